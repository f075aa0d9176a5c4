#!/usr/bin/env bash
# The whole GPU check of vcfast in one command, for a CUDA machine that may be offline.
#
#   bash scripts/gpu_validate.sh [--wheels DIR] [--out DIR] [--budget SECONDS] [--dry-run]
#
#   --wheels DIR    install every wheel in DIR first (pip --no-index --find-links DIR: no network)
#   --out DIR       where the per-step logs and the summary go (default gpu-validate-<date>)
#   --budget S      wall seconds for the whole run (default 510: done within 9 minutes)
#   --dry-run       the same plumbing on a CPU: no install or build (their commands are printed),
#                   each step in a tiny CPU form or printed; logs and summary as usual
#   PYTHON=...      the interpreter to use (default: python on PATH)
#
# Steps, most valuable first, each timed and logged to OUT/NN_<step>.log as it runs, the
# summary (OUT/summary.md, a markdown table) rewritten after every step so a cut-off run
# still leaves its results:
#   wheels, build       install the wheels; build vcfast._C for this GPU's architecture only
#   cpp_errors          a check that fires in a C++ kernel raises in Python (no crash)
#   selftest            vcfast selftest --device cuda --json (every op x backend vs float64)
#   gpu_tests           pytest -m gpu
#   memory_estimator    estimator vs torch.cuda.max_memory_allocated, paper size, batch 1/4/16,
#                       fp32 and bf16 (scripts/gpu_memory_check.py; target within 10 %)
#   layouts_batch16     one paper-size iteration at batch 16, official layout vs vcfast
#   train_50_steps      50 paper-size `vcfast train` steps, bf16, bundled corpus: s/step, memory
#   bench               pytest bench -k gpu --benchmark-json (the GPU benchmarks)
#   test_suite          the whole test suite with compiled Triton (TRITON_INTERPRET is unset for
#                       every step), the Triton test modules first; last because ~1800 mostly
#                       CPU tests in one process rarely finish inside the budget
# Every step has its own timeout, capped by what is left of the budget; a failing or timed-out
# step is recorded and the run goes on. Exit status: 0 when no step failed, 1 otherwise.

set -u -o pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

WHEELS=""
OUT=""
DRY_RUN=0
BUDGET=510
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_validate.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

# Compiled Triton kernels throughout: the interpreter (a CPU testing aid that the test suite's
# conftest turns on without a GPU) must not leak in from the caller's environment.
unset TRITON_INTERPRET

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python}"
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
  echo "gpu_validate.sh: --wheels $WHEELS is not a directory" >&2
  exit 2
fi
OUT="${OUT:-gpu-validate-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"

START=$(date +%s)
STEPS="$OUT/steps.tsv"   # one row per step: name, status, exit code, seconds, result, log
: > "$STEPS"
# Seconds kept back from the budget for writing the summary after the last step.
RESERVE=5
# A step is not started with less than this left: its result would be a timeout anyway.
MIN_STEP_SECONDS=15

elapsed() { echo $(( $(date +%s) - START )); }

environment() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "git: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "mode: $([ "$DRY_RUN" = 1 ] && echo 'dry run (CPU, tiny forms)' || echo 'GPU')"
  echo "cpu cores: $(nproc 2>/dev/null || echo unknown)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  else
    echo "gpu: none (no nvidia-smi)"
  fi
  "$PY" - <<'EOF' 2>&1
import platform
try:
    import torch
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"cuda available {torch.cuda.is_available()}")
except Exception as exc:
    print(f"python {platform.python_version()}, torch not importable: {exc}")
try:
    import triton
    print(f"triton {triton.__version__}")
except Exception as exc:
    print(f"triton not importable: {exc}")
EOF
}

write_summary() {
  local final="${1:-}"
  {
    echo "# vcfast GPU validation"
    echo
    sed 's/^/    /' "$OUT/00_environment.log"
    echo
    echo "| # | step | status | seconds | result | log |"
    echo "|---|---|---|---|---|---|"
    # Locals: bash scoping is dynamic, and run_step (a caller) has an rc of its own.
    local n=0 name status rc seconds result log
    while IFS=$'\t' read -r name status rc seconds result log; do
      n=$((n + 1))
      echo "| $n | $name | $status (exit $rc) | $seconds | ${result//|/\\|} | $(basename "$log") |"
    done < "$STEPS"
    echo
    if [ -n "$final" ]; then
      echo "$final"
    else
      echo "(running; $(elapsed) s so far)"
    fi
  } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
}

record() {  # name status rc seconds result log
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" "$6" >> "$STEPS"
  write_summary
  echo "[$(elapsed) s] $1: $2 (exit $3, $4 s) ${5}"
}

new_log() {  # OUT/NN_<step>.log, NN = the step's row in the summary (called in a subshell)
  printf '%s/%02d_%s.log' "$OUT" $(( $(wc -l < "$STEPS") + 1 )) "$1"
}

# run_step NAME TIMEOUT EXTRACTOR CMD...: runs CMD with min(TIMEOUT, budget left) seconds,
# output to the step's log; EXTRACTOR LOG prints the one-line result for the summary.
run_step() {
  local name="$1" timeout_s="$2" extractor="$3"
  shift 3
  local log left limit began rc seconds status result
  log="$(new_log "$name")"
  left=$(( BUDGET - $(elapsed) - RESERVE ))
  if [ "$left" -lt "$MIN_STEP_SECONDS" ]; then
    echo "not run: ${left} s left of the ${BUDGET} s budget" > "$log"
    record "$name" "skipped (time budget)" "-" 0 "budget ${BUDGET} s used up" "$log"
    return 0
  fi
  limit=$(( timeout_s < left ? timeout_s : left ))
  {
    echo "\$ $*"
    echo "# timeout ${limit} s, started at $(elapsed) s of the run"
  } > "$log"
  echo "[$(elapsed) s] $name: running (up to ${limit} s), log $log"
  began=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - began ))
  case "$rc" in
    0) status="pass" ;;
    124|137) status="timeout after ${limit} s" ;;
    *) status="FAIL" ;;
  esac
  result="$("$extractor" "$log" 2>/dev/null | tail -n 1)"
  # No result line (a crash, a timeout): the log's last line says where it stopped.
  [ -n "$result" ] || result="last line: $(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-200)"
  record "$name" "$status" "$rc" "$seconds" "$result" "$log"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  return 0
}

# print_step NAME REASON CMD...: the dry run's stand-in for a step too big for a CPU.
print_step() {
  local name="$1" reason="$2"
  shift 2
  local log
  log="$(new_log "$name")"
  {
    echo "# dry run: not run ($reason); on the GPU machine this step runs:"
    echo "\$ $*"
  } > "$log"
  record "$name" "printed (dry run)" 0 0 "would run: $*" "$log"
}

# --- result extractors: one line of each step's log for the summary ---------------------------
last_pytest_line() { grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$1" | sed 's/=//g; s/^ *//'; }
selftest_line() { grep -E 'checks passed' "$1"; }
verdict_line() { grep -E '^verdict:' "$1" | sed 's/^verdict: //'; }
build_line() { grep -E '^built:' "$1" | sed 's/^built: //'; }
pip_line() { grep -E '^Successfully installed|^Requirement already satisfied' "$1" | cut -c1-200; }
train_line() {  # s/step over the run and over its last logged steps, and peak memory
  "$PY" - "$1" "$OUT/train_run/log.csv" <<'EOF'
import csv, json, sys
text = open(sys.argv[1]).read()
start = text.rfind("\n{")
if start < 0:  # no run summary: the run failed, run_step shows the log's last line instead
    sys.exit(0)
summary = json.loads(text[start:])
steady = ""
try:
    rows = list(csv.DictReader(open(sys.argv[2])))
    if rows and rows[-1].get("seconds_per_step"):
        steady = f", last logged steps {float(rows[-1]['seconds_per_step']):.3f} s/step"
except OSError:
    pass
cuda = summary.get("peak_cuda_allocated_bytes")
memory = (f"peak CUDA allocated {cuda / 2**20:.0f} MiB" if cuda else
          f"peak RSS {summary.get('peak_rss_bytes', 0) / 2**20:.0f} MiB")
print(f"{summary.get('steps')} steps, {summary.get('seconds_per_step', float('nan')):.3f} s/step "
      f"overall{steady}, {memory}")
EOF
}

FAILED=0
echo "vcfast GPU validation: logs and summary in $OUT (budget ${BUDGET} s)"
environment > "$OUT/00_environment.log" 2>&1
write_summary

# --- install and build ----------------------------------------------------------------------
if [ -z "$WHEELS" ]; then
  log="$(new_log wheels)"
  echo "no --wheels given: using the installed torch/triton" > "$log"
  record wheels "skipped (no --wheels)" "-" 0 "installed packages kept" "$log"
elif [ "$DRY_RUN" = 1 ]; then
  print_step wheels "dry run" "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
else
  run_step wheels 120 pip_line "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi

build() {
  # This GPU's architecture only (one arch compiles several times faster than the default
  # list), all cores; setup.py reads both variables.
  local arch
  arch="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || return 1
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc)"
  TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
  "$PY" - <<'EOF'
import vcfast
info = vcfast.build_info()
print(f"built: extension loaded {info['extension_loaded']}, CUDA kernels {info['extension_has_cuda']}, "
      f"backends {', '.join(b for b, ok in vcfast.backends().items() if ok)}")
raise SystemExit(0 if info["extension_has_cuda"] else 1)
EOF
}

if [ "$DRY_RUN" = 1 ]; then
  print_step build "dry run: no GPU to build for" env "TORCH_CUDA_ARCH_LIST=<this GPU's major.minor from torch.cuda.get_device_capability()>" \
    "MAX_JOBS=$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
else
  # timeout runs programs, not shell functions: the function goes to a child bash.
  export -f build
  export PY
  run_step build 240 build_line bash -c build
fi

# --- the checks, most valuable first -----------------------------------------------------------
# Errors raised in the C++ kernels must reach Python (on the first GPU machine each one killed
# the process with SIGSEGV); on failure the step's log holds the diagnostics.
run_step cpp_errors 180 verdict_line "$PY" scripts/cpp_error_check.py --json "$OUT/cpp_errors.json"
if [ "$DRY_RUN" = 1 ]; then
  # Tiny CPU forms: the selftest of two cheap ops (the full --quick run takes ~30 s on two
  # cores), a few tests, a tiny memory check; the rest printed.
  run_step selftest 120 selftest_line "$PY" -m vcfast.cli selftest --device cpu --quick \
    --ops masked_multigroup_bce,penalty_terms --json "$OUT/selftest.json"
  print_step gpu_tests "needs a GPU" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
  # At tiny CPU sizes fixed allocator and first-call overheads dominate an RSS rise, so the
  # dry run checks the plumbing, not the 10 % target (--target 100).
  run_step memory_estimator 120 verdict_line "$PY" scripts/gpu_memory_check.py estimator \
    --device cpu --batches 1 --precisions fp32 --image-size 64 --conv-dim 8 --n-critic 1 \
    --label-groups 4,2 --no-warmup --target 100 --json "$OUT/memory_estimator.json"
  print_step layouts_batch16 "paper size at batch 16 needs a GPU" "$PY" scripts/gpu_memory_check.py layouts \
    --batch 16 --json "$OUT/layouts_batch16.json"
  print_step train_50_steps "paper size needs a GPU" "$PY" -m vcfast.cli train --out "$OUT/train_run" --size paper \
    --steps 50 --bf16 --device cuda --log-every 10 --sample-every 1000 --checkpoint-every 1000 \
    --eval-every 1000 --no-progress
  print_step bench "timings need the GPU" "$PY" -m pytest -q -p no:cacheprovider bench -k gpu \
    --benchmark-json "$OUT/bench.json"
  run_step test_suite 120 last_pytest_line "$PY" -m pytest -q \
    -p no:cacheprovider tests/test_labels.py
else
  run_step selftest 150 selftest_line "$PY" -m vcfast.cli selftest --device cuda \
    --json "$OUT/selftest.json"
  run_step gpu_tests 90 last_pytest_line "$PY" -m pytest -q \
    -p no:cacheprovider -m gpu tests
  run_step memory_estimator 150 verdict_line "$PY" scripts/gpu_memory_check.py estimator \
    --device cuda --batches 1,4,16 --precisions fp32,bf16 --json "$OUT/memory_estimator.json"
  run_step layouts_batch16 90 verdict_line "$PY" scripts/gpu_memory_check.py layouts \
    --device cuda --batch 16 --json "$OUT/layouts_batch16.json"
  run_step train_50_steps 150 train_line "$PY" -m vcfast.cli train --out "$OUT/train_run" \
    --size paper --steps 50 --bf16 --device cuda --log-every 10 --sample-every 1000 \
    --checkpoint-every 1000 --eval-every 1000 --no-progress
  run_step bench 180 last_pytest_line "$PY" -m pytest -q -p no:cacheprovider bench -k gpu \
    --benchmark-json "$OUT/bench.json"
  # The modules that exercise compiled Triton kernels first (pytest runs the files in the
  # order given and collects each once), then the rest of the suite.
  run_step test_suite 600 last_pytest_line "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_classification.py tests/test_slope_bits.py \
    tests/test_spectrogram.py tests/test_label_conv.py tests/test_norm_act.py tests
fi

verdict="$([ "$FAILED" = 0 ] && echo "all steps passed" || echo "$FAILED step(s) FAILED")"
write_summary "**Done in $(elapsed) s: ${verdict}.** Per-step output: the NN_<step>.log files; JSON: cpp_errors.json, selftest.json, memory_estimator.json, layouts_batch16.json, bench.json."
echo "done in $(elapsed) s: $verdict; summary: $OUT/summary.md"
[ "$FAILED" = 0 ]
