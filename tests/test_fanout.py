"""The fan-out over Ray: local workers give the serial run's tensors bit for bit (torch.equal), in input
order, and resume; --workers / --ray-address never enter a cache key; without Ray, --workers 2 is one
`error:` line and --workers 1 never imports it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from procrustes_onnx.compiler.allocate import build_ladders, plan_curvature
from procrustes_onnx.compiler.compress import compress_model, rotate_solved, solve_positions
from procrustes_onnx.compiler.config import CompressionConfig
from procrustes_onnx.ops.project_gs import project_gs_weighted
from procrustes_onnx.compiler.fanout import Fanout, fan_out, map_threads
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.testing import tiny_compression_config, tiny_model

ray = pytest.importorskip("ray")  # in the test extra; skipped only where someone installed without it

CALIB = torch.randint(0, 256, (6000,), generator=torch.Generator().manual_seed(2))
TWO = Fanout(workers=2)


@pytest.fixture(scope="module", autouse=True)
def _ray_instance():
    """One local Ray instance for the module (starting one takes seconds), stopped afterwards."""
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_fan_out_returns_serial_results_in_input_order():
    gen = torch.Generator().manual_seed(0)
    items = [(torch.randn(40, 30 + i, dtype=torch.float64, generator=gen),
              torch.randn(20, 30 + i, dtype=torch.float64, generator=gen)) for i in range(5)]
    shared = {"bias": torch.rand(20, dtype=torch.float64, generator=gen)}   # linear(x, w, bias=b)
    seen: list[int] = []
    serial = fan_out(torch.nn.functional.linear, items, shared=shared)
    on_ray = fan_out(torch.nn.functional.linear, iter(items), TWO, shared=shared,
                     on_result=lambda i, _: seen.append(i))
    assert len(on_ray) == len(serial) == 5 and sorted(seen) == list(range(5))
    assert all(torch.equal(a, b) for a, b in zip(serial, on_ray))


def _compress(config: CompressionConfig, work) -> dict[str, torch.Tensor]:
    model = tiny_model("llama")
    compress_model(model, None, config, work, progress=False, echo=lambda s: None, calib_tokens=CALIB)
    return model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def test_map_threads_is_the_serial_one_thread_loop_bit_for_bit():
    """Weighted GS projections (LAPACK and GEMMs) side by side on 3 threads give exactly what one thread gives
    one after another, in input order, and the caller's torch thread count is restored."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 48, generator=gen, dtype=torch.float64)
    gram = x.T @ x
    mats = [torch.randn(48, 40, generator=gen, dtype=torch.float64) for _ in range(6)]
    project = lambda m: project_gs_weighted(m, gram, 4, 12, 6, 4, 6, 10)   # noqa: E731
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = [project(m) for m in mats]
    finally:
        torch.set_num_threads(before)
    threaded = map_threads(project, mats, width=3)
    assert torch.get_num_threads() == before
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, threaded))
    assert map_threads(lambda i: i * i, range(7), width=2) == [i * i for i in range(7)]


def test_per_position_measured_compression_on_two_workers_is_bitwise_serial(tmp_path):
    """Both fan-outs: the per-position solves and the loss ladders of the measured allocation."""
    kw = dict(rotation="per-position", structure="gs", ratio=0.2, preset=None, allocation="measured")
    serial = _compress(tiny_compression_config(**kw), tmp_path / "serial")
    parallel = _compress(tiny_compression_config(**kw, workers=2), tmp_path / "ray")
    assert _same(serial, parallel)
    # the per-group resume files are the same bytes, and a serial rerun resumes the Ray run's work/
    for path in sorted((tmp_path / "serial").glob("pos*.safetensors")):
        assert path.read_bytes() == (tmp_path / "ray" / path.name).read_bytes()
    assert _same(_compress(tiny_compression_config(**kw), tmp_path / "ray"), serial)


@torch.no_grad()
def test_build_ladders_on_two_workers_equal_serial(tmp_path):
    """Under a global rotation there is one solve, but every planned linear's ladder is its own item."""
    from procrustes_onnx.compiler.compress import count_params, plan_for_model
    from procrustes_onnx.compiler.fusion import fuse_norms
    from procrustes_onnx.compiler.positions import residual_positions

    config = tiny_compression_config(structure="kron", method="frobenius")
    model = tiny_model("llama")
    original = count_params(model)
    fuse_norms(model)
    plan = plan_for_model(model, config, original)
    specs = {e.path: e.spec for e in plan.entries}
    rs, factors = solve_positions(model, residual_positions(model), specs, config, tmp_path, {}, False)
    rotate_solved(model, rs, "global")
    grams, fishers = plan_curvature(model, plan, CALIB[:2048].view(-1, 64), config.damp, progress=False)
    args = (model, plan, factors, grams, fishers)
    serial = build_ladders(*args, progress=False)
    parallel = build_ladders(*args, progress=False, fanout=TWO)
    assert [lad.path for lad in parallel] == [e.path for e in plan.entries]
    for a, b in zip(serial, parallel):
        assert [(o.label, o.params, o.price) for o in a.options] == [(o.label, o.params, o.price) for o in b.options]
        for oa, ob in zip(a.options, b.options):
            assert (oa.factors is None) == (ob.factors is None)
            assert oa.factors is None or all(torch.equal(oa.factors[k], ob.factors[k]) for k in oa.factors)


def test_workers_and_address_are_not_settings(tmp_path):
    """They change how, not what: equality (the resume check), settings() (cache keys, the checkpoint's
    record) and the saved work config leave them out."""
    a, b = CompressionConfig(), CompressionConfig(workers=4, ray_address="auto")
    assert a == b and a.settings() == b.settings() and "workers" not in b.settings()
    assert b.fanout == Fanout(4, "auto")
    b.save(tmp_path / "c.json")
    assert "workers" not in (tmp_path / "c.json").read_text()
    with pytest.raises(UserError, match="--workers 0 is too small"):
        CompressionConfig(workers=0)


def test_main_job_cache_key_ignores_workers():
    from procrustes_onnx.pipeline_options import RunOptions
    from procrustes_onnx.stages.compress import compression_config

    serial = compression_config(RunOptions(), "w-gs")
    parallel = compression_config(RunOptions(workers=2, ray_address="auto"), "w-gs")
    assert parallel.workers == 2 and parallel.settings() == serial.settings()


def test_without_ray_workers_is_one_error_line_and_serial_needs_no_ray(monkeypatch, capsys):
    from procrustes_onnx.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(UserError, match=r"--workers 2 needs Ray.*pip install 'procrustes-onnx\[ray\]'"):
        Fanout(workers=2).check()
    assert main(["compress", "--model", "nowhere", "--out", "nowhere-ck", "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --workers 2 needs Ray"), err
    Fanout().check()
    assert fan_out(torch.mm, [(torch.eye(2), torch.ones(2, 2))])[0].tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("address, said", [("127.0.0.1:1", "nothing answers there"), ("garbage", "not host:port"),
                                           ("ray://127.0.0.1:1", "nothing answers there")])
def test_a_bad_ray_address_is_one_line_at_once(address, said):
    """Ray itself retries a wrong address for minutes; the check says so in one line before any work."""
    with pytest.raises(UserError, match=said):
        Fanout(workers=2, address=address).check()


def test_serial_compress_never_imports_ray(tmp_path):
    code = ("import sys; from procrustes_onnx.compiler.compress import compress_model; "
            "from procrustes_onnx.testing import tiny_compression_config, tiny_model; "
            "compress_model(tiny_model(), None, tiny_compression_config(rotation='per-position', method='frobenius'), "
            "sys.argv[1], progress=False, echo=lambda s: None); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "work")], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip().splitlines()[-1] == "False"
