"""`compress`: the ProcrustesGPT driver. Fuse norms, plan shapes, solve the Frobenius stage per position
(or one global rotation), optionally the weighted stage, rotate, swap linears for StructuredLinear and
save the checkpoint. Per-position results are checkpointed in ``out_dir/work`` so a killed run resumes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from procrustes_onnx.errors import UserError
from procrustes_onnx.ops import StructuredLinear, project_factors, structured_from_spec

from .adapters import get_adapter, get_module
from .calibration import calibration_windows, collect_grams, rotate_gram
from .config import CompressionConfig, Plan, build_plan
from .positions import Position, residual_positions, stream_matrix
from .procrustes import frobenius_als
from .weighted import WeightedTerm, balance_weights, weighted_stage

__all__ = ["compress", "compress_cli", "plan_for_model", "count_params", "saved_param_count"]

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    """Numbers the saved checkpoint stores: each parameter once (tied ones once), skips compactly."""
    from .skips import stored_parameter_count
    return stored_parameter_count(model)


def saved_param_count(out_dir: str | Path) -> int:
    """Numbers stored in a checkpoint's model.safetensors."""
    with safe_open(str(Path(out_dir) / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _skip_params(model: nn.Module, config: CompressionConfig) -> int:
    """Stored numbers of the two skip matrices per layer that per-position rotation adds."""
    if config.rotation == "global":
        return 0
    from .skips import shortcut_stored_numel
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
    return build_plan(candidates, config, original_params, fixed, _skip_params(model, config))


# --------------------------------------------------------------------------------------------- stages

def _stack_terms(model: nn.Module, pos: Position, specs: dict[str, dict]):
    """(stacked matrices d x n, Frobenius projections) of the compressed linears at one position."""
    mats, projs = [], []
    for ref in pos.writers + pos.readers:
        spec = specs.get(ref.path)
        if spec is None:
            continue
        w = stream_matrix(model, ref).detach().to(torch.float64)
        if ref.reads:
            mats.append(w)
            projs.append(lambda m, s=spec: _materialize(project_factors(m, s), s))
        else:
            mats.append(w.T)
            projs.append(lambda m, s=spec: _materialize(project_factors(m.T, s), s).T)
    return mats, projs


def _materialize(factors: dict, spec: dict) -> torch.Tensor:
    return structured_from_spec(spec, {k: v.to(torch.float64) for k, v in factors.items()},
                                dtype=torch.float64).materialize().detach()


def _weighted_terms(model: nn.Module, pos: Position, specs: dict[str, dict], grams: dict[str, torch.Tensor],
                    balance: str) -> list[WeightedTerm]:
    terms = []
    reader_gram = grams.get(pos.readers[0].path)
    for ref in pos.writers + pos.readers:
        spec = specs.get(ref.path)
        if spec is None:
            continue
        w = stream_matrix(model, ref).detach()
        proj = (lambda m, c, s=spec: _materialize(project_factors(m, s, gram=c), s))
        gram = reader_gram if ref.reads else grams[ref.path]
        terms.append(WeightedTerm(w, gram, proj, "in" if ref.reads else "out", name=ref.path))
    balance_weights(terms, balance)
    return terms


def _gram_paths(positions: list[Position], specs: dict[str, dict]) -> list[str]:
    paths = []
    for pos in positions:
        if any(r.path in specs for r in pos.readers):
            paths.append(pos.readers[0].path)
        paths.extend(w.path for w in pos.writers if w.path in specs)
    return paths


def _cached(work: Path, name: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Per-position checkpoint: load ``work/name.safetensors`` if a previous run finished it."""
    path = work / f"{name}.safetensors"
    if path.exists():
        return load_file(str(path))["r"]
    r = fn().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file({"r": r}, str(tmp))
    os.replace(tmp, path)
    return r


def _solve(model, positions, specs, config, work, grams, bar) -> list[torch.Tensor]:
    """Rotation R_p per position (model orientation: stream h -> h R_p); global mode repeats one R."""
    d = get_adapter(model).hidden_size
    eye = torch.eye(d, dtype=torch.float64)
    groups = positions if config.rotation == "per-position" else [None]
    rs = []
    for g in groups:
        sel = positions if g is None else [g]
        tag = "global" if g is None else f"pos{g.index:03d}"

        def frob() -> torch.Tensor:
            mats, projs = [], []
            for pos in sel:
                m, p = _stack_terms(model, pos, specs)
                mats += m
                projs += p
            if not mats or config.iterations == 0:
                return eye.clone()
            return frobenius_als(mats, projs, iters=config.iterations, tol=config.tol).q.T.contiguous()

        r = _cached(work, f"F_{tag}", frob)
        if config.method == "weighted":
            def weighted(r_f=r) -> torch.Tensor:
                terms = [t for pos in sel for t in _weighted_terms(model, pos, specs, grams, config.balance)]
                if not terms:
                    return r_f
                res = weighted_stage(terms, r_f, outer_iters=config.weighted_outer,
                                     rotation_iters=config.rotation_iters)
                log.info("%s weighted loss %s", tag, " -> ".join(f"{x:.4g}" for x in res.loss))
                return res.r
            r = _cached(work, f"W_{tag}", weighted)
        rs.extend([r] * len(sel))
        bar.update(len(sel))
    return rs


def _apply(model, positions, specs, rs, grams, weighted: bool, rotation: str) -> None:
    """Rotate the dense model, then replace each planned linear by its structured projection."""
    from .rotation import rotate_global, rotate_per_position
    if rotation == "global":
        rotate_global(model, rs[0].to(torch.float64))
    else:
        rotate_per_position(model, [r.to(torch.float64) for r in rs])
    for pos, r in zip(positions, rs):
        for ref in pos.writers + pos.readers:
            spec = specs.get(ref.path)
            if spec is None:
                continue
            linear = get_module(model, ref.path)
            w = stream_matrix(model, ref).detach().to(torch.float64)
            gram = None
            if weighted:
                gram = rotate_gram(grams[pos.readers[0].path], r) if ref.reads else grams[ref.path]
            factors = project_factors(w, spec, gram=gram)
            dtype = linear.weight.dtype
            matrix = structured_from_spec(spec, {k: v.to(dtype) for k, v in factors.items()}, dtype=dtype)
            bias = None if linear.bias is None else linear.bias.detach()
            _replace(model, ref.path, StructuredLinear(matrix, bias))


def _replace(model, path, module) -> None:
    try:
        from .checkpoint import replace_linear
    except ImportError:
        from .adapters import set_module as replace_linear
    replace_linear(model, path, module)


# --------------------------------------------------------------------------------------------- driver

def compress(model: nn.Module, tokenizer, config: CompressionConfig, out_dir: str | Path, *,
             progress: bool = True, keep_work: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Compress ``model`` (modified in place) into a checkpoint folder ``out_dir``; returns it.

    Deterministic for ``config.seed``; rerunning with the same arguments after an interruption
    reuses the per-position rotations already in ``out_dir/work`` (a different config is refused).
    """
    config.validate()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    saved_cfg = work / "config.json"
    if saved_cfg.exists() and CompressionConfig.load(saved_cfg) != config:
        raise UserError(f"{out_dir} holds a partial run with different settings: use another --out or delete "
                        f"{work}")
    config.save(saved_cfg)
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    model.eval()
    original = count_params(model)
    if config.method == "slicegpt":
        return _slicegpt(model, tokenizer, config, out_dir, original, echo)

    from .fusion import fuse_norms
    fuse_norms(model)
    plan = plan_for_model(model, config, original)
    echo(plan.table())
    specs = {e.path: e.spec for e in plan.entries}
    positions = residual_positions(model)

    grams: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if config.method == "weighted":
            grams = _calibrate(model, tokenizer, config, _gram_paths(positions, specs), progress)
        bar = tqdm(total=len(positions), desc=f"{config.method} {config.rotation}", unit="pos",
                   disable=not progress)
        rs = _solve(model, positions, specs, config, work, grams, bar)
        bar.close()
        _apply(model, positions, specs, rs, grams, config.method == "weighted", config.rotation)
    _save(model, tokenizer, config, plan, out_dir, time.perf_counter() - start)
    saved = saved_param_count(out_dir)
    if saved != plan.promised_params:
        log.warning("plan promised %d parameters but the checkpoint stores %d", plan.promised_params, saved)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    echo(f"saved {out_dir}: {saved:,} parameters stored, {100 * (1 - saved / original):.2f}% removed, "
         f"{time.perf_counter() - start:.0f} s")
    return out_dir


def _calibrate(model, tokenizer, config: CompressionConfig, paths: list[str], progress: bool):
    from procrustes_onnx.texts import load_text, tokenize_corpus
    if tokenizer is None:
        raise UserError("the weighted stage needs the model's tokenizer for calibration text: pass it, or use "
                        "--method frobenius")
    need = config.calib_samples * config.calib_seq_len
    tokens = tokenize_corpus(tokenizer, load_text(config.calib_text), max_tokens=max(4 * need, need + 1))
    windows = calibration_windows(tokens, config.calib_samples, config.calib_seq_len, config.seed)
    return collect_grams(model, windows, paths, progress=progress)


def _save(model, tokenizer, config, plan, out_dir: Path, seconds: float) -> None:
    """Save through the checkpoint module into a staging folder, then move the files into out_dir."""
    from .checkpoint import save_compressed
    staging = out_dir.parent / f".{out_dir.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    extra = {"compression": config.to_dict(), "promised_params": plan.promised_params,
             "original_params": plan.original_params, "removed": plan.removed, "seconds": round(seconds, 1)}
    save_compressed(model, staging, tokenizer=tokenizer, extra_config=extra)
    for item in staging.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def _slicegpt(model, tokenizer, config, out_dir, original, echo) -> Path:
    try:
        from .slicegpt import slicegpt_compress
    except ImportError:
        raise UserError("--method slicegpt is not available in this build: use frobenius or weighted") from None
    return slicegpt_compress(model, tokenizer, config, out_dir, original_params=original, echo=echo)


def compress_cli(*, model: str, out: str, config: str | None = None, **overrides) -> Path:
    """What the `procrustes-onnx compress` verb calls: load the model, build the config (a JSON file
    and/or keyword overrides such as ratio=0.2, structure="gs"), compress, return the folder."""
    from procrustes_onnx.sources import load_model
    base = CompressionConfig.load(config).to_dict() if config else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if "preset" in overrides and overrides["preset"] is not None and "ratio" not in overrides:
        base["ratio"] = None
    cfg = CompressionConfig.from_dict(base)
    loaded, tokenizer = load_model(model, dtype=torch.float32)
    return compress(loaded, tokenizer, cfg, out)
