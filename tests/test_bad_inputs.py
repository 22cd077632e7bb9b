"""Bad inputs through the CLI, one table row per case (tests/bad_inputs_cases.py): exit code, the one
`error: ...` line, no traceback, and every input file byte-identical afterwards (sha256)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bad_inputs_cases import CASES, ROOT, argv_of, build_inputs, error_line, fingerprints, run_cli


@pytest.fixture(scope="module")
def inputs():
    return build_inputs()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case, inputs, tmp_path):
    out = tmp_path / "out"
    watched = [inputs[name] for name in case.unchanged]
    before = fingerprints(watched)
    code, stdout, stderr = run_cli(argv_of(case, inputs, out))
    assert "Traceback" not in stderr
    assert code == case.code, f"exit {code}: {stderr[-600:]}"
    if code == 2:
        line = error_line(stderr)
        assert line.startswith("error: ") and case.fragment in line, line
        assert sum(1 for ln in stderr.splitlines() if ln.startswith("error:")) == 1
        assert not out.exists(), "a refused command left its output behind"
    else:
        assert case.fragment in stdout, stdout[-600:]
    assert fingerprints(watched) == before, "an input changed"


def test_every_verb_is_covered():
    verbs = {c.argv.split()[0] for c in CASES}
    assert {"info", "ppl", "compress", "export", "rewrite", "quantize", "inspect", "eval", "generate", "run"} <= verbs


def test_docs_list_every_case():
    doc = (ROOT / "docs" / "bad_inputs.md").read_text()
    missing = [c.id for c in CASES if f"| {c.id} |" not in doc]
    assert not missing, f"docs/bad_inputs.md lacks {missing}: regenerate it with `python tests/bad_inputs_cases.py`"


@pytest.mark.parametrize("argv, fragment", [
    (["compress", "--model", "{model}", "--out", "{model}"], "is the input"),
    (["export", "--model", "{ck}", "--out", "{out}"], "is a compressed checkpoint"),
    (["ppl", "--model", "{model}", "--window", "0"], "argument --window"),
], ids=["compress-out-is-model", "export-compressed-as-model", "ppl-window-zero"])
def test_real_subprocess(argv, fragment, inputs, tmp_path):
    """The installed entry point as a user runs it: exit 2, one error line last, no traceback."""
    args = [a.format(out=tmp_path / "out", **{k: str(v) for k, v in inputs.items()}) for a in argv]
    before = fingerprints([inputs["model"], inputs["ck"]])
    exe = shutil.which("procrustes-onnx", path=str(Path(sys.executable).parent)) or "procrustes-onnx"
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert error_line(proc.stderr).startswith("error: ") and fragment in error_line(proc.stderr)
    assert fingerprints([inputs["model"], inputs["ck"]]) == before


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"),
                                 RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")])
def test_a_full_disk_is_one_line(exc, monkeypatch, capsys):
    """ENOSPC from any writer (Python's, safetensors', onnx's) is one line with the fix, exit 2; other errors still
    raise."""
    from procrustes_onnx import cli

    def fail(args):
        raise exc

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: type("Args", (), {"func": staticmethod(fail)})())
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on device") and "\n" not in err and "run the same command" in err
    monkeypatch.setattr(parser, "parse_args", lambda argv: type("Args", (), {"func": staticmethod(
        lambda args: (_ for _ in ()).throw(ValueError("a bug")))})())
    with pytest.raises(ValueError):
        cli.main(["info"])
