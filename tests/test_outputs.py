"""Output folders never lose a user's data and never hold a wrong model: --overwrite replaces only the
tool's files (per the file list), a failed run blocks nothing, identical tensors give identical bytes,
and what a folder is (identity.json) is checked by the verbs that need it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bad_inputs_cases import build_inputs, error_line, fingerprints, run_cli
from procrustes_onnx.compiler.checkpoint import load_compressed, save_compressed
from procrustes_onnx.compiler.checkpoint import load_model
from procrustes_onnx.core.errors import UserError
from procrustes_onnx.core.outputs import FILE_LIST, atomic_output_dir, read_file_list
from procrustes_onnx.testing import tiny_model

COMPRESS = ["compress", "--method", "frobenius", "--preset", "3/4", "--iterations", "1"]


@pytest.fixture(scope="module")
def inputs():
    return build_inputs()


def _ok(argv):
    code, stdout, stderr = run_cli([str(a) for a in argv])
    assert code == 0, stderr[-800:]
    return stdout


def _refused(argv, fragment):
    code, _, stderr = run_cli([str(a) for a in argv])
    assert code == 2 and fragment in error_line(stderr), stderr[-800:]


def test_overwrite_replaces_only_the_tools_files(inputs, tmp_path):
    out = tmp_path / "ck"
    _ok([*COMPRESS, "--model", inputs["model"], "--out", out])
    notes = out / "notes.txt"
    notes.write_text("mine\n")
    (out / "mine").mkdir()
    (out / "mine" / "plot.png").write_bytes(b"\x89PNG")
    mine = fingerprints([notes, out / "mine"])
    _refused([*COMPRESS, "--model", inputs["model"], "--out", out], "pass --overwrite")
    _ok([*COMPRESS, "--model", inputs["model2"], "--out", out, "--overwrite"])
    assert fingerprints([notes, out / "mine"]) == mine
    listed = set(read_file_list(out)["files"])
    assert {"model.safetensors", "structure.json", "identity.json"} <= listed and "notes.txt" not in listed
    assert json.loads((out / "identity.json").read_text())["source"] != \
        json.loads((inputs["ck"] / "identity.json").read_text())["source"]          # model2's checkpoint now
    rewritten = tmp_path / "rw"
    _ok(["rewrite", "--onnx", inputs["de"], "--checkpoint", inputs["ck"], "--out", rewritten])
    (rewritten / "notes.txt").write_text("mine too\n")
    _ok(["rewrite", "--onnx", inputs["de"], "--checkpoint", inputs["ck"], "--out", rewritten, "--overwrite"])
    assert (rewritten / "notes.txt").read_text() == "mine too\n" and (rewritten / "model.onnx").is_file()


def test_overwrite_never_replaces_a_user_file_of_the_same_name(inputs, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "model.onnx").write_text("the user's, not ours")
    _refused(["rewrite", "--onnx", inputs["de"], "--checkpoint", inputs["ck"], "--out", out, "--overwrite"],
             "did not write")
    assert (out / "model.onnx").read_text() == "the user's, not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]      # no temp sibling left


def test_failed_build_keeps_the_old_folder(tmp_path):
    out = tmp_path / "art"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert set(p.name for p in out.iterdir()) == {"a.txt", FILE_LIST}


def test_failed_compress_blocks_nothing(inputs, tmp_path):
    """A bad calibration text fails before anything is recorded; the corrected rerun then just runs. A
    work/ left by an older build (settings but no results) does not block it either."""
    out = tmp_path / "ck"
    weighted = ["compress", "--model", inputs["model"], "--out", out, "--method", "weighted", "--preset", "3/4",
                "--iterations", "1", "--calib-samples", "2", "--calib-seq-len", "32"]
    _refused([*weighted, "--calib", inputs["empty"]], "is empty")
    assert not out.exists()
    (out / "work").mkdir(parents=True)
    (out / "work" / "config.json").write_text(json.dumps({"structure": "gs", "ratio": None, "preset": "1/2"}))
    _ok([*weighted, "--calib", inputs["calib"]])
    assert (out / "model.safetensors").is_file() and not (out / "work").exists()


def test_identical_tensors_give_identical_bytes(tmp_path):
    model = tiny_model("llama")
    a = save_compressed(model, tmp_path / "a", source="x")
    b = save_compressed(model, tmp_path / "b", source="x")
    for name in ("model.safetensors", "structure.json", "identity.json", FILE_LIST):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    blob = (a / "model.safetensors").read_bytes()
    header = blob[8:8 + int.from_bytes(blob[:8], "little")].decode().rstrip()
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"))


def test_compressed_checkpoint_as_model_loads_its_structured_linears(inputs):
    ids = torch.arange(1, 9)[None]
    via_model, _ = load_model(str(inputs["ck"]), allow_compressed=True)
    via_checkpoint, _ = load_compressed(inputs["ck"])
    with torch.no_grad():
        assert torch.equal(via_model(ids).logits, via_checkpoint(ids).logits)
    with pytest.raises(UserError, match="is a compressed checkpoint"):
        load_model(str(inputs["ck"]))


def test_two_step_export_equals_one_step(inputs, tmp_path):
    """export --dense-equivalent + rewrite gives the same bytes as export --checkpoint."""
    _ok(["rewrite", "--onnx", inputs["de"], "--checkpoint", inputs["ck"], "--out", tmp_path / "two"])
    _ok(["export", "--checkpoint", inputs["ck"], "--out", tmp_path / "one"])
    for name in ("model.onnx", "model.onnx.data", "identity.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    identity = json.loads((tmp_path / "one" / "identity.json").read_text())
    assert identity["kind"] == "structured"
    assert identity["checkpoint"] == json.loads((inputs["ck"] / "identity.json").read_text())["id"]


def test_a_changed_checkpoint_is_refused(inputs, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(inputs["ck"], ck)
    blob = bytearray((ck / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (ck / "model.safetensors").write_bytes(bytes(blob))
    _refused(["export", "--checkpoint", ck, "--out", tmp_path / "onnx"], "was changed after")


def test_stage_folders_list_what_the_stage_wrote_after_its_atomic_build(tmp_path):
    """cached_dir registers the marker and files a stage adds after the atomic write (README,
    structure.json), so a rebuild replaces them, while a user's file in the folder is kept."""
    from procrustes_onnx.cache import cached_dir

    def build(d):
        with atomic_output_dir(d) as tmp:
            (tmp / "model.onnx").write_text("graph")
        (d / "README.md").write_text("about")

    out = tmp_path / "stage"
    cached_dir(out, {"v": 1}, build, echo=lambda s: None)
    assert {"model.onnx", "README.md", ".stage.json"} <= set(read_file_list(out)["files"])
    (out / "notes.txt").write_text("mine")
    cached_dir(out, {"v": 2}, build, echo=lambda s: None)
    assert (out / "notes.txt").read_text() == "mine" and "notes.txt" not in read_file_list(out)["files"]
    assert json.loads((out / ".stage.json").read_text())["inputs"] == {"v": 2}
