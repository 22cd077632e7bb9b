"""The bad-input table: one CLI case per line, the tiny inputs it runs against, and a runner.

Each case is (id, argv, expected exit code, message fragment, inputs that must be unchanged). ``{name}``
in argv is an input built by ``build_inputs`` (tiny random models, checkpoints and exports); ``{out}`` is
a fresh path that does not exist yet. Exit 2 means one `error: ...` line, never a traceback; exit 0
cases (valid neighbours of the bad ones) check stdout. ``python tests/bad_inputs_cases.py`` runs the
table and writes docs/bad_inputs.md with the result of every case.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CALIB_TEXT = ("In the beginning the model was dense, and the compressor rotated its stream so that every weight "
              "became a sum of small Kronecker products. ") * 60


@dataclass(frozen=True)
class Case:
    id: str
    argv: str
    code: int
    fragment: str
    unchanged: tuple[str, ...] = ()


C = Case
CASES: list[Case] = [
    # info
    C("info-missing-path", "info --model {root}/nope", 2, "neither a Hugging Face folder", ()),
    C("info-not-causal-lm", "info --model {bert}", 2, "not a causal LM", ("bert",)),
    C("info-bad-config-json", "info --model {badjson}", 2, "not valid JSON", ("badjson",)),
    C("info-onnx-folder", "info --model {onnx}", 2, "is an ONNX artifact", ("onnx",)),
    C("info-compressed-loads", "info --model {ck} --json", 0, '"compressed_checkpoint": true', ("ck",)),
    C("info-no-attention-works", "info --model {mamba} --json", 0, '"model_type": "mamba"', ("mamba",)),
    C("info-unknown-alias", "info --model nosuchmodel", 2, "unknown model", ()),
    # ppl
    C("ppl-window-zero", "ppl --model {model} --window 0", 2, "argument --window", ("model",)),
    C("ppl-window-text", "ppl --model {model} --window big", 2, "argument --window", ("model",)),
    C("ppl-batch-negative", "ppl --model {model} --batch-size -1", 2, "argument --batch-size", ("model",)),
    C("ppl-threads-zero", "ppl --model {model} --threads 0", 2, "argument --threads", ("model",)),
    C("ppl-max-windows-zero", "ppl --model {model} --max-windows 0", 2, "argument --max-windows", ("model",)),
    C("ppl-max-tokens-short", "ppl --model {model} --text {calib} --window 64 --max-tokens 10", 2,
      "--max-tokens 10 is shorter", ("model", "calib")),
    C("ppl-window-past-context", "ppl --model {model} --text {calib} --window 1200", 2,
      "exceeds the model's 1100 positions", ("model", "calib")),
    C("ppl-onnx-window-past-context", "ppl --onnx {onnx} --text {calib} --window 2000", 2,
      "exceeds the model's 1100 positions", ("onnx", "calib")),
    C("ppl-missing-text", "ppl --model {model} --text {root}/nope.txt", 2, "neither", ("model",)),
    C("ppl-empty-text", "ppl --model {model} --text {empty}", 2, "is empty", ("model", "empty")),
    C("ppl-onnx-missing-data", "ppl --onnx {nodata} --text {calib}", 2, "which is missing", ("nodata", "calib")),
    C("ppl-compressed-loads", "ppl --model {ck} --text {calib} --window 32 --max-windows 1 --max-tokens 200", 0,
      "ppl ", ("ck", "calib")),
    # compress
    C("compress-out-is-model", "compress --model {model} --out {model} --method frobenius --preset 3/4", 2,
      "is the input", ("model",)),
    C("compress-out-inside-model", "compress --model {model} --out {model}/ck --method frobenius --preset 3/4", 2,
      "is inside the input", ("model",)),
    C("compress-out-contains-model", "compress --model {model} --out {root} --method frobenius --preset 3/4", 2,
      "contains the input", ("model",)),
    C("compress-out-contains-calib", "compress --model {model} --out {textdir} --calib {textdir}/calib.txt", 2,
      "contains the input", ("model", "textdir")),
    C("compress-compressed-model", "compress --model {ck} --out {out} --method frobenius --preset 3/4", 2,
      "is a compressed checkpoint", ("ck",)),
    C("compress-out-not-empty", "compress --model {model} --out {userdir} --method frobenius --preset 3/4", 2,
      "is not empty: pass --overwrite", ("model", "userdir")),
    C("compress-out-is-file", "compress --model {model} --out {afile} --method frobenius --preset 3/4", 2,
      "is not a folder", ("model", "afile")),
    C("compress-out-under-file", "compress --model {model} --out {afile}/ck --method frobenius --preset 3/4", 2,
      "is a file, not a folder", ("model", "afile")),
    C("compress-out-unwritable", "compress --model {model} --out /proc/procrustes-ck --method frobenius", 2,
      "is not writable", ("model",)),
    C("compress-dense-layer-missing", "compress --model {model} --out {out} --method frobenius --preset 3/4 "
      "--dense-layers 7", 2, "names layer 7, which this model lacks", ("model",)),
    C("compress-dense-layers-text", "compress --model {model} --out {out} --dense-layers a,b", 2,
      "not a layer index", ("model",)),
    C("compress-structures-malformed", "compress --model {model} --out {out} --structures down", 2,
      "not role=structure", ("model",)),
    C("compress-structures-unknown", "compress --model {model} --out {out} --structures down=foo", 2,
      "unknown structure of down 'foo'", ("model",)),
    C("compress-kept-malformed", "compress --model {model} --out {out} --kept q=abc", 2, "role=fraction",
      ("model",)),
    C("compress-kept-out-of-range", "compress --model {model} --out {out} --kept q=1.5", 2, "outside (0, 1]",
      ("model",)),
    C("compress-config-missing", "compress --model {model} --out {out} --config {root}/nope.json", 2,
      "cannot be read", ("model",)),
    C("compress-config-bad-json", "compress --model {model} --out {out} --config {afile}", 2, "not valid JSON",
      ("model", "afile")),
    C("compress-config-list", "compress --model {model} --out {out} --config {listjson}", 2, "JSON object",
      ("model", "listjson")),
    C("compress-config-wrong-type", "compress --model {model} --out {out} --config {typejson}", 2, "wrong type",
      ("model", "typejson")),
    C("compress-config-unknown-key", "compress --model {model} --out {out} --config {keyjson}", 2,
      "unknown compression settings", ("model", "keyjson")),
    C("compress-calib-samples-zero", "compress --model {model} --out {out} --calib-samples 0", 2,
      "argument --calib-samples", ("model",)),
    C("compress-iterations-negative", "compress --model {model} --out {out} --iterations -1", 2,
      "argument --iterations", ("model",)),
    C("compress-ratio-out-of-range", "compress --model {model} --out {out} --ratio 1.5", 2, "argument --ratio",
      ("model",)),
    C("compress-preset-and-ratio", "compress --model {model} --out {out} --preset 3/4 --ratio 0.2", 2,
      "both given", ("model",)),
    C("compress-max-loss-and-ratio", "compress --model {model} --out {out} --max-loss 0.1 --ratio 0.2", 2,
      "--max-loss and --ratio/--preset both given", ("model",)),
    C("compress-max-loss-negative", "compress --model {model} --out {out} --max-loss -0.1", 2, "argument --max-loss",
      ("model",)),
    C("compress-max-loss-frobenius", "compress --model {model} --out {out} --max-loss 0.1 --method frobenius", 2,
      "--max-loss needs calibration statistics", ("model",)),
    C("compress-measured-preset", "compress --model {model} --out {out} --allocation measured --preset 3/4", 2,
      "not --preset", ("model",)),
    C("compress-workers-zero", "compress --model {model} --out {out} --workers 0", 2, "argument --workers",
      ("model",)),
    C("compress-stream-refine", "compress --model {model} --out {out} --stream --refine sequential", 2,
      "--stream does not support --refine sequential yet", ("model",)),
    C("compress-stream-checkpoint", "compress --model {ck} --out {out} --stream --rotation per-position", 2,
      "compressed checkpoint", ("ck",)),
    C("compress-ray-address-refused", "compress --model {model} --out {out} --ray-address 127.0.0.1:1", 2,
      "nothing answers there", ("model",)),
    C("compress-measured-refine", "compress --model {model} --out {out} --allocation measured --refine sequential",
      2, "does not combine with measured allocation", ("model",)),
    C("compress-heldout-past-text", "compress --model {model} --out {out} --max-loss 0.1 --calib {calib} "
      "--heldout-samples 5000 --calib-seq-len 64 --calib-samples 2", 2, "held-out slice", ("model", "calib")),
    C("compress-calib-past-context", "compress --model {model} --out {out} --calib {calib} --calib-seq-len 2000", 2,
      "exceeds the model's 1100 positions", ("model", "calib")),
    C("compress-empty-calib", "compress --model {model} --out {out} --method weighted --calib {empty}", 2,
      "is empty", ("model", "empty")),
    C("compress-unsupported-arch", "compress --model {gpt2} --out {out} --method frobenius --preset 3/4", 2,
      "supported", ("gpt2",)),
    C("compress-preset-works", "compress --model {model} --out {out} --method frobenius --preset 3/4 "
      "--iterations 1", 0, "saved", ("model",)),
    # export
    C("export-out-is-model", "export --model {model} --out {model}", 2, "is the input", ("model",)),
    C("export-out-is-checkpoint", "export --checkpoint {ck} --out {ck}", 2, "is the input", ("ck",)),
    C("export-out-inside-checkpoint", "export --checkpoint {ck} --out {ck}/onnx", 2, "is inside the input", ("ck",)),
    C("export-compressed-as-model", "export --model {ck} --out {out}", 2, "export --checkpoint", ("ck",)),
    C("export-out-not-empty", "export --model {model} --out {userdir}", 2, "pass --overwrite", ("model", "userdir")),
    C("export-out-under-file", "export --model {model} --out {afile}/onnx", 2, "is a file", ("model", "afile")),
    C("export-out-unwritable", "export --model {model} --out /proc/procrustes-onnx", 2, "is not writable",
      ("model",)),
    C("export-dense-equivalent-needs-ck", "export --model {model} --out {out} --dense-equivalent", 2,
      "pass --checkpoint", ("model",)),
    C("export-checkpoint-not-compressed", "export --checkpoint {model} --out {out}", 2,
      "not a compressed checkpoint", ("model",)),
    C("export-not-causal-lm", "export --model {bert} --out {out}", 2, "not a causal LM", ("bert",)),
    C("export-gpt2-works", "export --model {gpt2} --out {out}", 0, "model.onnx", ("gpt2",)),
    C("export-no-attention", "export --model {mamba} --out {out}", 2, "has no attention heads", ("mamba",)),
    C("export-gqa-unfusable", "export --model {gpt2} --out {out} --attention gqa", 2,
      "--attention gqa: cannot fuse GPT2LMHeadModel", ("gpt2",)),
    C("export-attention-unknown", "export --model {model} --out {out} --attention mha", 2, "invalid choice",
      ("model",)),
    # rewrite
    C("rewrite-plain-dense-export", "rewrite --onnx {onnx} --checkpoint {ck} --out {out}", 2,
      "is a dense export, not the dense-equivalent", ("onnx", "ck")),
    C("rewrite-other-checkpoint", "rewrite --onnx {de2} --checkpoint {ck} --out {out}", 2,
      "of another checkpoint", ("de2", "ck")),
    C("rewrite-swapped-weights", "rewrite --onnx {swapped} --checkpoint {ck} --out {out}", 2, "was changed after",
      ("swapped", "ck")),
    C("rewrite-no-identity", "rewrite --onnx {noid} --checkpoint {ck} --out {out}", 2, "has no identity.json",
      ("noid", "ck")),
    C("rewrite-out-is-onnx", "rewrite --onnx {de} --checkpoint {ck} --out {de}", 2, "is the input", ("de", "ck")),
    C("rewrite-out-is-checkpoint", "rewrite --onnx {de} --checkpoint {ck} --out {ck}", 2, "is the input",
      ("de", "ck")),
    C("rewrite-checkpoint-not-compressed", "rewrite --onnx {de} --checkpoint {model} --out {out}", 2,
      "not a compressed checkpoint", ("de", "model")),
    C("rewrite-missing-onnx", "rewrite --onnx {root}/nope --checkpoint {ck} --out {out}", 2, "does not exist",
      ("ck",)),
    C("rewrite-missing-data", "rewrite --onnx {denodata} --checkpoint {ck} --out {out}", 2, "which is missing",
      ("denodata", "ck")),
    C("rewrite-out-not-empty", "rewrite --onnx {de} --checkpoint {ck} --out {userdir}", 2, "pass --overwrite",
      ("de", "ck", "userdir")),
    C("rewrite-works", "rewrite --onnx {de} --checkpoint {ck} --out {out}", 0, "model.onnx", ("de", "ck")),
    # quantize
    C("quantize-missing", "quantize --onnx {root}/nope --out {out}", 2, "has no model.onnx", ()),
    C("quantize-not-artifact", "quantize --onnx {noid} --out {out}", 2, "has no identity.json", ("noid",)),
    C("quantize-missing-data", "quantize --onnx {nodata} --out {out}", 2, "which is missing", ("nodata",)),
    C("quantize-already-quantized", "quantize --onnx {q4} --out {out}", 2, "is already int4", ("q4",)),
    C("quantize-out-is-onnx", "quantize --onnx {onnx} --out {onnx}", 2, "is the input", ("onnx",)),
    C("quantize-out-not-empty", "quantize --onnx {onnx} --out {userdir}", 2, "pass --overwrite", ("onnx", "userdir")),
    C("quantize-none", "quantize --onnx {onnx} --out {out} --quantize none", 2, "nothing to do", ("onnx",)),
    C("quantize-block-not-pow2", "quantize --onnx {onnx} --out {out} --quantize-block 48", 2,
      "must be a power of two", ("onnx",)),
    C("quantize-block-small", "quantize --onnx {onnx} --out {out} --quantize-block 8", 2, "argument --quantize-block",
      ("onnx",)),
    C("quantize-hqq-symmetric", "quantize --onnx {onnx} --out {out} --quantize-algorithm hqq", 2,
      "HQQ quantizes asymmetrically", ("onnx",)),
    C("quantize-bad-precision", "quantize --onnx {onnx} --out {out} --quantize int3", 2, "argument --quantize",
      ("onnx",)),
    C("quantize-keep-bad-regex", "quantize --onnx {onnx} --out {out} --quantize-keep (", 2,
      "is not a regular expression", ("onnx",)),
    C("quantize-works", "quantize --onnx {onnx} --out {out} --quantize int8", 0, "model.onnx", ("onnx",)),
    C("export-dense-equivalent-quantized", "export --checkpoint {ck} --dense-equivalent --quantize int4 --out {out}",
      2, "must stay fp32", ("ck",)),
    C("export-quantized-works", "export --model {model} --out {out} --quantize int4", 0, "model.onnx", ("model",)),
    # inspect
    C("inspect-quantized-works", "inspect {q4}", 0, "MatMulNBits", ("q4",)),
    C("inspect-missing", "inspect {root}/nope", 2, "does not exist", ()),
    C("inspect-missing-data", "inspect {nodata}", 2, "which is missing", ("nodata",)),
    C("inspect-not-onnx", "inspect {garbage}", 2, "not a readable ONNX model", ("garbage",)),
    C("inspect-works", "inspect {onnx}", 0, "MatMul", ("onnx",)),
    # eval
    C("eval-limit-zero", "eval --onnx {onnx} --limit 0", 2, "argument --limit", ("onnx",)),
    C("eval-limit-fractional-count", "eval --onnx {onnx} --limit 2.5", 2, "neither a fraction", ("onnx",)),
    C("eval-fewshot-negative", "eval --onnx {onnx} --num-fewshot -1", 2, "argument --num-fewshot", ("onnx",)),
    C("eval-threads-zero", "eval --onnx {onnx} --threads 0", 2, "argument --threads", ("onnx",)),
    C("eval-output-inside-onnx", "eval --onnx {onnx} --output {onnx}/results.json", 2, "is inside the input",
      ("onnx",)),
    C("eval-output-exists", "eval --onnx {onnx} --output {afile}", 2, "exists: pass --overwrite", ("onnx", "afile")),
    C("eval-output-is-folder", "eval --onnx {onnx} --output {userdir}", 2, "is a folder", ("onnx", "userdir")),
    # generate
    C("generate-max-new-zero", "generate --onnx {onnx} --prompt hi --max-new-tokens 0", 2,
      "argument --max-new-tokens", ("onnx",)),
    C("generate-past-context", "generate --onnx {onnx} --prompt hi --max-new-tokens 5000", 2,
      "exceeds the model's context of 1100", ("onnx",)),
    C("generate-empty-prompt", "generate --onnx {onnx} --prompt ''", 2, "prompt is empty", ("onnx",)),
    C("generate-top-p", "generate --onnx {onnx} --prompt hi --top-p 2", 2, "argument --top-p", ("onnx",)),
    C("generate-temperature-negative", "generate --onnx {onnx} --prompt hi --temperature -1", 2,
      "argument --temperature", ("onnx",)),
    C("generate-top-k-negative", "generate --onnx {onnx} --prompt hi --top-k -3", 2, "argument --top-k", ("onnx",)),
    C("generate-threads-negative", "generate --onnx {onnx} --prompt hi --threads -2", 2, "argument --threads",
      ("onnx",)),
    C("generate-seed-huge", "generate --onnx {onnx} --prompt hi --seed 99999999999999999999", 2, "at most",
      ("onnx",)),
    C("generate-threads-huge", "generate --onnx {onnx} --prompt hi --threads 100000", 2, "at most 1024", ("onnx",)),
    C("generate-missing-data", "generate --onnx {nodata} --prompt hi", 2, "which is missing", ("nodata",)),
    C("generate-not-onnx", "generate --onnx {garbage} --prompt hi", 2, "cannot load", ("garbage",)),
    C("generate-works", "generate --onnx {onnx} --prompt hi --max-new-tokens 3", 0, "tokens,", ("onnx",)),
    # run
    C("run-out-is-model", "run --model {model} --out {model} --text {calib}", 2, "is the input", ("model", "calib")),
    C("run-out-not-empty", "run --model {model} --out {userdir} --text {calib}", 2, "pass --overwrite",
      ("model", "calib", "userdir")),
    C("run-compressed-model", "run --model {ck} --out {out} --text {calib}", 2, "is a compressed checkpoint",
      ("ck", "calib")),
    C("run-max-loss-and-ratio", "run --model {model} --out {out} --max-loss 0.1 --ratio 0.2", 2,
      "--max-loss and --ratio both given", ("model",)),
    C("run-ratio-zero", "run --model {model} --out {out} --ratio 0", 2, "argument --ratio", ("model",)),
    C("run-eval-windows-zero", "run --model {model} --out {out} --eval-windows 0", 2, "argument --eval-windows",
      ("model",)),
    C("run-unknown-variant", "run --model {model} --out {out} --variants nope", 2, "unknown variant", ("model",)),
    C("run-unknown-task", "run --model {model} --out {out} --text {calib} --tasks nosuchtask", 2,
      "unknown lm-eval task", ("model", "calib")),
    C("run-threads-zero", "run --model {model} --out {out} --threads 0", 2, "argument --threads", ("model",)),
    C("run-workers-zero", "run --model {model} --out {out} --workers 0", 2, "argument --workers", ("model",)),
    # heal
    C("heal-out-is-checkpoint", "heal --checkpoint {ck} --model {model} --out {ck} --heal-text {calib}", 2,
      "is the input", ("ck", "model", "calib")),
    C("heal-out-not-empty", "heal --checkpoint {ck} --model {model} --out {userdir} --heal-text {calib}", 2,
      "pass --overwrite", ("ck", "model", "calib", "userdir")),
    C("heal-dense-checkpoint", "heal --checkpoint {model} --model {model} --out {out}", 2,
      "is not a compressed checkpoint", ("model",)),
    C("heal-compressed-teacher", "heal --checkpoint {ck} --model {ck} --out {out} --heal-text {calib}", 2,
      "is a compressed checkpoint", ("ck", "calib")),
    C("heal-wrong-teacher", "heal --checkpoint {ck} --model {model2} --out {out} --heal-text {calib}", 2,
      "is not the dense model", ("ck", "model2", "calib")),
    C("heal-tokens-negative", "heal --checkpoint {ck} --model {model} --out {out} --heal-tokens -1", 2,
      "--heal-tokens -1 is negative", ("ck", "model")),
    C("heal-lr-zero", "heal --checkpoint {ck} --model {model} --out {out} --heal-lr 0", 2, "--heal-lr 0 must be",
      ("ck", "model")),
    C("heal-eval-text", "heal --checkpoint {ck} --model {model} --out {out} --heal-text jargon@100", 2,
      "first 102,400 tokens", ("ck", "model")),
    C("heal-text-too-short", "heal --checkpoint {ck} --model {model} --out {out} --heal-text {calib} "
      "--heal-tokens 100000", 2, "fewer than the", ("ck", "model", "calib")),
    C("heal-works", "heal --checkpoint {ck} --model {model} --out {out} --heal-text {calib} --heal-tokens 256 "
      "--heal-seq-len 32 --heal-heldout-tokens 128 --threads 1", 0, "healed", ("ck", "model", "calib")),
    C("compress-heal-tokens-negative", "compress --model {model} --out {out} --heal-tokens -3", 2,
      "--heal-tokens -3 is negative", ("model",)),
    # the parser itself
    C("unknown-verb", "shrink --model {model}", 2, "invalid choice", ()),
    C("missing-required", "rewrite --onnx {de}", 2, "required", ("de",)),
]


LEGEND = {
    "model": "a tiny random Llama folder", "model2": "another one (other weights)",
    "ck": "a compressed checkpoint of {model}", "ck2": "one of {model2}",
    "onnx": "a dense export of {model}", "de": "the dense-equivalent export of {ck}", "de2": "that of {ck2}",
    "nodata": "{onnx} without model.onnx.data", "denodata": "{de} without it", "noid": "{de} without identity.json",
    "swapped": "{de} with the model.onnx.data of {de2}",
    "gpt2": "a tiny GPT-2", "mamba": "a tiny Mamba", "bert": "a BERT masked-LM config",
    "badjson": "a folder whose config.json is not JSON", "calib": "a UTF-8 text", "textdir": "the folder holding it",
    "empty": "an empty text file", "afile": "a plain text file", "garbage": "a .onnx file that is not protobuf",
    "listjson": "a JSON list", "typejson": "a config with iterations \"many\"", "keyjson": "a config with an "
    "unknown key", "userdir": "a folder holding a user's notes.txt", "root": "the folder holding all of them",
}


# --------------------------------------------------------------------------------------------- inputs

@functools.cache
def build_inputs() -> dict[str, Path]:
    """The inputs every case may name, built once per process in a temp folder (removed at exit)."""
    import atexit

    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, MambaConfig

    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.compress import compress
    from procrustes_onnx.exporters.pipeline import export_compressed, export_model
    from procrustes_onnx.exporters.quantize import quantize_artifact
    from procrustes_onnx.testing import save_tiny_model, tiny_compression_config, tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bad-inputs-"))
    atexit.register(shutil.rmtree, root, True)
    p = {"root": root}
    p["model"] = save_tiny_model(root / "model")
    p["model2"] = save_tiny_model(root / "model2", seed=1)
    p["textdir"] = root / "texts"
    p["textdir"].mkdir()
    p["calib"] = p["textdir"] / "calib.txt"
    p["calib"].write_text(CALIB_TEXT)
    p["empty"] = root / "empty.txt"
    p["empty"].write_text("")
    p["afile"] = root / "afile.txt"
    p["afile"].write_text("not json, not a folder\n")
    p["garbage"] = root / "garbage.onnx"
    p["garbage"].write_bytes(b"this is not protobuf")
    p["listjson"] = root / "list.json"
    p["listjson"].write_text("[1, 2]")
    p["typejson"] = root / "type.json"
    p["typejson"].write_text(json.dumps({"iterations": "many", "preset": "3/4", "ratio": None}))
    p["keyjson"] = root / "key.json"
    p["keyjson"].write_text(json.dumps({"speed": "fast"}))
    p["userdir"] = root / "userdir"
    p["userdir"].mkdir()
    (p["userdir"] / "notes.txt").write_text("the user's own notes\n")
    p["bert"] = root / "bert"
    p["bert"].mkdir()
    (p["bert"] / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    p["badjson"] = root / "badjson"
    p["badjson"].mkdir()
    (p["badjson"] / "config.json").write_text("{")
    p["gpt2"] = root / "gpt2"
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=264, n_embd=32, n_layer=2, n_head=2,
                                                       n_positions=128, bos_token_id=256, eos_token_id=256))
    gpt2.save_pretrained(p["gpt2"])
    tiny_tokenizer().save_pretrained(p["gpt2"])
    p["mamba"] = root / "mamba"
    AutoModelForCausalLM.from_config(MambaConfig(vocab_size=264, hidden_size=32, num_hidden_layers=2,
                                                 state_size=4)).save_pretrained(p["mamba"])
    tiny_tokenizer().save_pretrained(p["mamba"])
    config = tiny_compression_config(method="frobenius", iterations=1, rotation_iters=5)
    with contextlib.redirect_stdout(io.StringIO()):
        for name, src in (("ck", "model"), ("ck2", "model2")):
            model, tok = load_model(str(p[src]))
            p[name] = compress(model, tok, config, root / name, progress=False, echo=lambda s: None)
        export_model(str(p["model"]), root / "onnx")
        p["onnx"] = root / "onnx"
        p["q4"] = quantize_artifact(p["onnx"], root / "q4").parent
        for name, ck in (("de", "ck"), ("de2", "ck2")):
            p[name] = export_compressed(p[ck], root / name, dense_equivalent=True).parent
    for name, src, drop in (("nodata", "onnx", "model.onnx.data"), ("denodata", "de", "model.onnx.data"),
                            ("noid", "de", "identity.json")):
        shutil.copytree(p[src], root / name)
        (root / name / drop).unlink()
        p[name] = root / name
    shutil.copytree(p["de"], root / "swapped")           # de's identity, de2's weights
    shutil.copy2(p["de2"] / "model.onnx.data", root / "swapped" / "model.onnx.data")
    p["swapped"] = root / "swapped"
    return p


def fingerprints(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under each path (a file or a folder)."""
    out = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
        if path.is_dir():
            out[f"{path}/"] = " ".join(sorted(str(f.relative_to(path)) for f in path.rglob("*")))
    return out


def argv_of(case: Case, inputs: dict[str, Path], out: Path) -> list[str]:
    return shlex.split(case.argv.format(out=out, **{k: str(v) for k, v in inputs.items()}))


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """procrustes_onnx.cli.main in this process: (exit code, stdout, stderr)."""
    from procrustes_onnx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def error_line(stderr: str) -> str:
    """The last non-empty stderr line (progress bars and warnings may precede it)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def write_doc(path: Path = ROOT / "docs" / "bad_inputs.md") -> Path:
    """Run every case and write the table with what the tool actually said."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    inputs = build_inputs()
    rows = ["# Bad inputs: what the CLI says", "",
            "Generated by `python tests/bad_inputs_cases.py` from the table that `tests/test_bad_inputs.py` runs",
            "(tiny random models; `{out}` is a fresh path). Every bad input ends in one `error: ...` line and exit",
            "code 2, with no traceback, and leaves every input byte-identical (sha256 before and after).",
            "A few valid neighbours (exit 0) show the same inputs work when given properly.", "",
            "Inputs: " + "; ".join(f"`{{{k}}}` {v}" for k, v in LEGEND.items()) + ".", "",
            "Behaviour beyond one command (tests/test_outputs.py): `--overwrite` replaces only the files the tool",
            "wrote (a user's notes, plots and sub-folders stay byte-identical, a user file with a tool file's name",
            "is refused); a failed build leaves the old folder as it was; a compress that fails on its",
            "calibration text leaves nothing and the corrected rerun runs; identical tensors give identical",
            "checkpoint bytes; export --dense-equivalent + rewrite equals export --checkpoint byte for byte; a",
            "checkpoint edited after compress is refused. tests/test_bad_inputs_property.py mutates valid commands",
            "at random (values, flags, deletions) and checks that none ends in a traceback.", "",
            "| case | command | exit | result |", "|---|---|---|---|"]
    for case in CASES:
        out = Path(tempfile.mkdtemp(prefix="case-")) / "out"
        code, stdout, stderr = run_cli(argv_of(case, inputs, out))
        hits = [ln for ln in stdout.splitlines() if case.fragment in ln]
        said = error_line(stderr) if code else (hits[-1].strip() if hits else error_line(stdout) or "(ok)")
        said = said.replace(str(inputs["root"]), "…").replace(str(out), "{out}").replace("|", "\\|")
        argv = case.argv.replace("|", "\\|")
        rows.append(f"| {case.id} | `procrustes-onnx {argv}` | {code} | {said[:220]} |")
        shutil.rmtree(out.parent, ignore_errors=True)
    path.write_text("\n".join(rows) + "\n")
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    print(write_doc())
