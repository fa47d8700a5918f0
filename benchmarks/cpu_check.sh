#!/usr/bin/env bash
# This machine's CPU results in one command, for a CPU kind the README has no table for yet (issue 12:
# AVX-512 AMD, Intel Xeon with AVX512-BF16 / AMX). Run it on a quiet machine from an installed
# checkout (the README's second command):
#
#     bash benchmarks/cpu_check.sh [OUT_DIR]   # default: benchmarks/results/<date>_cpu-<model>-<threads>t
#
# Stages, each logged to OUT_DIR/cpu_check.log with its seconds:
#   1. the machine: lscpu, and the environment record every result carries (CPU model, ISA flags,
#      torch's kernel level, versions) -> environment.json;
#   2. the test suite on this CPU (tests pass on every CPU kind; the ISA-specific ones say what
#      they skip and why; CPU_CHECK_TESTS picks other test paths) -> tests.log;
#   3. fp32: resnet18 and resnet50, batch 1 and 8, fused against eager, torch.compile, ONNX Runtime
#      and OpenVINO, timed round-robin in three fresh processes (benchmarks/interleaved.py --rounds 10
#      --runs 1 --processes 3: one process's ratio is one draw) -> fp32/;
#   4. bf16, where the CPU has bf16 instructions (avx512_bf16 or amx_bf16; CPU_CHECK_BF16=1 forces
#      it elsewhere): the same models against eager fp32 (the bf16 targets' baseline), eager bf16,
#      torch.compile bf16 and OpenVINO bf16 -> bf16/;
#   5. resnet50 batch 1 conv by conv against ONNX Runtime and OpenVINO, inside whole forwards
#      (benchmarks/per_layer.py) -> per_layer/; in bf16 too where stage 4 runs -> per_layer_bf16/.
# About 25 minutes on 2 cores. CPU_CHECK_SKIP="tests fp32 bf16 per_layer per_layer_bf16" leaves stages out;
# CPU_CHECK_ROUNDS (10), CPU_CHECK_RUNS (1) and CPU_CHECK_PROCESSES (3) size stages 3-4;
# CPU_CHECK_MODELS, CPU_CHECK_BATCH and CPU_CHECK_SIZE (default resnet18,resnet50 / 1,8 / 224) shrink
# stages 3-5 for a rehearsal (the smoke test runs it at 32x32). Exit status 1 when a stage fails (a failing test, a result off
# float64); missed performance targets are reported, not failed.
# PYTHON picks the interpreter (default: .venv/bin/python, else python on PATH).

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=$(command -v python || command -v python3)
fi
ROUNDS=${CPU_CHECK_ROUNDS:-10}
RUNS=${CPU_CHECK_RUNS:-1}
PROCESSES=${CPU_CHECK_PROCESSES:-3}
MODELS=${CPU_CHECK_MODELS:-resnet18,resnet50}
BATCH=${CPU_CHECK_BATCH:-1,8}
SIZE=${CPU_CHECK_SIZE:-224}
SKIP=" ${CPU_CHECK_SKIP:-} "

slug=$("$PY" - <<'EOF'
import re, torch
from resnet_fused import bench
name = bench.environment("cpu")["cpu_model"].split(" (")[0]
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + f"-{torch.get_num_threads()}t")
EOF
) || { echo "cpu_check: resnet_fused does not import with $PY: install it first (README)" >&2; exit 1; }
OUT=${1:-benchmarks/results/$(date -u +%Y-%m-%d)_cpu-$slug}
mkdir -p "$OUT"
LOG="$OUT/cpu_check.log"
: > "$LOG"
status=0

say() { echo "cpu_check: $*" | tee -a "$LOG" >&2; }

# stage NAME COMMAND...: runs unless skipped, logs its output and seconds, remembers a failure.
stage() {
  local name=$1
  shift
  if [[ "$SKIP" == *" $name "* ]]; then
    say "$name: skipped (CPU_CHECK_SKIP)"
    return
  fi
  say "$name: $*"
  local start=$SECONDS
  "$@" >> "$LOG" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}

lscpu > "$OUT/lscpu.txt" 2>&1
"$PY" -c "import json, sys; from resnet_fused import bench; json.dump(bench.environment('cpu'), sys.stdout, indent=1)" \
  > "$OUT/environment.json" || status=1
flags=$("$PY" -c "from resnet_fused import bench; print(' '.join(bench.cpu_flags()))")
say "CPU: $(sed -n 's/^Model name:[[:space:]]*//p' "$OUT/lscpu.txt" | head -1); ISA: ${flags:-none of note}; out: $OUT"

run_tests() {
  # shellcheck disable=SC2086  # CPU_CHECK_TESTS may name several paths
  "$PY" -m pytest -q -p no:cacheprovider -rs ${CPU_CHECK_TESTS:-tests} > "$OUT/tests.log" 2>&1
  local rc=$?
  tail -3 "$OUT/tests.log"
  return $rc
}
stage tests run_tests
stage fp32 "$PY" benchmarks/interleaved.py --models "$MODELS" --batch "$BATCH" --size "$SIZE" --rounds "$ROUNDS" \
  --runs "$RUNS" --processes "$PROCESSES" --out "$OUT/fp32"
bf16=0
if [[ " $flags " == *" avx512_bf16 "* || " $flags " == *" amx_bf16 "* || "${CPU_CHECK_BF16:-0}" = 1 ]]; then
  bf16=1
  stage bf16 "$PY" benchmarks/interleaved.py --dtype bf16 --models "$MODELS" --batch "$BATCH" --size "$SIZE" \
    --rounds "$(( ROUNDS < 6 ? ROUNDS : 6 ))" --runs "$RUNS" --processes "$PROCESSES" \
    --out "$OUT/bf16"
else
  say "bf16: not run: this CPU has neither avx512_bf16 nor amx_bf16 (CPU_CHECK_BF16=1 runs it anyway)"
fi
stage per_layer "$PY" benchmarks/per_layer.py --model "${MODELS##*,}" --batch 1 --size "$SIZE" --rounds 10 \
  --out "$OUT/per_layer"
if [ "$bf16" = 1 ]; then
  stage per_layer_bf16 "$PY" benchmarks/per_layer.py --dtype bf16 --model "${MODELS##*,}" --batch 1 --size "$SIZE" \
    --rounds 10 --out "$OUT/per_layer_bf16"
fi

for table in fp32/interleaved.md bf16/interleaved.md; do
  [ -f "$OUT/$table" ] && { echo; cat "$OUT/$table"; } | tee -a "$LOG"
done
say "done, exit $status; results in $OUT"
exit "$status"
