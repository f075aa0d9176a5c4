#!/usr/bin/env bash
# Why does an error thrown by a C++ check crash the process on some machines?
#   bash scripts/unwind_probe/run.sh OUT_DIR [--build-vcfast]
# Builds two tiny libraries here with this machine's compiler: probe_ops.so (ops that only
# throw, one per c10 error type: tells the exception type and message formatting apart from
# vcfast._C's build) and segv_backtrace.so (LD_PRELOADed: prints the faulting module, symbol
# and a native backtrace). Then calls each probe op and vcfast's failing checks in a child
# process each. --build-vcfast first builds vcfast for this GPU's arch in the background.
# Writes OUT_DIR/report.txt. Found on the first GPU machine: scripts/cpp_error_check.py.
set -u
PY=${PYTHON:-python3}
OUT=${1:?usage: run.sh OUT_DIR [--build-vcfast]}
mkdir -p "$OUT"
here=$(cd "$(dirname "$0")" && pwd)
report="$OUT/report.txt"
: > "$report"
build_pid=""
if [ "${2:-}" = --build-vcfast ]; then
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  (TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) "$PY" -m pip install -q --no-build-isolation \
    --no-deps --no-index -e . > "$OUT/vcfast_build.log" 2>&1; echo "exit $?" >> "$OUT/vcfast_build.log") &
  build_pid=$!
fi
{
  echo "== toolchain"
  c++ --version | head -1; ld --version | head -1
  "$PY" -c 'import sys, torch; print(sys.version.split()[0], torch.__version__); print("\n".join(torch.__config__.show().splitlines()[:8]))'
  ldconfig -p | grep -E 'libstdc\+\+\.so|libgcc_s\.so'
  echo "gdb: $(command -v gdb || echo none)"
} >> "$report" 2>&1

gcc -shared -fPIC -O1 -g -o "$OUT/segv_backtrace.so" "$here/segv_backtrace.c" -ldl >> "$report" 2>&1
flags=$("$PY" - <<'PYEOF'
import torch, torch.utils.cpp_extension as ce
print(" ".join("-I" + p for p in ce.include_paths()),
      " ".join(f"-L{p} -Wl,-rpath,{p}" for p in ce.library_paths()),
      "-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI))
PYEOF
)
t0=$SECONDS
# shellcheck disable=SC2086
c++ -std=c++20 -O2 -g -shared -fPIC $flags "$here/probe_ops.cpp" -o "$OUT/probe_ops.so" \
  -lc10 -ltorch -ltorch_cpu >> "$report" 2>&1
echo "== probe_ops.so built in $((SECONDS - t0)) s (exit $?)" >> "$report"

case_run() {  # case_run LABEL PRELUDE CODE
  local label=$1 prelude=$2 code=$3 out rc
  out=$(LD_PRELOAD="$OUT/segv_backtrace.so" timeout 60 "$PY" -c "
import torch
$prelude
try:
    $code
except Exception as exc:
    print('raised', type(exc).__name__ + ':', str(exc).splitlines()[0][:120])
else:
    print('no exception')
" 2>&1)
  rc=$?
  printf '%-44s rc %-4s %s\n' "$label" "$rc" "$(echo "$out" | grep -m1 '^raised\|^no exception')" >> "$report"
  if [ "$rc" != 0 ]; then echo "$out" | tail -40 | sed 's/^/    /' >> "$report"; fi
}

echo "== probe ops (torch only)" >> "$report"
load="torch.ops.load_library('$OUT/probe_ops.so')"
for op in throw_plain throw_type throw_type_sizes throw_value throw_value_literal throw_index throw_std; do
  case_run "$op" "$load" "torch.ops.vcprobe.$op(torch.zeros(2, 3))"
done
case_run "torch's own IndexError (aten.select)" "" "torch.ops.aten.select.int(torch.zeros(2), 0, 5)"

if [ -n "$build_pid" ]; then wait "$build_pid"; tail -3 "$OUT/vcfast_build.log" >> "$report"; fi
if "$PY" -c 'import vcfast._C' 2>/dev/null; then
  echo "== probe ops after import vcfast" >> "$report"
  for op in throw_type throw_value throw_index; do
    case_run "$op" "import vcfast; $load" "torch.ops.vcprobe.$op(torch.zeros(2, 3))"
  done
  echo "== vcfast's checks" >> "$report"
  case_run "penalty_terms (TypeError)" "import vcfast" \
    "torch.ops.vcfast.penalty_terms(torch.zeros(2, 3, dtype=torch.int64), 1.0, 10.0)"
  case_run "instance_norm_stats (ValueError)" "import vcfast" \
    "torch.ops.vcfast.instance_norm_stats(torch.zeros(2, 3), 1e-5)"
  case_run "label_table_add (IndexError)" "import vcfast" \
    "torch.ops.vcfast.label_table_add(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 2, 2), torch.tensor([0, 1, 9]), torch.tensor([0, 1, 1]))"
  case_run "instance_norm_stats, vcfast._C only" "import vcfast._C" \
    "torch.ops.vcfast.instance_norm_stats(torch.zeros(2, 3), 1e-5)"
  if command -v gdb > /dev/null; then
    echo "== gdb: instance_norm_stats" >> "$report"
    timeout 90 gdb -q -batch -ex run -ex bt -ex 'info registers rip' --args \
      "$("$PY" -c 'import sys; print(sys.executable)')" -c \
      "import torch, vcfast; torch.ops.vcfast.instance_norm_stats(torch.zeros(2, 3), 1e-5)" 2>&1 \
      | tail -40 | sed 's/^/    /' >> "$report"
  fi
else
  echo "== vcfast._C not importable: its checks not run" >> "$report"
fi
cat "$report"
