"""--compress-embeddings: low-rank token embedding (tied head on the same factors), counted, saved, exported."""

from __future__ import annotations

import json

import pytest
import torch

from procrustes_onnx.compiler.checkpoint import load_compressed
from procrustes_onnx.compiler.compress import compress, saved_param_count
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.exporters.matmul_map import _unslice
from procrustes_onnx.ops.embedding import FactoredEmbedding, FactoredHead, embedding_rank, project_embedding
from procrustes_onnx.testing import relative_error, tiny_compression_config, tiny_model, tiny_tokenizer

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 200, (4000,), generator=torch.Generator().manual_seed(2))   # ids 200+ never occur


def test_projection_is_exact_at_full_rank_and_optimal_in_its_weighted_norm():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(300, 24, dtype=torch.float64, generator=g)
    w = torch.rand(300, dtype=torch.float64, generator=g) * 10 + 0.1
    a, b = project_embedding(e, 24, w)
    assert relative_error(a @ b, e) < 1e-12
    a, b = project_embedding(e, 8, w)
    plain_a, plain_b = project_embedding(e, 8)
    weighted = lambda approx: float((w[:, None] * (e - approx)).norm())
    assert weighted(a @ b) < weighted(plain_a @ plain_b)          # the weighting moves the fit
    sv = torch.linalg.svdvals(w[:, None] * e)
    assert weighted(a @ b) == pytest.approx(float(sv[8:].norm()), rel=1e-10)   # Eckart-Young optimum
    fe = FactoredEmbedding(a, b)
    ids = torch.tensor([[0, 5, 299]])
    assert relative_error(fe(ids), (a @ b)[ids]) < 1e-12
    h = torch.randn(1, 3, 24, dtype=torch.float64, generator=g)
    assert relative_error(FactoredHead(fe)(h), h @ (a @ b).T) < 1e-12


def test_rank_and_bad_inputs():
    assert embedding_rank(49152, 576, 0.75) == int(0.75 * 49152 * 576 / (49152 + 576))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(UserError, match="kept share"):
            embedding_rank(100, 10, bad)
    with pytest.raises(UserError, match="rank"):
        project_embedding(torch.randn(10, 4), 5)
    with pytest.raises(UserError, match="needs --compress-embeddings"):
        tiny_compression_config(kept={"embed": 0.5})
    with pytest.raises(UserError, match="slicegpt"):
        tiny_compression_config(compress_embeddings=True, method="slicegpt", ratio=0.2, preset=None)
    with pytest.raises(UserError, match="head"):
        tiny_compression_config(compress_embeddings=True, kept={"head": 0.5})


@torch.no_grad()
@pytest.mark.parametrize("tie", [True, False])
def test_promise_equals_saved_and_checkpoint_round_trips(tmp_path, tie):
    model = tiny_model("llama", tie=tie)
    lines: list[str] = []
    out = compress(model, tiny_tokenizer(), tiny_compression_config(ratio=0.2, preset=None, compress_embeddings=True,
                                                                    kept={"embed": 0.5}),
                   tmp_path / "ckpt", progress=False, echo=lines.append, calib_tokens=CALIB)
    assert any(line.startswith("embed+head" if tie else "embed ") for line in lines[0].splitlines())
    extra = json.loads((out / "config.json").read_text())["procrustes"]
    assert extra["promised_params"] == saved_param_count(out)
    assert abs(1 - saved_param_count(out) / extra["original_params"] - 0.2) < 0.02
    emb = model.model.embed_tokens
    assert isinstance(emb, FactoredEmbedding) and emb.rank == embedding_rank(emb.num_embeddings, emb.embedding_dim, 0.5)
    assert isinstance(model.lm_head, FactoredHead) == tie
    assert not emb.a[200:].abs().sum() > 1e3 * emb.a[:200].abs().sum()   # unseen tokens are not blown up
    loaded, _ = load_compressed(out)
    assert relative_error(loaded(IDS).logits, model(IDS).logits) < 1e-6
    if tie:
        assert loaded.lm_head.embedding is loaded.model.embed_tokens


def test_factored_embedding_exports_and_matches_torch(tmp_path):
    from procrustes_onnx.exporters.pipeline import export_compressed, ort_logits

    model = tiny_model("llama", tie=True)
    out = compress(model, tiny_tokenizer(), tiny_compression_config(compress_embeddings=True), tmp_path / "ckpt",
                   progress=False, echo=lambda s: None, calib_tokens=CALIB)
    onnx_path = export_compressed(out, tmp_path / "onnx")
    with torch.no_grad():
        ref = model(IDS[:1]).logits
    assert relative_error(torch.as_tensor(ort_logits(onnx_path, IDS[:1].numpy())), ref) < 1e-5
    import onnx_ir as ir
    inits = [v for v in ir.load(str(onnx_path)).graph.initializers.values() if v.const_value is not None]
    vocab, dim = model.model.embed_tokens.num_embeddings, model.model.embed_tokens.embedding_dim
    assert not [v.name for v in inits if sorted(v.shape) == sorted((vocab, dim))]    # no dense table
    assert sum(1 for v in inits if vocab in v.shape) == 1                             # factor A stored once
    rotary = model.config.max_position_embeddings * model.config.head_dim  # fused GQA's cos/sin caches
    assert sum(int(v.const_value.size) for v in inits) < saved_param_count(out) + rotary + 1000


def test_sliced_module_list_scopes_map_back():
    assert _unslice("model.model.layers.slice(None, 2, None).1.mlp.up_proj") == "model.model.layers.1.mlp.up_proj"
    assert _unslice("model.layers.slice(2, None, 2).1.self_attn") == "model.layers.4.self_attn"
    assert _unslice("model.layers.3.mlp") == "model.layers.3.mlp"


def test_head_gram_weighting_is_optimal_in_its_norm():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(200, 16, dtype=torch.float64, generator=g)
    x = torch.randn(500, 16, dtype=torch.float64, generator=g) * torch.logspace(0, -2, 16, dtype=torch.float64)
    c = x.T @ x / 500
    w = torch.rand(200, dtype=torch.float64, generator=g) + 0.5
    a, b = project_embedding(e, 6, w, c)
    err = lambda approx: float(((w[:, None] * (e - approx)) @ c * (w[:, None] * (e - approx))).sum())
    root = torch.linalg.cholesky(c)                     # C = L L^T: the norm is ||D (E - A B) L||
    optimum = float((torch.linalg.svdvals(w[:, None] * e @ root)[6:] ** 2).sum())
    assert err(a @ b) == pytest.approx(optimum, rel=1e-9)
    pa, pb = project_embedding(e, 6, w)
    assert err(a @ b) < err(pa @ pb)
    with pytest.raises(UserError, match="positive definite"):
        project_embedding(e, 6, w, torch.zeros(16, 16, dtype=torch.float64))
