#!/usr/bin/env bash
# hybrid-vl-sft's GPU checks on the GPU test machine, in at most 9 minutes, with the image's own
# python3: no venv, no network. `make device-kit` builds .devcheck/ (this script, the wheels the image
# lacks, causal-conv1d's source, the embedded data; tests/device/build_kit.py). From the repo root:
#
#   bash .devcheck/device_check.sh              every step
#   bash .devcheck/device_check.sh --only d     one step (to rerun it after a failure), after the install
#   bash .devcheck/device_check.sh --dry-run    the steps and their budgets; runs nothing (also on a CPU)
#
# Every step runs on its own, under its own timeout, into its own log: a failure loses nothing else.
# GPU tests run with REQUIRE_BACKENDS=1: a missing backend fails them instead of skipping them.
# Output, in $OUT when set, else .devcheck/out (at most 8 files, no folders):
#   summary.json          step -> status (pass/fail), seconds, budget, key figures, last lines of its log
#   steps.log             every step's log, one after another
#   bench_gpu.json        step g's measurements
#   triton-cache.tar.gz   Triton's compiled kernels and autotuning results   } bring them back for the next
#   causal_conv1d-*.whl   causal-conv1d as compiled here (sm_90)             } visit: make device-kit
#                                                                              DEVICE_KIT_PREVIOUS=<that folder>
set -uo pipefail

SELF="$(realpath "${BASH_SOURCE[0]}")"
KIT="$(dirname "$SELF")"
ROOT="$(dirname "$KIT")"
PYTHON="${DEVCHECK_PYTHON:-python3}"
OUT_DIR="$(realpath -m "${OUT:-$KIT/out}")"  # absolute: the steps run from the repository root
SCRATCH="$(realpath -m "${DEVCHECK_SCRATCH:-/tmp/devcheck}")"
SITE="$SCRATCH/site"
MAX_RETURNED_BYTES=$((16 * 1024 * 1024))  # the largest file the device tool brings back

# The steps, in order; budgets in seconds. The sequential ones sum to at most 540 s (9 minutes) with
# the build's wait; the build runs alongside from the start and ends before step h needs it.
STEPS=(install a b c d e f g h)
# A cold Triton cache compiles and autotunes mamba-ssm's kernels (most of b and c on a first visit).
declare -A BUDGET=([install]=15 [a]=20 [b]=140 [c]=60 [d]=100 [e]=45 [f]=25 [g]=70 [h]=40 [build]=420)
declare -A TITLE=(
  [install]="install the kit's wheels into a scratch folder; restore the Triton cache"
  [a]="environment: GPU, driver, torch/triton/transformers, kit packages importable"
  [b]="kernel parity: mamba-ssm and torch varlen attention vs the torch references"
  [c]="the smoke model on CUDA with the GPU kernels vs the CPU references"
  [d]="smoke=gpu stage: 10 steps, falling loss, checkpoint, resume continues"
  [e]="megatron-core engine (local spec, NCCL, world size 1) vs the native engine"
  [f]="FP8 GEMMs (torch._scaled_mm) vs the CPU emulation"
  [g]="bench: 12B-width layers on a 16K packed row, bf16 and FP8"
  [h]="causal-conv1d parity, once its build is done"
  [build]="causal-conv1d compiled for sm_90 in the background from the start (or the kit's previous wheel)"
)
# GPU tests of libraries neither the image nor the kit has (flash-attn, Transformer Engine): not run here.
NOT_ON_THIS_MACHINE="flash_attn or transformer_engine or test_activation_checkpointing_with_fused_kernels"
# GPU tests that need causal-conv1d: step h, after the build.
NEEDS_CONV1D="causal_conv1d or fp32_mamba_kernels"
PYTEST=("$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfEs --tb=short)

usage() { sed -n '2,20p' "$SELF" | sed 's/^# \{0,1\}//'; }

first() {  # the first existing path among a glob's matches (nothing when it matched none)
  local path
  for path in "$@"; do [[ -e $path ]] && { echo "$path"; return; }; done
}

environment() {
  [[ -n ${DEVCHECK_ENV:-} ]] && return
  export DEVCHECK_ENV=1 DEVCHECK_KIT="$KIT" DEVCHECK_SCRATCH="$SCRATCH" DEVCHECK_OUT="$OUT_DIR"
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  export TRITON_CACHE_DIR="$SCRATCH/triton" TRITON_CACHE_AUTOTUNING=1  # autotuning results persist too
  export REQUIRE_BACKENDS=1
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg  # bytecode is written: the first step's imports compile it once
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline  # nothing outside can be reached
  export PIP_ROOT_USER_ACTION=ignore  # root on that machine, and a --target install: pip's warning is moot
  cd "$ROOT" || exit 1
}

# --- step bodies (each runs in its own process under its timeout) ---------------------------------

body_install() {
  rm -rf "$SITE" && mkdir -p "$SITE" "$TRITON_CACHE_DIR" || return
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" \
      "$KIT"/wheels/*.whl || return
  else  # no pip in the image: a wheel is a zip of its files (these have no scripts to place)
    "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
      "$SITE" "$KIT"/wheels/*.whl || return
  fi
  ls "$SITE"
  if [[ -f $KIT/previous/triton-cache.tar.gz ]]; then
    tar -xzf "$KIT/previous/triton-cache.tar.gz" -C "$SCRATCH" && \
      echo "restored the Triton cache of a previous visit ($(du -sh "$TRITON_CACHE_DIR" | cut -f1))"
  else
    echo "no Triton cache in the kit: kernels compile and autotune from scratch"
  fi
}

body_a() { "$PYTHON" -m tests.device.env_report --require-cuda; }

body_b() {
  "${PYTEST[@]}" tests/gpu/test_kernel_parity.py -k "not ($NOT_ON_THIS_MACHINE) and not ($NEEDS_CONV1D)"
}

body_c() { "${PYTEST[@]}" tests/gpu/test_model_gpu.py -k "not causal_conv1d"; }

body_d() { "$PYTHON" -m tests.device.smoke_resume --data "$KIT/data" --work "$SCRATCH/smoke"; }

body_e() { "${PYTEST[@]}" tests/gpu/test_mcore_gpu.py; }

body_f() { "${PYTEST[@]}" tests/gpu/test_fp8_scaled_mm.py; }

body_g() {
  rm -f bench_results/bench_gpu.json
  "$PYTHON" -m tests.bench.gpu_layers
  local rc=$?
  [[ -f bench_results/bench_gpu.json ]] && cp bench_results/bench_gpu.json "$OUT_DIR/bench_gpu.json"
  return $rc
}

body_build() {
  mkdir -p "$SCRATCH/conv1d-wheel"
  local previous
  previous=$(first "$SCRATCH"/conv1d-wheel/causal_conv1d-*.whl)
  if [[ -n $previous ]]; then  # a rerun (--only h) on the machine that built it
    echo "reusing $(basename "$previous"), built by an earlier run here: nothing to compile"
    return
  fi
  previous=$(first "$KIT"/previous/causal_conv1d-*.whl)
  if [[ -n $previous ]]; then
    echo "reusing $(basename "$previous"), built on a previous visit: nothing to compile"
    cp "$previous" "$SCRATCH/conv1d-wheel/"
    return
  fi
  local src
  src=$(first "$KIT"/src/causal_conv1d-*)
  rm -rf "$SCRATCH/conv1d-src" && cp -r "$src" "$SCRATCH/conv1d-src" && cd "$SCRATCH/conv1d-src" || return
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  command -v ninja >/dev/null || echo "note: no ninja on PATH: torch compiles the sources one by one"
  # FORCE_BUILD: never try upstream's prebuilt-wheel download (no network here). Three jobs (the
  # .cu files) of 4 nvcc threads each leave a few cores to the steps running meanwhile.
  export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=3 TORCH_CUDA_ARCH_LIST=9.0
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip wheel --no-deps --no-build-isolation --no-index --disable-pip-version-check \
      -w "$SCRATCH/conv1d-wheel" .
  else
    "$PYTHON" setup.py -q bdist_wheel -d "$SCRATCH/conv1d-wheel"
  fi
}

body_h() {
  local wheel
  wheel=$(first "$SCRATCH"/conv1d-wheel/causal_conv1d-*.whl)
  if [[ -z $wheel ]]; then
    echo "no causal-conv1d wheel: its build failed or ran out of time (see the build's log); the tests below fail"
  elif "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" "$wheel"
  else
    "$PYTHON" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[2]).extractall(sys.argv[1])' "$SITE" "$wheel"
  fi
  "${PYTEST[@]}" tests/gpu/test_kernel_parity.py tests/gpu/test_model_gpu.py \
    -k "($NEEDS_CONV1D) and not ($NOT_ON_THIS_MACHINE)"
}

# --- the runner -------------------------------------------------------------------------------------

now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# record NAME RC SECONDS: the step's result, its log into steps.log, and summary.json written anew
# (after every step, so a run cut short still leaves its summary).
record() {
  local name=$1 rc=$2 seconds=$3 log="$SCRATCH/logs/$1.log"
  local status=pass
  [[ $rc == 0 ]] || status=fail
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "${BUDGET[$name]}" "${TITLE[$name]}" \
    >>"$SCRATCH/steps.tsv"
  {
    printf '===== %s: %s — %s (exit %s) in %s s of %s s =====\n' "$name" "${TITLE[$name]}" "$status" "$rc" \
      "$seconds" "${BUDGET[$name]}"
    if [[ -f $log ]]; then
      local lines
      lines=$(wc -l <"$log")
      ((lines > 600)) && echo "[... the first $((lines - 600)) lines left out ...]"
      tail -n 600 "$log"
    fi
    echo
  } >>"$OUT_DIR/steps.log"
  summarize
  printf '%-8s %-5s %6s s of %4s s  %s\n' "$name" "$status" "$seconds" "${BUDGET[$name]}" "${TITLE[$name]}"
}

summarize() {
  "$PYTHON" "$ROOT/tests/device/summarize.py" --records "$SCRATCH/steps.tsv" --logs "$SCRATCH/logs" \
    --kit "$KIT" --out "$OUT_DIR" --started "$STARTED" >/dev/null \
    || echo "warning: summary.json could not be written" >&2
}

run_step() {
  local name=$1 t0
  t0=$(now)
  timeout -k 3 "${BUDGET[$name]}" bash "$SELF" --body "$name" >"$SCRATCH/logs/$name.log" 2>&1
  record "$name" $? "$(elapsed "$t0")"
}

start_build() {
  (
    t0=$(now)
    timeout -k 5 "${BUDGET[build]}" bash "$SELF" --body build >"$SCRATCH/logs/build.log" 2>&1
    echo "$? $(elapsed "$t0")" >"$SCRATCH/build.result"
  ) &
  BUILD_PID=$!
}

finish_build() {
  wait "$BUILD_PID"
  local rc seconds
  read -r rc seconds <"$SCRATCH/build.result" || { rc=1; seconds=0; }
  record build "$rc" "$seconds"
  local wheel
  wheel=$(first "$SCRATCH"/conv1d-wheel/causal_conv1d-*.whl)
  if [[ -n $wheel ]]; then
    if (($(stat -c %s "$wheel") <= MAX_RETURNED_BYTES)); then
      cp "$wheel" "$OUT_DIR/"
    else
      echo "note: $(basename "$wheel") is over 16 MiB: the device tool would not bring it back" >&2
    fi
  fi
}

save_triton_cache() {
  [[ -d $SCRATCH/triton ]] || return
  tar -czf "$OUT_DIR/triton-cache.tar.gz" -C "$SCRATCH" triton
  if (($(stat -c %s "$OUT_DIR/triton-cache.tar.gz") > MAX_RETURNED_BYTES)); then
    echo "note: the Triton cache is over 16 MiB once packed: left out" >&2
    rm -f "$OUT_DIR/triton-cache.tar.gz"
  fi
}

dry_run() {
  printf '%-8s %6s  %s\n' step budget what
  local sequential=0 name
  for name in "${STEPS[@]}"; do
    printf '%-8s %4s s  %s\n' "$name" "${BUDGET[$name]}" "${TITLE[$name]}"
    [[ $name == h ]] || sequential=$((sequential + BUDGET[$name]))
  done
  printf '%-8s %4s s  %s\n' build "${BUDGET[build]}" "${TITLE[build]}"
  # Step h starts once both the steps before it and the build (started after the install) are over.
  local build_end=$((BUDGET[install] + BUDGET[build]))
  ((build_end > sequential)) && sequential=$build_end
  printf '%-8s %4s s  %s\n' total $((sequential + BUDGET[h])) "at most, end to end (the build runs alongside)"
}

main() {
  local only="" name
  while (($#)); do
    case $1 in
      --dry-run) dry_run; return 0 ;;
      --only) only=${2:-}; shift ;;
      --body) environment; "body_$2"; return ;;
      -h|--help) usage; return 0 ;;
      *) echo "unknown argument $1" >&2; usage >&2; return 2 ;;
    esac
    shift
  done
  if [[ -n $only && ( -z ${BUDGET[$only]:-} || $only == install || $only == build ) ]]; then
    echo "--only takes one of: ${STEPS[*]:1}" >&2
    return 2
  fi
  STARTED=$(now)
  environment
  mkdir -p "$OUT_DIR" "$SCRATCH/logs" || return 1
  rm -f "$SCRATCH"/logs/*.log "$SCRATCH/steps.tsv" "$SCRATCH/build.result" "$OUT_DIR/summary.json" \
    "$OUT_DIR/steps.log" "$OUT_DIR/bench_gpu.json" "$OUT_DIR/triton-cache.tar.gz" "$OUT_DIR"/causal_conv1d-*.whl
  echo "device check: kit $KIT, output $OUT_DIR, scratch $SCRATCH"
  run_step install
  if [[ -z $only || $only == h ]]; then
    start_build
    [[ $only == h ]] && finish_build
  fi
  for name in a b c d e f g; do
    [[ -z $only || $only == "$name" ]] && run_step "$name"
  done
  if [[ -z $only ]]; then
    finish_build
  fi
  [[ -z $only || $only == h ]] && run_step h
  save_triton_cache
  summarize
  echo "total $(elapsed "$STARTED") s; summary: $OUT_DIR/summary.json"
  ! grep -q $'\tfail\t' "$SCRATCH/steps.tsv"
}

main "$@"
