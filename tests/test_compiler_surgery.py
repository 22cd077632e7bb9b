"""Model surgery on tiny models: adapters, positions, norm fusion, rotations, skips (all against dense logits)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

from procrustes_onnx.compiler.adapters import get_adapter, get_module, surgery_state
from procrustes_onnx.compiler.fusion import HeadNorm, RMSNorm, fuse_norms
from procrustes_onnx.compiler.positions import num_positions, position_dims, residual_positions
from procrustes_onnx.compiler.rotation import random_orthogonal, rotate_global, rotate_per_position, rotate_position
from procrustes_onnx.compiler.skips import (Shortcut, cayley_decode, cayley_encode, shortcut_paths,
                                            shortcut_stored_numel, stored_parameter_count)
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.testing import tiny_model

ARCHS = ("llama", "qwen2", "opt")
# float64 bound is set by the HF Llama RMSNorm, which computes in float32 even for float64 inputs (~1e-7)
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}




def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_unsupported_architecture_lists_supported_ones() -> None:
    gpt2 = torch.nn.Module()
    gpt2.config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    with pytest.raises(UserError, match="'gpt2'; supported: llama, mistral, qwen2, qwen3, opt"):
        get_adapter(gpt2)


def test_post_layernorm_opt_is_refused() -> None:
    cfg = OPTConfig(vocab_size=32, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                    do_layer_norm_before=False, word_embed_proj_dim=16)
    with pytest.raises(UserError, match="post-LayerNorm"):
        get_adapter(AutoModelForCausalLM.from_config(cfg))


@pytest.mark.parametrize("arch", ARCHS)
def test_positions_list_readers_and_writers(arch: str) -> None:
    model = tiny_model(arch)
    positions = residual_positions(model)
    assert len(positions) == num_positions(model) == 5
    mlp_in = ["up"] if arch == "opt" else ["gate", "up"]
    assert [[r.role for r in p.readers] for p in positions] == [["q", "k", "v"], mlp_in, ["q", "k", "v"], mlp_in, ["head"]]
    first = ["embed", "pos_embed"] if arch == "opt" else ["embed"]
    assert [[w.role for w in p.writers] for p in positions] == [first, ["o"], ["down"], ["o"], ["down"]]
    assert positions[3].readers[0].layer == 1 and positions[4].writers[0].layer == 1
    for p in positions:                                      # every path resolves to a module
        for ref in p.readers + p.writers:
            assert get_module(model, ref.path) is not None
    fuse_norms(model)                                        # tied: the head's reader becomes the d x d pre-matrix
    assert [r.role for r in residual_positions(model)[-1].readers] == ["head_pre"]
    assert position_dims(model) == [64] * 5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_norm_fusion_keeps_logits(arch: str, tie: bool, dtype: torch.dtype) -> None:
    model = tiny_model(arch, dtype=dtype, tie=tie)
    ids = _ids()
    ref = _logits(model, ids)
    fuse_norms(model)
    assert _rel(_logits(model, ids), ref) < TOL[dtype]
    adapter = get_adapter(model)
    assert isinstance(get_module(model, adapter.attn_norm_path(0)), RMSNorm)
    assert isinstance(get_module(model, adapter.final_norm_path), HeadNorm if tie else RMSNorm)
    assert adapter.tied == tie                               # the embedding is still stored once when tied
    assert sum(1 for n, _ in model.named_parameters() if "norm" in n and "proj" not in n) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["global", "per-position"])
@pytest.mark.parametrize("arch", ARCHS)
def test_random_rotations_keep_logits(arch: str, mode: str, dtype: torch.dtype) -> None:
    model = tiny_model(arch, dtype=dtype)
    ids = _ids(1)
    ref = _logits(model, ids)
    fuse_norms(model)
    fused = _logits(model, ids)
    if mode == "global":
        rotate_global(model, random_orthogonal(64, seed=7))
        assert shortcut_paths(model) == []
    else:
        qs = [random_orthogonal(64, seed=10 + p) for p in range(num_positions(model))]
        rotate_per_position(model, qs)
        skips = shortcut_paths(model)
        assert len(skips) == 4
        s2 = get_module(model, skips[1]).weight.double()    # skip into position 2 = Q_1^T Q_2
        assert torch.allclose(s2, qs[1].T @ qs[2], atol=1e-6)
    out = _logits(model, ids)
    assert _rel(out, ref) < TOL[dtype]
    assert _rel(out, fused) < (1e-12 if dtype == torch.float64 else 1e-4)
    assert surgery_state(model)["rotation"] == mode
    assert get_adapter(model).tied


@pytest.mark.parametrize("config_cls", ["MistralConfig", "Qwen3Config"])
def test_other_llama_family_members(config_cls: str) -> None:
    """Mistral and Qwen3 (q/k head norms, which rotations do not touch) go through the Llama adapter."""
    import transformers
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ids = _ids(5)
    ref = _logits(model, ids)
    fuse_norms(model)
    rotate_per_position(model, [random_orthogonal(64, seed=30 + p) for p in range(5)])
    assert _rel(_logits(model, ids), ref) < 1e-5


def test_shortcut_model_pickles(tmp_path) -> None:
    model = fuse_norms(tiny_model("llama"))
    rotate_per_position(model, [random_orthogonal(64, seed=p) for p in range(5)])
    torch.save(model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    ids = _ids(6)
    assert _rel(_logits(again, ids), _logits(model, ids)) < 1e-7


def test_rotation_checks_catch_a_broken_rotation() -> None:
    """The invariance test can fail: rotating one position without its skips changes the logits."""
    model = fuse_norms(tiny_model("llama", dtype=torch.float64))
    ids = _ids(2)
    ref = _logits(model, ids)
    rotate_position(model, 1, random_orthogonal(64, seed=3))       # no skips installed: not invariant
    assert _rel(_logits(model, ids), ref) > 1e-2
    with pytest.raises(UserError, match="not orthogonal"):
        rotate_position(model, 0, torch.ones(64, 64, dtype=torch.float64))
    with pytest.raises(UserError, match="not fused"):
        rotate_global(tiny_model("llama"), torch.eye(64))


def test_rotations_compose_with_compression_order() -> None:
    """Per-position rotation on top of a global one is still exact (skips become Q_{p-1}^T S Q_p)."""
    model = fuse_norms(tiny_model("opt", dtype=torch.float64))
    ids = _ids(3)
    ref = _logits(model, ids)
    rotate_global(model, random_orthogonal(64, seed=1))
    rotate_per_position(model, [random_orthogonal(64, seed=20 + p) for p in range(5)])
    rotate_global(model, random_orthogonal(64, seed=2))
    assert _rel(_logits(model, ids), ref) < 1e-12


@pytest.mark.parametrize("d", [48, 150])    # 150: the sign choice crosses its 64-column panels
@pytest.mark.parametrize("kind", ["random", "minus_identity", "swap", "reflection"])
def test_cayley_round_trip_is_exact(kind: str, d: int) -> None:
    q = {"random": random_orthogonal(d, seed=5),
         "minus_identity": -torch.eye(d, dtype=torch.float64),
         "swap": torch.eye(d, dtype=torch.float64)[torch.randperm(d, generator=torch.Generator().manual_seed(0))],
         "reflection": torch.eye(d, dtype=torch.float64) - 2 * torch.outer(*(2 * [torch.ones(d, dtype=torch.float64) / d ** 0.5]))}[kind]
    upper, signs = cayley_encode(q)
    assert upper.numel() + signs.numel() == d * (d + 1) // 2
    back = cayley_decode(upper, signs)
    assert (back - q).abs().max() < 1e-12
    assert (back.T @ back - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-12


def test_stored_parameter_count() -> None:
    model = tiny_model("llama")
    dense = sum(p.numel() for p in model.parameters())       # HF dedups the tied head
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    fuse_norms(model)
    assert stored_parameter_count(model) == dense - norms + 64 * 64      # + the tied head's pre-matrix
    rotate_per_position(model, [random_orthogonal(64, seed=p) for p in range(5)])
    skips = 4 * 64 * 65 // 2
    assert stored_parameter_count(model) == dense - norms + 64 * 64 + skips
    assert stored_parameter_count(model, "dense") == dense - norms + 64 * 64 + 4 * 64 * 64
    assert shortcut_stored_numel((64, 48)) == 64 * 48
    assert all(isinstance(get_module(model, p), Shortcut) for p in shortcut_paths(model))


@pytest.mark.parametrize("arch", ["opt"])
def test_per_position_model_is_exportable(arch: str) -> None:
    """Shortcut layers trace with torch.export (what the dynamo ONNX exporter runs first)."""
    model = fuse_norms(tiny_model(arch))
    rotate_per_position(model, [random_orthogonal(64, seed=p) for p in range(5)])

    class Logits(torch.nn.Module):
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, use_cache=False).logits

    ids = _ids(4)[:1]
    program = torch.export.export(Logits(model), (ids,), strict=False)
    assert any("attn_shortcut" in n for n in program.graph_signature.parameters)
    with torch.no_grad():
        assert _rel(program.module()(ids), _logits(model, ids)) < 1e-6


@pytest.mark.slow
def test_smollm2_per_position_rotation_keeps_logits(tmp_path) -> None:
    """Real model (opt-in): fused + per-position rotated SmolLM2, and its checkpoint, match the HF logits."""
    from procrustes_onnx.compiler.checkpoint import load_compressed, save_compressed
    from procrustes_onnx.compiler.checkpoint import load_model

    model, tok = load_model("smollm2-135m")
    ids = tok("The quick brown fox jumps over the lazy dog and", return_tensors="pt").input_ids
    ref = _logits(model, ids)
    fuse_norms(model)
    rotate_per_position(model, [random_orthogonal(576, seed=p) for p in range(num_positions(model))])
    assert _rel(_logits(model, ids), ref) < 1e-4
    loaded, _ = load_compressed(save_compressed(model, tmp_path / "ck", tokenizer=tok))
    assert _rel(_logits(loaded, ids), ref) < 1e-4
    assert stored_parameter_count(loaded) == stored_parameter_count(model)
