"""Streamed calibration (compiler/stream.py): the Grams of the in-memory pass, bitwise, from a sharded folder
read one layer at a time; peak memory bounded by a layer, not the depth; bad shards fail in one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from procrustes_onnx.compiler.calibration import calibration_windows, collect_grams
from procrustes_onnx.compiler.fusion import fuse_norms
from procrustes_onnx.compiler.positions import residual_positions
from procrustes_onnx.compiler.stream import ShardReader, stream_grams
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.testing import peak_rss_growth_kib, save_tiny_model, tiny_model

WINDOWS = calibration_windows(torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2)), 6, 32)


def _sharded(tmp_path, name="m", shard="200KB", **kw):
    """A tiny model saved in several safetensors shards (with an index), like a large model's folder."""
    model = tiny_model(**kw)
    out = tmp_path / name
    model.save_pretrained(out, max_shard_size=shard)
    return out


def _all_paths(model) -> list[str]:
    """Every Gram the weighted stage could ask for: each position's first reader and every writer but
    the embedding."""
    pos = residual_positions(model)
    return [p.readers[0].path for p in pos] + [w.path for p in pos[1:] for w in p.writers]


@pytest.mark.parametrize("tie", [True, False])
def test_streamed_grams_equal_in_memory(tmp_path, tie):
    folder = _sharded(tmp_path, layers=3, tie=tie, vocab=264)
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fuse_norms(model)
    paths = _all_paths(model)
    expected = collect_grams(model, WINDOWS, paths, progress=False)
    got = stream_grams(folder, WINDOWS, paths)
    assert list(got) == paths
    for p in paths:
        assert torch.equal(got[p], expected[p]), p


def test_single_file_folder_streams(tmp_path):
    folder = save_tiny_model(tmp_path / "one", layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fuse_norms(model)
    paths = _all_paths(model)
    expected = collect_grams(model, WINDOWS, paths, progress=False)
    got = stream_grams(folder, WINDOWS, paths)
    assert all(torch.equal(got[p], expected[p]) for p in paths)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_shard_is_one_line(tmp_path):
    folder = _sharded(tmp_path, layers=3)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UserError) as exc:
        stream_grams(folder, WINDOWS, [])
    msg = _one_line(exc)
    assert victim.name in msg and "missing" in msg and "download" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_shard_is_one_line(tmp_path, damage):
    folder = _sharded(tmp_path, layers=3)
    victim = sorted(folder.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file" * 4)
    with pytest.raises(UserError) as exc:
        ShardReader(folder)
    msg = _one_line(exc)
    assert victim.name in msg and "corrupt or truncated" in msg


def test_reader_reads_each_tensor_into_its_own_memory(tmp_path):
    """ShardReader reads bytes from the file (no mapping, no second copy): the stored values in every dtype,
    in 64-byte aligned tensors (BLAS rounds by alignment), each costing its own size only."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    stored = {"a.f32": torch.randn(3, 5, generator=gen), "a.bf16": torch.randn(7, generator=gen).bfloat16(),
              "a.f64": torch.randn(2, 2, generator=gen).double(), "a.i64": torch.arange(5), "a.empty": torch.zeros(0, 4),
              "a.scalar": torch.tensor(2.5), "a.bool": torch.tensor([True, False, True])}
    save_file(stored, str(tmp_path / "model.safetensors"))
    reader = ShardReader(tmp_path)
    expected = load_file(str(tmp_path / "model.safetensors"))
    for key, want in expected.items():
        got = reader.tensor(key)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), key
        assert got.numel() == 0 or got.data_ptr() % 64 == 0, key
    assert set(reader.tensors("a")) == {k[2:] for k in stored}

    big = tmp_path / "big"
    big.mkdir()
    save_file({"w": torch.ones(4096, 4096)}, str(big / "model.safetensors"))  # 64 MiB
    grew = peak_rss_growth_kib("from procrustes_onnx.compiler.stream import ShardReader\nr = ShardReader(sys.argv[1])",
                               "t = r.tensor('w')", big)
    assert 60 * 1024 < grew < 80 * 1024, grew  # one copy (a mapped read and its clone: about 128 MiB)


def test_shard_cut_after_opening_is_one_line(tmp_path):
    folder = _sharded(tmp_path, layers=3)
    reader = ShardReader(folder)
    key = next(iter(reader.where))
    path = folder / reader.where[key]
    path.write_bytes(path.read_bytes()[:8])
    with pytest.raises(UserError) as exc:
        reader.tensor(key)
    assert path.name in _one_line(exc)


def test_no_weights_is_one_line(tmp_path):
    with pytest.raises(UserError) as exc:
        ShardReader(tmp_path)
    assert "save_pretrained" in _one_line(exc)


def test_layernorm_family_is_refused_in_one_line(tmp_path):
    folder = _sharded(tmp_path, arch="opt", layers=2)
    with pytest.raises(UserError) as exc:
        stream_grams(folder, WINDOWS, [])
    assert "opt" in _one_line(exc) and "without --stream" in str(exc.value)


# ------------------------------------------------------------------------------------------------ memory

_SETUP = """
from transformers import AutoModelForCausalLM
from procrustes_onnx.compiler.calibration import calibration_windows, collect_grams
from procrustes_onnx.compiler.fusion import fuse_norms
from procrustes_onnx.compiler.stream import empty_model, layer_grams, stream_grams
from procrustes_onnx.compiler.adapters import get_adapter
folder = sys.argv[1]
windows = calibration_windows(torch.arange(4000) % 256, 8, 64)
a = get_adapter(empty_model(folder))
paths = [r.path for i in range(a.num_layers) for r in (a.attn_inputs(i)[0], a.mlp_inputs(i)[0])]
"""

_WORK = {
    "stream": """
for grams in layer_grams(folder, windows, paths):  # each layer's Grams dropped, as a per-position solve does
    del grams
""",
    "stream-all": """
grams = stream_grams(folder, windows, paths)  # every Gram kept to the end
""",
    "memory": """
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
fuse_norms(model)
grams = collect_grams(model, windows, paths, progress=False)
"""}


def _growth_kib(folder, mode: str) -> int:
    """Peak RSS growth (KiB) of collecting the Grams of every layer's readers, in a fresh process."""
    return peak_rss_growth_kib(_SETUP, _WORK[mode], folder)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_streamed_peak_memory_is_bounded_by_a_layer(tmp_path):
    # 24 layers of ~2.8 MB (hidden 256): the dense weights are ~70 MB, one layer ~3% of them
    folder = _sharded(tmp_path, layers=24, hidden=256, vocab=264, shard="8MB")
    weights = sum(p.stat().st_size for p in folder.glob("model-*.safetensors")) // 1024
    stream, kept, memory = (_growth_kib(folder, mode) for mode in ("stream", "stream-all", "memory"))
    grams = 48 * 256 * 256 * 8 // 1024
    print(f"weights {weights} KiB, Grams {grams} KiB; peak RSS growth: streamed {stream} KiB "
          f"(ratio {stream / memory:.3f}), streamed keeping every Gram {kept} KiB ({kept / memory:.3f}), "
          f"in memory {memory} KiB")
    assert memory > weights + grams  # the in-memory pass holds the whole model and every Gram
    assert stream < 0.25 * memory
    assert kept < stream + 1.5 * grams
