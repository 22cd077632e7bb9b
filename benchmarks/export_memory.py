"""Peak memory of exporting a compressed checkpoint to ONNX, as the model deepens: random Llamas of one width
(nothing downloaded) compressed cheaply (Frobenius W-GS 20%, per-position, streamed: the memory of the export, not
the quality, is measured), then exported with and without a kept dense twin, each in a fresh process whose peak
(VmHWM) is counted over its resident set after the imports. Writes docs/results/export_memory.json; docs/scale.md
reports it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import synthetic_llama  # noqa: E402

from procrustes_onnx.compiler.config import CompressionConfig  # noqa: E402
from procrustes_onnx.compiler.streamed import compress_streamed  # noqa: E402
from procrustes_onnx.core.environment import write_results  # noqa: E402
from procrustes_onnx.testing import peak_rss_growth_kib  # noqa: E402

SETUP = "from procrustes_onnx.exporters.pipeline import export_compressed\nimport time"
WORK = {"lean": "export_compressed(sys.argv[1], sys.argv[2], attention='gqa')",
        "twin": "export_compressed(sys.argv[1], sys.argv[2], attention='gqa', dense_dir=sys.argv[2] + '-twin')"}


def measure(layers: int, args, root: Path) -> dict:
    model = root / f"dense{layers}"
    params = synthetic_llama(model, args.hidden, layers, args.intermediate, args.vocab, args.heads, args.kv_heads)
    ck = root / f"ck{layers}"
    config = CompressionConfig(structure="gs", ratio=0.2, rotation="per-position", method="frobenius", iterations=1,
                               stream=True)
    compress_streamed(model, None, config, ck, echo=lambda s: None)
    manifest = json.loads((ck / "structure.json").read_text())
    row = {"layers": layers, "hidden": args.hidden, "parameters": params, "dense_fp32_kib": 4 * params // 1024,
           "stored_kib": (ck / "model.safetensors").stat().st_size // 1024,
           "structured_modules": len(manifest["structured"]), "shortcuts": len(manifest["shortcuts"])}
    for route, work in WORK.items():
        start = time.perf_counter()
        row[f"{route}_growth_kib"] = peak_rss_growth_kib(SETUP, work, ck, root / f"onnx-{route}{layers}")
        row[f"{route}_seconds"] = round(time.perf_counter() - start, 1)
        row[f"{route}_over_stored"] = round(row[f"{route}_growth_kib"] / row["stored_kib"], 3)
    print(row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--out", default="docs/results/export_memory.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(int(n), args, Path(tmp)) for n in args.layers.split(",")]
    print("\n| layers | stored MiB | dense fp32 MiB | export peak growth MiB, no twin | with a kept twin |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['stored_kib'] / 1024:.0f} | {r['dense_fp32_kib'] / 1024:.0f} | "
              f"{r['lean_growth_kib'] / 1024:.0f} ({r['lean_over_stored']}x stored) | "
              f"{r['twin_growth_kib'] / 1024:.0f} ({r['twin_over_stored']}x) |")
    write_results(args.out, {"benchmark": "export_memory", "rows": rows,
                             "compression": "Frobenius W-GS 20%, per-position, streamed, 1 ALS iteration (random weights)",
                             "export": "export_compressed(attention='gqa'); peak VmHWM growth over the imports"})


if __name__ == "__main__":
    main()
