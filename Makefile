# Every target sets up .venv (CPU install) first when needed; all are idempotent.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_QUIET := --quiet --disable-pip-version-check
# pip's local index mirrors print one harmless "is ignored" line per package: hide only those.
PIP_FILTER := { grep -v "is ignored: it is neither" || true; }

.PHONY: setup smoke test test-gpu bench bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) -c constraints-cpu.txt torch==2.13.0 2>&1 | $(PIP_FILTER)
	$(PY) -m pip install $(PIP_QUIET) -c constraints-cpu.txt -e '.[dev,eval]' 2>&1 | $(PIP_FILTER)
	$(PY) -c "import torch, hydra, webdataset, decord, av, transformers, tokenizers, megatron.core, triton, matplotlib, lm_eval"
	@# Headless Chromium renders report.html in its test; installed when missing and we are root.
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium is not installed; the report's browser test will be skipped"
	touch $(STAMP)

# The main job: all five stages on CPU with the tiny model and the embedded synthetic data.
smoke: setup
	$(PY) -m train.pipeline smoke=cpu run.dir=runs/smoke

test: setup
	$(PY) -m pytest -q

# One screen: a line per failure, error and skip (with its reason), then the counts.
test-gpu: setup
	$(PY) -m pytest -q -m gpu tests/gpu --tb=line -rfEs -p no:warnings --timeout 600

bench-gpu: setup
	$(PY) -m tests.bench.gpu_layers

bench: setup
	$(PY) -m tests.bench.run_all

clean:
	rm -rf runs
