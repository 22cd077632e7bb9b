"""Compressed checkpoint: save/load round-trip, generate(), stored parameter count, materialize_dense."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from procrustes_onnx.compiler.adapters import get_adapter, get_module
from procrustes_onnx.compiler.checkpoint import load_compressed, materialize_dense, replace_linear, save_compressed
from procrustes_onnx.compiler.fusion import fuse_norms
from procrustes_onnx.compiler.positions import residual_positions
from procrustes_onnx.compiler.rotation import random_orthogonal, rotate_global, rotate_per_position
from procrustes_onnx.compiler.skips import Shortcut, stored_parameter_count
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.ops import StructuredLinear, project_factors, structured_from_spec
from procrustes_onnx.testing import tiny_model


def _compressed(arch: str, mode: str, dtype: torch.dtype = torch.float32, tie: bool = True) -> nn.Module:
    """A tiny fused, rotated model whose q and down projections are Kronecker sums (rank 2 of 4)."""
    model = fuse_norms(tiny_model(arch, dtype=dtype, tie=tie))
    if mode == "global":
        rotate_global(model, random_orthogonal(64, seed=1))
    else:
        rotate_per_position(model, [random_orthogonal(64, seed=p) for p in range(5)])
    adapter = get_adapter(model)
    for ref, spec in ((adapter.linear(0, "q"), {"kind": "kron", "rank": 2, "a_shape": [4, 1], "b_shape": [16, 64]}),
                      (adapter.linear(1, "down"), {"kind": "kron", "rank": 2, "a_shape": [1, 4],
                                                   "b_shape": [get_module(model, adapter.linear(1, "down").path).in_features, 16]})):
        lin = get_module(model, ref.path)
        factors = project_factors(lin.weight.detach().T.double(), spec)
        matrix = structured_from_spec(spec, {k: v.to(dtype) for k, v in factors.items()}, dtype=dtype)
        replace_linear(model, ref.path, StructuredLinear(matrix, None if lin.bias is None else lin.bias.detach()))
    return model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(255)} | {"<unk>": 255}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w0")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))




@pytest.mark.parametrize("arch,mode", [("llama", "per-position"), ("qwen2", "global"), ("opt", "per-position")])
def test_round_trip_keeps_logits_and_generates(arch: str, mode: str, tmp_path) -> None:
    model = _compressed(arch, mode)
    ref = _logits(model, IDS)
    out = save_compressed(model, tmp_path / "ck", tokenizer=_tokenizer(), extra_config={"note": "test"})
    loaded, tok = load_compressed(out)
    assert float((_logits(loaded, IDS) - ref).norm() / ref.norm()) < 1e-5   # skips decoded from float32 Cayley
    assert isinstance(get_module(loaded, get_adapter(loaded).linear(0, "q").path), StructuredLinear)
    assert get_adapter(loaded).tied
    assert tok is not None and tok.convert_tokens_to_ids("w7") == 7
    assert json.loads((out / "config.json").read_text())["procrustes"]["note"] == "test"
    gen = loaded.generate(IDS[:1], max_new_tokens=6, do_sample=False)
    assert gen.shape == (1, 15)
    assert torch.equal(gen, model.generate(IDS[:1], max_new_tokens=6, do_sample=False))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]             # no temp folders left behind


def test_float64_round_trip_is_exact_and_skips_orthogonal(tmp_path) -> None:
    model = _compressed("llama", "per-position", dtype=torch.float64, tie=False)
    ref = _logits(model, IDS)
    loaded, tok = load_compressed(save_compressed(model, tmp_path / "ck"))
    assert tok is None
    assert float((_logits(loaded, IDS) - ref).norm() / ref.norm()) < 1e-12
    for m in loaded.modules():
        if isinstance(m, Shortcut):
            assert (m.weight.T @ m.weight - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-12


@pytest.mark.parametrize("mode", ["global", "per-position"])
def test_saved_numbers_equal_stored_parameter_count(mode: str, tmp_path) -> None:
    model = _compressed("opt", mode)
    out = save_compressed(model, tmp_path / "ck")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        saved = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
        names = list(f.keys())
    assert saved == stored_parameter_count(model) == json.loads((out / "structure.json").read_text())["stored_parameters"]
    assert not any(n.startswith("lm_head") for n in names)            # tied head stored once
    manifest = json.loads((out / "structure.json").read_text())
    assert len(manifest["shortcuts"]) == (0 if mode == "global" else 4)
    assert manifest["structured"]["model.decoder.layers.0.self_attn.q_proj"]["spec"]["rank"] == 2


def test_materialize_dense_keeps_logits() -> None:
    model = _compressed("llama", "per-position")
    ref = _logits(model, IDS)
    factor_map = materialize_dense(model)
    assert sorted(factor_map) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert factor_map["model.layers.0.self_attn.q_proj"]["factors"]["a"].shape == (2, 4, 1)
    assert not any(isinstance(m, StructuredLinear) for m in model.modules())
    assert float((_logits(model, IDS) - ref).norm() / ref.norm()) < 1e-5


def test_bad_inputs_raise_user_errors(tmp_path) -> None:
    model = fuse_norms(tiny_model("llama"))
    path = residual_positions(model)[0].readers[0].path
    with pytest.raises(UserError, match="features"):
        replace_linear(model, path, nn.Linear(64, 8))
    with pytest.raises(UserError, match="not a compressed checkpoint"):
        load_compressed(tmp_path)
    with pytest.raises(UserError, match="collide"):
        save_compressed(model, tmp_path / "ck", extra_config={"fused": 1})
