#!/usr/bin/env bash
# One-shot check of resnet-fused on a machine with an NVIDIA GPU and no internet, run from a copy
# of the repository (nothing is installed, nothing downloaded), sized to finish in 7 minutes on an
# H100/H200 with 16 cores (the last stages as time allows; give the device tool's run ~480 s):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else ./gpu_results
#
# Stages, in this order (the numbers first: GPU time is scarce):
#   1. environment, import check;
#   2. the extension built in place, IN PARALLEL WITH a Triton warm-up: every Triton kernel the
#      benchmarks can launch (resnet50 fp16, batch 256 and 1: every autotuning candidate of every
#      layer, split-K and reduction kernels included) compiled across all cores into the Triton
#      cache the runs below read (benchmarks/sm90_compile_check.py --use-cache), so no timing stage
#      waits on a compiler;
#   3. `resnet-fused bench` of resnet50 fp16 at batch 256 (eager, channels_last, torch.compile, fused
#      backends), the extension again with cuDNN's engine configs timed (RESNET_FUSED_CUDNN_PLANS=8),
#      then batch 1 (the same plus CUDA-graph replay); each fused result is judged against float64
#      like `verify` does;
#   4. the GPU tests (pytest -m gpu), in parallel across cores with pytest-xdist, with one config
#      per shape (RESNET_FUSED_AUTOTUNE=0) except in the tests of autotuning itself;
#   5. as time allows: the CPU kernels' tests on this machine's own CPU (its ISA printed), verify of
#      resnet50/resnet18 in every dtype (one config per shape), bench of resnet18 fp16 b256, and
#      resnet50's convs one by one at b256 (benchmarks/bench_ops.py: each fused op per backend against
#      eager's conv -> BN (-> add) -> ReLU), the table that says which layers to work on, and
#      resnet50/resnet18 fp32 batch 1 on two pinned cores of this machine's CPU against
#      torch.compile and the peers installed (benchmarks/interleaved.py): a GPU machine's CPU is
#      often an AVX-512 Xeon, which the development machines are not;
#   6. results.md and speedup.png rendered from the JSONs; a summary with the H100/H200 targets.
# GPU_CHECK_SKIP="KEY ..." leaves stages out (a rerun that needs no new numbers from them); the keys:
# bench50_b256 plans8 bench50_b1 gpu_tests cpu_tests verify bench18 ops50 cpu_bench.
# Every stage has a timeout inside the overall budget (GPU_CHECK_BUDGET_S, default 420 s). A stage
# that the budget leaves no time for says "not run: out of time", one cut short says so too: neither
# fails the check. Exit status 1 only on a real failure (a failed build, compile, test) or a
# numerical mismatch; missed performance targets are reported, not failed.
#
# OUT_DIR receives at most 8 files (what the device tool brings back): gpu_check.log (everything
# printed, the warm-up's compile report included), gpu_check.json (the plan and each stage's result
# and seconds), bench_*.json (resnet-fused bench), results.md, speedup.png and cpu_interleaved.md.
#
# Without a CUDA device (or with GPU_CHECK_DRY_RUN=1) the script rehearses itself: it prints the
# plan with the GPU run's compile count and estimated seconds per stage, then runs every stage at a
# tiny size on the CPU (the warm-up only enumerates its kernels; the build is skipped unless
# GPU_CHECK_REHEARSE_BUILD=1, since it would replace this tree's extension). GPU_CHECK_PLAN_ONLY=1
# prints the plan and exits.

set -uo pipefail

OUT_DIR=${1:-${OUT:-./gpu_results}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd)
LOG=$OUT_DIR/gpu_check.log
OUTPUTS=(gpu_check.log gpu_check.json results.md speedup.png cpu_interleaved.md
         bench_resnet50_{fp16,fp32}_b256.json bench_resnet50_{fp16,fp32}_b1.json bench_resnet18_{fp16,fp32}_b256.json)
for name in "${OUTPUTS[@]}"; do rm -f "${OUT_DIR:?}/$name"; done  # a rerun must not render stale results
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

START=$SECONDS
STAGES=()  # "name|result|seconds|estimate"
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
# "major minor sm_count" of cuda:0, or nothing
GPU=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(p.major, p.minor, p.multi_processor_count)" 2>/dev/null)
if [ -n "$GPU" ] && [ "${GPU_CHECK_DRY_RUN:-0}" != 1 ]; then
  MODE=full; DEVICE=cuda
else
  MODE=rehearsal; DEVICE=$([ -n "$GPU" ] && echo cuda || echo cpu)
fi
read -r CC_MAJOR CC_MINOR SMS <<<"${GPU:-9 0 132}"  # a rehearsal plans for an H100/H200
ARCH=$((CC_MAJOR * 10 + CC_MINOR))
CORES=$(nproc)
GPU_CORES=${GPU_CHECK_GPU_CORES:-16}  # the GPU machine's cores, for the rehearsal's estimates
PLAN_CORES=$([ "$MODE" = full ] && echo "$CORES" || echo "$GPU_CORES")
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$MODE" = full ] && echo 420 || echo 900)}
RENDER_RESERVE=20  # kept back so that the results are always rendered

echo "gpu_check: repository $REPO, output $OUT_DIR, python $(command -v "$PY"), $MODE on $DEVICE, $CORES cores, budget ${BUDGET}s"
if [ -z "$GPU" ]; then
  echo "gpu_check: NO CUDA DEVICE visible to PyTorch: REHEARSAL ONLY, every stage at a tiny size on the CPU; nothing here says anything about a GPU"
elif [ "$MODE" = rehearsal ]; then
  echo "gpu_check: GPU_CHECK_DRY_RUN=1: every stage at a tiny size"
fi

# Caches of this run only: the warm-up fills the Triton cache every later stage reads; tuned
# configs are kept between the stages but not mixed with a user's own.
export TRITON_CACHE_DIR=$WORK/triton-cache RESNET_FUSED_CACHE_DIR=$WORK/autotune
# The repository root gives `resnet_fused`; benchmarks/shim/sitecustomize.py maps top-level kernels/
# to `resnet_fused.kernels`, which otherwise only an install does.
export PYTHONPATH="$REPO:$REPO/benchmarks/shim${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = rehearsal ] && [ "$DEVICE" = cpu ]; then
  unset TRITON_INTERPRET  # the compile enumeration needs Triton's compiler, not its interpreter
fi

# ---- the plan: every stage with its estimated seconds on the GPU machine ------------------------
# Seconds measured on the H200 machine (16 cores) on 2026-11-30, from cold: the extension builds in
# ~30 s beside the warm-up's 80 kernels (~10 s); a rebuild with other compilers adds ~30 s.
PLAN=(
  "environment|10"
  "import without install|1"
  "build extension + Triton warm-up (parallel)|35"
  "bench resnet50 fp16 b256 (eager, compile, fused)|45"
  "bench resnet50 fp16 b256, cuDNN plans timed|25"
  "bench resnet50 fp16 b1 (+ CUDA graphs)|40"
  "GPU tests (pytest -m gpu, xdist)|140"
  "CPU tests on this machine's CPU (xdist)|40"
  "verify resnet50 resnet18 fp32 fp16 bf16|45"
  "bench resnet18 fp16 b256|35"
  "ops of resnet50 fp16 b256 one by one|60"
  "CPU bench on 2 cores of this machine|150"
  "render|5"
)
estimate_of() { local row; for row in "${PLAN[@]}"; do [ "${row%%|*}" = "$1" ] && { echo "${row##*|}"; return; }; done; echo "-"; }
print_plan() {
  local row total=0
  printf '\ngpu_check plan (estimated seconds on the GPU machine, %s cores; budget %ss):\n' "$PLAN_CORES" "$BUDGET"
  for row in "${PLAN[@]}"; do
    printf '  %-52s %5s s\n' "${row%%|*}" "${row##*|}"
    total=$((total + ${row##*|}))
  done
  printf '  %-52s %5s s (stages past the budget are cut: "not run: out of time")\n' "total" "$total"
}
print_plan

seconds_left() { echo $(( BUDGET - RENDER_RESERVE - (SECONDS - START) )); }

# stage NAME CAP_S CMD...: run CMD under a timeout of CAP_S (or what is left of the budget). A
# failure fails the check; running out of time does not.
stage() {
  local name=$1 cap=$2 left result rc t0
  shift 2
  left=$(seconds_left)
  (( cap > left )) && cap=$left
  if (( cap < 10 )); then
    STAGES+=("$name|not run: out of time|0|$(estimate_of "$name")")
    say "$name: not run: out of time"
    return
  fi
  say "$name (timeout ${cap}s): $*"
  t0=$SECONDS
  # bash -c: the command may be one of the functions below (exported), which timeout cannot run itself.
  timeout -s INT -k 15 "$cap" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$WORK/stage.out"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then
    result=ok
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    # pytest stops cleanly on the timeout's SIGINT, keeping the results it has; its failures are in its output.
    if grep -qE '^(FAILED|ERROR) |MISMATCH' "$WORK/stage.out"; then
      result="FAILED, then cut at ${cap}s: out of time"; FAILED+=("$name")
    else
      result="cut at ${cap}s: out of time (partial)"
    fi
  else
    result="FAILED (exit $rc)"; FAILED+=("$name")
  fi
  STAGES+=("$name|$result|$((SECONDS - t0))|$(estimate_of "$name")")
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
    print(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
for name in ("xdist", "pytest_benchmark", "matplotlib", "torchvision", "timm", "hypothesis"):
    try:
        __import__(name)
    except ImportError:
        print(f"{name}: not installed")
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
  unset RESNET_FUSED_NO_EXTENSION
  local home
  if home=$(cuda_home); then
    export CUDA_HOME=$home PATH="$home/bin:$PATH" TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CC_MAJOR.$CC_MINOR}
    echo "build: CUDA_HOME=$CUDA_HOME (nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*')), torch built with CUDA $("$PY" -c 'import torch; print(torch.version.cuda)')"
  elif [ "$DEVICE" = cuda ]; then
    echo "build: no CUDA toolkit (nvcc) in \$CUDA_HOME, on PATH or in /usr/local/cuda*: cannot build the CUDA extension"
    return 1
  else
    echo "build: no CUDA toolkit: building the CPU-only extension"
  fi
  echo "build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS"
  local cc=${CC:-cc} cxx=${CXX:-c++}
  echo "build: CC=$cc ($("$cc" --version 2>&1 | head -1)), CXX=$cxx ($("$cxx" --version 2>&1 | head -1))"
  "$PY" setup.py -q build_ext --inplace || return 1
  local problem
  problem=$(load_error)
  # A compiler that links libstdc++ statically makes a library whose op errors crash the process
  # (the first H200 run's CC/CXX=/opt/gcc did): the system's compilers, where they differ, build it again.
  if [[ "$problem" == *"own copy of the C++ runtime"* ]] && [ -x /usr/bin/cc ] && [ -x /usr/bin/c++ ] \
      && [ "$(readlink -f "$(command -v "$cxx")")" != "$(readlink -f /usr/bin/c++)" ]; then
    echo "build: $cxx linked its own libstdc++ into the library: again with CC=/usr/bin/cc CXX=/usr/bin/c++ ($(/usr/bin/c++ --version | head -1))"
    CC=/usr/bin/cc CXX=/usr/bin/c++ "$PY" setup.py -q build_ext --inplace --force || return 1
    problem=$(load_error)
  fi
  if [ -n "$problem" ]; then
    echo "build: FAILED: the built library does not load: $problem"
    return 1
  fi
  probe_build_info
}

load_error() {  # why resnet_fused._C cannot be used, or nothing
  "$PY" -c "from resnet_fused.backends import extension as e; print(e.load_error() or '')"
}

# build_info() as the first op call of a fresh process, as the CLI's environment record makes it
# (the first H200 run crashed there): a crash is reported with a native backtrace where cuda-gdb is
# found (it also debugs host code; the machine has no gdb).
probe_build_info() {
  local code="import torch, resnet_fused._C as C; print('build: built', C.__file__, torch.ops.resnet_fused.build_info())"
  "$PY" -X faulthandler -c "$code" && return 0
  echo "build: build_info FAILED (exit $?)"
  if command -v cuda-gdb >/dev/null; then
    timeout 120 cuda-gdb -q -batch -ex run -ex "bt 40" -ex "info sharedlibrary" --args "$PY" -c "$code" 2>&1 \
      | grep -vE '^\[(New|Thread) ' | tail -120
  fi
  return 1
}

# Triton kernels of the benchmarks' shapes, compiled across the cores into $TRITON_CACHE_DIR (a fused
# model launches no pointwise kernel).
warm_up() {
  local plan=()
  [ "$MODE" = rehearsal ] && plan=(--plan)
  "$PY" benchmarks/sm90_compile_check.py "${plan[@]}" --use-cache --no-pointwise --models resnet50 --dtypes fp16 --batches 256 1 \
    --arch "$ARCH" --sm-count "$SMS" --jobs "$WARM_JOBS" --json "$WORK/warmup.json"
}

build_and_warm_up() {
  local t0=$SECONDS build_rc=0 warm_rc=0 pid=""
  if [ "$MODE" = full ] || [ "${GPU_CHECK_REHEARSE_BUILD:-0}" = 1 ]; then
    build >"$WORK/build.log" 2>&1 &
    pid=$!
  else
    echo "build: rehearsal: not run (it would replace this tree's extension; GPU_CHECK_REHEARSE_BUILD=1 runs it)"
  fi
  warm_up || warm_rc=$?
  echo "--- Triton warm-up: exit $warm_rc after $((SECONDS - t0))s"
  if [ -n "$pid" ]; then
    wait "$pid" || build_rc=$?
    sed 's/^/build | /' "$WORK/build.log"
    echo "--- build: exit $build_rc after $((SECONDS - t0))s"
  fi
  [ "$warm_rc" = 0 ] && [ "$build_rc" = 0 ]
}

# Our kernels in the Triton cache: a number that grows during a bench means the warm-up missed those.
our_cubins() {
  find "$TRITON_CACHE_DIR" \( -name 'conv_bias_act_kernel.cubin' -o -name 'splitk_reduce_kernel.cubin' \
    -o -name 'bias_residual_act_kernel.cubin' \) 2>/dev/null | wc -l
}

bench() {  # bench JSON MODEL BATCH EXTRA_ARGS...: resnet-fused bench, JSON to OUT_DIR (or an absolute path), each fused result judged
  local json=$1 model=$2 batch=$3 before
  [[ "$json" == /* ]] || json=$OUT_DIR/$json
  shift 3
  before=$(our_cubins)
  "$PY" -m resnet_fused bench --device "$DEVICE" --model "$model" --dtype "$DTYPE" --batch "$batch" \
    --size "$SIZE" --no-progress --json "$json" "$@" || return 1
  echo "bench: our Triton kernels in the cache: $before before, $(our_cubins) after (a rise: the warm-up missed some)"
  "$PY" - "$json" <<'PYTHON'
import json, sys
import torch
from resnet_fused.accuracy import EAGER_FACTOR, REL_TOL

record = json.load(open(sys.argv[1]))
results = record["results"]
eager = next(r for r in results if r["variant"] == "eager")["rel_error_vs_fp64"]
bound = max(REL_TOL[getattr(torch, record["dtype"])], EAGER_FACTOR * eager)
bad = [r for r in results if r["kind"] == "fused" and not r["rel_error_vs_fp64"] <= bound]
for r in bad:
    print(f"bench: MISMATCH: {r['variant']} is {r['rel_error_vs_fp64']:.3g} from float64, more than {bound:.3g} "
          f"({EAGER_FACTOR}x eager's {eager:.3g}, at least {REL_TOL[getattr(torch, record['dtype'])]:.0e})")
sys.exit(1 if bad else 0)
PYTHON
}

gpu_tests() {
  local xdist=() rc=0
  if "$PY" -c "import xdist" 2>/dev/null; then
    xdist=(-n "$TEST_WORKERS")
  else
    echo "gpu tests: pytest-xdist is not installed: one process"
  fi
  # One config per shape (the first candidate) where autotuning is not what a test tests; the
  # tests of tuning itself ("tun" in their name) tune as a user's process would.
  RESNET_FUSED_AUTOTUNE=0 "$PY" -m pytest -m gpu -k "not tun" tests/ "${xdist[@]}" -q -rfEs -p no:cacheprovider \
    --continue-on-collection-errors || rc=$?
  "$PY" -m pytest -m gpu -k "tun" tests/ -q -rfEs -p no:cacheprovider --continue-on-collection-errors
  local tuned=$?
  # 5: nothing collected (no such test): not a failure
  [ "$rc" = 0 ] && { [ "$tuned" = 0 ] || [ "$tuned" = 5 ]; }
}

verify() {  # verify CLI_ARGS... --dtype D...: `resnet-fused verify` of each backend on the device, in each dtype it supports
  # One config per shape: verify judges results, and tuning every fp32 candidate costs a minute of compiling.
  RESNET_FUSED_AUTOTUNE=0 "$PY" - "$DEVICE" "$@" <<'PYTHON'
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

# The CPU kernels' tests on this machine's own CPU (a GPU machine's CPU is often another x86 kind), two
# threads per worker as on the 2-core machines the suite is written for.
cpu_tests() {
  "$PY" - <<'PYTHON'
from resnet_fused.bench import environment
e = environment("cpu")
print(f"cpu tests: {e['cpu_model']}, torch's CPU capability {e['cpu_capability']}, ISA flags {' '.join(e['cpu_flags'])}")
PYTHON
  local xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "$TEST_WORKERS")
  OMP_NUM_THREADS=2 "$PY" -m pytest -m "not gpu" tests/test_extension.py tests/test_avx2_conv.py tests/test_ops.py "${xdist[@]}" -q -rfEs \
    -p no:cacheprovider
}

ops_bench() {  # JSON: benchmarks/bench_ops.py over resnet50's distinct convs, without torch.compile
  "$PY" -m pytest benchmarks/bench_ops.py -q -p no:cacheprovider --bench-device "$DEVICE" --bench-models resnet50 \
    --bench-batch "$BIG" --bench-dtype "$DTYPE" --bench-size "$SIZE" --bench-no-compile --bench-repeat 20 \
    --bench-min-time 0.2 --benchmark-json "$1"
}

cpu_bench() {  # DIR: interleaved.py at batch 1 on cores 0 and 1, its table copied to OUT_DIR
  local pin=()
  command -v taskset >/dev/null && pin=(taskset -c 0,1)
  OMP_NUM_THREADS=2 "${pin[@]}" "$PY" benchmarks/interleaved.py --models resnet50,resnet18 --batch 1 \
    --rounds "$CPU_ROUNDS" --runs 1 --size "$SIZE" --out "$1" || return 1
  cp "$1/interleaved.md" "$OUT_DIR/cpu_interleaved.md"
}

# ---- sizes ------------------------------------------------------------------------------------
if [ "$MODE" = full ]; then
  DTYPE=fp16; SIZE=224; BIG=256; SMALL=1
  BENCH_BIG=(--compile --repeat 10)
  BENCH_SMALL=(--compile --cuda-graph --repeat 30)
  VERIFY=(resnet50 resnet18 --dtype fp32 fp16 bf16)
  export MAX_JOBS=${MAX_JOBS:-8}  # the extension's 8 sources, beside the warm-up's compiles
  WARM_JOBS=$CORES; TEST_WORKERS=${GPU_CHECK_TEST_WORKERS:-12}; CPU_ROUNDS=5
else
  DTYPE=$([ "$DEVICE" = cuda ] && echo fp16 || echo fp32); SIZE=32; BIG=2; SMALL=1
  BENCH_BIG=(--repeat 2 --warmup 1)
  BENCH_SMALL=(--compile --cuda-graph --repeat 2 --warmup 1)
  VERIFY=(resnet18 --size 32 --dtype "$DTYPE")
  export MAX_JOBS=${MAX_JOBS:-$CORES}
  WARM_JOBS=$PLAN_CORES; TEST_WORKERS=$CORES; CPU_ROUNDS=2
fi
export PY REPO DEVICE OUT_DIR MODE CC_MAJOR CC_MINOR ARCH SMS WARM_JOBS TEST_WORKERS CPU_ROUNDS DTYPE SIZE WORK
export -f environment importable cuda_home build load_error probe_build_info warm_up build_and_warm_up our_cubins bench gpu_tests \
  verify cpu_tests ops_bench cpu_bench

if [ "${GPU_CHECK_PLAN_ONLY:-0}" = 1 ]; then
  "$PY" benchmarks/sm90_compile_check.py --plan --no-pointwise --models resnet50 --dtypes fp16 --batches 256 1 \
    --arch "$ARCH" --sm-count "$SMS" --jobs "$PLAN_CORES" | grep -v '^  '
  echo "gpu_check: PLAN ONLY: nothing run"
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit 0
fi

# skipped KEY: whether GPU_CHECK_SKIP names the stage; a skipped stage is listed as such.
skipped() {
  [[ " ${GPU_CHECK_SKIP:-} " == *" $1 "* ]] || return 1
  STAGES+=("$2|not run: skipped (GPU_CHECK_SKIP)|0|$(estimate_of "$2")")
  say "$2: not run: skipped (GPU_CHECK_SKIP names $1)"
}

stage "environment" 60 environment
stage "import without install" 60 importable
stage "build extension + Triton warm-up (parallel)" 240 build_and_warm_up
# A rehearsal's JSONs carry the GPU run's names (its batch sizes are smaller), so every later step reads the same files.
NAME="bench resnet50 fp16 b256 (eager, compile, fused)"
skipped bench50_b256 "$NAME" || stage "$NAME" 200 bench "bench_resnet50_${DTYPE}_b256.json" resnet50 "$BIG" "${BENCH_BIG[@]}"
# The extension with cuDNN's first 8 engine configs timed per fused graph instead of its first one
# (RESNET_FUSED_CUDNN_PLANS), in a new process: its row against the same eager rows.
NAME="bench resnet50 fp16 b256, cuDNN plans timed"
skipped plans8 "$NAME" || stage "$NAME" 90 env RESNET_FUSED_CUDNN_PLANS=8 bash -c 'bench "$@"' bench \
  "$WORK/plans8.json" resnet50 "$BIG" --backend extension --repeat 10
NAME="bench resnet50 fp16 b1 (+ CUDA graphs)"
skipped bench50_b1 "$NAME" || stage "$NAME" 150 bench "bench_resnet50_${DTYPE}_b1.json" resnet50 "$SMALL" "${BENCH_SMALL[@]}"
NAME="GPU tests (pytest -m gpu, xdist)"
skipped gpu_tests "$NAME" || stage "$NAME" 150 gpu_tests
NAME="CPU tests on this machine's CPU (xdist)"
skipped cpu_tests "$NAME" || stage "$NAME" 90 cpu_tests
NAME="verify resnet50 resnet18 fp32 fp16 bf16"
skipped verify "$NAME" || stage "$NAME" 120 verify --model "${VERIFY[@]}"
NAME="bench resnet18 fp16 b256"
skipped bench18 "$NAME" || stage "$NAME" 90 bench "bench_resnet18_${DTYPE}_b256.json" resnet18 "$BIG" "${BENCH_BIG[@]}"
# Its JSON stays in WORK (at most 8 files come back from the GPU machine): results.md carries its table.
NAME="ops of resnet50 fp16 b256 one by one"
skipped ops50 "$NAME" || stage "$NAME" 90 ops_bench "$WORK/ops.json"
NAME="CPU bench on 2 cores of this machine"
skipped cpu_bench "$NAME" || stage "$NAME" 240 cpu_bench "$WORK/cpu"

jsons=()
for name in "bench_resnet50_${DTYPE}_b256.json" "bench_resnet50_${DTYPE}_b1.json" "bench_resnet18_${DTYPE}_b256.json"; do
  [ -s "$OUT_DIR/$name" ] && jsons+=("$OUT_DIR/$name")
done
[ -s "$WORK/ops.json" ] && jsons+=("$WORK/ops.json")
RENDERED=""
if [ "${#jsons[@]}" -gt 0 ]; then
  RENDER_RESERVE=0
  stage "render" 30 "$PY" benchmarks/render.py "${jsons[@]}" --out "$OUT_DIR" --summary
  RENDERED=$(grep -v '^render: wrote' "$WORK/stage.out")
else
  STAGES+=("render|not run: no benchmark results|0|5")
fi

# ---- summary ----------------------------------------------------------------------------------
say "gpu_check summary ($MODE on $DEVICE, $((SECONDS - START))s of a ${BUDGET}s budget)"
"$PY" - "$DEVICE" <<'PYTHON' 2>/dev/null
import sys
from resnet_fused.bench import environment
e = environment(sys.argv[1])
print(f"{e['device_name']}: torch {e['torch']}, triton {e.get('triton', '-')}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, "
      f"driver {e.get('driver', '-')}, TF32 conv {e.get('tf32_cudnn', '-')}")
PYTHON
rule() { printf -- '-%.0s' $(seq "$1"); }
printf '| %-50s | %-40s | %7s | %8s |\n' stage result seconds estimate
printf '|%s|%s|%s|%s|\n' "$(rule 52)" "$(rule 42)" "$(rule 9)" "$(rule 10)"
for row in "${STAGES[@]}"; do
  IFS='|' read -r name result took est <<<"$row"
  printf '| %-50s | %-40s | %7s | %8s |\n' "$name" "$result" "$took" "$est"
done
[ -n "$RENDERED" ] && printf '\n%s\n' "$RENDERED"
if [ -s "$WORK/warmup.json" ]; then
  "$PY" - "$WORK/warmup.json" <<'PYTHON'
import json, sys
report = json.load(open(sys.argv[1]))
n = len(report["kernels"])
if report.get("plan_only"):
    print(f"\nTriton warm-up plan: {n} distinct kernels for resnet50 fp16 b256+b1; at ~{report['seconds_per_kernel']} s "
          f"each on {report['jobs']} cores ~{report['estimate_s']:.0f} s")
else:
    print(f"\nTriton warm-up: {n} kernels compiled in {report['compile_wall_s']} s on {report['jobs']} processes")
PYTHON
fi
"$PY" - "$OUT_DIR/gpu_check.json" "$MODE" "$DEVICE" "$BUDGET" "$((SECONDS - START))" "${STAGES[@]}" <<'PYTHON'
import json, sys
path, mode, device, budget, took, *rows = sys.argv[1:]
stages = [dict(zip(("stage", "result", "seconds", "estimate_s"), row.split("|"))) for row in rows]
json.dump({"mode": mode, "device": device, "budget_s": int(budget), "seconds": int(took), "stages": stages},
          open(path, "w"), indent=1)
PYTHON
if [ -s "$OUT_DIR/results.md" ]; then
  { printf '\n## gpu_check stages (%s on %s, %ss)\n\n' "$MODE" "$DEVICE" "$((SECONDS - START))"
    printf '| stage | result | seconds | estimate |\n|---|---|---|---|\n'
    for row in "${STAGES[@]}"; do IFS='|' read -r name result took est <<<"$row"; printf '| %s | %s | %s | %s |\n' "$name" "$result" "$took" "$est"; done
  } >>"$OUT_DIR/results.md"
fi
echo
echo "outputs in $OUT_DIR: $(cd "$OUT_DIR" && ls "${OUTPUTS[@]}" 2>/dev/null | tr '\n' ' ')"
if [ "${#FAILED[@]}" -gt 0 ]; then
  code=1
  echo "gpu_check: FAILED: ${FAILED[*]}"
else
  code=0
  echo "gpu_check: PASSED$([ -z "$GPU" ] && echo ' (REHEARSAL ONLY: no GPU was checked)')"
fi
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$code"
