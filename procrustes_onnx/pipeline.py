"""The main job (`procrustes-onnx run`): compress, export, rewrite, validate, evaluate, benchmark, report.

Every stage can run alone through its CLI verb; here each is cached by the content hash of its inputs,
so an interrupted run resumes where it stopped and a finished one is not redone."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from .pipeline_options import VARIANTS, RunOptions
from .cache import cached_dir, cached_json, content_hash, folder_hash

__all__ = ["run_pipeline"]


class _Clock:
    """Stage headers with elapsed time and a naive ETA from the stages done so far."""

    def __init__(self, total: int) -> None:
        self.start, self.total, self.done, self.times = time.perf_counter(), total, 0, {}
        self._name, self._t, self._reused = None, None, False

    def note(self, message: str) -> None:
        """Echo a cache message; a stage whose outputs were all reused is reported as such."""
        print(message, flush=True)
        self._reused = self._reused or message.lstrip().startswith("reuse")

    def stage(self, name: str) -> None:
        self._close()
        self._name, self._t = name, time.perf_counter()
        elapsed = self._t - self.start
        eta = f", ETA {elapsed / self.done * (self.total - self.done) / 60:.1f} min" if self.done else ""
        print(f"[{self.done + 1}/{self.total}] {name}  (elapsed {elapsed / 60:.1f} min{eta})", flush=True)

    def _close(self) -> None:
        if self._name is not None:
            seconds = round(time.perf_counter() - self._t, 1)
            self.times[self._name] = f"{seconds} (reused earlier output)" if self._reused else seconds
            self.done += 1
            self._name, self._reused = None, False

    def finish(self) -> dict:
        self._close()
        return {"stages_s": self.times, "total_s": round(time.perf_counter() - self.start, 1)}


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.rstrip("/")).name.removesuffix(".gguf")).strip("-") or "model"


def _compression_config(opts: RunOptions, variant: str):
    from procrustes_onnx.compiler.config import CompressionConfig

    overrides = {"ratio": opts.ratio, "rotation": opts.rotation, "calib_samples": opts.calib_samples,
                 "calib_seq_len": opts.calib_seq_len, "iterations": opts.iterations, "calib_text": opts.calib}
    base = CompressionConfig().to_dict()
    base.update(VARIANTS[variant])
    if VARIANTS[variant].get("method") != "slicegpt":
        base.update(opts.solver)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if VARIANTS[variant].get("method") != "slicegpt":  # the accuracy budget is a ProcrustesGPT setting
        budget = {"allocation": opts.allocation, "max_loss": opts.max_loss, "heldout_samples": opts.heldout_samples}
        base.update({k: v for k, v in budget.items() if v is not None})
        if opts.max_loss is not None:
            base["ratio"] = None
    return CompressionConfig.from_dict(base)


def _removal_label(config: dict) -> tuple[str, str]:
    """How a variant's folder and title name its size: the removal asked, or the loss budget."""
    if config.get("max_loss") is not None:
        return f"maxloss{config['max_loss']:g}", f"at most {config['max_loss']:.0%} higher held-out perplexity"
    return f"{round(100 * config['ratio'])}", f"{config['ratio']:.0%} of parameters removed"


def _compress(model_dir: Path, config, out: Path) -> None:
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.compress import compress

    model, tokenizer = load_model(str(model_dir))
    compress(model, tokenizer, config, out)


def _heal(checkpoint: Path, model_dir: Path, config, out: Path) -> None:
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.heal import heal_checkpoint
    from procrustes_onnx.core.sources import cache_root

    teacher, tokenizer = load_model(str(model_dir))
    heal_checkpoint(checkpoint, out, teacher, tokenizer, config, teacher_cache=cache_root() / "heal-teacher",
                    overwrite=True)  # a stage folder of this run's own (a killed rerun may find it unmarked)


def _write_artifact_readme(folder: Path, title: str, details: dict) -> None:
    lines = [f"# {title}", "", "Made by `procrustes-onnx run`. Load it with plain ONNX Runtime:", "",
             "```python", "import onnxruntime as ort",
             f"session = ort.InferenceSession('{folder.name}/model.onnx')  # inputs: input_ids, attention_mask, "
             "position_ids, past_key_values.{i}.key|value", "```", "",
             "or with optimum (optimum-onnx 0.1.0 needs transformers 4.x; the tokenizer files load in 4.x and 5.x):",
             "", "```python", "from optimum.onnxruntime import ORTModelForCausalLM",
             "from transformers import AutoTokenizer",
             f"model = ORTModelForCausalLM.from_pretrained('{folder.name}')",
             f"tokenizer = AutoTokenizer.from_pretrained('{folder.name}')", "```", "",
             "or with onnxruntime-genai (genai_config.json; keep its past_present_share_buffer false):", "",
             "```python", "import onnxruntime_genai as og", f"model = og.Model('{folder.name}')", "```", ""]
    lines += [f"- {k}: {v}" for k, v in details.items()]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _quantize_stage(opts: RunOptions, artifacts: dict, clock: _Clock) -> dict[str, dict]:
    """A weight-only copy of every fp32 artifact, beside it (``<artifact>-int4``)."""
    from dataclasses import asdict

    from procrustes_onnx.exporters.quantize import quantize_artifact

    from .pipeline_options import QUANT_WINDOWS

    q = opts.quantize
    clock.stage(f"quantize every artifact ({q.name}, ONNX Runtime MatMulNBits)")
    out = {}
    for name, a in artifacts.items():
        key = {"a": a["key"], "quantize": asdict(q)}

        def build(d: Path, a=a, name=name) -> None:
            quantize_artifact(a["path"], d, q, overwrite=True)
            _write_artifact_readme(d, f"{opts.model}, {name}, weight-only {q.name}", {"quantized from": a["path"].name,
                                                                                      "quantization": asdict(q)})
        folder = cached_dir(Path(a["path"]).parent / f"{Path(a['path']).name}-{q.name}", key, build, clock.note)
        out[name] = {"path": folder, "key": content_hash(key), "of": name,
                     "windows": min(opts.eval_windows or QUANT_WINDOWS, QUANT_WINDOWS)}
    return out


def _reference(opts: RunOptions, model_dir: Path, model_key: str, work: Path) -> dict | None:
    """onnxruntime-genai's builder on the same model at the same precision, where it is installed."""
    from .reference import build_reference

    q = opts.quantize
    folder = build_reference(model_dir, work / f"genai-builder-{q.name}-{model_key}", q.name)
    if folder is None:
        return None
    from .pipeline_options import QUANT_WINDOWS
    return {"path": folder, "key": f"genai-builder-{q.name}-{model_key}", "label": f"onnxruntime-genai builder {q.name}",
            "windows": min(opts.eval_windows or QUANT_WINDOWS, QUANT_WINDOWS)}


def run_pipeline(opts: RunOptions) -> Path:
    from procrustes_onnx.core.sources import require_dense, resolve_model_dir
    from procrustes_onnx.core.texts import load_text

    from . import pipeline_measure as measure
    from .report import write_report

    unknown = [v for v in opts.variants if v not in VARIANTS]
    if unknown:
        from procrustes_onnx.core.errors import UserError
        raise UserError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    healing = opts.heal is not None and opts.heal.tokens > 0
    clock = _Clock(total=4 + (3 if healing else 2) * len(opts.variants) + (2 if opts.evaluate else 0)
                   + (1 if opts.benchmark else 0) + (1 if opts.quantize is not None else 0))
    out = Path(opts.out)
    work = out / ".work"
    clock.stage(f"model {opts.model}")
    eval_text = load_text(opts.text)  # a missing corpus fails here, before any long stage
    model_dir = require_dense(resolve_model_dir(opts.model), opts.model)
    from procrustes_onnx.core.outputs import check_output, claim  # never inside an input; a folder of others' files needs --overwrite
    checked = check_output(out, inputs=[model_dir], overwrite=opts.overwrite, resumable=True)
    if opts.evaluate:  # a task name is checked now, not after an hour of compression and export
        from procrustes_onnx.runtime.lm_eval_adapter import check_tasks
        check_tasks(list(opts.tasks))
    claim(checked, [".work"])
    model_key = folder_hash(model_dir)
    text_key = content_hash(eval_text)  # the text's content, not its name: an edited file is re-measured
    slug = _slug(opts.model)

    entries: dict[str, dict] = {}
    for variant in opts.variants:
        config = _compression_config(opts, variant)
        clock.stage(f"compress {variant} " + (f"at {config.ratio:.0%} removed" if config.max_loss is None
                                              else f"within --max-loss {config.max_loss:g}"))
        key = {"model": model_key, "config": config.to_dict()}
        # one folder per configuration: a partial run of other settings is never clobbered or mixed in
        ckpt = cached_dir(work / f"{variant}-{content_hash(key)}", key, lambda d, c=config: _compress(model_dir, c, d),
                          clock.note)
        entries[variant] = {"checkpoint": ckpt, "key": content_hash(key), "config": config.to_dict()}
    heal_scores: dict[str, dict] = {}
    for variant, entry in entries.items() if healing else ():
        clock.stage(f"heal {variant} ({opts.heal.tokens:,} {opts.heal.text} tokens, {opts.heal.mode})")
        settings = {k: v for k, v in opts.heal.to_dict().items() if k not in ("threads", "device")}
        key = {"checkpoint": entry["key"], "heal": settings}
        healed = cached_dir(work / f"{variant}-{content_hash(key)}-healed", key,
                            lambda d, e=entry: _heal(e["checkpoint"], model_dir, opts.heal, d), clock.note)
        heal_scores[variant] = cached_json(work / "results" / f"heal-{variant}.json", {**key, "text": text_key},
                                           lambda e=entry, h=healed: measure.heal_scores(e["checkpoint"], h, eval_text,
                                                                                         opts), clock.note)
        entry.update(unhealed=entry["checkpoint"], checkpoint=healed, key=content_hash(key))

    from procrustes_onnx.exporters.pipeline import export_compressed, export_model

    clock.stage("export dense (KV cache)")
    dense_dir = out / f"{slug}-dense"
    dense_key = {"model": model_key, "stage": "export-dense"}

    def build_dense(d: Path) -> None:
        export_model(str(model_dir), d)
        _write_artifact_readme(d, f"{opts.model}, dense", {"source": opts.model})

    cached_dir(dense_dir, dense_key, build_dense, clock.note)
    artifacts = {"dense": {"path": dense_dir, "key": content_hash(dense_key), "torch": ("dense", model_dir)}}
    twins: list[Path] = []  # dense twins of globally rotated variants: same graph, other weights
    for variant, entry in entries.items():
        clock.stage(f"export + rewrite {variant}")
        label, title = _removal_label(entry["config"])
        folder = out / f"{slug}-{variant}-{label}"
        key = {"checkpoint": entry["key"], "stage": "export-rewrite"}

        same_shape = entry["config"]["rotation"] == "global" and entry["config"]["method"] != "slicegpt"
        twin = work / f"{variant}-{entry['key']}-twin" if same_shape else None  # kept: a template for the next

        def build(d: Path, e=entry, v=variant, twin=twin) -> None:
            export_compressed(e["checkpoint"], d, dense_dir=twin, templates=[dense_dir, *twins] if twin else ())
            shutil.copy2(Path(e["checkpoint"]) / "structure.json", d / "structure.json")  # the structure manifest
            _write_artifact_readme(d, f"{opts.model}, {v}, {title}",
                                   {"compression": e["config"]})
        cached_dir(folder, key, build, clock.note)
        if twin is not None and (twin / "model.onnx").is_file():
            twins.append(twin)
        artifacts[variant] = {"path": folder, "key": content_hash(key), "torch": ("compressed", entry["checkpoint"])}

    quantized: dict[str, dict] = {}  # fp32 artifact name -> its weight-only copy
    reference = None  # onnxruntime-genai's builder at the same precision: the point to beat
    if opts.quantize is not None:
        quantized = _quantize_stage(opts, artifacts, clock)
        reference = _reference(opts, model_dir, model_key, work) if opts.reference else None
    extra = {**{f"{n}-{opts.quantize.name}": q for n, q in quantized.items()},
             **({"reference": reference} if reference else {})}

    results: dict[str, dict] = {name: {"path": str(a["path"])} for name, a in artifacts.items()}
    clock.stage("validate ONNX Runtime vs torch")
    for name, a in artifacts.items():
        results[name]["inspect"] = measure.inspect(a["path"])
        key = {"a": a["key"], "text": text_key}
        results[name]["validation"] = cached_json(work / "results" / f"validate-{name}.json", key,
                                                  lambda a=a: measure.validate(a, eval_text, opts), clock.note)
    if opts.evaluate:
        clock.stage(f"perplexity on {opts.text} ({opts.eval_windows or 100} windows, ONNX Runtime)")
        for name, a in artifacts.items():
            key = {"a": a["key"], "text": text_key, "windows": opts.eval_windows}
            results[name]["perplexity"] = cached_json(work / "results" / f"ppl-{name}.json", key,
                                                      lambda a=a: measure.perplexity(a, eval_text, opts), clock.note)
        for name, q in extra.items():  # the first windows only: the fp32 delta is what they show
            key = {"a": q["key"], "text": text_key, "windows": q["windows"]}
            q["perplexity"] = cached_json(work / "results" / f"ppl-{name}.json", key,
                                          lambda q=q: measure.perplexity(q, eval_text, opts, windows=q["windows"]),
                                          clock.note)
        clock.stage("zero-shot local tasks (lm-eval, ONNX Runtime)")
        for name, a in artifacts.items():
            key = {"a": a["key"], "limit": opts.task_limit, "tasks": list(opts.tasks)}
            results[name]["tasks"] = cached_json(work / "results" / f"tasks-{name}.json", key,
                                                 lambda a=a: measure.tasks(a, opts), clock.note)
    if opts.benchmark:
        clock.stage("benchmark prefill and decode (ONNX Runtime CPU)")
        for name, a in artifacts.items():  # timings are never reused: they describe this run's machine
            results[name]["benchmark"] = measure.benchmark(a, opts)
        for q in extra.values():
            q["benchmark"] = measure.benchmark(q, opts)
    for name, q in quantized.items():
        results[name]["quantized"] = {**measure.quantize_summary(q["path"]), "path": str(q["path"]),
                                      **{k: q[k] for k in ("perplexity", "benchmark", "windows") if k in q}}
    reference_result = None
    if reference is not None:
        from procrustes_onnx.runtime.benchmark import bytes_on_disk
        reference_result = {"label": reference["label"], "path": str(reference["path"]),
                            "bytes": bytes_on_disk(reference["path"]),
                            **{k: reference[k] for k in ("perplexity", "benchmark", "windows") if k in reference}}
    for name, entry in entries.items():
        results[name]["compression"] = measure.compression_summary(entry.get("unhealed", entry["checkpoint"]))
        if name in heal_scores:
            results[name]["healing"] = heal_scores[name]
    clock.stage("report")
    timing = clock.finish()
    report = write_report(out, results, opts, timing, reference=reference_result)
    print(f"done in {timing['total_s'] / 60:.1f} min: {report}")
    return report
