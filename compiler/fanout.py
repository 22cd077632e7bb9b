"""Independent work items run here one after another, or on Ray (an existing engine: local workers or a
cluster), never on a scheduler of our own. The items are calls of one pure, module-level function on
tensors and plain values, each under the same torch thread count wherever it runs, so a worker computes
exactly what the serial loop computes, bit for bit (`tests/test_fanout.py`).

Ray is imported only when it is asked for (``workers > 1`` or an address): the serial path needs none.
"""

from __future__ import annotations

import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from procrustes_onnx.core.errors import UserError

__all__ = ["Fanout", "fan_out", "require_ray", "default_workers", "map_threads", "one_torch_thread"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'procrustes-onnx[ray]'"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Fanout:
    """Where independent items run: ``workers`` at once (1: serially, here), on a local Ray instance or,
    with ``address``, on the Ray cluster there. Every item runs with ``threads`` torch threads, serially
    too: results depend on the thread count (float sums split differently), so the count must not follow
    the number of workers; parallelism comes from running items side by side, workers x threads CPUs."""

    workers: int = 1
    address: str | None = None
    threads: int = 1

    @property
    def parallel(self) -> bool:
        return self.workers > 1 or self.address is not None

    def check(self) -> None:
        """Fail now, in one line, if the settings are bad or Ray is asked for but missing (before slow work)."""
        if self.workers < 1 or self.parallel:
            require_ray(self)
        if self.address is not None:
            _check_reachable(self.address)


def default_workers() -> int:
    """The main job's default: one worker per CPU when Ray is installed, else 1 (serial, no Ray). The
    result does not depend on it; serial items run on one torch thread, so without it a 2-core machine
    solves its loss ladders on one core."""
    import importlib.util

    cpus = os.cpu_count() or 1
    return cpus if cpus > 1 and importlib.util.find_spec("ray") is not None else 1


def require_ray(fanout: Fanout):
    """The ray module, or a one-line UserError saying how to get it (before any slow work)."""
    if fanout.workers < 1:
        raise UserError(f"--workers {fanout.workers} is too small: it must be at least 1 (1: no Ray)")
    try:
        import ray
    except ImportError:
        flag = f"--ray-address {fanout.address}" if fanout.address else f"--workers {fanout.workers}"
        raise UserError(f"{flag} needs Ray, which is not installed: {INSTALL_HINT}, or use --workers 1") from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line error if nothing answers at a ``host:port`` (or ``ray://host:port``) address: Ray itself
    retries a wrong one for minutes. "auto" and "local" are Ray's to resolve."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not host:port (or ray://host:port, or auto): pass the "
                        "address the Ray head printed")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"--ray-address {address}: nothing answers there ({exc.strerror or type(exc).__name__}): "
                        "start the cluster (ray start --head) or fix the address") from None


def _start(ray, fanout: Fanout) -> None:
    """Join the cluster at ``address``, or start a local instance with room for workers x threads CPUs;
    an instance this process already started (or joined) is reused."""
    if ray.is_initialized():
        return
    kw: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    try:
        if fanout.address is not None:
            _check_reachable(fanout.address)
            ray.init(address=fanout.address, **kw)
        else:
            cpus = fanout.workers * fanout.threads
            if cpus > (os.cpu_count() or 1):
                log.warning("--workers %d x %d threads exceeds this machine's %d CPUs: the items will share "
                            "cores", fanout.workers, fanout.threads, os.cpu_count())
            ray.init(num_cpus=cpus, **kw)
    except (ConnectionError, ValueError, RuntimeError) as exc:  # no cluster there, a malformed address
        where = f"the Ray cluster at {fanout.address}" if fanout.address else "a local Ray instance"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"could not start {where} ({first}): check --ray-address, or use --workers 1") from None


def _run_item(fn: Callable, threads: int, item: tuple, **shared) -> Any:
    """One item, with the thread count fixed so the result does not depend on where it ran."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return fn(*item, **shared)
    finally:
        torch.set_num_threads(before)


def fan_out(fn: Callable, items: Iterable[tuple], fanout: Fanout = Fanout(), *, shared: dict | None = None,
            on_result: Callable[[int, Any], None] | None = None) -> list:
    """``[fn(*item, **shared) for item in items]``, serially or on Ray, in input order.

    ``shared``: keyword arguments common to every item, put into Ray's object store once. ``on_result(i,
    result)`` runs here as each result arrives (in input order serially, in completion order on Ray), e.g.
    to save it so that a killed run resumes. At most ``workers`` items are in flight, so the store holds
    the inputs of those only (Ray's pattern for limiting pending tasks)."""
    shared = dict(shared or {})
    if not fanout.parallel:
        results = []
        for i, item in enumerate(items):
            results.append(_run_item(fn, fanout.threads, item, **shared))
            if on_result is not None:
                on_result(i, results[-1])
        return results
    ray = require_ray(fanout)
    _start(ray, fanout)
    remote = ray.remote(_run_item).options(num_cpus=fanout.threads, max_retries=0)
    shared_refs = {k: ray.put(v) for k, v in shared.items()}   # top-level refs: Ray passes their values
    results: dict[int, Any] = {}
    pending: dict[Any, int] = {}

    def collect(ready: Sequence) -> None:
        for ref in ready:
            i = pending.pop(ref)
            results[i] = ray.get(ref)
            if on_result is not None:
                on_result(i, results[i])

    try:
        for i, item in enumerate(items):
            if len(pending) >= fanout.workers:
                collect(ray.wait(list(pending), num_returns=1)[0])
            pending[remote.remote(fn, fanout.threads, item, **shared_refs)] = i
        while pending:
            collect(ray.wait(list(pending), num_returns=1)[0])
    except BaseException:  # a failed item or a Ctrl-C: the others stop too (finished ones were handed over)
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return [results[i] for i in range(len(results))]


def map_threads(fn: Callable[[T], R], items: Iterable[T], width: int | None = None) -> list[R]:
    """``[fn(x) for x in items]`` in order, on ``width`` Python threads (default: this thread's torch thread
    count), each item's torch ops on one thread, so the result is the serial one-thread loop's, bit for bit,
    whatever ``width``. For the many small independent projections of one in-process solve (the global
    rotation): torch releases the GIL in its kernels, so they run side by side, where intra-op threads barely
    help small LAPACK calls and stall when another process holds a core (a batched 144 x 384 SVD: 0.1 s on one
    thread, 1.6 s on two under load)."""
    items = list(items)
    width = min(width or torch.get_num_threads(), len(items))
    with one_torch_thread():
        if width <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(width, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """This thread's torch ops on one intra-op thread inside the block: how `map_threads` runs each item, so a
    loop that runs the same item elsewhere (an out-of-core solve) gets its bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
