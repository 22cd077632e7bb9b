#!/usr/bin/env bash
# A separate venv with optimum-onnx 0.1.0 and the transformers it pins (4.57.6), for checking that an
# exported artifact folder loads in optimum's ORTModelForCausalLM (tests/test_optimum_compat.py).
# Separate because the project itself needs transformers 5. torch goes in first, on its own, so pip
# takes the local CPU wheel instead of pulling a CUDA build. onnxruntime is pinned to the project's
# (ORT_VERSION, default 1.32.0) so both sides run the same kernels. Nothing comes from the Hugging Face hub.
#
#   benchmarks/optimum_venv.sh [VENV]   (default: $PROCRUSTES_ONNX_CACHE/optimum-venv,
#                                        i.e. ~/.cache/procrustes-onnx/optimum-venv)
# Prints the venv's python on its last line. Re-running on a complete venv does nothing.
set -euo pipefail
VENV="${1:-${PROCRUSTES_ONNX_CACHE:-$HOME/.cache/procrustes-onnx}/optimum-venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.procrustes-optimum"
if [[ -f "$STAMP" && -x "$VENV/bin/python" ]]; then echo "$VENV/bin/python"; exit 0; fi
"$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
pip torch==2.13.0
"$VENV/bin/python" -c "import torch" || { echo "error: torch==2.13.0 did not install into $VENV" >&2; exit 2; }
pip "optimum-onnx[onnxruntime]==0.1.0" transformers==4.57.6 "onnxruntime==${ORT_VERSION:-1.32.0}"
"$VENV/bin/python" -c "import optimum.onnxruntime, transformers, onnxruntime" \
  || { echo "error: optimum-onnx did not install into $VENV; see pip's output above" >&2; exit 2; }
"$VENV/bin/python" -c "import transformers, optimum.onnxruntime, torch, onnxruntime as o; \
print('transformers', transformers.__version__, 'torch', torch.__version__, 'onnxruntime', o.__version__)"
touch "$STAMP"
echo "$VENV/bin/python"
