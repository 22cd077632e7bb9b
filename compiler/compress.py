"""`compress`: the ProcrustesGPT driver. Fuse norms, plan shapes, solve the Frobenius stage per position
(or one global rotation), optionally the weighted stage, rotate, swap linears for StructuredLinear and
save the checkpoint. Per-position results are checkpointed in ``out_dir/work`` so a killed run resumes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from procrustes_onnx.core.artifacts import write_json
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import FILE_LIST, check_output, claim
from procrustes_onnx.core.sources import (is_compressed_checkpoint, load_tokenizer, model_fingerprint, require_dense,
                                          resolve_model_dir)
from procrustes_onnx.ops import StructuredLinear, structured_from_spec
from procrustes_onnx.ops.embedding import embedding_rank

from . import refine  # called as refine.refine_sequential: tests wrap that attribute
from .adapters import get_adapter, get_module
from .allocate import allocate_measured
from .calibration import calibration_split, calibration_windows_for, collect_grams, damp_gram
from .checkpoint import load_model, replace_linear, save_compressed
from .config import EMBED_KEPT, CompressionConfig
from .plan import Plan, build_plan
from .embeddings import factor_embedding
from .fanout import fan_out
from .fusion import fuse_norms
from .positions import residual_positions, stream_matrix
from .rotation import rotate_global, rotate_per_position
from .skips import shortcut_stored_numel, stored_parameter_count
from .slicegpt import slicegpt_compress
from .solve import gram_paths, group_problem, load_group, rotated_input_grams, save_group, solve_group

__all__ = ["compress", "compress_model", "compress_cli", "plan_for_model", "count_params", "saved_param_count",
           "check_layers", "solve_positions", "plan_and_solve", "rotate_solved", "swap_structured",
           "open_work", "discard_empty", "saved_extra", "report_saved"]

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Numbers the saved checkpoint stores: each parameter once (tied ones once), skips compactly."""
    return stored_parameter_count(model)


def saved_param_count(out_dir: str | Path) -> int:
    """Numbers stored in a checkpoint's model.safetensors."""
    with safe_open(str(Path(out_dir) / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _skip_params(model: nn.Module, config: CompressionConfig) -> int:
    """Stored numbers of the two skip matrices per layer that per-position rotation adds."""
    if config.rotation == "global":
        return 0
    adapter = get_adapter(model)
    return 2 * adapter.num_layers * shortcut_stored_numel((adapter.hidden_size, adapter.hidden_size))


def plan_for_model(model: nn.Module, config: CompressionConfig, original_params: int) -> Plan:
    """Plan for a norm-fused model: every reader/writer linear whose structure is not dense."""
    candidates, compressed_numel = [], 0
    for pos in residual_positions(model):
        for ref, side in [(r, "in") for r in pos.readers] + [(w, "out") for w in pos.writers]:
            if ref.role not in ("q", "k", "v", "o", "gate", "up", "down"):
                continue
            if config.structure_of(ref.role, ref.layer) == "dense":
                continue
            w = stream_matrix(model, ref)
            candidates.append((ref.path, ref.role, ref.layer, tuple(w.shape), side))
            compressed_numel += w.numel()
    fixed = count_params(model) - compressed_numel
    embedding = _embedding_plan(model, config)
    if embedding is not None:
        fixed -= math.prod(embedding["shape"]) - embedding["params"]
    plan = build_plan(candidates, config, original_params, fixed, _skip_params(model, config))
    plan.embedding = embedding
    return plan


def _embedding_plan(model: nn.Module, config: CompressionConfig) -> dict | None:
    """The low-rank token embedding `--compress-embeddings` asks for (None without it)."""
    if not config.compress_embeddings:
        return None
    adapter = get_adapter(model)
    vocab, dim = get_module(model, adapter.embed_path).weight.shape
    rank = embedding_rank(vocab, dim, float(config.kept.get("embed", EMBED_KEPT)))
    return {"path": adapter.embed_path, "head": adapter.lm_head_path, "shape": [vocab, dim], "rank": rank,
            "params": rank * (vocab + dim), "tied": adapter.tied}


# --------------------------------------------------------------------------------------------- stages

def solve_positions(model, positions, specs, config, work: Path, grams, progress: bool):
    """Per group of positions (each position, or all at once): R and factors, from ``work`` if a previous
    run finished that group. Returns one R per position and the factors of every planned linear. Per-position
    groups are independent: they fan out over ``config.fanout`` (one torch thread each, on Ray with
    ``--workers``), each saved as it ends."""
    groups = [[p] for p in positions] if config.rotation == "per-position" else [positions]
    paths = [work / ("global.safetensors" if config.rotation == "global" else f"pos{sel[0].index:03d}.safetensors")
             for sel in groups]
    solved = {i: load_group(path) for i, path in enumerate(paths) if path.exists()}
    todo = [i for i in range(len(groups)) if i not in solved]
    bar = tqdm(total=len(positions), desc=f"{config.method} {config.rotation}", unit="pos", disable=not progress)
    bar.update(sum(len(groups[i]) for i in solved))

    def finished(k: int, result) -> None:
        i = todo[k]
        r, fac, _ = result
        save_group(paths[i], r, fac)
        solved[i] = (r, fac)
        bar.update(len(groups[i]))

    problems = ((group_problem(model, groups[i], specs, grams),) for i in todo)
    if config.rotation == "per-position":  # a streamed run solves a few positions at a time, still fanned out
        fan_out(solve_group, problems, config.fanout, shared={"config": config}, on_result=finished)
    else:  # one global rotation: nothing to fan out, and it keeps this process's torch threads
        for k, (problem,) in enumerate(problems):
            finished(k, solve_group(problem, config))
    bar.close()
    rs, factors = [], {}
    for i, sel in enumerate(groups):
        r, fac = solved[i]
        rs.extend([r] * len(sel))
        factors.update(fac)
    return rs, factors


def rotate_solved(model, rs, rotation: str) -> None:
    """Rotate the fused dense model by the solved rotations (exact: its function does not change)."""
    if rotation == "global":
        rotate_global(model, rs[0].to(torch.float64))
    else:
        rotate_per_position(model, [r.to(torch.float64) for r in rs])


def _apply(model, positions, specs, rs, factors, rotation: str, keep_reference: bool = False) -> nn.Module | None:
    """Rotate the dense model, then replace each planned linear by a StructuredLinear from its factors.
    With ``keep_reference``, returns a copy of the rotated model taken before the swap (else None)."""
    rotate_solved(model, rs, rotation)
    reference = copy.deepcopy(model) if keep_reference else None
    swap_structured(model, specs, factors)
    return reference


def swap_structured(model: nn.Module, specs: dict[str, dict], factors: dict[str, dict]) -> None:
    """Replace each linear of ``specs`` (rotated, dense) by the StructuredLinear of its solved factors."""
    for path, spec in specs.items():
        linear = get_module(model, path)
        dtype = linear.weight.dtype
        matrix = structured_from_spec(spec, {k: v.to(dtype) for k, v in factors[path].items()}, dtype=dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        replace_linear(model, path, StructuredLinear(matrix, bias))


def plan_and_solve(model: nn.Module, config: CompressionConfig, original: int, windows, work: Path,
                   progress: bool = True, echo: Callable[[str], None] = print):
    """The front half of compression, shared with the quality benchmark: fuse the norms, plan the specs,
    collect the (damped) input Grams for the weighted method, and solve each residual position's
    rotation (reused from ``work``). Returns (plan, positions, grams, rotations, factors); the model is
    fused but not yet rotated."""
    fuse_norms(model)
    plan = plan_for_model(model, config, original)
    echo(plan.table())
    specs = {e.path: e.spec for e in plan.entries}
    positions = residual_positions(model)
    grams = {}
    if config.method == "weighted":
        grams = collect_grams(model, windows, gram_paths(positions, specs), progress=progress, device=config.device)
        grams = {k: damp_gram(v, config.damp) for k, v in grams.items()}
    rs, factors = solve_positions(model, positions, specs, config, work, grams, progress)
    return plan, positions, grams, rs, factors


def compress_model(model: nn.Module, tokenizer, config: CompressionConfig, work: str | Path, *,
                   progress: bool = True, echo: Callable[[str], None] = print,
                   calib_tokens: torch.Tensor | None = None, source: str | None = None) -> Plan:
    """Compress ``model`` in place (fuse, plan, solve, rotate, swap linears) without saving; per-position
    results go to ``work`` and are reused from there. Returns the plan (the promised count).
    ``calib_tokens`` (a 1-D token stream) replaces the config's calibration text, e.g. in tests.
    ``source``: the model's fingerprint, if the caller has it already."""
    config.validate()
    config.fanout.check()
    check_layers(model, config)
    # bad calibration text fails here, before work/ records these settings (a failed run blocks nothing)
    needs_text = config.method == "weighted" or config.compress_embeddings
    heldout = None
    if config.measured:
        windows, heldout = calibration_split(tokenizer, config, calib_tokens)
    else:
        windows = calibration_windows_for(tokenizer, config, calib_tokens) if needs_text else None
    work = open_work(work, config, source or model_fingerprint(model))
    torch.manual_seed(config.seed)
    model.eval()
    original = count_params(model)
    with torch.no_grad():
        plan, positions, grams, rs, factors = plan_and_solve(model, config, original, windows, work, progress, echo)
        specs = {e.path: e.spec for e in plan.entries}
        ladder_grams = rotated_input_grams(positions, specs, grams, rs) if config.measured else None
        del grams
        if config.measured:
            rotate_solved(model, rs, config.rotation)
            plan, plan.allocation = allocate_measured(model, plan, factors, windows, heldout, config, echo=echo,
                                                      progress=progress, input_grams=ladder_grams)
            del ladder_grams
            reference = None
        else:
            reference = _apply(model, positions, specs, rs, factors, config.rotation,
                               keep_reference=config.refine != "none")
        if reference is not None:
            records = refine.refine_sequential(model, reference, specs, windows, damp=config.damp,
                                        correct=config.refine == "corrected", work=work, progress=progress)
            if records:
                before = sum(r["rel_before"] for r in records) / len(records)
                after = sum(r["rel_after"] for r in records) / len(records)
                echo(f"refine ({config.refine}): {len(records)} linears re-fitted on the compressed model's inputs, "
                     f"mean relative error {before:.4f} -> {after:.4f}")
            del reference
        if plan.embedding is not None:
            err = factor_embedding(model, plan.embedding, windows, config.token_weighting, config.damp)
            echo(f"embedding: rank {plan.embedding['rank']} factors, weighted relative error {err:.4f}"
                 + (" (the tied head reads the same factors)" if plan.embedding["tied"] else " (head stays dense)"))
    return plan


# --------------------------------------------------------------------------------------------- driver

def compress(model: nn.Module, tokenizer, config: CompressionConfig, out_dir: str | Path, *,
             progress: bool = True, keep_work: bool = False, echo: Callable[[str], None] = print,
             calib_tokens: torch.Tensor | None = None) -> Path:
    """Compress ``model`` (modified in place) into a checkpoint folder ``out_dir``; returns it.

    Deterministic for ``config.seed``; rerunning with the same arguments after an interruption
    reuses the per-position rotations already in ``out_dir/work`` (a different config is refused).
    """
    out_dir = Path(out_dir)
    work = out_dir / "work"
    start = time.perf_counter()
    source = model_fingerprint(model)  # the dense model's identity, recorded in the checkpoint's
    if config.method == "slicegpt":
        check_layers(model, config)
        return _slicegpt(model, tokenizer, config, out_dir, count_params(model), echo, source)
    created = not out_dir.exists()
    claim(out_dir, ["work"])
    try:
        plan = compress_model(model, tokenizer, config, work, progress=progress, echo=echo, calib_tokens=calib_tokens,
                              source=source)
    except BaseException:
        discard_empty(out_dir, work, created)
        raise
    _save(model, tokenizer, config, plan, out_dir, time.perf_counter() - start, source, keep_work)
    report_saved(out_dir, plan, start, echo)
    return out_dir


def report_saved(out_dir: Path, plan: Plan, start: float, echo: Callable[[str], None], how: str = "") -> None:
    """The closing line of a compression; a warning if the checkpoint does not store what the plan promised."""
    saved = saved_param_count(out_dir)
    if saved != plan.promised_params:
        log.warning("plan promised %d parameters but the checkpoint stores %d", plan.promised_params, saved)
    echo(f"saved {out_dir}: {saved:,} parameters stored, {100 * (1 - saved / plan.original_params):.2f}% removed, "
         f"{time.perf_counter() - start:.0f} s{how}")


def open_work(work: str | Path, config: CompressionConfig, source: str) -> Path:
    """The resumable work folder, recording ``config`` and the dense model's fingerprint ``source``; a partial
    run of other settings, or of another model (its rotations would be applied to this one), is refused.
    A folder from a version that recorded no fingerprint is trusted, as it was then."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    saved_cfg, saved_source = work / "config.json", work / "source.json"
    if saved_cfg.exists() and _has_results(work) and CompressionConfig.load(saved_cfg) != config:
        raise UserError(f"{work} holds a partial run with different settings: rerun with those settings to "
                        "resume, or use another --out (or delete the folder)")
    if saved_source.exists() and _has_results(work):
        before = json.loads(saved_source.read_text()).get("source")
        if before != source:
            raise UserError(f"{work} holds a partial run of another model (fingerprint {before}, this one {source}): "
                            "rerun with that model to resume, or use another --out (or delete the folder)")
    config.save(saved_cfg)
    write_json(saved_source, {"source": source})
    return work


def _has_results(work: Path) -> bool:
    """Whether ``work`` holds solved groups or refined layers (anything worth resuming)."""
    return work.is_dir() and any(p.suffix == ".safetensors" for p in work.rglob("*"))


def discard_empty(out_dir: Path, work: Path, created: bool) -> None:
    """After a failed run: drop a ``work/`` with nothing to resume, and the folder if this run made it."""
    if _has_results(work):
        return
    shutil.rmtree(work, ignore_errors=True)
    if created and out_dir.is_dir() and {p.name for p in out_dir.iterdir()} <= {FILE_LIST}:
        shutil.rmtree(out_dir, ignore_errors=True)


def check_layers(model: nn.Module, config: CompressionConfig) -> None:
    """Settings that only the model can judge: ``--dense-layers`` may only name layers it has, and a
    calibration window may not be longer than its context (learned positions would index past the table)."""
    n = get_adapter(model).num_layers
    bad = [i for i in config.dense_layers if not 0 <= int(i) < n]
    if bad:
        raise UserError(f"--dense-layers names layer {bad[0]}, which this model lacks: it has layers 0..{n - 1}")
    needs_text = config.method in ("weighted", "slicegpt") or config.compress_embeddings
    limit = getattr(model.config, "max_position_embeddings", None)
    if needs_text and limit and config.calib_seq_len > limit:
        raise UserError(f"--calib-seq-len {config.calib_seq_len} exceeds the model's {limit} positions: use {limit} "
                        "or less")


def saved_extra(config: CompressionConfig, plan: Plan, seconds: float) -> dict:
    """What the checkpoint's config.json records about the compression, next to the surgery record."""
    extra = {"compression": config.settings(), "promised_params": plan.promised_params,
             "original_params": plan.original_params, "removed": plan.removed, "seconds": round(seconds, 1)}
    if plan.allocation is not None:
        extra["allocation"] = plan.allocation
    return extra


def _save(model, tokenizer, config, plan, out_dir: Path, seconds: float, source: str, keep_work: bool) -> None:
    """Save through the checkpoint module; the resumable work/ folder goes along only with ``keep_work``."""
    extra = saved_extra(config, plan, seconds)
    save_compressed(model, out_dir, tokenizer=tokenizer, extra_config=extra, source=source,
                    carry=("work",) if keep_work else ())


def _slicegpt(model, tokenizer, config, out_dir, original, echo, source) -> Path:
    return slicegpt_compress(model, tokenizer, config, out_dir, original_params=original, echo=echo, source=source)


def compress_cli(*, model: str, out: str, config: str | None = None, overwrite: bool = False, **overrides) -> Path:
    """What the `procrustes-onnx compress` verb calls: load the model, build the config (a JSON file
    and/or keyword overrides such as ratio=0.2, structure="gs"), compress, return the folder."""
    base = CompressionConfig.load(config).to_dict() if config else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "preset" in given and "ratio" in given:
        raise UserError("--preset and --ratio both given: pass one (a preset fixes the kept fraction per matrix, "
                        "--ratio the fraction of all parameters removed)")
    if "max_loss" in given and ("ratio" in given or "preset" in given):
        raise UserError("--max-loss and --ratio/--preset both given: pass one (--max-loss finds the removal itself)")
    if "max_loss" in given:
        base["ratio"] = base["preset"] = None
    elif "preset" in given:
        base["ratio"] = base["max_loss"] = None  # a preset replaces the default (or the config file's) ratio
    elif "ratio" in given:
        base["preset"] = base["max_loss"] = None
    base.update(given)
    cfg = CompressionConfig.from_dict(base)
    cfg.fanout.check()
    if cfg.stream:
        from .streamed import check_streamable  # streamed imports this module
        check_streamable(cfg)
    calib = cfg.calib_text.rpartition("@")[0] or cfg.calib_text
    model_dir = resolve_model_dir(model)
    check_output(out, inputs=[model_dir, config, calib if Path(calib).exists() else None], overwrite=overwrite,
                 resumable=True)
    saved = Path(out) / "work" / "config.json"
    if overwrite and saved.is_file() and CompressionConfig.load(saved) != cfg:
        shutil.rmtree(saved.parent)  # --overwrite: a partial run of other settings is replaced, not resumed
    if cfg.stream:
        from .streamed import compress_streamed
        if is_compressed_checkpoint(model_dir):
            require_dense(model_dir, model)
        return compress_streamed(model_dir, load_tokenizer(model_dir), cfg, out, progress=True)
    loaded, tokenizer = load_model(model, dtype=torch.float32)
    return compress(loaded, tokenizer, cfg, out)
