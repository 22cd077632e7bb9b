"""Shared helpers for the export/rewrite tests (no tests here): tiny models with random structured
layers, one cached export per architecture, and the torch-vs-ORT greedy decode comparison.

Relative error is max|ort - torch| / max|torch| over a logits tensor; float32 tolerance 1e-4.
"""

from __future__ import annotations

import atexit
import copy
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from procrustes_onnx.compiler.adapters import cache_keyword
from procrustes_onnx.compiler.checkpoint import load_compressed, materialize_dense, save_compressed
from procrustes_onnx.compiler.skips import install_shortcuts, shortcut_paths
from procrustes_onnx.exporters.onnx_export import export_onnx
from procrustes_onnx.exporters.pipeline import export_compressed
from procrustes_onnx.ops import GSMatrix, KroneckerSum, StructuredLinear
from procrustes_onnx.testing import tiny_model

RTOL = 1e-4
STRUCTURED_DIR = "structured"

# module -> ("kron", rank, a_shape, b_shape) or ("gs", left, right); hidden 64, llama/qwen2 d_ff 160, opt 256.
# Cases: both Kronecker GEMM orders, GS with kr | bl2 (single transpose) and without (general shuffle),
# a Linear with bias (qwen2 q_proj: MatMul + Add) and OPT's Gemm (fc1/fc2: 2-D input, bias inside).
STRUCTURE = {
    "llama": {"model.layers.0.self_attn.q_proj": ("kron", 2, (8, 8), (8, 8)),
              "model.layers.0.mlp.gate_proj": ("gs", (4, 16, 8), (4, 8, 40)),
              "model.layers.1.self_attn.k_proj": ("gs", (2, 32, 16), (4, 8, 8)),
              "model.layers.1.mlp.down_proj": ("kron", 3, (16, 8), (10, 8))},
    "qwen2": {"model.layers.0.self_attn.q_proj": ("kron", 2, (4, 16), (16, 4)),
              "model.layers.0.mlp.gate_proj": ("gs", (4, 16, 6), (8, 3, 20)),
              "model.layers.1.mlp.up_proj": ("kron", 1, (8, 16), (8, 10))},
    "opt": {"model.decoder.layers.0.fc1": ("kron", 2, (8, 16), (8, 16)),
            "model.decoder.layers.1.fc2": ("gs", (8, 32, 4), (4, 8, 16)),
            "model.decoder.layers.0.self_attn.q_proj": ("gs", (2, 32, 8), (2, 8, 32))},
}


def random_matrix(kind: str, *shapes, gen: torch.Generator) -> torch.nn.Module:
    """A structured matrix with N(0, 1/4) factors scaled so x @ W keeps unit-ish activations."""
    if kind == "kron":
        r, (m1, n1), (m2, n2) = shapes
        return KroneckerSum(torch.randn(r, m1, n1, generator=gen) / (m1 * r) ** 0.5,
                            torch.randn(r, m2, n2, generator=gen) / m2 ** 0.5)
    left, right = shapes
    return GSMatrix(torch.randn(*left, generator=gen) / left[1] ** 0.5,
                    torch.randn(*right, generator=gen) / right[1] ** 0.5)


def structured_tiny(arch: str, seed: int = 1) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(model with StructuredLinear layers, its dense twin for export, factor map: module -> spec/factors/bias).

    The dense twin is what ``compiler.checkpoint.materialize_dense`` produces (``to_linear`` per layer).
    """
    model = tiny_model(arch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    factor_map = {}
    modules = dict(model.named_modules())
    for name, (kind, *shapes) in STRUCTURE[arch].items():
        parent, _, child = name.rpartition(".")
        old = modules[name]
        matrix = random_matrix(kind, *shapes, gen=gen)
        assert (matrix.in_features, matrix.out_features) == (old.in_features, old.out_features), name
        setattr(modules[parent], child, StructuredLinear(matrix, old.bias.detach() if old.bias is not None else None))
        factor_map[name] = {"spec": matrix.spec(), "bias": old.bias is not None,
                          "factors": {k: v.detach().clone() for k, v in matrix.factors().items()}}
    dense = copy.deepcopy(model)
    for name in factor_map:
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent), child, dense.get_submodule(name).to_linear())
    return model.eval(), dense.eval(), factor_map


def add_random_shortcuts(model: torch.nn.Module, seed: int = 2) -> list[str]:
    """Per-position rotation's residual-path matrices (compiler.skips), set to random orthogonal Q."""
    install_shortcuts(model)
    gen = torch.Generator().manual_seed(seed)
    paths = shortcut_paths(model)
    for path in paths:
        weight = model.get_submodule(path).weight
        q, _ = torch.linalg.qr(torch.randn(weight.shape, generator=gen, dtype=torch.float64))
        weight.data.copy_(q.to(weight.dtype))
    return paths


@functools.lru_cache(maxsize=None)
def exported(arch: str, with_past: bool = True) -> tuple[torch.nn.Module, torch.nn.Module, dict, Path]:
    """(structured model, dense twin, factor map, exported model.onnx of the twin); one export per session.

    llama (with KV cache) goes the whole compressed-checkpoint route instead: skip matrices on the
    residual path, ``save_compressed``, then ``export_compressed`` keeping its dense twin, whose
    path is returned; the structured ONNX is ``STRUCTURED_DIR`` beside it.
    """
    structured, dense, factor_map = structured_tiny(arch)
    root = Path(tempfile.mkdtemp(prefix=f"export-{arch}-"))
    atexit.register(shutil.rmtree, root, True)
    if arch == "llama" and with_past:
        add_random_shortcuts(structured)
        save_compressed(structured, root / "ckpt")
        structured, _ = load_compressed(root / "ckpt")
        dense, _ = load_compressed(root / "ckpt")
        factor_map = materialize_dense(dense)
        export_compressed(root / "ckpt", root / STRUCTURED_DIR, dense_dir=root / "onnx")
        return structured, dense, factor_map, root / "onnx" / "model.onnx"
    return structured, dense, factor_map, export_onnx(dense, root / "onnx", with_past=with_past)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def kv_geometry(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers, kv, config.hidden_size // heads


def torch_greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[list[np.ndarray], torch.Tensor]:
    """Prefill + ``steps`` greedy decode steps with the HF cache; logits of each call and all tokens."""
    logits, tokens, past, ids = [], prompt, None, prompt
    with torch.no_grad():
        for _ in range(steps + 1):
            mask = torch.ones(tokens.shape, dtype=torch.long)
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_keyword(model): past})
            past = getattr(out, "cache", None) or out.past_key_values
            logits.append(out.logits.numpy())
            ids = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, ids], dim=1)
    return logits, tokens


def ort_replay(session: ort.InferenceSession, config, tokens: torch.Tensor, prompt_len: int) -> list[np.ndarray]:
    """Feed the same token stream through the ONNX graph: prefill from an empty cache, then one token at a time."""
    layers, kv, hd = kv_geometry(config)
    batch = tokens.shape[0]
    past = {f"past_key_values.{i}.{k}": np.zeros((batch, kv, 0, hd), np.float32)
            for i in range(layers) for k in ("key", "value")}
    present = [o.name for o in session.get_outputs()][1:]
    outs, start, end = [], 0, prompt_len
    while end <= tokens.shape[1] - 1:
        feed = {"input_ids": tokens[:, start:end].numpy(), "attention_mask": np.ones((batch, end), np.int64),
                "position_ids": np.tile(np.arange(start, end), (batch, 1)), **past}
        res = session.run(None, feed)
        outs.append(res[0])
        past = {k.replace("present", "past_key_values"): v for k, v in zip(present, res[1:])}
        start, end = end, end + 1
    return outs


def assert_decode_matches(model: torch.nn.Module, onnx_path: Path, *, steps: int = 3, seed: int = 0) -> None:
    """Torch greedy decode with cache vs the ONNX graph on the same tokens: rel err < RTOL, same argmax."""
    torch.manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5))
    ref, tokens = torch_greedy(model, prompt, steps)
    got = ort_replay(ort.InferenceSession(str(onnx_path)), model.config, tokens, prompt.shape[1])
    assert len(got) == steps + 1
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        assert rel_err(g, r) < RTOL
        assert np.array_equal(g.argmax(-1), r.argmax(-1))
