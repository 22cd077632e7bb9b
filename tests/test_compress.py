"""compress() on tiny random models: lossless at full rank, exact parameter promise, resume == uninterrupted."""

from __future__ import annotations

import shutil

import pytest
import torch

from procrustes_onnx.compiler.checkpoint import load_compressed
from procrustes_onnx.compiler.compress import compress, compress_model, saved_param_count
from procrustes_onnx.compiler.config import CompressionConfig
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import StructuredLinear
from procrustes_onnx.testing import relative_error, tiny_compression_config, tiny_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2))




cfg = tiny_compression_config
rel = relative_error


@torch.no_grad()
@pytest.mark.parametrize("arch,rotation,structure", [("llama", "global", "kron"), ("llama", "per-position", "gs"),
                                                     ("opt", "per-position", "kron"), ("qwen2", "global", "gs")])
def test_full_rank_structure_is_lossless(tmp_path, arch, rotation, structure):
    model = tiny_model(arch, dtype=torch.float64)
    model.config._attn_implementation = "eager"
    ref = model(IDS).logits
    compress_model(model, None, cfg(preset="full", rotation=rotation, structure=structure), tmp_path,
                   progress=False, echo=lambda s: None, calib_tokens=CALIB)
    expected = 10 if arch == "opt" else 12  # q,k,o,(gate),up/fc1,down/fc2 in 2 layers; v dense
    assert sum(isinstance(m, StructuredLinear) for m in model.modules()) == expected
    # float64 end to end; HF's RMSNorm computes in float32, hence 1e-6 rather than 1e-12
    assert rel(model(IDS).logits, ref) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("rotation,structure,method", [("global", "kron", "weighted"),
                                                       ("per-position", "gs", "frobenius")])
def test_promised_params_equal_saved(tmp_path, rotation, structure, method):
    model = tiny_model("llama")
    ref = model(IDS).logits
    lines = []
    out = compress(model, None, cfg(ratio=0.15, preset=None, rotation=rotation, structure=structure,
                                    method=method), tmp_path / "ckpt", progress=False, echo=lines.append,
                   calib_tokens=CALIB)
    plan_line = lines[0]
    assert "role" in plan_line and "removed" in plan_line  # the plan table is printed first
    import json
    extra = json.loads((out / "config.json").read_text())["procrustes"]
    promised = extra["promised_params"] if "promised_params" in extra else None
    saved = saved_param_count(out)
    assert promised == saved
    assert abs(1 - saved / extra["original_params"] - 0.15) < 0.02
    assert not (out / "work").exists()
    loaded, _ = load_compressed(out)
    got = loaded(IDS).logits
    assert rel(got, model(IDS).logits) < 1e-5  # the checkpoint reproduces the compressed model
    assert 0.0 < rel(got, ref) < 1.0           # lossy but not garbage on a random model


@torch.no_grad()
def test_resume_after_kill_matches_uninterrupted(tmp_path, monkeypatch):
    config = cfg(rotation="per-position", structure="kron")
    full = tiny_model("llama")
    compress_model(full, None, config, tmp_path / "a", progress=False, echo=lambda s: None, calib_tokens=CALIB)

    import procrustes_onnx.compiler.compress as driver
    calls = {"n": 0}
    real = driver.solve_group

    def dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the "kill" after two positions were checkpointed
        return real(*args, **kw)

    monkeypatch.setattr(driver, "solve_group", dying)
    with pytest.raises(KeyboardInterrupt):
        compress_model(tiny_model("llama"), None, config, tmp_path / "b", progress=False, echo=lambda s: None,
                       calib_tokens=CALIB)
    assert len(list((tmp_path / "b").glob("pos*.safetensors"))) == 2
    monkeypatch.setattr(driver, "solve_group", real)
    with pytest.raises(UserError, match="partial run of another model"):  # its rotations are not this model's
        compress_model(tiny_model("llama", seed=1), None, config, tmp_path / "b", progress=False, echo=lambda s: None,
                       calib_tokens=CALIB)
    resumed = tiny_model("llama")
    compress_model(resumed, None, config, tmp_path / "b", progress=False, echo=lambda s: None, calib_tokens=CALIB)
    assert torch.equal(resumed(IDS).logits, full(IDS).logits)

    with pytest.raises(UserError):  # a different config must not reuse the partial run
        compress_model(tiny_model("llama"), None, cfg(rotation="global"), tmp_path / "b", progress=False,
                       echo=lambda s: None, calib_tokens=CALIB)


def test_config_round_trip_and_errors(tmp_path):
    c = cfg(structures={"down": "gs"}, dense_layers=[1])
    c.save(tmp_path / "c.json")
    assert CompressionConfig.load(tmp_path / "c.json") == c
    assert c.structure_of("down", 0) == "gs" and c.structure_of("q", 1) == "dense" and c.structure_of("v") == "dense"
    for bad in (dict(ratio=0.2), dict(preset="7/8"), dict(structure="lowrank"), dict(rotation="local")):
        with pytest.raises(UserError):
            cfg(**bad)
    with pytest.raises(UserError):
        CompressionConfig.from_dict({"ratio": 0.2, "colour": "red"})


def test_calibration_text_can_skip_a_held_out_prefix(tmp_path):
    from procrustes_onnx.compiler.calibration import calibration_windows_for
    from procrustes_onnx.testing import tiny_tokenizer
    tok = tiny_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("a" * 3000 + "b" * 3000)
    n_a = len(tok("a" * 3000, add_special_tokens=False)["input_ids"])
    windows = calibration_windows_for(tok, cfg(calib_text=f"{text}@{n_a}", calib_samples=6, calib_seq_len=64))
    assert windows.shape == (6, 64)
    b_id = tok("b", add_special_tokens=False)["input_ids"][0]
    assert bool((windows == b_id).all())  # nothing from the held-out prefix
    whole = calibration_windows_for(tok, cfg(calib_text=str(text), calib_samples=6, calib_seq_len=64))
    assert not bool((whole == b_id).all())
    with pytest.raises(UserError, match="fewer than one"):
        calibration_windows_for(tok, cfg(calib_text=f"{text}@{n_a + 2990}", calib_samples=2, calib_seq_len=64))


def test_fixed_kept_roles_and_ratio(tmp_path):
    from procrustes_onnx.compiler.compress import plan_for_model
    from procrustes_onnx.compiler.fusion import fuse_norms
    model = tiny_model("llama")
    from procrustes_onnx.compiler.compress import count_params
    original = count_params(model)
    fuse_norms(model)
    plan = plan_for_model(model, cfg(ratio=0.2, preset=None, kept={"q": 0.5, "k": 0.5}), original)
    assert abs(plan.removed - 0.2) < 0.02
    uniform = plan_for_model(model, cfg(ratio=0.2, preset=None), original)

    def shares(p, fixed: bool) -> list[float]:
        return [e.params / e.dense_params for e in p.entries if (e.role in ("q", "k")) == fixed]
    assert max(shares(plan, True)) < 0.55 and min(shares(uniform, True)) > 0.6
    assert sum(shares(plan, False)) > sum(shares(uniform, False))       # the rest keeps more
    with pytest.raises(UserError, match="kept fraction"):
        cfg(kept={"q": 1.5})


@torch.no_grad()
def test_frobenius_per_position_kron_runs_without_grams(tmp_path):
    # the last position holds one matrix; when ALS keeps its first iterate the solver re-projects it,
    # which once looked up a calibration Gram that Frobenius runs never collect (KeyError)
    model = tiny_model("llama")
    plan = compress_model(model, None, cfg(ratio=0.2, preset=None, rotation="per-position", structure="kron",
                                           method="frobenius"), tmp_path, progress=False, echo=lambda s: None,
                          calib_tokens=CALIB)
    assert sum(isinstance(m, StructuredLinear) for m in model.modules()) == len(plan.entries)


def test_device_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from procrustes_onnx.cli import main as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = tmp_path / "dense"
    tiny_model(layers=1, vocab=264).save_pretrained(folder)
    capsys.readouterr()
    for extra in ([], ["--stream", "--rotation", "per-position"]):
        assert cli(["compress", "--model", str(folder), "--out", str(tmp_path / "o"), "--ratio", "0.2",
                    "--device", "cuda", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --device cuda") and "sees no GPU" in err and "\n" not in err, err
        assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("rotation", ["global", "per-position"])
def test_compression_on_cuda_matches_cpu(tmp_path, rotation):
    """Gram sums and solves on the GPU: the same float64 math, so the same checkpoint up to rounding."""
    outs = {}
    for device in ("cpu", "cuda"):
        model = tiny_model(layers=2)
        compress_model(model, None, cfg(rotation=rotation, structure="gs", method="weighted", device=device),
                       tmp_path / device, progress=False, echo=lambda _: None, calib_tokens=CALIB)
        with torch.no_grad():
            outs[device] = model(IDS).logits
    assert rel(outs["cuda"], outs["cpu"]) < 1e-6


def test_resumed_group_is_read_into_aligned_tensors(tmp_path):
    """A resumed run rotates with the saved R: read with the allocator's 64-byte alignment, as the run that saved
    it held it (safetensors' own tensors are 16-byte aligned, and BLAS rounds some products differently there)."""
    from procrustes_onnx.compiler.solve import load_group, save_group

    save_group(tmp_path / "pos.safetensors", torch.eye(40, dtype=torch.float64),
               {"m.q": {"left": torch.ones(4, 10, 5), "right": torch.ones(4, 5, 10)}})
    r, factors = load_group(tmp_path / "pos.safetensors")
    assert torch.equal(r, torch.eye(40, dtype=torch.float64))
    assert all(t.data_ptr() % 64 == 0 for t in [r, *factors["m.q"].values()])
