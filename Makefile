# Every target sets up .venv (CPU install) first when needed; all are idempotent.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-cpu.lock
# mamba-ssm, built by setup from its hash-pinned sdist without CUDA (its Triton kernels only).
BUILD_LOCK := requirements-cpu-build.lock
UV := $(VENV)/bin/uv
# The lock pins uv too; setup bootstraps that version with pip, then uv installs the lock exactly.
UV_VERSION := $(shell sed -n 's/^uv==\([^ ]*\).*/\1/p' $(LOCK) 2>/dev/null)
# A folder holding the CPU torch wheel the lock names (torch-2.13.0+cpu). Elsewhere:
#   pip download --no-deps torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu -d wheels
#   make setup TORCH_FIND_LINKS=wheels
TORCH_FIND_LINKS ?= /opt/wheels
UV_FLAGS := $(if $(wildcard $(TORCH_FIND_LINKS)),--find-links $(TORCH_FIND_LINKS)) --no-progress
# Bytecode compiled at install: uv does not compile by default, and where PYTHONDONTWRITEBYTECODE is set
# (many container images) nothing ever writes the .pyc files, so every process (each trainer, torchrun
# rank, test subprocess) compiled torch and transformers from source again: ~6 s of a 12 s one-step run.
INSTALL_FLAGS := $(UV_FLAGS) --compile-bytecode
PIP_QUIET := --quiet --disable-pip-version-check
# pip's local index mirrors print one harmless "is ignored" line per package: hide only those.
PIP_FILTER := { grep -v "is ignored: it is neither" || true; }
IMPORT_CHECK := import torch, hydra, webdataset, braceexpand, decord, av, transformers, tokenizers, megatron.core, triton, matplotlib, lm_eval, tensorboard, peft

.PHONY: setup smoke test test-latest lock test-gpu bench bench-gpu device-kit clean

setup: $(STAMP)

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing uv $(or $(UV_VERSION),(newest)) into $(VENV) (it installs the lock)"
	$(PY) -m pip install $(PIP_QUIET) "uv$(if $(UV_VERSION),==$(UV_VERSION))" 2>&1 | $(PIP_FILTER)

$(STAMP): pyproject.toml $(LOCK) $(BUILD_LOCK) Makefile | $(UV)
	@echo "setup: installing the $$(grep -c '^[a-z]' $(LOCK)) packages of $(LOCK) into $(VENV) exactly (hash-checked, bytecode compiled; about a minute from a cold cache)"
	$(UV) pip sync --python $(PY) $(INSTALL_FLAGS) --require-hashes $(LOCK)
	@# Not in the lock, so sync removes it; reinstalled from uv's cached build. See $(BUILD_LOCK).
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(UV) pip install --python $(PY) $(INSTALL_FLAGS) --quiet \
	  --no-build-isolation --no-deps --require-hashes -r $(BUILD_LOCK)
	$(UV) pip install --python $(PY) $(INSTALL_FLAGS) --quiet --no-deps -e .
	$(PY) -W ignore -c "$(IMPORT_CHECK)"
	$(PY) -W ignore -c "from train.ops.backends.mamba_ssm import IMPORT_ERROR as e; assert e is None, repr(e)"
	@# Headless Chromium renders report.html in its test; installed when missing and we are root.
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    echo "setup: installing Debian's chromium with apt-get (the report's browser test; a few minutes)" && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: chromium is not installed; the report's browser test will be skipped"
	touch $(STAMP)

# Regenerate the lock from pyproject.toml (+ constraints-cpu.txt): Linux x86_64, Python 3.11, hashes.
# Pins already in the lock stay unless a bound forces a change; `make lock UPGRADE=1` moves all to newest.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra dev --extra eval -c constraints-cpu.txt --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 $(UV_FLAGS) $(if $(UPGRADE),--upgrade) \
	  --custom-compile-command "make lock" --quiet -o $(LOCK)

# The newest releases pyproject.toml allows, in their own venv, then the suite (or PYTEST_ARGS=...):
# drift shows here first.
LATEST := .venv-latest
test-latest: | $(UV)
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(UV) pip install --python $(LATEST)/bin/python $(UV_FLAGS) --upgrade -c constraints-cpu.txt -e '.[dev,eval]'
	$(LATEST)/bin/python -m pip list --format=freeze 2>/dev/null | diff <(sed -n 's/^\([a-z0-9._-]*==[^ ]*\).*/\1/p' $(LOCK) | sort -f) <(sort -f) | grep '^[<>]' || true
	$(LATEST)/bin/python -m pytest -q $(PYTEST_ARGS)

# The main job: all five stages on CPU with the tiny model and the embedded synthetic data.
smoke: setup
	$(PY) -m train.pipeline smoke=cpu run.dir=runs/smoke

# The suite in parallel workers (pytest-xdist; a test file stays on one worker, so its module
# fixtures run once): TEST_WORKERS=1 runs it in this process.
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The GPU targets run with the python holding the CUDA torch and the GPU extras (GPU_PYTHON, default
# python3: README "Running the GPU checks"), without `setup`, whose CPU venv would hide that torch.
GPU_PYTHON ?= python3

# One screen: a line per failure, error and skip (with its reason), then the counts.
test-gpu:
	$(GPU_PYTHON) -m pytest -q -m gpu tests/gpu --tb=line -rfEs -p no:warnings --timeout 600

bench-gpu:
	$(GPU_PYTHON) -m tests.bench.gpu_layers

# The GPU test machine's kit, .devcheck/ (git-ignored, at most 60 MiB): the wheels its image lacks,
# causal-conv1d's source, the embedded data and device_check.sh (README "Running the GPU checks").
# DEVICE_KIT_PREVIOUS=DIR adds a previous visit's Triton cache and causal-conv1d wheel (its output folder).
device-kit: setup
	$(PY) -m tests.device.build_kit --out .devcheck $(if $(DEVICE_KIT_PREVIOUS),--previous $(DEVICE_KIT_PREVIOUS))

bench: setup
	$(PY) -m tests.bench.run_all

clean:
	rm -rf runs $(LATEST)
