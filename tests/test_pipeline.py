"""The main job end to end on a tiny random model: artifacts load, numbers come from the run, resume works."""

import importlib.util
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import pytest

from procrustes_onnx import pipeline_measure
from procrustes_onnx.cache import folder_hash
from procrustes_onnx.exporters.quantize import QuantizeConfig
from procrustes_onnx.pipeline import run_pipeline
from procrustes_onnx.pipeline_options import RunOptions
from procrustes_onnx.testing import save_tiny_model

WORDS = "the a hacker file system kernel bug fix user program data net mail code time word byte".split()


def _text(path, seed):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(60)))
    return str(path)


@dataclass(frozen=True)
class Inputs:
    """The job's inputs, shared by the tests and never modified: tiny model, eval and calibration text."""

    model: Path
    text: Path
    calib: Path

    def options(self, out: Path, text: Path | None = None, **changes) -> RunOptions:
        """Fresh options for a run into ``out`` (each test its own: no test sees another's settings)."""
        opts = RunOptions(model=str(self.model), out=str(out), variants=["w-kron"], ratio=0.2,
                          text=str(text or self.text), calib=str(self.calib), eval_windows=2, task_limit=3,
                          prefill_seqs=(16,), decode_tokens=4, iterations=2, calib_samples=2, calib_seq_len=64,
                          threads=1, quantize=QuantizeConfig(block_size=16), reference=False)
        for name, value in changes.items():
            setattr(opts, name, value)
        return opts


@dataclass(frozen=True)
class FirstRun:
    """The full job, interrupted in its benchmark and then resumed, done once per module."""

    inputs: Inputs
    out: Path
    artifact: Path
    hash_after_interrupt: str
    report_after_interrupt: bool
    report: Path

    def copy(self, tmp_path: Path) -> Path:
        """This run's output folder (stage cache included) copied for a test that runs the job again."""
        return Path(shutil.copytree(self.out, tmp_path / "artifacts", symlinks=True))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("pipeline-inputs")
    return Inputs(save_tiny_model(root / "tiny"), Path(_text(root / "eval.txt", 0)), Path(_text(root / "calib.txt", 1)))


@pytest.fixture(scope="module")
def first_run(inputs, tmp_path_factory) -> FirstRun:
    out = tmp_path_factory.mktemp("pipeline") / "artifacts"
    opts = inputs.options(out)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_measure, "benchmark", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(opts)
    artifact = out / "tiny-w-kron-20"
    before, reported = folder_hash(artifact), (out / "report.md").exists()
    report = run_pipeline(inputs.options(out))  # resumes: every finished stage is reused
    return FirstRun(inputs, out, artifact, before, reported, report)


def test_chain_resumes_after_interrupt_and_reports_measured_numbers(first_run):
    root, artifact, report = first_run.out, first_run.artifact, first_run.report
    assert not first_run.report_after_interrupt
    assert folder_hash(artifact) == first_run.hash_after_interrupt
    results = json.loads((root / "results.json").read_text())
    rows = {r["name"]: r for r in results["summary"]}
    assert set(rows) == {"dense", "w-kron"}
    assert 15 < rows["w-kron"]["removed_pct"] < 25
    for row in rows.values():
        assert row["relative_error"] < 1e-4 and row["argmax_agreement"] == 1.0 and row["greedy_identical"]
        assert row["ppl"] > 1 and row["decode_tokens_per_s"] > 0
    quantized = {r["name"]: r for r in results["quantized"]}
    assert set(quantized) == {"dense", "w-kron"}
    for q in quantized.values():  # int4 of each, on the same first windows as its fp32 source
        assert q["mb"] < q["mb_fp32"] and q["ppl"] > 1 and q["ppl_fp32"] > 1 and q["decode"] > 0
    assert (root / "tiny-w-kron-20-int4" / "quantize.json").is_file()
    assert "## Weight-only quantization" in report.read_text()
    stage_times = results["timing"]["stages_s"]
    peaks = results["timing"]["peak_rss_gib"]  # a high-water mark per stage: present for each, never falling
    assert list(peaks) == list(stage_times) and all(v > 0 for v in peaks.values())
    assert list(peaks.values()) == sorted(peaks.values())
    assert "| peak RSS GiB |" in report.read_text()
    assert "reused" in str(stage_times["compress w-kron at 20% removed"])  # resumed, not recomputed
    assert "w-kron" in report.read_text() and f"{rows['w-kron']['ppl']:.2f}" in report.read_text()
    assert (artifact / "structure.json").is_file() and (artifact / "README.md").is_file()
    session = ort.InferenceSession(str(artifact / "model.onnx"))
    assert "past_key_values.0.key" in {i.name for i in session.get_inputs()}


def test_changed_input_changes_the_number(first_run, tmp_path):
    out = first_run.copy(tmp_path)
    text = tmp_path / "eval.txt"
    shutil.copy2(first_run.inputs.text, text)

    def ppl() -> float:
        run_pipeline(first_run.inputs.options(out, text, benchmark=False))
        return json.loads((out / "results.json").read_text())["results"]["w-kron"]["perplexity"]["ppl"]
    first = ppl()
    _text(text, 7)  # same file name, new content: the number must follow the content
    assert ppl() != first


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _installed("optimum.onnxruntime"), reason="optimum[onnxruntime] is not installed")
def test_artifact_loads_in_optimum(first_run):  # skipped before the fixture runs the job
    from optimum.onnxruntime import ORTModelForCausalLM
    model = ORTModelForCausalLM.from_pretrained(first_run.artifact)
    assert model.generate(max_new_tokens=3, input_ids=__import__("torch").tensor([[1, 2, 3]])).shape[1] == 6


def _options(*argv: str) -> RunOptions:
    from procrustes_onnx.cli import build_parser
    return RunOptions.from_args(build_parser().parse_args(["run", *argv]))


def test_run_defaults_fit_the_time_budget_and_flags_override_them():
    full, quick = _options(), _options("--quick")
    assert full.tasks == quick.tasks == ("jargon_cloze", "kjv_cloze")
    assert (full.task_limit, quick.task_limit) == (100, 20)
    assert (full.iterations, full.calib_samples, full.solver["rotation_iters"]) == (10, 16, 50)
    assert (quick.iterations, quick.calib_seq_len, quick.eval_windows) == (5, 256, 4)
    given = _options("--quick", "--iterations", "7", "--task-limit", "0", "--tasks", "kjv_ppl")
    assert (given.iterations, given.task_limit, given.tasks) == (7, None, ("kjv_ppl",))


def test_second_global_variant_reuses_a_graph_instead_of_tracing(first_run, tmp_path):
    out = first_run.copy(tmp_path)
    run_pipeline(first_run.inputs.options(out, variants=["w-kron", "f-kron"], evaluate=False, benchmark=False))
    twins = {p.name.split("-")[0] + "-" + p.name.split("-")[1]: p for p in (out / ".work").glob("*-twin")}
    assert json.loads((twins["f-kron"] / "export.json").read_text())["traced"] is False
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["f-kron"]["validation"]["relative_error"] < 1e-4


def test_main_job_heals_each_variant_and_reports_before_and_after(tmp_path):
    from procrustes_onnx.compiler.heal import HealConfig

    model = save_tiny_model(tmp_path / "tiny")
    calib = _text(tmp_path / "calib.txt", 1)
    opts = RunOptions(model=str(model), out=str(tmp_path / "artifacts"), variants=["w-gs"], ratio=0.2,
                      text=_text(tmp_path / "eval.txt", 0), calib=calib, iterations=2, calib_samples=2,
                      calib_seq_len=64, threads=1, evaluate=False, benchmark=False,
                      heal=HealConfig(tokens=512, seq_len=32, batch_size=2, heldout_tokens=128, text=calib, threads=1))
    report = run_pipeline(opts).read_text()
    results = json.loads((tmp_path / "artifacts" / "results.json").read_text())
    healing = results["results"]["w-gs"]["healing"]
    assert healing["report"]["tokens"] == 512 and healing["ppl_before"] > 1 and healing["ppl_after"] > 1
    assert "## Healing" in report and f"{healing['ppl_after']:,.1f}" in report
    assert results["results"]["w-gs"]["validation"]["relative_error"] < 1e-4  # the artifact is the healed model
    assert json.loads((tmp_path / "artifacts" / "tiny-w-gs-20" / "structure.json").read_text())["structured"]


def test_main_job_with_max_loss_names_the_budget_and_reports_the_promise(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    calib = _text(tmp_path / "calib.txt", 1)
    opts = RunOptions(model=str(model), out=str(tmp_path / "artifacts"), variants=["w-gs"], max_loss=0.5,
                      text=_text(tmp_path / "eval.txt", 0), calib=calib, iterations=2, calib_samples=2,
                      calib_seq_len=64, heldout_samples=2, threads=1, evaluate=False, benchmark=False)
    report = run_pipeline(opts).read_text()
    results = json.loads((tmp_path / "artifacts" / "results.json").read_text())
    alloc = results["results"]["w-gs"]["compression"]["allocation"]
    assert alloc["max_loss"] == 0.5 and alloc["heldout_nll"] <= alloc["limit_nll"]
    assert (tmp_path / "artifacts" / "tiny-w-gs-maxloss0.5" / "model.onnx").is_file()
    assert "## Accuracy budget" in report and "--max-loss 0.5" in report
    assert results["results"]["w-gs"]["validation"]["relative_error"] < 1e-4
