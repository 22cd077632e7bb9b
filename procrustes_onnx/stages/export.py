"""Export: the dense model -> `<model>-dense`, or a checkpoint -> `<model>-<variant>-<size>` (its dense twin
exported, then its structured MatMuls rewritten): the shipped ONNX folders, KV cache included
(`exporters.pipeline`)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from procrustes_onnx.exporters.pipeline import export_compressed, export_model

from ..cache import cached_dir, content_hash
from . import Artifact, Job, Note

__all__ = ["title", "run", "write_readme"]


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.rstrip("/")).name.removesuffix(".gguf")).strip("-") or "model"


def _removal_label(config: dict) -> tuple[str, str]:
    """How a variant's folder and title name its size: the removal asked, or the loss budget."""
    if config.get("max_loss") is not None:
        return f"maxloss{config['max_loss']:g}", f"at most {config['max_loss']:.0%} higher held-out perplexity"
    return f"{round(100 * config['ratio'])}", f"{config['ratio']:.0%} of parameters removed"


def write_readme(folder: Path, title: str, details: dict) -> None:
    """The README.md of a shipped folder: how to load it with ONNX Runtime, optimum and onnxruntime-genai."""
    lines = [f"# {title}", "", "Made by `procrustes-onnx run`. Load it with plain ONNX Runtime:", "",
             "```python", "import onnxruntime as ort",
             f"session = ort.InferenceSession('{folder.name}/model.onnx')  # inputs: input_ids, attention_mask, "
             "position_ids, past_key_values.{i}.key|value", "```", "",
             "or with optimum (optimum-onnx 0.1.0 needs transformers 4.x; the tokenizer files load in 4.x and 5.x):",
             "", "```python", "from optimum.onnxruntime import ORTModelForCausalLM",
             "from transformers import AutoTokenizer",
             f"model = ORTModelForCausalLM.from_pretrained('{folder.name}')",
             f"tokenizer = AutoTokenizer.from_pretrained('{folder.name}')", "```", "",
             "or with onnxruntime-genai (genai_config.json; keep its past_present_share_buffer as written):", "",
             "```python", "import onnxruntime_genai as og", f"model = og.Model('{folder.name}')", "```", ""]
    lines += [f"- {k}: {v}" for k, v in details.items()]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _attention_key(job: Job) -> dict:
    """The attention choice joins the cache key only when it is not the unfused graph (older caches stay valid)."""
    attention = getattr(job.opts, "attention", "unfused")
    return {} if attention == "unfused" else {"attention": attention}


def title(source: Artifact, job: Job) -> str:
    return "export dense (KV cache)" if source.kind == "model" else f"export + rewrite {source.name}"


def _dense(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    key = {"model": source.key, "stage": "export-dense", **_attention_key(job)}

    def build(d: Path) -> None:
        export_model(str(source.path), d, attention=job.opts.attention)
        write_readme(d, f"{job.opts.model}, dense", {"source": job.opts.model})
    folder = cached_dir(out / f"{_slug(job.opts.model)}-dense", key, build, note)
    job.graphs.append(folder)
    return Artifact("dense", "onnx", folder, content_hash(key), origin=source)


def _compressed(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    label, size = _removal_label(source.config)
    key = {"checkpoint": source.key, "stage": "export-rewrite", **_attention_key(job)}
    same_shape = source.config["rotation"] == "global" and source.config["method"] != "slicegpt"
    # a globally rotated model has the dense graph with other weights: its dense twin is kept, a template for the next
    twin = job.work / f"{source.name}-{source.key}-twin" if same_shape else None

    def build(d: Path) -> None:
        export_compressed(source.path, d, dense_dir=twin, templates=list(job.graphs) if twin else (),
                          attention=job.opts.attention)
        shutil.copy2(source.path / "structure.json", d / "structure.json")  # the structure manifest
        write_readme(d, f"{job.opts.model}, {source.name}, {size}", {"compression": source.config})
    folder = cached_dir(out / f"{_slug(job.opts.model)}-{source.name}-{label}", key, build, note)
    if twin is not None and (twin / "model.onnx").is_file():
        job.graphs.append(twin)
    return Artifact(source.name, "onnx", folder, content_hash(key), origin=source)


def run(source: Artifact, job: Job, out: Path, note: Note) -> Artifact:
    return (_dense if source.kind == "model" else _compressed)(source, job, out, note)
