"""Which structure fits SmolLM2's matrices best at equal parameters: weighted relative error
||X (W - W_hat)|| / ||X W|| of single matrices (no rotation, Grams from held-out Jargon) for GS with
k = 1 (low rank), 2, 4, 8, 16 blocks and for the Kronecker sum (input-side slabs, q = 8).

    python benchmarks/structure_errors.py --layers 5,20 -> docs/results/structure_errors.json
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROLES = {"q": "self_attn.q_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}


def main() -> None:
    import torch

    from procrustes_onnx.compiler.calibration import calibration_windows, collect_grams, damp_gram
    from procrustes_onnx.compiler.checkpoint import load_model
    from procrustes_onnx.compiler.fusion import fuse_norms
    from procrustes_onnx.compiler.weighted import project_weighted
    from procrustes_onnx.core.environment import write_results
    from procrustes_onnx.core.texts import load_text, tokenize_corpus
    from procrustes_onnx.ops import gs_materialize, kron_materialize, project_gs_weighted
    from procrustes_onnx.ops import projection_error as rel
    from procrustes_onnx.ops.planner import kron_spec, spec_params

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="5,20")
    p.add_argument("--kept", type=float, default=0.7)
    p.add_argument("--sweeps", type=int, default=8, help="weighted GS alternating sweeps")
    p.add_argument("--out", default="docs/results/structure_errors.json")
    args = p.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    fuse_norms(model)
    held_out = tokenize_corpus(tokenizer, load_text("jargon"), 200_000)[102_400:]
    windows = calibration_windows(held_out, 8, 512, 0)
    layers = [int(x) for x in args.layers.split(",")]
    paths = [f"model.layers.{i}.{p}" for i in layers for p in ROLES.values()]
    with torch.no_grad():
        grams = collect_grams(model, windows, paths, progress=False)

    rows = []
    for layer in layers:
        for role, sub in ROLES.items():
            path = f"model.layers.{layer}.{sub}"
            m = model.get_submodule(path).weight.detach().T.to(torch.float64)
            c = damp_gram(grams[path], 0.01)
            n_in, n_out = m.shape
            row = {"layer": layer, "role": role, "shape": [n_in, n_out]}
            for k in (1, 2, 4, 8, 16):
                per = n_in // k + n_out // k
                inner = max(k, round(args.kept * n_in * n_out / per / k) * k)
                left, right = project_gs_weighted(m, c, k, n_in // k, inner // k, k, inner // k, n_out // k,
                                                  sweeps=args.sweeps)
                row[f"gs{k}"], row[f"gs{k}_params"] = rel(m, gs_materialize(left, right), c), inner * per
            spec = kron_spec(n_in, n_out, "in", args.kept, 8)
            f = project_weighted(m, c, spec)
            row["kron"], row["kron_params"] = rel(m, kron_materialize(f["a"], f["b"]), c), spec_params(spec)
            rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                           if not k.endswith("_params")), flush=True)
    write_results(args.out, {"model": "smollm2-135m", "kept": args.kept, "sweeps": args.sweeps,
                             "calibration": "jargon tokens 102,400+ (8 x 512)", "rows": rows})


if __name__ == "__main__":
    main()
