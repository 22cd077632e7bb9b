"""Property: random mutations of valid CLI commands never end in a traceback, only in exit 0 or in one
`error: ...` line with exit 2. Each example runs in a fresh copy of the tiny inputs, so a mutation that
turns an input into an output (e.g. --out CK --overwrite) cannot spoil the next example."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bad_inputs_cases import build_inputs, error_line, run_cli

BASES = [
    ["info", "--model", "{model}", "--json"],
    ["ppl", "--model", "{model}", "--text", "{calib}", "--window", "16", "--max-windows", "1", "--max-tokens", "64"],
    ["inspect", "{onnx}"],
    ["generate", "--onnx", "{onnx}", "--prompt", "hi", "--max-new-tokens", "2"],
    ["compress", "--model", "{model}", "--out", "{out}", "--method", "frobenius", "--preset", "3/4",
     "--iterations", "1"],
    ["rewrite", "--onnx", "{de}", "--checkpoint", "{ck}", "--out", "{out}"],
    ["export", "--checkpoint", "{ck}", "--out", "{ck}"],
]
VALUES = ["0", "-1", "1", "2", "7", "1.5", "abc", "", "nan", "inf", "3/4", "q=2", "down", "0,99", "a,b",
          "{model}", "{ck}", "{onnx}", "{de}", "{afile}", "{garbage}", "{root}/missing", "/proc/x", "{out}"]
FLAGS = ["--window", "--batch-size", "--threads", "--max-new-tokens", "--top-p", "--kept", "--structures",
         "--dense-layers", "--config", "--calib", "--ratio", "--preset", "--model", "--out", "--overwrite",
         "--checkpoint", "--onnx", "--dense-equivalent", "--no-past", "--calib-samples", "--seed", "--limit"]
SANDBOX = ("model", "ck", "onnx", "de", "calib", "afile", "garbage")

mutation = st.one_of(
    st.tuples(st.just("replace"), st.integers(1, 20), st.sampled_from(VALUES)),
    st.tuples(st.just("delete"), st.integers(1, 20), st.just("")),
    st.tuples(st.just("insert"), st.integers(1, 20), st.sampled_from(FLAGS + VALUES)),
)


def _mutate(argv: list[str], mutations) -> list[str]:
    argv = list(argv)
    for op, i, value in mutations:
        i = i % len(argv) if op != "insert" else i % (len(argv) + 1)
        if op == "replace" and i > 0:
            argv[i] = value
        elif op == "delete" and i > 0 and len(argv) > 1:
            del argv[i]
        elif op == "insert" and i > 0:
            argv.insert(i, value)
    return argv


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(base=st.sampled_from(BASES), mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_commands_never_trace_back(base, mutations):
    inputs = build_inputs()
    box = Path(tempfile.mkdtemp(prefix="mutant-"))
    try:
        paths = {"root": str(box), "out": str(box / "out")}
        for name in SANDBOX:
            src = inputs[name]
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, box / src.name)
            paths[name] = str(box / src.name)
        argv = [a.format(**paths) for a in _mutate(base, mutations)]
        code, _, stderr = run_cli(argv)
        assert "Traceback" not in stderr, (argv, stderr[-800:])
        assert code in (0, 2), (argv, code, stderr[-800:])
        if code == 2:
            assert error_line(stderr).startswith("error: "), (argv, stderr[-800:])
    finally:
        shutil.rmtree(box, ignore_errors=True)
