"""Wall time of the fanned-out work, serial vs Ray workers, on a small random Llama (nothing downloaded).

Per-position W-GS with measured allocation: the two fan-outs are the per-position solves and the loss
ladders. Each run is checked bitwise against the serial one (torch.equal on every tensor). Writes
docs/results/fanout.json; docs/scale.md reports it."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from procrustes_onnx.compiler import allocate, compress
from procrustes_onnx.core.environment import package_versions, write_results
from procrustes_onnx.testing import tiny_compression_config, tiny_model


def timed(module, name: str, seconds: dict):
    """Wrap ``module.name`` so each call adds its wall time to ``seconds[name]``."""
    real = getattr(module, name)

    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t
    setattr(module, name, wrapper)
    return real


def run(workers: int, args) -> tuple[dict, dict[str, torch.Tensor]]:
    config = tiny_compression_config(rotation="per-position", structure="gs", ratio=0.2, preset=None,
                                     allocation="measured", iterations=args.iterations,
                                     rotation_iters=args.rotation_iters, calib_samples=8, calib_seq_len=128,
                                     workers=workers)
    model = tiny_model("llama", hidden=args.hidden, layers=args.layers, vocab=256)
    calib = torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(2))
    seconds: dict[str, float] = {}
    reals = [(compress, "solve_positions", timed(compress, "solve_positions", seconds)),
             (allocate, "build_ladders", timed(allocate, "build_ladders", seconds))]
    t = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as work:
            compress.compress_model(model, None, config, work, progress=False, echo=lambda s: None,
                                    calib_tokens=calib)
    finally:
        for module, name, real in reals:
            setattr(module, name, real)
    row = {"workers": workers, "total_s": round(time.perf_counter() - t, 2),
           **{f"{k}_s": round(v, 2) for k, v in seconds.items()}}
    return row, {k: v.clone() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--rotation-iters", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--out", default="docs/results/fanout.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the driver's own (serial) parts on one thread, as every item runs
    rows, (serial_row, serial) = [], run(1, args)
    rows.append(serial_row)
    print(serial_row, flush=True)
    for workers in args.workers:
        for attempt in ("cold", "warm"):  # cold: the first run starts Ray and its workers
            row, tensors = run(workers, args)
            row.update(ray=attempt, bitwise_equal=all(torch.equal(serial[k], tensors[k]) for k in serial))
            rows.append(row)
            print(row, flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    write_results(args.out, {"model": f"random llama hidden {args.hidden}, {args.layers} layers", "rows": rows,
                             "load_average_1_5_15": load, "ray": package_versions(("ray",))["ray"]})
    print(args.out)


if __name__ == "__main__":
    main()
