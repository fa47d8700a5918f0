"""Compile every Triton kernel the library can pick for ResNets, for a GPU that is not here (sm_90 by default).

    python benchmarks/sm90_compile_check.py [--models resnet18 resnet50] [--dtypes fp16 bf16 fp32]
        [--batches 1 8 256] [--size 224] [--jobs N] [--json report.json] [--plan]

What it checks is what the library would run, found through the library's own path: each model is
built on the ``meta`` device, fused (:func:`resnet_fused.fuse`) onto a stand-in backend that calls
:func:`resnet_fused.kernels.conv.conv_bias_act` exactly as the Triton backend does, and run forward.
The autotuner (``kernels.configs.TUNED``) is given a "bench" that launches each candidate once, and
every Triton launch is recorded instead of run. So every config ``configs.candidates()`` offers for
every layer shape, every extra kernel a conv launches (a split-K reduction, say) and the pointwise
kernels (``kernels.pointwise``, run on each conv's output shape) are found without naming them here.

Launches are deduplicated on Triton's own cache key (its specialization of every argument: dtypes,
pointer alignment, integer values 1 and multiples of 16, constexprs; and its options: warps, stages),
then compiled in parallel processes behind a stand-in driver whose target is ``GPUTarget("cuda",
ARCH, 32)``, each into a fresh Triton cache unless ``--use-cache`` (then the cache a later real run
will read: a warm-up on the GPU machine). Per kernel it reports shared memory against the sm_90 limit
(232,448 B per block), registers and spill stack (``cuobjdump -res-usage``), whether the PTX uses
Hopper's ``wgmma``, and compile seconds. Exit 1 on any compile error or shared-memory overflow (2 on
bad arguments); the totals are the last line printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

SMEM_LIMIT = {90: 232_448, 100: 232_448, 80: 166_912, 86: 101_376, 89: 101_376}
# Seconds per kernel compile on one idle core, for --plan's estimate: the full check's 498 kernels
# took 1.18 CPU-s each on average (Triton's passes plus ptxas; 0.3-5.2 s, the largest tiles slowest)
# on an AMD EPYC core with triton 3.8, ~0.9 with triton 3.6; wall time on shared cores was 4-10x that.
PLAN_S_PER_KERNEL = 1.3
_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_SHIM = []  # the shim's module once loaded in this process


def _importable() -> None:
    """Import ``resnet_fused`` and ``resnet_fused.kernels`` from this source tree, installed or not."""
    if not _SHIM:
        # This tree first, even where another is installed (editable or not): it is the one to check.
        # A spawned worker inherits sys.path but not the shim's import hook, hence the flag.
        if _REPO not in sys.path:
            sys.path.insert(0, _REPO)
        import importlib.util

        spec = importlib.util.spec_from_file_location("_kernels_shim", os.path.join(_REPO, "benchmarks", "shim",
                                                                                   "sitecustomize.py"))
        _SHIM.append(importlib.util.module_from_spec(spec))
        spec.loader.exec_module(_SHIM[0])  # maps kernels/ to resnet_fused.kernels


def _stand_in_driver(arch: int):
    """A Triton driver for a GPU that is not there: it names the target and a device/stream, nothing more."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    class StandIn(DriverBase):
        @staticmethod
        def is_active():
            return True

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch

            return torch.device("meta")

        def get_device_interface(self):
            raise RuntimeError("stand-in driver: no device")

        def get_benchmarker(self):
            raise RuntimeError("stand-in driver: nothing can be timed")

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("stand-in driver: nothing can be launched")

    driver.set_active(StandIn())


@dataclass
class Launch:
    """One distinct kernel: where its JIT function lives and the arguments that specialize it."""

    module: str
    name: str
    args: list  # tensors as ("tensor", dtype name); everything else as passed
    kwargs: dict
    key: str  # Triton's cache key (specialization + options): the dedupe key
    seen_in: list = field(default_factory=list)  # "resnet50 fp16 b256" ...

    def label(self) -> str:
        kw = self.kwargs
        tiles = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kw)
        tiles = tiles or "x".join(str(v) for k, v in sorted(kw.items()) if k.startswith("BLOCK"))
        dtypes = sorted({a[1] for a in self.args if isinstance(a, tuple) and a and a[0] == "tensor"})
        flags = ",".join(f"{k}={v}" for k, v in sorted(kw.items())
                         if not k.startswith("BLOCK") and k not in ("num_warps", "num_stages"))
        # Launches with equal constexprs differ in how Triton specialized their integer arguments.
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:6]
        return (f"{self.name} {'/'.join(d.replace('float', 'f') for d in dtypes)} {tiles} "
                f"w{kw.get('num_warps', '-')} s{kw.get('num_stages', '-')} {flags} #{digest}")


def _describe(value):
    import torch

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).replace("torch.", ""))
    return value


def _rebuild(value):
    import torch

    if isinstance(value, (tuple, list)) and len(value) == 2 and value[0] == "tensor":
        # A meta tensor's data_ptr() is 0: aligned, as every CUDA allocation the library makes.
        return torch.empty(1, dtype=getattr(torch, value[1]), device="meta")
    return value


@contextlib.contextmanager
def _recording(found: dict, context: list):
    """Every Triton launch is recorded into ``found`` (by Triton's cache key) and not run."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        device = driver.active.get_current_device()
        binder = self.device_caches[device][4]
        options = dict(kwargs)
        # run() adds these two before binding; the key must be the one a real launch computes.
        from triton import knobs

        options["debug"] = options.get("debug", self.debug) or knobs.runtime.debug
        options["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        _, specialization, opts = binder(*args, **options)
        key = f"{self.fn.__module__}.{self.fn.__qualname__}:{specialization}{opts}"
        launch = found.get(key)
        if launch is None:
            launch = found[key] = Launch(self.fn.__module__, self.fn.__qualname__, [_describe(a) for a in args],
                                         {k: _describe(v) for k, v in kwargs.items()}, key)
        if context[0] not in launch.seen_in:
            launch.seen_in.append(context[0])
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


class _CheckBackend:
    """A backend for ``ops`` that runs the Triton backend's kernels on meta tensors (recorded, not launched)."""

    NAME = "sm90-check"

    @staticmethod
    def unavailable_reason(device_type, dtype):
        return None

    @staticmethod
    def conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu):
        from resnet_fused.kernels import conv

        # As resnet_fused.backends.triton passes them to the kernels (the custom op's schema: lists).
        out = conv.conv_bias_act(x, weight, bias, list(stride), list(padding), groups, residual, relu)
        _CheckBackend.outputs.append(out)
        return out

    @staticmethod
    def max_pool2d(x, kernel_size, stride, padding):
        from resnet_fused.backends import triton

        return triton.max_pool2d(x, kernel_size, stride, padding)  # torch's pool: no kernel of ours to check

    @staticmethod
    def global_avg_pool(x):
        from resnet_fused.backends import triton

        return triton.global_avg_pool(x)  # torch's, as for the pool

    @staticmethod
    def linear(x, weight, bias):
        from resnet_fused.backends import triton

        return triton.linear(x, weight, bias)

    outputs: list = []


def enumerate_launches(models, dtypes, batches, size, arch=90, sm_count=132, pointwise=True, progress=print) -> dict[str, Launch]:
    """The distinct kernels the library launches for these models/dtypes/batches, keyed by Triton's cache key."""
    _importable()
    import torch

    from resnet_fused import convert, ops, reference
    from resnet_fused.kernels import configs
    from resnet_fused.kernels import pointwise as pw

    _stand_in_driver(arch)
    found: dict[str, Launch] = {}
    context = [""]

    def compile_each(fn):  # the tuner's "benchmark": each candidate launched (recorded) once
        fn()
        return 1.0

    smem = SMEM_LIMIT.get(arch, SMEM_LIMIT[90])
    saved_configs = {name: getattr(configs, name) for name in ("TUNED", "device_info", "shared_memory")
                     if hasattr(configs, name)}
    ops.BACKENDS[_CheckBackend.NAME] = _CheckBackend
    # A tuner of our own: no disk cache (a cached choice would hide the other candidates).
    configs.TUNED = configs.Tuner(bench=compile_each)
    if hasattr(configs, "device_info"):
        configs.device_info = lambda device: configs.Device(f"stand-in sm_{arch}", smem, sm_count)
    else:
        configs.shared_memory = lambda device: smem
    autotune = os.environ.pop("RESNET_FUSED_AUTOTUNE", None)  # "0" would offer only the first candidate
    ops._resolve.cache_clear()
    try:
        with _recording(found, context), torch.inference_mode():
            for model_name in models:
                with torch.device("meta"):
                    model = reference.MODELS[model_name]().eval()
                for dtype_name in dtypes:
                    dtype = getattr(torch, _DTYPES[dtype_name])
                    fused = convert.fuse(model, backend=_CheckBackend.NAME, dtype=dtype)
                    for batch in batches:
                        context[0] = f"{model_name} {dtype_name} b{batch}"
                        before = len(found)
                        _CheckBackend.outputs.clear()
                        x = torch.empty(batch, 3, size, size, device="meta", dtype=dtype, memory_format=torch.channels_last)
                        fused(x)
                        if pointwise:
                            for out in {(o.shape, o.stride()): o for o in _CheckBackend.outputs}.values():
                                bias = torch.empty(out.shape[1], device="meta", dtype=dtype)
                                pw.add_relu(out, out)
                                pw.bias_act(out, bias, True)
                                pw.bias_act(out, bias, False)
                        progress(f"enumerate: {context[0]}: {len(found) - before} new distinct kernels ({len(found)} so far)")
    finally:
        for name, value in saved_configs.items():
            setattr(configs, name, value)
        if autotune is not None:
            os.environ["RESNET_FUSED_AUTOTUNE"] = autotune
        del ops.BACKENDS[_CheckBackend.NAME]
        ops._resolve.cache_clear()
    return found


# ---- compiling ----------------------------------------------------------------------------------

def _cuobjdump() -> str | None:
    with contextlib.suppress(ImportError):
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("cuobjdump") or next(
        (p for p in ("/usr/local/cuda/bin/cuobjdump",) if os.access(p, os.X_OK)), None)


def _resource_usage(cubin: bytes) -> dict:
    tool = _cuobjdump()
    if tool is None:
        return {"registers": None, "stack": None, "local": None, "res_usage": "cuobjdump not found"}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"registers": int(fields["REG"]) if "REG" in fields else None,
            "stack": int(fields.get("STACK", 0)), "local": int(fields.get("LOCAL", 0)),
            "res_usage": " ".join(out.split()[-8:]) if not fields else None}


def _init_worker(arch: int) -> None:
    _importable()
    # Also on a GPU machine: the target is all a compile needs, and a warm-up should not open a CUDA
    # context per process.
    _stand_in_driver(arch)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): unlike wall time, it does not
    grow when other work shares the cores, so it sizes a run on an idle machine."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def compile_one(launch: Launch) -> dict:
    import importlib

    result = {"label": launch.label(), "module": launch.module, "name": launch.name, "seen_in": launch.seen_in,
              "error": None, "seconds": None, "shared": None, "registers": None, "spill_stack": None,
              "local": None, "wgmma": None, "cpu_seconds": None}
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    try:
        fn = getattr(importlib.import_module(launch.module), launch.name)
        kernel = fn.warmup(*[_rebuild(a) for a in launch.args], grid=(1,),
                           **{k: _rebuild(v) for k, v in launch.kwargs.items()})
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["cpu_seconds"] = round(_cpu_seconds() - cpu0, 3)
        result["shared"] = kernel.metadata.shared
        result["wgmma"] = "wgmma.mma_async" in kernel.asm.get("ptx", "")
        usage = _resource_usage(kernel.asm["cubin"])
        result.update(registers=usage["registers"], spill_stack=usage["stack"], local=usage["local"])
        if usage.get("res_usage"):
            result["note"] = usage["res_usage"]
    except Exception as exc:  # reported per kernel; the check fails on any
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:500]
    return result


def compile_all(launches: list[Launch], jobs: int, arch: int, progress=print) -> list[dict]:
    # Slowest first (fp32 IEEE MMAs, then big tiles), so the last worker is not left alone with a slow one.
    def cost(launch):
        kw = launch.kwargs
        ieee = kw.get("PRECISION") == "ieee"
        return (ieee, kw.get("BLOCK_M", 0) * kw.get("BLOCK_N", 0) * kw.get("BLOCK_K", 0))

    order = sorted(launches, key=cost, reverse=True)
    results = []
    ctx = multiprocessing.get_context("spawn")  # no forked copy of a half-initialised Triton/torch
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                                     initargs=(arch,)) as pool:
        pending = {pool.submit(compile_one, launch): launch for launch in order}
        for done in futures.as_completed(pending):
            r = done.result()
            results.append(r)
            progress(f"[{len(results)}/{len(order)}] {r['seconds']:6.2f}s {_verdict(r, arch)} {r['label']}")
    return results


def _verdict(r: dict, arch: int) -> str:
    if r["error"]:
        return "FAIL"
    if r["shared"] is not None and r["shared"] > SMEM_LIMIT.get(arch, SMEM_LIMIT[90]):
        return "SMEM"
    if r["spill_stack"] or r["local"]:
        return "spill"
    return "ok"


def _table(results: list[dict], arch: int) -> str:
    rows = [("kernel", "result", "shared B", "regs", "spill B", "wgmma", "s")]
    for r in sorted(results, key=lambda r: r["label"]):
        rows.append((r["label"], _verdict(r, arch) + (f": {r['error']}" if r["error"] else ""),
                     str(r["shared"]), str(r["registers"]), str(r["spill_stack"]), "yes" if r["wgmma"] else "no",
                     f"{r['seconds']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(_DTYPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 256])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--arch", type=int, default=90, help="compute capability as one number (90 = sm_90)")
    p.add_argument("--sm-count", type=int, default=132,
                   help="multiprocessors of the target GPU, for split-K candidates (default 132: H100/H200 SXM)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiling processes (default: all cores)")
    p.add_argument("--no-pointwise", dest="pointwise", action="store_false", help="skip kernels.pointwise")
    p.add_argument("--use-cache", action="store_true",
                   help="compile into Triton's own cache (TRITON_CACHE_DIR or its default) instead of a fresh "
                        "temporary one: on the GPU machine, a warm-up for the runs that follow")
    p.add_argument("--only", default=None, help="only the kernels whose label contains this text")
    p.add_argument("--limit", type=int, default=None, help="only the first N distinct kernels (a smoke test)")
    p.add_argument("--plan", action="store_true", help="enumerate and print the distinct kernels; compile nothing")
    p.add_argument("--json", default=None, help="write the per-kernel report here")
    args = p.parse_args(argv)
    for name in ("jobs", "size", "arch", "sm_count"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")
    if "TRITON_INTERPRET" in os.environ and os.environ["TRITON_INTERPRET"] not in ("", "0"):
        p.error("TRITON_INTERPRET is set: the interpreter compiles nothing; unset it")

    start = time.perf_counter()
    _importable()
    import torch
    import triton

    from resnet_fused.kernels import conv

    tf32 = torch.backends.cudnn.allow_tf32
    print(f"sm90_compile_check: torch {torch.__version__}, triton {triton.__version__}, target cuda:{args.arch} warp 32, "
          f"fp32 convs as the library runs them by default: torch.backends.cudnn.allow_tf32={tf32} "
          f"(PyTorch's default) -> tl.dot input_precision={conv.dot_precision(torch.float32)!r}", flush=True)
    launches = list(enumerate_launches(args.models, args.dtypes, args.batches, args.size, args.arch,
                                       args.sm_count, args.pointwise, progress=lambda s: print(s, flush=True)).values())
    enumerated = time.perf_counter() - start
    if args.only:
        launches = [launch for launch in launches if args.only in launch.label()]
    if args.limit is not None:
        launches = launches[:args.limit]
    by_kernel = {}
    for launch in launches:
        by_kernel[launch.name] = by_kernel.get(launch.name, 0) + 1
    summary = ", ".join(f"{n} {name}" for name, n in sorted(by_kernel.items()))
    print(f"sm90_compile_check: {len(launches)} distinct kernels ({summary}) found in {enumerated:.1f}s", flush=True)
    if args.plan:
        for launch in sorted(launches, key=Launch.label):
            print(f"  {launch.label()}")
        # Processes start and import torch in ~10 s; then the kernels go in waves of --jobs.
        estimate = -(-len(launches) // args.jobs) * PLAN_S_PER_KERNEL + 10
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"plan_only": True, "torch": torch.__version__, "triton": triton.__version__, "arch": args.arch,
                           "models": args.models, "dtypes": args.dtypes, "batches": args.batches, "size": args.size,
                           "jobs": args.jobs, "seconds_per_kernel": PLAN_S_PER_KERNEL, "estimate_s": estimate,
                           "kernels": [{"label": launch.label(), "name": launch.name, "seen_in": launch.seen_in}
                                       for launch in launches]}, f, indent=1)
        print(f"sm90_compile_check: PLAN {len(launches)} distinct kernels; on {args.jobs} processes at "
              f"~{PLAN_S_PER_KERNEL} s each (an idle core) ~{estimate:.0f} s")
        return 0

    cache = None if args.use_cache else tempfile.mkdtemp(prefix="sm90-triton-cache-")
    if cache:
        os.environ["TRITON_CACHE_DIR"] = cache
    try:
        t0 = time.perf_counter()
        results = compile_all(launches, args.jobs, args.arch, progress=lambda s: print(s, flush=True))
        wall = time.perf_counter() - t0
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)

    limit = SMEM_LIMIT.get(args.arch, SMEM_LIMIT[90])
    failed = [r for r in results if r["error"]]
    over = [r for r in results if r["shared"] is not None and r["shared"] > limit]
    spilled = [r for r in results if r["spill_stack"] or r["local"]]
    ok = [r for r in results if not r["error"]]
    biggest = max(ok, key=lambda r: r["shared"], default=None)
    wgmma = sum(1 for r in ok if r["wgmma"])
    mma_kernels = [r for r in ok if r["name"] != "bias_residual_act_kernel"]
    print("\n" + _table(results, args.arch))
    for r in failed:
        print(f"FAILED {r['label']} (seen in {', '.join(r['seen_in'])}): {r['error']}")
    for r in over:
        print(f"SHARED MEMORY OVERFLOW {r['label']}: {r['shared']} B > {limit} B")
    total = time.perf_counter() - start
    compile_s = sum(r["seconds"] or 0 for r in results)
    cpu_s = sum(r["cpu_seconds"] or 0 for r in results)
    record = {
        "torch": torch.__version__, "triton": triton.__version__, "arch": args.arch, "smem_limit": limit,
        "fp32_precision": conv.dot_precision(torch.float32), "allow_tf32": tf32,
        "models": args.models, "dtypes": args.dtypes, "batches": args.batches, "size": args.size,
        "jobs": args.jobs, "compile_wall_s": round(wall, 1), "total_s": round(total, 1),
        "compile_cpu_s": round(cpu_s, 1), "kernels": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"sm90_compile_check: wrote {args.json}")
    status = "FAILED" if failed or over else "PASSED"
    print(f"sm90_compile_check: {status}: {len(results)} kernels, {len(failed)} failures, "
          f"{len(over)} over shared memory (max {biggest['shared'] if biggest else 0} of {limit} B), "
          f"{len(spilled)} spilling (max {max((r['spill_stack'] or 0 for r in results), default=0)} B), "
          f"wgmma in {wgmma} of {len(mma_kernels)} MMA kernels, "
          f"{compile_s:.0f}s compiling in {args.jobs} processes ({wall:.0f}s wall, {cpu_s:.0f} CPU-s), {total:.0f}s in all")
    return 1 if failed or over else 0


if __name__ == "__main__":
    sys.exit(main())
