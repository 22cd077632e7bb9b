"""The stages of the main job (`procrustes-onnx run`), one module each, all called the same way.

A stage module has `title(source, job) -> str`, its header in the run's log, and
`run(source, job, out, note) -> Artifact`: it reads one artifact, writes what it makes under the folder `out`
and returns it (a measuring stage returns its source with the measurement added). Each caches its own work
with `procrustes_onnx.cache`, keyed by the content hash of what it reads (the source's key and the options
it uses), so a rerun reuses what did not change. The driver, `procrustes_onnx.pipeline.run_pipeline`, lists
the hops; adding a stage is a module here and a line there."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from procrustes_onnx.core.outputs import check_output, claim
from procrustes_onnx.core.sources import require_dense, resolve_model_dir
from procrustes_onnx.core.texts import load_text

from ..cache import content_hash, folder_hash
from ..pipeline_options import RunOptions

__all__ = ["Artifact", "Job", "Note"]

#: echoes a cache message ("  reuse ..."); the run's clock marks a stage whose outputs were all reused
Note = Callable[[str], None]
_WORK = ".work"  # under --out: the run's resumable state


@dataclass(frozen=True)
class Artifact:
    """What one stage hands the next: a folder, the hash it is cached by, and what later stages read of it."""

    name: str  # its entry in results.json: "dense", a variant, "<name>-int4", "reference"
    kind: str  # "model" (a Hugging Face folder), "checkpoint", "onnx", "quantized", "reference"
    path: Path
    key: str  # what made it, as a content hash (the reference: its folder's name); in the keys of what reads it
    origin: Artifact | None = None  # what it was made from: an ONNX folder is validated against its torch model
    config: dict = field(default_factory=dict)  # a variant's compression config: folder names, titles, graph shape
    windows: int | None = None  # perplexity windows where fewer than --eval-windows (a quantized copy, the reference)
    results: dict = field(default_factory=dict)  # what the stages found, by results.json field, in the order found

    def measured(self, **results) -> Artifact:
        """A copy with these measurements added: an artifact a later stage holds never changes under it."""
        return replace(self, results={**self.results, **results})


@dataclass(frozen=True)
class Job:
    """What every stage of one run reads besides its source: the options and the inputs checked up front."""

    opts: RunOptions
    model: Artifact  # the dense model (kind "model", named "dense")
    text: str  # the evaluation text, read once
    text_key: str  # its content, not its name: an edited file is measured again
    graphs: list[Path] = field(default_factory=list)  # exported graphs a later export of the same shape reuses

    @property
    def work(self) -> Path:
        """The run's resumable state: checkpoints, dense twins, cached measurements."""
        return Path(self.opts.out) / _WORK

    @classmethod
    def start(cls, opts: RunOptions) -> Job:
        """Every input checked before any long stage: the text, the model, the output folder, the task names."""
        text = load_text(opts.text)
        model_dir = require_dense(resolve_model_dir(opts.model), opts.model)
        # never inside an input; a folder of others' files needs --overwrite
        checked = check_output(Path(opts.out), inputs=[model_dir], overwrite=opts.overwrite, resumable=True)
        if opts.evaluate:  # a task name is checked now, not after an hour of compression and export
            from procrustes_onnx.runtime.lm_eval_adapter import check_tasks
            check_tasks(list(opts.tasks))
        claim(checked, [_WORK])
        return cls(opts, Artifact("dense", "model", model_dir, folder_hash(model_dir)), text, content_hash(text))
