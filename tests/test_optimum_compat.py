"""optimum (transformers 4.x) loads our artifact folders as a new user would, and generates our greedy ids.

optimum-onnx pins transformers < 4.58 and the project needs 5.x, so the check runs in a separate venv
(benchmarks/optimum_venv.sh: torch 2.13 CPU, optimum-onnx 0.1.0, transformers 4.57.6). Building it takes
minutes, so the test uses the venv where it already exists and builds it only with PROCRUSTES_OPTIMUM=1;
otherwise it skips and says so. The venv is $PROCRUSTES_OPTIMUM_VENV, by default optimum-venv under the
user's model cache (~/.cache/procrustes-onnx), read before conftest points the cache at a temp folder.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from procrustes_onnx.exporters.pipeline import export_model
from procrustes_onnx.runtime.generate import SamplingConfig, generate_ids
from procrustes_onnx.runtime.session import OnnxCausalLM
from procrustes_onnx.testing import save_tiny_model
from test_export_helpers import STRUCTURED_DIR, exported

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "optimum_venv.sh"
VENV = Path(os.environ.get("PROCRUSTES_OPTIMUM_VENV")
            or Path(os.environ.get("PROCRUSTES_ONNX_CACHE", "~/.cache/procrustes-onnx")).expanduser() / "optimum-venv")
STAMP = VENV / ".procrustes-optimum"
NEW_TOKENS = 12
TEXT = "Hello, world! The quick brown fox"

CHILD = """
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoConfig, AutoTokenizer
import torch
folder, text, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(folder, provider="CPUExecutionProvider")
if text:
    tok = AutoTokenizer.from_pretrained(folder)
    enc = dict(tok(text, return_tensors="pt"))
else:
    ids = torch.tensor([json.loads(sys.argv[4])])
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
out = model.generate(**enc, do_sample=False, max_new_tokens=new)
import transformers, optimum.onnxruntime as oo, onnxruntime
print(json.dumps({"prompt": enc["input_ids"][0].tolist(), "keys": sorted(enc),
                  "generated": out[0, enc["input_ids"].shape[1]:].tolist(),
                  "rope_theta": getattr(AutoConfig.from_pretrained(folder), "rope_theta", None),
                  "versions": [transformers.__version__, onnxruntime.__version__]}))
"""


@pytest.fixture(scope="module")
def optimum_python() -> Path:
    if not STAMP.is_file():
        if os.environ.get("PROCRUSTES_OPTIMUM") != "1":
            pytest.skip(f"no optimum venv at {VENV}: build it with benchmarks/optimum_venv.sh (minutes), or set "
                        "PROCRUSTES_OPTIMUM=1 to have this test build it")
        done = subprocess.run(["bash", str(SCRIPT), str(VENV)], capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f"benchmarks/optimum_venv.sh failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return VENV / "bin" / "python"


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A dense export, with its byte tokenizer, of a tiny random Llama with an untied head."""
    root = tmp_path_factory.mktemp("optimum")
    save_tiny_model(root / "hf", "llama", tie=False)
    return export_model(str(root / "hf"), root / "onnx").parent


def _optimum(python: Path, folder: Path, text: str = "", ids: list[int] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run([str(python), "-c", CHILD, str(folder), text, str(NEW_TOKENS), json.dumps(ids or [])],
                          capture_output=True, text=True, timeout=600, env=env, cwd=folder)
    assert done.returncode == 0, f"optimum failed on {folder}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ours(folder: Path, prompt: list[int]) -> list[int]:
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    return generate_ids(OnnxCausalLM(folder, threads=1), prompt, SamplingConfig(max_new_tokens=NEW_TOKENS),
                        eos_ids=eos if isinstance(eos, list) else [eos]).token_ids


def test_optimum_loads_folder_and_tokenizer_and_generates_our_ids(optimum_python, dense):
    from transformers import AutoTokenizer

    got = _optimum(optimum_python, dense, text=TEXT)
    assert got["versions"][0].startswith("4.")
    prompt = AutoTokenizer.from_pretrained(dense)(TEXT)["input_ids"]
    assert got["prompt"] == prompt and got["keys"] == ["attention_mask", "input_ids"]
    assert got["rope_theta"] == 10000.0
    assert got["generated"] == _ours(dense, prompt)
    assert len(set(got["generated"])) > 2


def test_optimum_generates_our_ids_on_a_structured_rewrite(optimum_python):
    _, _, _, path = exported("llama")
    folder = path.parent.parent / STRUCTURED_DIR
    prompt = [int(x) for x in np.random.default_rng(0).integers(0, 256, 6)]
    got = _optimum(optimum_python, folder, ids=prompt)
    assert got["generated"] == _ours(folder, prompt)
    assert len(set(got["generated"])) > 2
