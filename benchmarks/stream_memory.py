"""Peak resident memory of a streamed vs an in-memory compression as the model deepens, on random Llamas of
hidden 256 (nothing downloaded). Each run is a fresh process; its peak (VmHWM) is counted over its resident
set after the imports. Writes docs/results/stream_memory.json; docs/scale.md reports it."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from procrustes_onnx.core.environment import write_results
from procrustes_onnx.testing import STREAM_SETUP, STREAM_WORK, peak_rss_growth_kib, tiny_model


def measure(layers: int, hidden: int, root: Path) -> dict:
    folder = root / f"dense{layers}"
    tiny_model(layers=layers, hidden=hidden, vocab=264).save_pretrained(folder, max_shard_size="8MB")
    weights = sum(p.stat().st_size for p in folder.glob("model-*.safetensors")) // 1024
    row = {"layers": layers, "hidden": hidden, "weights_kib": weights,
           "shards": len(list(folder.glob("model-*.safetensors")))}
    for mode in ("stream", "memory"):
        row[f"{mode}_growth_kib"] = peak_rss_growth_kib(STREAM_SETUP, STREAM_WORK[mode], folder, root / f"{mode}{layers}")
    row["ratio"] = round(row["stream_growth_kib"] / row["memory_growth_kib"], 3)
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", default="4,8,16,32")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--out", default="docs/results/stream_memory.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(int(n), args.hidden, Path(tmp)) for n in args.layers.split(",")]
    write_results(args.out, {"benchmark": "stream_memory", "rows": rows,
                             "config": "weighted per-position W-GS 3/4, 1 ALS iteration, 4 x 64 calibration tokens"})


if __name__ == "__main__":
    main()
