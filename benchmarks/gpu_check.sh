#!/usr/bin/env bash
# One-shot check of resnet-fused on a machine with an NVIDIA GPU and no internet, run from a copy
# of the repository (nothing is installed, nothing downloaded):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_results
#
# Builds the extension in place against the installed torch, makes the package importable without
# pip, prints the environment, runs the GPU tests, benchmarks resnet50 against eager and
# torch.compile (then, as time allows, a whole-model verify, resnet18 and resnet50's ops), renders
# the results and prints a summary with the H100 targets last. Every stage has a timeout inside an
# overall budget (GPU_CHECK_BUDGET_S, default 450 s, so that a cold H100 finishes in 8 minutes).
#
# OUT_DIR receives few files: gpu_check.log (everything printed), models_resnet50.json,
# models_resnet18.json, ops_resnet50.json (pytest-benchmark), results.md and speedup.png.
# Exit status: 0 when every stage that ran passed, 1 on any failure or numerical mismatch (missed
# performance targets are reported, not failed).
#
# Without a CUDA device, or with GPU_CHECK_DRY_RUN=1, every stage runs at a tiny size (on the CPU
# when there is no GPU): a rehearsal of the script itself, which says nothing about a GPU.

set -uo pipefail

OUT_DIR=${1:-${OUT:-./gpu_results}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd)
LOG=$OUT_DIR/gpu_check.log
OUTPUTS=(gpu_check.log models_resnet50.json models_resnet18.json ops_resnet50.json results.md speedup.png)
for name in "${OUTPUTS[@]}"; do rm -f "${OUT_DIR:?}/$name"; done  # a rerun must not render stale results
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
STAGE_DIR=$(mktemp -d)
trap 'rm -rf "$STAGE_DIR"' EXIT

START=$SECONDS
STAGES=()  # "name|result|seconds"
FAILED=()

say() { printf '\n=== %s\n' "$*"; }

# ---- Python, device, mode -------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu_check: FAILED: no python with torch found (set PYTHON=/path/to/python)"
  exit 1
fi
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then HAVE_GPU=1; else HAVE_GPU=0; fi
if [ "$HAVE_GPU" = 1 ] && [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
  MODE=full; DEVICE=cuda
else
  MODE=tiny; DEVICE=$([ "$HAVE_GPU" = 1 ] && echo cuda || echo cpu)
fi
# The budget is for an H100 from cold (16 cores); a rehearsal on a small CPU machine compiles the
# extension, CUDA code included, far more slowly.
if [ "$MODE:$DEVICE" = tiny:cpu ]; then BUDGET=${GPU_CHECK_BUDGET_S:-1800}; BUILD_CAP=1200; else BUDGET=${GPU_CHECK_BUDGET_S:-450}; BUILD_CAP=240; fi
RENDER_RESERVE=45  # kept back so that the results are always rendered (a stage may overrun its timeout by 20 s)

echo "gpu_check: repository $REPO, output $OUT_DIR, python $(command -v "$PY"), mode $MODE on $DEVICE, budget ${BUDGET}s"
if [ "$HAVE_GPU" = 0 ]; then
  echo "gpu_check: NO CUDA DEVICE visible to PyTorch: the GPU stages are skipped; every stage is rehearsed at a tiny size on the CPU instead"
elif [ "$MODE" = tiny ]; then
  echo "gpu_check: GPU_CHECK_DRY_RUN=1: every stage at a tiny size"
fi

seconds_left() { echo $(( BUDGET - RENDER_RESERVE - (SECONDS - START) )); }

# stage NAME CAP_S required|optional CMD...: run CMD under a timeout of CAP_S (or what is left of
# the budget); a failure fails the check; running out of time fails it only for a required stage.
stage() {
  local name=$1 cap=$2 need=$3 left result rc t0
  shift 3
  left=$(seconds_left)
  (( cap > left )) && cap=$left
  if (( cap < 15 )); then
    result="not run: out of time"
    [ "$need" = required ] && FAILED+=("$name")
    STAGES+=("$name|$result|0")
    say "$name: $result"
    return
  fi
  say "$name (timeout ${cap}s): $*"
  t0=$SECONDS
  # bash -c: the command may be one of the functions below (exported), which timeout cannot run itself.
  timeout -s INT -k 20 "$cap" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$STAGE_DIR/stage.out"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    result=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    # pytest stops cleanly on the timeout's SIGINT, keeping the results it has; its failures are in its output.
    if grep -qE '^(FAILED|ERROR) ' "$STAGE_DIR/stage.out"; then
      result="FAILED, then cut at ${cap}s"; FAILED+=("$name")
    elif [ "$need" = required ]; then
      result="cut at ${cap}s: unfinished"; FAILED+=("$name")
    else
      result="cut at ${cap}s (partial)"
    fi
  else
    result="FAILED (exit $rc)"; FAILED+=("$name")
  fi
  STAGES+=("$name|$result|$((SECONDS - t0))")
  echo "--- $name: $result in $((SECONDS - t0))s"
}

# ---- what the stages run ----------------------------------------------------------------------
environment() {
  "$PY" - <<'PYTHON'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"triton: not importable ({exc})")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB")
PYTHON
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  for tool in nvcc ninja c++; do echo "$tool: $(command -v "$tool" || echo 'not on PATH')"; done
}

importable() {
  "$PY" - "$REPO" <<'PYTHON'
import os, sys
import resnet_fused, resnet_fused.kernels
repo = os.path.realpath(sys.argv[1])
for module, where in ((resnet_fused, "resnet_fused"), (resnet_fused.kernels, "kernels")):
    found = os.path.realpath(os.path.dirname(module.__file__))
    if found != os.path.join(repo, where):
        sys.exit(f"import: {module.__name__} comes from {found}, not from this repository")
print(f"import: resnet_fused from {os.path.dirname(resnet_fused.__file__)}, "
      f"resnet_fused.kernels from {os.path.dirname(resnet_fused.kernels.__file__)}")
PYTHON
}

make_importable() {
  importable && return 0
  # Fallback: an editable install, offline (no dependencies, no build isolation, no extension build:
  # the extension is built in place by its own stage).
  echo "import: the PYTHONPATH shim did not work; trying an editable install"
  RESNET_FUSED_NO_EXTENSION=1 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e "$REPO" && importable
}

# Prints the CUDA toolkit to build with: $CUDA_HOME if it has nvcc, else the toolkit of the nvcc on
# PATH if it has libcudart (a wrapper in /usr/local/bin does not), else /usr/local/cuda(-*).
cuda_home() {
  local home nvcc
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && { echo "$home"; return 0; }
  done
  nvcc=$(command -v nvcc || true)
  if [ -n "$nvcc" ]; then
    home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    if compgen -G "$home/lib64/libcudart.so*" >/dev/null || compgen -G "$home/targets/*/lib/libcudart.so*" >/dev/null; then
      echo "$home"; return 0
    fi
  fi
  for home in /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV) /opt/cuda; do
    [ -x "$home/bin/nvcc" ] && { echo "$home"; return 0; }
  done
  return 1
}

build() {
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  unset RESNET_FUSED_NO_EXTENSION
  local home
  if home=$(cuda_home); then
    export CUDA_HOME=$home PATH="$home/bin:$PATH"
    if [ "$DEVICE" = cuda ]; then
      export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
    else
      # Without a GPU the CUDA code is still compiled, for the H100 this check is for: a compile
      # error shows up here, not in GPU time.
      export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    fi
    echo "build: CUDA_HOME=$CUDA_HOME (nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')), torch built with CUDA $("$PY" -c 'import torch; print(torch.version.cuda)')"
    echo "build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  elif [ "$DEVICE" = cuda ]; then
    echo "build: no CUDA toolkit (nvcc) in \$CUDA_HOME, on PATH or in /usr/local/cuda*: cannot build the CUDA extension"
    return 1
  else
    echo "build: no CUDA toolkit: building the CPU-only extension (MAX_JOBS=$MAX_JOBS)"
  fi
  "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "import resnet_fused._C as C; print('build: built', C.__file__)"
}

verify() {  # verify CLI_ARGS... --dtype D...: `resnet-fused verify` of each backend on the device, in each dtype it supports
  "$PY" - "$DEVICE" "$@" <<'PYTHON'
import sys
from resnet_fused import cli, ops

device, *args = sys.argv[1:]
at = args.index("--dtype")
failed = False
for name, module in ops.BACKENDS.items():
    dtypes = [d for d in args[at + 1:] if module.unavailable_reason(device, cli.DTYPES[d]) is None]
    if not dtypes or (name == "triton" and device == "cpu"):
        print(f"verify: {name}: not run on {device} ({module.unavailable_reason(device, None) or 'interpreter only'})")
        continue
    print(f"verify: {name}: {' '.join(dtypes)}", flush=True)
    failed |= cli.main(["verify", "--device", device, "--backend", name, *args[:at], "--dtype", *dtypes]) != 0
sys.exit(1 if failed else 0)
PYTHON
}

bench() {  # bench JSON_NAME PYTEST_ARGS... (which override BENCH_OPTS)
  local json=$1
  shift
  # shellcheck disable=SC2086  # BENCH_OPTS is a list of words
  "$PY" -m pytest --bench-device "$DEVICE" $BENCH_OPTS "$@" -rfEs -p no:cacheprovider \
    --benchmark-columns=min,median,iqr,rounds --benchmark-sort=name --benchmark-json "$OUT_DIR/$json"
}

# ---- run --------------------------------------------------------------------------------------
# The repository root gives `resnet_fused`; benchmarks/shim/sitecustomize.py maps top-level kernels/
# to `resnet_fused.kernels`, which otherwise only an install does.
export PYTHONPATH="$REPO:$REPO/benchmarks/shim${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = full ]; then
  DTYPES=fp16; BATCHES=256,1
  BENCH_OPTS="--bench-min-time 0.5"
  # torch.compile only where a target compares with it (batch 256): each compilation costs ~a minute
  MODEL_FILTER=(-k "not (b1 and compile)")
  OPS_OPTS="--bench-min-time 0.2 --bench-repeat 10"  # 24 shapes x 5 variants: shorter timing
  VERIFY=(resnet50 resnet18 --dtype fp32 fp16 bf16)
else
  DTYPES=$([ "$DEVICE" = cuda ] && echo fp16 || echo fp32); BATCHES=1
  BENCH_OPTS="--bench-size 32 --bench-repeat 2 --bench-warmup 0 --bench-min-time 0 --bench-no-compile"
  MODEL_FILTER=()
  OPS_OPTS=""
  VERIFY=(resnet18 --size 32 --dtype "$DTYPES")
fi
export PY REPO DEVICE OUT_DIR BENCH_OPTS
export -f environment importable make_importable cuda_home build verify bench

stage "environment" 60 required environment
stage "import without install" 90 required make_importable
stage "build extension" "$BUILD_CAP" required build
stage "resnet-fused info" 60 required "$PY" -m resnet_fused info
stage "GPU tests (pytest -m gpu)" 150 required \
  "$PY" -m pytest -m gpu tests/ -q -rfEs -p no:cacheprovider --continue-on-collection-errors
stage "bench resnet50 $DTYPES b$BATCHES" 210 required \
  bench models_resnet50.json benchmarks/bench_models.py --bench-models resnet50 --bench-dtype "$DTYPES" --bench-batch "$BATCHES" \
  ${MODEL_FILTER[@]+"${MODEL_FILTER[@]}"}
stage "verify ${VERIFY[*]}" 60 optional verify --model "${VERIFY[@]}"
stage "bench resnet18 $DTYPES b$BATCHES" 120 optional \
  bench models_resnet18.json benchmarks/bench_models.py --bench-models resnet18 --bench-dtype "$DTYPES" --bench-batch "$BATCHES" \
  ${MODEL_FILTER[@]+"${MODEL_FILTER[@]}"}
# shellcheck disable=SC2086  # OPS_OPTS is a list of words
stage "bench resnet50 ops $DTYPES b${BATCHES%%,*}" 120 optional \
  bench ops_resnet50.json benchmarks/bench_ops.py --bench-models resnet50 --bench-dtype "$DTYPES" \
  --bench-batch "${BATCHES%%,*}" $OPS_OPTS

RENDERED=""
jsons=()
for name in models_resnet50.json models_resnet18.json ops_resnet50.json; do
  [ -s "$OUT_DIR/$name" ] && jsons+=("$OUT_DIR/$name")
done
if [ "${#jsons[@]}" -gt 0 ]; then
  RENDER_RESERVE=0
  stage "render" 60 required "$PY" benchmarks/render.py "${jsons[@]}" --out "$OUT_DIR" --summary
  RENDERED=$(grep -v '^render: wrote' "$STAGE_DIR/stage.out")
else
  STAGES+=("render|FAILED: no benchmark results|0")
  FAILED+=("render")
fi

# ---- summary ----------------------------------------------------------------------------------
say "gpu_check summary ($MODE mode on $DEVICE, $((SECONDS - START))s)"
"$PY" - "$DEVICE" <<'PYTHON' 2>/dev/null
import sys
from resnet_fused.bench import environment
e = environment(sys.argv[1])
print(f"{e['device_name']}: torch {e['torch']}, triton {e.get('triton', '-')}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, "
      f"driver {e.get('driver', '-')}, TF32 conv {e.get('tf32_cudnn', '-')}")
PYTHON
rule() { printf -- '-%.0s' $(seq "$1"); }
printf '| %-50s | %-34s | %7s |\n' stage result seconds
printf '|%s|%s|%s|\n' "$(rule 52)" "$(rule 36)" "$(rule 9)"
for row in "${STAGES[@]}"; do
  IFS='|' read -r name result took <<<"$row"
  printf '| %-50s | %-34s | %7s |\n' "$name" "$result" "$took"
done
[ -n "$RENDERED" ] && printf '\n%s\n' "$RENDERED"
echo
echo "outputs in $OUT_DIR: $(cd "$OUT_DIR" && ls "${OUTPUTS[@]}" 2>/dev/null | tr '\n' ' ')"
if [ "${#FAILED[@]}" -gt 0 ]; then
  code=1
  echo "gpu_check: FAILED: ${FAILED[*]}"
else
  code=0
  echo "gpu_check: PASSED$([ "$HAVE_GPU" = 0 ] && echo ' (REHEARSAL ONLY: no GPU was checked)')"
fi
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$code"
