"""Healing on tiny random models: it lowers the KL to the teacher on held-out tokens, keeps the structure
(names, shapes, count, Cayley skips), exports exactly, resumes to the same weights, and refuses bad values."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from procrustes_onnx.cli import main as cli
from procrustes_onnx.compiler.checkpoint import load_compressed, save_compressed
from procrustes_onnx.compiler.compress import compress, saved_param_count
from procrustes_onnx.compiler.fake_quant import WeightQuant, quant_targets, quantized_weights, rtn_blockwise
from procrustes_onnx.compiler.heal import (HealConfig, heal_checkpoint, heal_model, healed_precision, stream_bases,
                                           topk_kl)
from procrustes_onnx.compiler.slicegpt import slice_model
from procrustes_onnx.testing import relative_error, tiny_compression_config, tiny_model, tiny_tokenizer

GEN = torch.Generator().manual_seed(3)
CALIB = torch.randint(0, 256, (6000,), generator=GEN)
TRAIN = torch.randint(0, 256, (48, 32), generator=GEN)
HELD = torch.randint(0, 256, (8, 32), generator=GEN)
TEST = torch.randint(0, 256, (8, 32), generator=GEN)
quiet = dict(progress=False, echo=lambda s: None)


def _teacher_student(tmp_path, **overrides):
    """A tiny Llama (the teacher) and its compressed checkpoint folder."""
    teacher = tiny_model("llama", vocab=264)
    with torch.no_grad():  # a final norm 30x larger: sharper next-token laws than a random model's near-uniform ones
        teacher.model.norm.weight.mul_(30)
    student = copy.deepcopy(teacher)
    kw = dict(ratio=0.3, preset=None, structure="gs") | overrides
    if kw.get("method") == "slicegpt":
        slice_model(student, CALIB[:4096].view(-1, 32)[:16], ratio=0.2,
                    original_params=sum(p.numel() for p in student.parameters()))
        save_compressed(student, tmp_path / "ck", tokenizer=tiny_tokenizer())
    else:
        compress(student, tiny_tokenizer(), tiny_compression_config(**kw), tmp_path / "ck", calib_tokens=CALIB,
                 **quiet)
    return teacher, tmp_path / "ck"


def _kl(student, teacher, ids=TEST) -> float:
    with torch.no_grad():
        logp, idx = torch.log_softmax(teacher(ids).logits, -1).topk(64, -1)
        return float(topk_kl(student(ids).logits, logp, idx))


def _config(mode: str, **kw) -> HealConfig:
    base = dict(tokens=TRAIN.numel(), mode=mode, seq_len=32, batch_size=4, epochs=3, heldout_tokens=HELD.numel(),
                lr=1e-3, threads=1, eval_every=4)
    return HealConfig(**(base | kw))


KRON_HALF = {"rotation": "per-position", "structure": "kron", "ratio": 0.5}


# every mode on every variant, but e2e on KRON_HALF, which overfits (test_early_stopping_never_returns_a_worse_model)
HEALING_CASES = [(mode, variant) for variant in ({"rotation": "global"}, KRON_HALF, {"method": "slicegpt"})
                 for mode in ("blockwise", "e2e") if not (mode == "e2e" and variant is KRON_HALF)]


@pytest.mark.parametrize("mode,variant", HEALING_CASES)
def test_healing_lowers_kl_on_unseen_tokens(tmp_path, mode, variant):
    teacher, ck = _teacher_student(tmp_path, **variant)
    student, _ = load_compressed(ck)
    before = _kl(student, teacher)
    report = heal_model(student, teacher, None, _config(mode, lr=1e-3 if mode == "blockwise" else 1e-4),
                        tmp_path / "work", windows=(TRAIN, HELD), **quiet)
    assert report.heldout_after < 0.97 * report.heldout_before
    assert _kl(student, teacher) < 0.9 * before  # on tokens neither training nor early stopping saw


def test_early_stopping_never_returns_a_worse_model(tmp_path):
    """At 50% Kronecker the tiny student overfits 1,536 random tokens end to end: its training KL falls while
    the held-out KL rises from the first score on (how soon depends on the CPU's rounding). Healing must then
    hand back the best weights it scored, the unhealed ones at worst, never the last ones."""
    teacher, ck = _teacher_student(tmp_path, **KRON_HALF)
    student, _ = load_compressed(ck)
    report = heal_model(student, teacher, None, _config("e2e", lr=1e-3), tmp_path / "work", windows=(TRAIN, HELD),
                        **quiet)
    scores = [r["heldout_kl"] for r in report.history if "heldout_kl" in r]
    assert scores[-1] > 1.2 * report.heldout_before  # the run did overfit ...
    assert report.heldout_after == pytest.approx(min([report.heldout_before, *scores]), rel=1e-6)  # ... and kept the best
    assert _kl(student, teacher, HELD) == pytest.approx(report.heldout_after, rel=1e-3)


def test_quantization_aware_healing_beats_plain_healing_once_rounded(tmp_path):
    """Healed through the int4 rounding, the student is closer to the teacher after `export --quantize int4`
    (simulated exactly: tests/test_fake_quant.py) than the same healing without it, and its float weights
    (what the checkpoint stores) are not themselves on the int4 grid."""
    teacher, ck = _teacher_student(tmp_path, rotation="global")
    quant = WeightQuant(bits=4, block_size=16)
    rounded_kl, reports = {}, {}
    for q in ("none", "int4"):
        student, _ = load_compressed(ck)
        reports[q] = heal_model(student, teacher, None, _config("e2e", lr=1e-4, quantize=q, quantize_block=16),
                                tmp_path / f"w-{q}", windows=(TRAIN, HELD), **quiet)
        targets = quant_targets(student, quant)
        with quantized_weights(targets, quant):
            rounded_kl[q] = _kl(student, teacher)
    assert targets and rounded_kl["int4"] < 0.95 * rounded_kl["none"], rounded_kl
    assert reports["int4"].heldout_after < reports["int4"].heldout_before
    trained = next(t for t in targets if t.param.requires_grad is False and "embed" not in t.name)
    stored = trained.param.detach().contiguous().view(-1)[trained.index.long()]
    assert not torch.equal(rtn_blockwise(stored, quant), stored)


@pytest.mark.parametrize("variant", [{"rotation": "global", "preset": "full", "ratio": None},
                                     {"rotation": "per-position", "preset": "full", "ratio": None}])
def test_basis_map_is_exact_for_a_lossless_compression(tmp_path, variant):
    """At full rank the compressed model is the dense one rotated: every layer's blockwise loss starts at 0,
    which holds only if the recovered stream bases are the true rotations."""
    teacher, ck = _teacher_student(tmp_path, **variant)
    student, _ = load_compressed(ck)
    bases = stream_bases(student, teacher)
    assert all(q is not None for q in bases)
    report = heal_model(student, teacher, None, _config("blockwise", epochs=1), tmp_path / "w", windows=(TRAIN, HELD),
                        **quiet)
    assert max(r["heldout_before"] for r in report.history) < 1e-8


def test_healed_checkpoint_keeps_structure_and_exports_exactly(tmp_path):
    from procrustes_onnx.exporters.pipeline import export_compressed, ort_logits

    teacher, ck = _teacher_student(tmp_path, rotation="per-position")
    out = heal_checkpoint(ck, tmp_path / "healed", teacher, tiny_tokenizer(), _config("blockwise", epochs=1, tokens=512,
                          heldout_tokens=256, text=str(_text_file(tmp_path))), **quiet)
    a, b = load_file(str(ck / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert saved_param_count(out) == saved_param_count(ck)
    assert any("cayley" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if "embed_tokens" in k or "signs" in k)    # frozen by design
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if "cayley_upper" in k)     # (re-encoded, same skip)
    assert any(not torch.equal(a[k], b[k]) for k in a if ".matrix." in k)                   # the factors trained
    assert not (tmp_path / ".healed.heal-work").exists()
    healing = json.loads((out / "config.json").read_text())["procrustes"]["healing"]
    assert healing[-1]["report"]["tokens"] == 512
    healed, _ = load_compressed(out)
    onnx = export_compressed(out, tmp_path / "onnx")
    onnx = onnx if onnx.suffix == ".onnx" else onnx / "model.onnx"
    ids = TEST[:2, :12]
    with torch.no_grad():
        ref = healed(ids).logits
    got = torch.from_numpy(ort_logits(onnx, ids.numpy()))
    assert relative_error(got, ref) < 1e-5


def _text_file(tmp_path):
    path = tmp_path / "train.txt"
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxing frogs".split()
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (4000,), generator=g).tolist()))
    return path


@pytest.mark.parametrize("mode, older_version", [("blockwise", False), ("e2e", False), ("e2e", True)])
def test_resume_after_a_kill_gives_the_same_weights(tmp_path, mode, older_version, monkeypatch):
    """``older_version``: the state was left by a version without the quantize settings (at their defaults)."""
    teacher, ck = _teacher_student(tmp_path, rotation="global")
    config = _config(mode, patience=100)
    optimizer = torch.optim.Adam if mode == "blockwise" else torch.optim.AdamW
    real_step, calls = optimizer.step, {"n": 0, "kill_at": None}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(optimizer, "step", step)
    whole, _ = load_compressed(ck)
    heal_model(whole, teacher, None, config, tmp_path / "w1", windows=(TRAIN, HELD), **quiet)
    uninterrupted = calls["n"]

    calls.update(n=0, kill_at=50 if mode == "blockwise" else 22)  # inside layer 1 / between two saved states
    resumed, _ = load_compressed(ck)
    with pytest.raises(KeyboardInterrupt):
        heal_model(resumed, teacher, None, config, tmp_path / "w2", windows=(TRAIN, HELD), **quiet)
    if older_version:
        saved = tmp_path / "w2" / "heal-config.json"
        settings = json.loads(saved.read_text())
        del settings["quantize"], settings["quantize_block"]
        saved.write_text(json.dumps(settings))
    calls.update(n=0, kill_at=None)
    resumed, _ = load_compressed(ck)
    heal_model(resumed, teacher, None, config, tmp_path / "w2", windows=(TRAIN, HELD), **quiet)
    assert calls["n"] < uninterrupted  # it resumed rather than starting over
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_zero_tokens_is_a_no_op(tmp_path):
    teacher, ck = _teacher_student(tmp_path)
    out = heal_checkpoint(ck, tmp_path / "same", teacher, tiny_tokenizer(), _config("e2e", tokens=0), **quiet)
    a, b = load_file(str(ck / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_values_are_one_line_errors(tmp_path, capsys):
    from procrustes_onnx.testing import save_tiny_model

    dense = save_tiny_model(tmp_path / "dense")
    capsys.readouterr()
    cases = [
        (["heal", "--checkpoint", str(dense), "--model", str(dense), "--out", str(tmp_path / "o"), "--heal-tokens", "-5"],
         "--heal-tokens -5 is negative"),
        (["heal", "--checkpoint", str(dense), "--model", str(dense), "--out", str(tmp_path / "o")],
         "is not a compressed checkpoint"),
        (["heal", "--checkpoint", str(dense), "--model", str(dense), "--out", str(tmp_path / "o"),
          "--heal-text", "jargon"], "first 102,400 tokens"),
        (["heal", "--checkpoint", str(dense), "--model", str(dense), "--out", str(tmp_path / "o"),
          "--heal-batch-size", "0"], "--heal-batch-size 0 must be at least 1"),
        (["heal", "--checkpoint", str(dense), "--model", str(dense), "--out", str(tmp_path / "o"),
          "--heal-quantize", "int4", "--heal-mode", "blockwise"], "add --heal-mode e2e"),
        (["heal", "--checkpoint", str(dense), "--model", str(dense), "--out", str(tmp_path / "o"),
          "--heal-quantize", "int4", "--heal-quantize-block", "24"], "must be a power of two"),
    ]
    for argv, fragment in cases:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and fragment in err and "\n" not in err, err
        assert not (tmp_path / "o").exists()


@pytest.mark.gpu
def test_healing_on_cuda_lowers_kl(tmp_path):
    teacher, ck = _teacher_student(tmp_path, rotation="global")
    student, _ = load_compressed(ck)
    before = _kl(student, teacher)
    heal_model(student, teacher, None, _config("blockwise", lr=1e-3, device="cuda"), tmp_path / "w",
               windows=(TRAIN, HELD), **quiet)
    assert next(student.parameters()).device.type == "cpu"  # handed back where it came from
    assert _kl(student, teacher) < before


def test_state_left_by_other_settings_is_not_resumed(tmp_path):
    teacher, ck = _teacher_student(tmp_path)
    runs = {}
    for name, lr, work in (("first", 1e-3, "w"), ("other", 1e-4, "w"), ("fresh", 1e-4, "fresh")):
        runs[name], _ = load_compressed(ck)
        heal_model(runs[name], teacher, None, _config("blockwise", lr=lr, epochs=1), tmp_path / work,
                   windows=(TRAIN, HELD), **quiet)
    for p, q, r in zip(runs["other"].parameters(), runs["fresh"].parameters(), runs["first"].parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, r) for p, r in zip(runs["other"].parameters(), runs["first"].parameters()))


def test_state_left_by_another_starting_checkpoint_is_not_resumed(tmp_path, monkeypatch):
    """A killed heal of checkpoint A leaves its state in ``work``; healing checkpoint B there starts afresh
    (resuming would hand back A's weights under B's name)."""
    teacher, ck = _teacher_student(tmp_path, rotation="global")
    config = _config("e2e", patience=100)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 22:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    first, _ = load_compressed(ck)
    with pytest.raises(KeyboardInterrupt):
        heal_model(first, teacher, None, config, tmp_path / "w", windows=(TRAIN, HELD), **quiet)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    runs = {}
    for name, work in (("other", "w"), ("fresh", "fresh")):
        runs[name], _ = load_compressed(ck)
        with torch.no_grad():
            next(runs[name].parameters()).mul_(0.5)  # checkpoint B: another starting point
        heal_model(runs[name], teacher, None, config, tmp_path / work, windows=(TRAIN, HELD), **quiet)
    for p, q in zip(runs["other"].parameters(), runs["fresh"].parameters()):
        assert torch.equal(p, q)


def test_export_says_when_its_precision_is_not_the_one_healed_for(tmp_path, capsys):
    teacher, ck = _teacher_student(tmp_path, rotation="global")
    out = heal_checkpoint(ck, tmp_path / "healed", teacher, tiny_tokenizer(),
                          _config("e2e", epochs=1, tokens=256, heldout_tokens=128, quantize="int4", quantize_block=16,
                                  text=str(_text_file(tmp_path))), **quiet)
    assert healed_precision(out) == ("int4", 16, True) and healed_precision(ck) is None
    capsys.readouterr()
    assert cli(["export", "--checkpoint", str(out), "--out", str(tmp_path / "fp32")]) == 0
    assert "healed for int4 block 16" in capsys.readouterr().err
    assert cli(["export", "--checkpoint", str(out), "--out", str(tmp_path / "q"), "--quantize", "int4",
                "--quantize-block", "16"]) == 0
    assert "healed for" not in capsys.readouterr().err


def test_teacher_sampled_text_is_deterministic_cached_and_heals(tmp_path):
    from procrustes_onnx.compiler.teacher_text import sample_teacher_windows

    teacher, ck = _teacher_student(tmp_path, rotation="global")
    a = sample_teacher_windows(teacher, "t", 6, 2, 24, seed=0, cache=tmp_path / "c", batch=4, progress=False)
    assert a[0].shape == (6, 24) and a[1].shape == (2, 24) and len(list((tmp_path / "c").iterdir())) == 1
    c = sample_teacher_windows(teacher, "t", 6, 2, 24, seed=0, cache=None, batch=4, progress=False)
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])                     # same seed, same text
    assert not torch.equal(a[0][:2], a[1])                                         # held-out is other text
    student, _ = load_compressed(ck)
    before = _kl(student, teacher)
    report = heal_model(student, teacher, None, _config("e2e", lr=1e-4, text="teacher", tokens=48 * 32),
                        tmp_path / "w", teacher_cache=tmp_path / "c", **quiet)
    assert report.heldout_after < report.heldout_before
    assert _kl(student, teacher) < before
    assert len(list((tmp_path / "c").glob("teacher-text-*"))) == 2
