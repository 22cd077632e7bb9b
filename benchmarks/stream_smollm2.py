"""SmolLM2-135M compressed in memory and streamed (`compress --stream`): the same checkpoint, tensor for tensor, and
each run's peak memory. Weighted W-GS 20% with per-position rotation (or, with ``--rotation global``, one global
rotation, which streams as a gathering pass, an out-of-core solve and a writing pass) and cheap solver settings (the
result's equality does not depend on them), each run a fresh `procrustes-onnx compress` process whose process tree
is sampled for resident memory. Writes docs/results/stream_smollm2.json (global: stream_smollm2_global.json);
docs/scale.md reports it.

    flock /tmp/heavy.lock python benchmarks/stream_smollm2.py [--rotation global]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from scale import run_sampled  # noqa: E402

from procrustes_onnx.core.environment import write_results  # noqa: E402

SETTINGS = {"structure": "gs", "ratio": 0.2, "rotation": "per-position", "method": "weighted", "iterations": 1,
            "rotation_iters": 5, "calib_samples": 8, "calib_seq_len": 256, "allocation": "middle"}


def compress(model: str, out: Path, config: Path, stream: bool) -> dict:
    """One `compress` in a fresh process: wall time and the peak resident memory of its process tree."""
    argv = [sys.executable, "-m", "procrustes_onnx.cli", "compress", "--model", model, "--out", str(out),
            "--config", str(config), "--workers", "1"] + (["--stream"] if stream else [])
    done, seconds, peak = run_sampled(argv)
    if done.returncode:
        raise SystemExit(f"error: compress{' --stream' if stream else ''} failed:\n{done.stderr[-3000:]}")
    return {"stream": stream, "wall_seconds": seconds, "peak_kib": peak}


def same_tensors(a: Path, b: Path) -> dict:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    differ = [k for k in ta if k not in tb or ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    return {"tensors": len(ta), "differ": differ + sorted(set(tb) - set(ta)),
            "same_manifest": json.loads((a / "structure.json").read_text()) == json.loads((b / "structure.json").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rotation", choices=("per-position", "global"), default="per-position")
    ap.add_argument("--out", default=None, help="default: docs/results/stream_smollm2.json, or "
                    "stream_smollm2_global.json for --rotation global")
    args = ap.parse_args()
    settings = {**SETTINGS, "rotation": args.rotation}
    out = args.out or ("docs/results/stream_smollm2.json" if args.rotation == "per-position"
                       else "docs/results/stream_smollm2_global.json")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "config.json").write_text(json.dumps(settings))
        rows = [compress(args.model, root / ("stream" if s else "memory"), root / "config.json", s) for s in (False, True)]
        check = same_tensors(root / "memory", root / "stream")
    for r in rows:
        print(f"{'streamed ' if r['stream'] else 'in memory'}: {r['wall_seconds']} s, peak {r['peak_kib'] / 2**20:.2f} GiB")
    print(f"{check['tensors']} tensors, {len(check['differ'])} differ, same manifest: {check['same_manifest']}")
    write_results(out, {"benchmark": "stream_smollm2", "model": args.model, "settings": settings, "rows": rows,
                             "comparison": check})


if __name__ == "__main__":
    main()
