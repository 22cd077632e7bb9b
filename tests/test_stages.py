"""Every stage of the main job is called the same way, and the driver knows each: adding a stage is one module."""

import importlib
import inspect
import pkgutil

from procrustes_onnx import pipeline, stages


def _stage_modules() -> list:
    return [importlib.import_module(f"{stages.__name__}.{m.name}") for m in pkgutil.iter_modules(stages.__path__)]


def test_every_stage_module_has_the_shared_calling_convention():
    modules = _stage_modules()
    names = {m.__name__.rsplit(".", 1)[1] for m in modules}
    assert names >= {"compress", "heal", "export", "quantize", "validate", "perplexity", "tasks", "benchmark"}
    for module in modules:
        title, run = inspect.signature(module.title), inspect.signature(module.run)
        assert list(title.parameters) == ["source", "job"], module.__name__
        assert list(run.parameters) == ["source", "job", "out", "note"], module.__name__
        assert run.return_annotation in ("Artifact", "Artifact | None"), module.__name__


def test_every_stage_module_is_imported_by_the_driver():  # one it does not import is never run
    driven = {v for v in vars(pipeline).values() if inspect.ismodule(v)}
    assert set(_stage_modules()) <= driven
