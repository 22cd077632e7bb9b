"""The main job end to end on a tiny random model: artifacts load, numbers come from the run, resume works."""

import json
import random
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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model = save_tiny_model(root / "tiny")
    opts = RunOptions(model=str(model), out=str(root / "artifacts"), variants=["w-kron"], ratio=0.2,
                      text=_text(root / "eval.txt", 0), calib=_text(root / "calib.txt", 1), eval_windows=2,
                      task_limit=3, prefill_seqs=(16,), decode_tokens=4, iterations=2, calib_samples=2,
                      calib_seq_len=64, threads=1, quantize=QuantizeConfig(block_size=16), reference=False)
    return root, opts


def test_chain_resumes_after_interrupt_and_reports_measured_numbers(run, monkeypatch):
    root, opts = run
    real_benchmark = pipeline_measure.benchmark

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline_measure, "benchmark", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(opts)
    artifact = root / "artifacts" / "tiny-w-kron-20"
    before = folder_hash(artifact)
    assert not (root / "artifacts" / "report.md").exists()

    monkeypatch.setattr(pipeline_measure, "benchmark", real_benchmark)
    report = run_pipeline(opts)  # resumes: every finished stage is reused
    assert folder_hash(artifact) == before
    results = json.loads((root / "artifacts" / "results.json").read_text())
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
    assert (root / "artifacts" / "tiny-w-kron-20-int4" / "quantize.json").is_file()
    assert "## Weight-only quantization" in report.read_text()
    stage_times = results["timing"]["stages_s"]
    assert "reused" in str(stage_times["compress w-kron at 20% removed"])  # resumed, not recomputed
    assert "w-kron" in report.read_text() and f"{rows['w-kron']['ppl']:.2f}" in report.read_text()
    assert (artifact / "structure.json").is_file() and (artifact / "README.md").is_file()
    session = ort.InferenceSession(str(artifact / "model.onnx"))
    assert "past_key_values.0.key" in {i.name for i in session.get_inputs()}


def test_changed_input_changes_the_number(run):
    root, opts = run
    first = json.loads((root / "artifacts" / "results.json").read_text())["results"]["w-kron"]["perplexity"]["ppl"]
    _text(Path(opts.text), 7)  # same file name, new content: the number must follow the content
    opts.benchmark = False
    run_pipeline(opts)
    second = json.loads((root / "artifacts" / "results.json").read_text())["results"]["w-kron"]["perplexity"]["ppl"]
    assert second != first


def test_artifact_loads_in_optimum(run):
    pytest.importorskip("optimum.onnxruntime")
    from optimum.onnxruntime import ORTModelForCausalLM
    root, _ = run
    model = ORTModelForCausalLM.from_pretrained(root / "artifacts" / "tiny-w-kron-20")
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


def test_second_global_variant_reuses_a_graph_instead_of_tracing(run):
    root, opts = run
    opts.variants, opts.evaluate, opts.benchmark = ["w-kron", "f-kron"], False, False
    run_pipeline(opts)
    twins = {p.name.split("-")[0] + "-" + p.name.split("-")[1]: p for p in (root / "artifacts" / ".work").glob("*-twin")}
    assert json.loads((twins["f-kron"] / "export.json").read_text())["traced"] is False
    results = json.loads((root / "artifacts" / "results.json").read_text())
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
