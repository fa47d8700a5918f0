#!/usr/bin/env bash
# The CPU results of this machine in one command (run it on a quiet machine):
#
#     bash benchmarks/run_cpu.sh [extra pytest arguments, e.g. --bench-repeat 10]
#
# resnet18 and resnet50, 224x224, float32, batch 1 and 8: eager NCHW, eager channels_last,
# torch.compile (inductor, freezing on) and the fused model on every CPU backend, timed by
# resnet_fused.bench.time_fn. Writes benchmarks/results/<date>_<cpu>/{results.json, results.md,
# speedup.png}. About 5 minutes on a quiet 2-core machine (the resnet18 half took 1 min 45 s;
# torch.compile compiles four times, 15-40 s each), several times that on a busy one.
# PYTHON picks the interpreter (default: python on PATH).

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=${PYTHON:-$(command -v python || command -v python3)}
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT

"$PY" -m pytest benchmarks/bench_models.py --bench-device cpu --bench-models resnet18,resnet50 --bench-batch 1,8 \
  --bench-dtype fp32 --bench-size 224 -rfEs -p no:cacheprovider \
  --benchmark-columns=min,median,iqr,rounds --benchmark-sort=name --benchmark-json "$raw/results.json" "$@"
status=$?
# A failed variant (a mismatch, a crash) has no row; render the others, then fail.
if [ -s "$raw/results.json" ]; then
  "$PY" benchmarks/render.py "$raw/results.json" --summary || status=1
else
  echo "run_cpu: no results were written" >&2
  status=1
fi
[ "$status" = 0 ] || echo "run_cpu: FAILED (pytest exit $status): see the failures above" >&2
exit "$status"
