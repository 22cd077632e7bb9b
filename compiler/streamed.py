"""`compress --stream`: ProcrustesGPT on a model read from its shards one decoder layer at a time.

The model lives on the meta device; the embedding, the final norm and the head stay loaded. Layer l is
loaded, its norms folded (`fuse_layer_norms`), the calibration hidden states run through it (its Grams,
as `collect_grams` takes them), then positions 2l and 2l+1 are solved (`solve_positions`, each needs only
its own writers and readers) and position 2l rotated. That completes layer l-1 (its three positions are
rotated): its linears become StructuredLinears, it is written to a part file and freed. The checkpoint is
the one `compress` writes: same tensors, same manifest and surgery record. Peak memory is two layers,
the embedding and head, the carried activations and the Grams of two layers.

A global rotation streams in three passes: gather every compressed linear's fused weight and every Gram into
work files, solve out of core (`compiler.global_stream`), then rotate and write layer by layer as above.

Not streamed yet: `--allocation measured` / `--max-loss`, `--refine`, `--compress-embeddings`, slicegpt, and
LayerNorm families (OPT).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn

from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import claim
from procrustes_onnx.core.sources import tensors_fingerprint

from .adapters import get_adapter, get_module, set_module, surgery_state
from .calibration import GramSum, calibration_windows_for, capture_layer_inputs, damp_gram
from .checkpoint import METADATA, collect_tensors, merge_safetensors, write_checkpoint
from .compress import (check_layers, count_params, discard_empty, open_work, plan_for_model, report_saved,
                       saved_extra, solve_positions, swap_structured)
from .config import CompressionConfig
from .fusion import fuse_final_norm, fuse_layer_norms
from .positions import position_dims, residual_positions
from .rotation import rotate_position
from .skips import add_layer_shortcuts, install_shortcuts, shortcut_paths
from .global_stream import TermStore, solve_global_stored
from .solve import gram_paths, group_terms, saved_factors
from .stream import ShardReader, empty_model, layer_output, materialise, release, return_freed_blocks
from .tensor_files import load_aligned, save_torch_atomic

__all__ = ["compress_streamed", "check_streamable"]


def check_streamable(config: CompressionConfig) -> None:
    """The settings `--stream` does not cover yet, refused in one line before any work."""
    unsupported = [(config.method not in ("frobenius", "weighted"), f"--method {config.method}", "frobenius or weighted"),
                   (config.measured, "--allocation measured / --max-loss", "--ratio or --preset"),
                   (config.refine != "none", f"--refine {config.refine}", "--refine none"),
                   (config.compress_embeddings, "--compress-embeddings", "dense embeddings")]
    for bad, what, instead in unsupported:
        if bad:
            raise UserError(f"--stream does not support {what} yet: use {instead}, or compress in memory "
                            "(without --stream)")


def compress_streamed(model_dir: str | Path, tokenizer, config: CompressionConfig, out_dir: str | Path, *,
                      progress: bool = False, keep_work: bool = False, echo: Callable[[str], None] = print,
                      calib_tokens: torch.Tensor | None = None) -> Path:
    """`compress` of the model in ``model_dir`` (a safetensors folder), one decoder layer in memory at a time;
    writes the same checkpoint into ``out_dir`` and returns it. Resumes from ``out_dir/work`` like `compress`."""
    config.validate()
    config.fanout.check()
    check_streamable(config)
    start = time.perf_counter()
    return_freed_blocks()  # a streamed run is for bounded memory: freed solver temporaries go back at once
    reader = ShardReader(model_dir)
    model = empty_model(model_dir)
    adapter = get_adapter(model)
    if adapter.centres_stream:
        raise UserError(f"--stream does not support {model.config.model_type} yet (its LayerNorms need the stream "
                        "centred first): compress it in memory, without --stream")
    check_layers(model, config)
    windows = calibration_windows_for(tokenizer, config, calib_tokens) if config.method == "weighted" else None
    out_dir = Path(out_dir)
    work = out_dir / "work"
    created = not out_dir.exists()
    claim(out_dir, ["work"])
    try:
        source = _fingerprint(model, reader)
        open_work(work, config, source)
        torch.manual_seed(config.seed)
        run = _Run(model, reader, config, work, windows, progress)
        plan = run.prepare(echo)
        if config.rotation == "global":
            run.solve_global(echo)
        run.layers()
        parts = run.parts
    except BaseException:
        discard_empty(out_dir, work, created)
        raise

    def weights(path: Path) -> None:
        merge_safetensors(parts, path, METADATA)

    run.manifest["stored_parameters"] = sum(run.numbers)
    write_checkpoint(model, out_dir, run.manifest, weights, tokenizer=tokenizer,
                     extra_config=saved_extra(config, plan, time.perf_counter() - start), source=source,
                     carry=("work",) if keep_work else ())
    for part in parts:
        part.unlink(missing_ok=True)
    report_saved(out_dir, plan, start, echo, " (streamed)")
    return out_dir


def _fingerprint(model: nn.Module, reader: ShardReader) -> str:
    """`model_fingerprint` of the dense model as `load_model` would load it, read one tensor at a time (a
    tied head's weight is the embedding's)."""
    adapter = get_adapter(model)
    tied = {f"{adapter.lm_head_path}.weight": f"{adapter.embed_path}.weight"} if adapter.tied else {}
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    missing = sorted(k for k in dtypes if k not in reader.where and k not in tied)
    if missing:
        raise UserError(f"{reader.dir} stores no {missing[0]}: the weights do not match the model's config.json; "
                        "download or save the model again")

    def items():
        for name in sorted(dtypes):
            yield name, reader.tensor(tied.get(name, name)).to(dtypes[name])
    return tensors_fingerprint(type(model).__name__, items())


def _leaf_modules(module: nn.Module, prefix: str, skip: set[str]) -> list[tuple[str, nn.Module]]:
    """The submodules of ``module`` (at ``prefix``) that hold parameters and neither are in ``skip`` nor contain
    one of its paths, as (path, module), outermost first: the part of a layer that can be written without them."""
    out = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}"
        if path in skip:
            continue
        if any(s.startswith(path + ".") for s in skip):
            out += _leaf_modules(child, path, skip)
        elif any(True for _ in child.parameters()):
            out.append((path, child))
    return out


class _Run:
    """The state of one streamed pass: the meta model, the carried activations, the Grams and solutions
    of the positions still open, and the part files written so far."""

    def __init__(self, model, reader, config, work: Path, windows, progress: bool) -> None:
        self.model, self.reader, self.config, self.work = model, reader, config, work
        self.adapter = get_adapter(model)
        self.windows, self.progress = windows, progress
        self.parts: list[Path] = []
        self.numbers: list[int] = []
        self.manifest: dict = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.spilled: dict[str, Path] = {}
        self.rs: dict[int, torch.Tensor] = {}
        self.factors: dict[str, dict] = {}
        self.written: set[str] = set()

    def prepare(self, echo):
        """Load the embedding, final norm and head; fuse the final norm for real and the layers' norms on the
        meta device (shapes only, for the plan); plan; give every layer identity skips on the meta device."""
        model, adapter = self.model, self.adapter
        self.layer_class = type(adapter.layers()[0])
        original = count_params(model)
        tied = adapter.tied
        embed = materialise(model, adapter.embed_path, self.reader)
        if tied:
            get_module(model, adapter.lm_head_path).weight = embed.weight
        else:
            materialise(model, adapter.lm_head_path, self.reader)
        materialise(model, adapter.final_norm_path, self.reader)
        self.batches = capture_layer_inputs(model, self.windows) if self.windows is not None else []
        eps = None
        with torch.no_grad():
            for i in range(adapter.num_layers):
                eps = fuse_layer_norms(model, adapter, i)
        tied_head, head_bias, final_eps = fuse_final_norm(model, adapter)
        surgery_state(model).update(fused=True, tied_head=tied_head, centring=False, norm_dim=adapter.hidden_size,
                                    norm_eps=eps, final_norm_eps=final_eps, head_bias=head_bias)
        plan = plan_for_model(model, self.config, original)
        echo(plan.table())
        self.specs = {e.path: e.spec for e in plan.entries}
        self.positions = residual_positions(model)
        self.gram_paths = set(gram_paths(self.positions, self.specs)) if self.windows is not None else set()
        self.dims = position_dims(model)
        self.glob = self.config.rotation == "global"
        if not self.glob:
            with torch.device("meta"):
                install_shortcuts(model, self.dims)
        return plan

    def _load_layer(self, i: int) -> nn.Module:
        """Decoder layer i from the shards, norms folded, without skips (as the in-memory Gram pass sees it)."""
        path = self.adapter.layer_path(i)
        with init_empty_weights(include_buffers=False):
            fresh = self.layer_class(self.model.config, i)
        set_module(self.model, path, fresh)
        layer = materialise(self.model, path, self.reader)
        fuse_layer_norms(self.model, self.adapter, i)
        return layer

    def _run_layer(self, i: int, layer: nn.Module) -> None:
        """Carry the activations through layer i, adding the Grams of its modules the solve needs."""
        if not self.batches:
            return
        prefix = self.adapter.layer_path(i) + "."
        inside = sorted(p for p in self.gram_paths if p.startswith(prefix))
        acc = GramSum(self.config.device)
        handles = [get_module(self.model, p).register_forward_pre_hook(acc.hook(p)) for p in inside]
        with torch.inference_mode():  # as collect_grams runs (its Grams are inference tensors too)
            try:
                self.batches = [(layer_output(layer(h, **kw)), kw) for h, kw in self.batches]
            finally:
                for h in handles:
                    h.remove()
            self._add_grams(acc.grams(inside))

    def _add_grams(self, grams: dict[str, torch.Tensor]) -> None:
        self.grams.update({k: damp_gram(v, self.config.damp) for k, v in grams.items()})

    def _grams_for(self, sel: list) -> dict[str, torch.Tensor]:
        """The Grams positions ``sel`` need, in memory; every other Gram goes to disk until a solve needs it.
        A layer's down projection Gram (intermediate^2 float64: 0.5 GiB at 8192) is taken with the layer but
        only solved with the next one, so it waits on disk rather than beside this layer's solves."""
        needed = set(gram_paths(sel, self.specs))
        for path in [k for k in self.grams if k not in needed]:
            file = self.work / f"gram-{path}.pt"
            save_torch_atomic(self.grams.pop(path), file)
            self.spilled[path] = file
        for path in [k for k in self.spilled if k in needed]:
            file = self.spilled.pop(path)
            self.grams[path] = load_aligned(file)  # aligned as the Gram was: a serial run equals a Ray one
            file.unlink()
        return self.grams

    def solve_global(self, echo) -> None:
        """A global rotation: one streamed pass stores every compressed linear's fused weight and every Gram in
        work files, then one out-of-core solve (`solve_global_stored`) over them; `layers` then rotates and
        writes. A run that finds the solve finished in ``work`` skips both."""
        store = TermStore(self.work / "global")
        self.global_terms = group_terms(self.model, self.positions, self.specs, self.windows is not None)
        solved = store.solution()
        if solved is None:
            self._gather(store)
            r, slot, info = solve_global_stored(store, self.global_terms, self.dims[0], self.config)
            if "weighted_loss" in info:
                echo("weighted (global, out of core): loss " + " -> ".join(f"{x:.4g}" for x in info["weighted_loss"]))
            store.put_solution(r, slot)
            solved = (r, slot)
        self.global_r, self.global_slot, self.store = solved[0], solved[1], store
        self.batches = []  # the Grams are taken: `layers` only rotates and writes

    def _gather(self, store: TermStore) -> None:
        """The gathering pass: layer by layer, the fused weights of its compressed linears and its Grams to
        ``store``; then the head's."""
        stored: set[str] = set()
        for i in range(self.adapter.num_layers):
            layer = self._load_layer(i)
            self._run_layer(i, layer)
            self._store_terms(store, self.adapter.layer_path(i) + ".", stored)
            release(layer)
        self._head_gram()
        self._store_terms(store, "", stored)

    def _store_terms(self, store: TermStore, prefix: str, stored: set[str]) -> None:
        """Every term under ``prefix`` not in ``stored`` yet, and every Gram taken so far (then dropped)."""
        for t in self.global_terms:
            if t.path.startswith(prefix) and t.path not in stored:
                store.put_weight(t, get_module(self.model, t.path).weight)
                stored.add(t.path)
        for key, gram in self.grams.items():
            store.put_gram(key, gram)
        self.grams = {}

    def _head_gram(self) -> None:
        """The final stream's Gram, which only a compressed head reads."""
        head = self.positions[-1].readers[0].path
        if self.batches and head in self.gram_paths:
            acc = GramSum(self.config.device)
            final = get_module(self.model, self.adapter.final_norm_path)
            norm = getattr(final, "norm", final)  # HeadNorm (tied) or the RMSNorm itself
            with torch.inference_mode():
                for hidden, _ in self.batches:
                    acc.add(head, norm(hidden))
                self._add_grams(acc.grams([head]))

    def _solve(self, indices: list[int]) -> None:
        if self.glob:  # solved already: the global R and the stored factors of these positions' linears
            for p in indices:
                self.rs[p] = self.global_r
                for t in group_terms(self.model, [self.positions[p]], self.specs, False):
                    self.factors[t.path] = saved_factors(self.store.factors(self.global_slot, t))
            return
        sel = [self.positions[p] for p in indices]
        rs, factors = solve_positions(self.model, sel, self.specs, self.config, self.work, self._grams_for(sel),
                                      self.progress)
        self.rs.update({p: r for p, r in zip(indices, rs)})
        self.factors.update(factors)

    def _rotate(self, p: int) -> None:
        rotate_position(self.model, p, self.rs.pop(p).to(torch.float64))

    def _finish(self, prefix: str) -> None:
        """Swap the planned linears at or under ``prefix`` for StructuredLinears and write the module there to a
        part file (the caller frees it)."""
        mine = {path: spec for path, spec in self.specs.items() if path == prefix or path.startswith(prefix + ".")}
        swap_structured(self.model, mine, self.factors)
        for path in mine:
            del self.factors[path]
        tensors, manifest = collect_tensors(get_module(self.model, prefix), prefix)
        for key in ("structured", "shortcuts"):
            self.manifest.setdefault(key, {}).update(manifest[key])
        self.manifest["format"] = manifest["format"]
        self._write_part(tensors)
        under = (lambda k: k == prefix or k.startswith(prefix + "."))
        self.grams = {k: v for k, v in self.grams.items() if not under(k)}
        for path in [k for k in self.spilled if under(k)]:
            self.spilled.pop(path).unlink()

    def _write_part(self, tensors: dict[str, torch.Tensor]) -> None:
        """One finished module's tensors into work/partNNNN.stream (merged into model.safetensors at the end)."""
        part = self.work / f"part{len(self.parts):04d}.stream"
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(part))
        self.parts.append(part)
        self.numbers.append(sum(int(t.numel()) for t in tensors.values()))

    def layers(self) -> None:
        """The streamed pass: load, run, solve and rotate layer by layer; the head's position last.

        On workers a layer's two positions are solved side by side. Serially they are solved one at a time, so
        each solve holds only its own Grams (the other's wait on disk), and the first is rotated before the second
        is solved (that problem reads no module the rotation touches), so the embedding (after layer 0's first
        position) and the previous layer are written and freed before the second solve. Either way the previous
        layer's modules that the first position does not change are written and freed before it is solved. The
        same solves, the same checkpoint.
        """
        adapter, model = self.adapter, self.model
        n = adapter.num_layers
        together = self.config.fanout.workers > 1 and not self.glob
        previous = None
        for i in range(n):
            layer = self._load_layer(i)
            self._run_layer(i, layer)
            if not self.glob:
                add_layer_shortcuts(layer, self.dims[2 * i: 2 * i + 3], next(layer.parameters()).dtype,
                                    adapter.shortcut_forward())
            a, b = 2 * i, 2 * i + 1
            if previous is not None:
                self._finish_untouched(i - 1, previous, a)
            self._solve([a, b] if together else [a])
            self._rotate(a)
            if i == 0:
                self._write_embedding()
            if previous is not None:
                self._finish_touched(previous, a)
            if not together:
                self._solve([b])
            self._rotate(b)
            previous = layer
        self._head_gram()
        self._finish_untouched(n - 1, previous, 2 * n)
        self._solve([2 * n])
        self._rotate(2 * n)
        surgery_state(model)["rotation"] = "global" if self.glob else "per-position"
        self._finish_touched(previous, 2 * n)
        for file in self.spilled.values():
            file.unlink()
        self._finish_rest()

    def _touching(self, p: int) -> set[str]:
        """The modules position ``p`` changes in the layer before it: its writers and the skip into it."""
        skips = shortcut_paths(self.model)
        return {w.path for w in self.positions[p].writers} | ({skips[p - 1]} if skips else set())

    def _finish_untouched(self, i: int, layer: nn.Module, p: int) -> None:
        """Before position ``p`` (layer i's next) is solved, every module of layer i that ``p`` does not change is
        final: written and freed now, so that solve holds only the layer's writers into ``p`` (at hidden 2048,
        0.17 GiB of attention, gate and up weights less)."""
        for path, _ in _leaf_modules(layer, self.adapter.layer_path(i), self._touching(p)):
            self._finish(path)
            release(get_module(self.model, path))  # the StructuredLinear the swap put there, or the container

    def _finish_touched(self, layer: nn.Module, p: int) -> None:
        """The rest of the layer before position ``p``, once ``p`` is rotated."""
        for path in sorted(self._touching(p)):
            self._finish(path)
        release(layer)

    def _write_embedding(self) -> None:
        """The embedding is final once position 0 is rotated (a tied head reads it through the final norm's
        matrix, which the head's position rotates): written and freed now, so no solve holds the vocabulary table
        (0.25 GiB at 32,000 x 2048 in float32)."""
        path = self.adapter.embed_path
        module = get_module(self.model, path)
        mine = {id(p) for p in module.parameters()}
        tensors = {name: p for name, p in self.model.named_parameters() if id(p) in mine}  # the names a save gives
        self._write_part(tensors)
        self.written.update(tensors)
        head = get_module(self.model, self.adapter.lm_head_path)
        tied = head.weight is module.weight
        release(module)
        if tied:  # a tied head reads the same table: tie it to the freed one, or it would keep the table alive
            head.weight = module.weight

    def _finish_rest(self) -> None:
        """The final norm and the head (and whatever else is outside the decoder layers and not yet written)."""
        layers = tuple(self.adapter.layer_path(i) + "." for i in range(self.adapter.num_layers))
        tensors = {name: p for name, p in self.model.named_parameters()
                   if not name.startswith(layers) and name not in self.written}
        self._write_part(tensors)

