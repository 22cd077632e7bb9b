"""`compress --stream` (compiler/streamed.py): the checkpoint of the in-memory compression, tensor for tensor,
from a sharded folder read one decoder layer at a time; its peak memory does not grow with the model."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from procrustes_onnx.compiler.checkpoint import load_compressed
from procrustes_onnx.compiler.compress import compress, compress_cli
from procrustes_onnx.compiler.streamed import compress_streamed
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.testing import (STREAM_SETUP, STREAM_WORK, peak_rss_growth_kib, save_tiny_model,
                                     tiny_compression_config, tiny_model)

CALIB = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(2))
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _quiet(_line: str) -> None:
    pass


def _cfg(method: str, rotation: str = "per-position", **kw):
    return tiny_compression_config(rotation=rotation, structure="gs", method=method, **kw)


def _same_checkpoint(a, b) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "structure.json").read_text()) == json.loads((b / "structure.json").read_text())
    pa, pb = (json.loads((x / "config.json").read_text())["procrustes"] for x in (a, b))
    pa.pop("seconds"), pb.pop("seconds")
    assert pa == pb
    assert (json.loads((a / "identity.json").read_text())["source"]
            == json.loads((b / "identity.json").read_text())["source"])


@pytest.mark.parametrize("tie,method,rotation", [(True, "weighted", "per-position"), (False, "weighted", "per-position"),
                                                  (True, "frobenius", "per-position"), (True, "weighted", "global"),
                                                  (False, "weighted", "global"), (True, "frobenius", "global")])
def test_streamed_checkpoint_equals_in_memory(tmp_path, tie, method, rotation):
    folder = tmp_path / "dense"
    tiny_model(layers=3, tie=tie, vocab=264).save_pretrained(folder, max_shard_size="200KB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    compress(dense, None, _cfg(method, rotation), tmp_path / "memory", progress=False, echo=_quiet, calib_tokens=CALIB)
    out = compress_streamed(folder, None, _cfg(method, rotation), tmp_path / "stream", echo=_quiet,
                            calib_tokens=CALIB)
    _same_checkpoint(tmp_path / "memory", out)
    assert not (out / "work").exists()
    model, _ = load_compressed(out)
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def test_streamed_solves_hold_only_their_own_grams(tmp_path, monkeypatch):
    """A layer's down projection Gram waits on disk while that layer's positions are solved; each solve sees
    exactly the Grams of its positions, no spilled Gram outlives the run, and only the first solve holds the
    embedding table."""
    import procrustes_onnx.compiler.streamed as streamed
    from procrustes_onnx.compiler.solve import gram_paths

    seen, loaded = [], []
    real = streamed.solve_positions

    def spy(model, sel, specs, config, work, grams, progress):
        # a Gram back from disk has the allocator's alignment: BLAS rounds some products differently otherwise
        assert all(g.data_ptr() % 64 == 0 for g in grams.values())
        seen.append((sorted(grams), sorted(gram_paths(sel, specs)), sorted(p.name for p in work.glob("gram-*")),
                     model.model.embed_tokens.weight.is_meta and model.lm_head.weight.is_meta))
        loaded.append(sorted(n for n, t in model.named_parameters() if not t.is_meta and ".layers." in n))
        return real(model, sel, specs, config, work, grams, progress)

    monkeypatch.setattr(streamed, "solve_positions", spy)
    folder = tmp_path / "dense"
    tiny_model(layers=3, vocab=264).save_pretrained(folder, max_shard_size="200KB")
    out = compress_streamed(folder, None, _cfg("weighted"), tmp_path / "stream", echo=_quiet, calib_tokens=CALIB,
                            keep_work=True)
    assert len(seen) == 7                                          # serially one position per call, the head's last
    for held, needed, _, _ in seen:
        assert held == needed
    # the tied embedding table is written and freed once position 0 is rotated, before position 1 is solved
    assert [freed for *_, freed in seen] == [False] + [True] * 6
    assert "gram-model.layers.0.mlp.down_proj.pt" in seen[0][2]   # taken with layer 0, solved with layer 1
    assert not list((out / "work").glob("gram-*"))
    # a layer's first position is solved beside only the previous layer's writers into it and its skip: the rest
    # of that layer is written and freed first
    before = {n.split(".", 3)[3] for n in loaded[2] if n.startswith("model.layers.0.")}
    assert before == {"mlp.down_proj.weight", "mlp_shortcut.weight"}, before
    assert any(n.startswith("model.layers.1.self_attn.") for n in loaded[2])
    assert not any(n.startswith("model.layers.0.") for n in loaded[3])  # and the rest before the second


def test_streamed_global_solve_holds_a_few_terms_and_no_layer(tmp_path, monkeypatch):
    """The out-of-core global solve reads each linear's weight when it reaches it and drops it a few terms later
    (one per torch thread, projected side by side): at every read fewer earlier weights are alive than there are
    threads, and no decoder layer is loaded meanwhile."""
    import weakref

    import procrustes_onnx.compiler.global_stream as global_stream
    import procrustes_onnx.compiler.streamed as streamed

    alive, most, reads, layers_loaded = [], [0], [0], []
    real_term, real_solve = global_stream.TermStore.term, streamed.solve_global_stored

    def term(self, t, device="cpu", gram=True):
        got = real_term(self, t, device, gram)
        alive[:] = [ref for ref in alive if ref() is not None]
        most[0] = max(most[0], len(alive))
        alive.append(weakref.ref(got.weight))
        reads[0] += 1
        return got

    def solve(store, terms, width, config):
        model = run_model[0]
        layers_loaded.append(sorted(n for n, t in model.named_parameters() if not t.is_meta and ".layers." in n))
        return real_solve(store, terms, width, config)

    run_model = []
    real_prepare = streamed._Run.prepare

    def prepare(self, echo):
        run_model.append(self.model)
        return real_prepare(self, echo)

    monkeypatch.setattr(global_stream.TermStore, "term", term)
    monkeypatch.setattr(streamed, "solve_global_stored", solve)
    monkeypatch.setattr(streamed._Run, "prepare", prepare)
    folder = tmp_path / "dense"
    tiny_model(layers=3, vocab=264).save_pretrained(folder, max_shard_size="200KB")
    out = compress_streamed(folder, None, _cfg("weighted", "global"), tmp_path / "stream", echo=_quiet,
                            calib_tokens=CALIB, keep_work=True)
    assert layers_loaded == [[]]
    assert reads[0] >= 6 * 21 and most[0] < max(2, torch.get_num_threads())   # 21 linears, read in every pass
    assert (out / "work" / "global" / "solution.pt").exists()
    # a second run over the same work folder reuses the solve (and gives the same checkpoint)
    layers_loaded.clear()
    again = compress_streamed(folder, None, _cfg("weighted", "global"), tmp_path / "stream", echo=_quiet,
                              calib_tokens=CALIB)
    assert layers_loaded == []
    fresh = compress_streamed(folder, None, _cfg("weighted", "global"), tmp_path / "fresh", echo=_quiet,
                              calib_tokens=CALIB)
    _same_checkpoint(again, fresh)


def test_streamed_solves_on_two_ray_workers_give_the_in_memory_checkpoint(tmp_path):
    ray = pytest.importorskip("ray")
    folder = tmp_path / "dense"
    tiny_model(layers=2, vocab=264).save_pretrained(folder, max_shard_size="200KB")
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    compress(dense, None, _cfg("weighted"), tmp_path / "memory", progress=False, echo=_quiet, calib_tokens=CALIB)
    try:
        out = compress_streamed(folder, None, _cfg("weighted", workers=2), tmp_path / "stream", echo=_quiet,
                                calib_tokens=CALIB)
    finally:
        if ray.is_initialized():  # the next test starts with no Ray, as test_fanout's do
            ray.shutdown()
    _same_checkpoint(tmp_path / "memory", out)


def test_streamed_run_resumes_from_work(tmp_path):
    folder = tmp_path / "dense"
    tiny_model(layers=2, vocab=264).save_pretrained(folder, max_shard_size="200KB")
    compress_streamed(folder, None, _cfg("frobenius"), tmp_path / "a", echo=_quiet, keep_work=True)
    solved = sorted(p.name for p in (tmp_path / "a" / "work").glob("pos*.safetensors"))
    assert solved == [f"pos{i:03d}.safetensors" for i in range(5)]
    again = compress_streamed(folder, None, _cfg("frobenius"), tmp_path / "a", echo=_quiet)  # reuses work/
    fresh = compress_streamed(folder, None, _cfg("frobenius"), tmp_path / "b", echo=_quiet)
    _same_checkpoint(again, fresh)


def test_cli_stream_flag_gives_the_in_memory_checkpoint(tmp_path):
    folder = save_tiny_model(tmp_path / "dense", layers=2)
    common = dict(model=str(folder), method="frobenius", rotation="per-position", preset="3/4", iterations=2)
    compress_cli(out=str(tmp_path / "memory"), **common)
    compress_cli(out=str(tmp_path / "stream"), stream=True, **common)
    _same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    settings = json.loads((tmp_path / "stream" / "config.json").read_text())["procrustes"]["compression"]
    assert "stream" not in settings  # how it ran, not what it computed (like workers)


@pytest.mark.parametrize("override,words", [(dict(rotation="global", compress_embeddings=True), "--compress-embeddings"),
                                            (dict(rotation="per-position", refine="sequential"), "--refine sequential"),
                                            (dict(rotation="per-position", allocation="measured"),
                                             "--allocation measured")])
def test_unsupported_settings_are_one_line(tmp_path, override, words):
    folder = save_tiny_model(tmp_path / "dense", layers=2)
    with pytest.raises(UserError) as exc:
        compress_cli(model=str(folder), out=str(tmp_path / "ck"), stream=True, **override)
    msg = str(exc.value)
    assert "\n" not in msg and words in msg and "without --stream" in msg
    assert not (tmp_path / "ck").exists()


def test_layernorm_family_is_refused(tmp_path):
    folder = tmp_path / "opt"
    tiny_model("opt", layers=2).save_pretrained(folder)
    with pytest.raises(UserError, match="without --stream"):
        compress_streamed(folder, None, _cfg("frobenius"), tmp_path / "ck", echo=_quiet)
    assert not (tmp_path / "ck").exists()


# ------------------------------------------------------------------------------------------------ memory

def _growth_kib(folder, mode: str, out) -> int:
    """Peak RSS growth (KiB) of one compression in a fresh process (`benchmarks/stream_memory.py`'s runs)."""
    return peak_rss_growth_kib(STREAM_SETUP, STREAM_WORK[mode], folder, out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_streamed_compression_peak_memory_does_not_grow_with_depth(tmp_path):
    # layers of ~2.8 MB (hidden 256) in 8 MB shards. Both modes first pay a fixed ~150 MB (torch's lazily
    # loaded kernels, the solver's work space); beyond it the in-memory run grows ~18 MB a layer (weights,
    # every Gram, the rotated copies), the streamed one 0.5-1.1 MB (benchmarks/stream_memory.py, docs/scale.md)
    # A global rotation streamed (one gathering pass to work files, the out-of-core solve, the writing pass) is
    # bounded the same way.
    growth: dict = {}
    for layers in (8, 24):
        folder = tmp_path / f"dense{layers}"
        tiny_model(layers=layers, hidden=256, vocab=264).save_pretrained(folder, max_shard_size="8MB")
        for mode in ("stream", "stream-global"):
            growth[mode, layers] = _growth_kib(folder, mode, tmp_path / f"{mode}{layers}")
    memory = _growth_kib(tmp_path / "dense24", "memory", tmp_path / "m24")
    weights = sum(p.stat().st_size for p in (tmp_path / "dense24").glob("model-*.safetensors")) // 1024
    assert memory > weights
    for mode in ("stream", "stream-global"):
        per_layer = (growth[mode, 24] - growth[mode, 8]) / 16
        print(f"peak RSS growth (KiB), {mode}: {growth[mode, 8]} at 8 layers, {growth[mode, 24]} at 24 "
              f"({per_layer:.0f} a layer); in memory (per-position) {memory} at 24 ({weights} of weights); "
              f"ratio at 24 layers {growth[mode, 24] / memory:.3f}")
        assert per_layer < weights / 24         # under one layer's weights per layer (in memory: ~7 layers' worth)
        assert growth[mode, 24] < 0.6 * memory
