"""What the per-model benchmarks share: one model per fresh interpreter (its own peak RSS, no state carried
between models), and decode speed in onnxruntime-genai."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_worker(script: str, folder: str | Path, config: dict, timeout: int = 3600) -> dict:
    """Run ``script --worker FOLDER --worker-config JSON`` in a fresh interpreter; its last stdout line is the
    JSON result, or a one-line ``error`` from its stderr when it fails."""
    cmd = [sys.executable, script, "--worker", str(folder), "--worker-config", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_one(script: str, point: str, flags: list[str]) -> dict | None:
    """Run ``script --one POINT *flags`` in a fresh interpreter; its ``RESULT <json>`` stdout line, or None
    (its stderr's tail printed) when it printed none."""
    proc = subprocess.run([sys.executable, script, "--one", point, *flags], capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(line[len("RESULT "):])


def genai_decode_rates(folder: Path, prompt: int, new_tokens: int, runs: int, share: bool | None = None,
                       ) -> list[float] | None:
    """Decode tok/s of each of ``runs`` greedy generations after a random ``prompt``-token prompt in
    onnxruntime-genai; None without it or without the folder's genai_config.json. ``share`` overrides the
    config's past_present_share_buffer."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    if not (folder / "genai_config.json").is_file():
        return None
    import numpy as np

    config = og.Config(str(folder))
    config.clear_providers()
    if share is not None:
        config.overlay(json.dumps({"search": {"past_present_share_buffer": share}}))
    model = og.Model(config)
    ids = np.random.default_rng(0).integers(0, 256, size=prompt).astype(np.int32)
    rates = []
    for _ in range(runs):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + new_tokens + 1, do_sample=False, min_length=prompt + new_tokens)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        start, steps = time.perf_counter(), 0
        while not gen.is_done() and steps < new_tokens:
            gen.generate_next_token()
            steps += 1
        rates.append(steps / (time.perf_counter() - start))
    return rates
