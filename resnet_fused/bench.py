"""The one timing implementation, used by ``resnet-fused bench`` and by the suites in ``benchmarks/``.

Rules it keeps: warm-up (compilation, autotuning, weight packing) happens before any timed run;
GPU runs are timed with CUDA events and synchronised; inputs rotate through several buffers so a
small model does not time a hot cache; the median is reported.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["Timing", "time_fn", "time_interleaved", "CPU_SETTLE_S", "make_inputs", "Variant", "model_variants", "PEERS", "peer_variants",
           "environment", "cpu_flags"]


@dataclass
class Timing:
    times_ms: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def images_per_s(self, batch: int) -> float:
        return batch * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")


def make_inputs(batch: int, size: int | Sequence[int], *, dtype, device, count: int = 3, seed: int = 0,
                memory_format=torch.contiguous_format, channels: int = 3) -> list[torch.Tensor]:
    """``count`` distinct random batches (images, or a layer's input with ``channels``), rotated through by :func:`time_fn`."""
    h, w = (size, size) if isinstance(size, int) else size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return [
        torch.randn(batch, channels, h, w, generator=generator).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
        for _ in range(count)
    ]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_fn(fn: Callable[[torch.Tensor], object], inputs: Sequence[torch.Tensor], *, warmup: int = 2,
            repeat: int = 10, min_time_s: float = 0.0) -> Timing:
    """Time ``fn(x)`` over rotating ``inputs``: ``warmup`` untimed calls, then at least ``repeat`` timed ones.

    With ``min_time_s`` it keeps timing until that much time has been measured (cheap models on a GPU).
    """
    device = inputs[0].device
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    _synchronize(device)
    timing = Timing()
    i = 0
    while i < repeat or sum(timing.times_ms) < min_time_s * 1000.0:
        x = inputs[i % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            timing.times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            timing.times_ms.append((time.perf_counter() - t0) * 1000.0)
        i += 1
    return timing


# Idle time before each variant's turn on the CPU. WHY: ONNX Runtime's worker threads keep spinning
# for tens of milliseconds after a run (its default), taking a core from whatever runs next: on the
# 2-core dev machine the next variant's first resnet50 forward took 103-123 ms instead of 63-69 right
# after ONNX Runtime, 69 ms after a 30 ms pause and 63 ms after 100 ms. Each variant is timed on a
# machine the previous one has left idle.
CPU_SETTLE_S = 0.1


def time_interleaved(fns: dict[str, Callable[[torch.Tensor], object]], inputs: dict[str, Sequence[torch.Tensor]], *,
                     rounds: int = 8, per_round: int = 3, warmup: int = 2, settle_s: float = 0.0) -> dict[str, Timing]:
    """Time several variants round-robin: each round times every variant ``per_round`` times,
    after ``settle_s`` seconds of idle (see ``CPU_SETTLE_S``).

    On a shared or throttling machine the speed drifts over minutes; timing one variant after
    another turns that drift into a false ratio, interleaving spreads it over all of them.
    """
    timings = {name: Timing() for name in fns}
    for name, fn in fns.items():
        time_fn(fn, inputs[name], warmup=warmup, repeat=0)
    for _ in range(rounds):
        for name, fn in fns.items():
            if settle_s > 0:
                time.sleep(settle_s)
            timings[name].times_ms += time_fn(fn, inputs[name], warmup=0, repeat=per_round).times_ms
    return timings


@dataclass
class Variant:
    """One way of running the model: how to build it, and whether it is the baseline others are compared with."""

    name: str
    build: Callable[[], Callable[[torch.Tensor], torch.Tensor]]
    memory_format: torch.memory_format = torch.contiguous_format
    kind: str = "eager"  # eager | compile | peer | fused
    backend: str | None = None  # fused variants: the backend of their kernels
    cuda_graph: bool = False
    # The dtype it is fed in; None: the run's. WHY: the peers take float32 arrays, and converting a
    # bf16 batch inside each timed call put a fresh torch buffer before OpenVINO every time, which
    # cost it 3.5-4.4 ms of a 21-22 ms resnet50 batch-1 bf16 forward (Zen 4 EPYC, 2 threads; numpy
    # copies or the same array cost nothing): the comparisons before that fix flattered us.
    input_dtype: torch.dtype | None = None

    def feed(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x`` as this variant takes it, converted once before timing: in its input dtype, else in
        ``dtype`` (the run's; default x's own), and in its memory format."""
        return x.to(self.input_dtype or dtype or x.dtype).contiguous(memory_format=self.memory_format)


def _compiled(model: nn.Module, example: torch.Tensor) -> Callable:
    import torch._inductor.config as inductor_config

    # Dynamo keys its cache on the code object of forward(), shared by every instance of a class: a
    # process that compiles many models (a benchmark suite) would pass the recompile limit and
    # silently time eager code. Each compiled variant starts from a clean cache instead.
    torch._dynamo.reset()
    # Freezing folds BN and prepacks weights, the way Inductor is used for inference.
    with inductor_config.patch(freezing=True), torch.inference_mode():
        compiled = torch.compile(model)
        compiled(example)
    return compiled


def _cuda_graph(model: nn.Module, example: torch.Tensor) -> Callable:
    """``model`` replayed through the library's own CUDA graphs (what a user gets), captured here
    so that the capture is not timed. Every caller uses a result before the next call (or drops
    it), so the copy that protects a user from the next call's overwrite is skipped."""
    from .cuda_graphs import graphed

    replay = graphed(model, max_shapes=1, copy_output=False)
    with torch.inference_mode():
        replay(example)
    return replay


def model_variants(model: nn.Module, *, dtype: torch.dtype, device: torch.device | str, backends: Iterable[str],
                   example: torch.Tensor, channels_last_eager: bool = True, compile: bool = False,
                   cuda_graph: bool = False) -> list[Variant]:
    """The variants a user would compare: eager NCHW (the baseline), eager channels_last, torch.compile,
    and the fused model on each backend (each also under CUDA-graph replay when asked).

    ``model`` is an eval-mode float32 model; each variant works on its own copy.
    """
    from .convert import fuse

    device = torch.device(device)

    def eager(memory_format):
        def build():
            m = copy.deepcopy(model).to(device=device, dtype=dtype).to(memory_format=memory_format)
            return m
        return build

    variants = [Variant("eager", eager(torch.contiguous_format))]
    if channels_last_eager:
        variants.append(Variant("eager channels_last", eager(torch.channels_last), torch.channels_last))
    if compile:
        def build_compiled():
            m = copy.deepcopy(model).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
            return _compiled(m, example.contiguous(memory_format=torch.channels_last))
        variants.append(Variant("torch.compile", build_compiled, torch.channels_last, kind="compile"))
    for backend in backends:
        def build_fused(backend=backend):
            return fuse(copy.deepcopy(model).to(device), backend=backend, dtype=dtype)
        variants.append(Variant(f"fused {backend}", build_fused, torch.channels_last, kind="fused", backend=backend))
        if cuda_graph and device.type == "cuda":
            variants.append(Variant(f"fused {backend} + CUDA graph",
                                    lambda b=build_fused: _cuda_graph(b(), example.contiguous(memory_format=torch.channels_last)),
                                    torch.channels_last, kind="fused", backend=backend, cuda_graph=True))
    if cuda_graph and device.type == "cuda":
        variants.append(Variant("eager + CUDA graph", lambda: _cuda_graph(eager(torch.contiguous_format)(), example),
                                cuda_graph=True))
    return variants


# Runtimes a user would pick on a CPU instead of torch (module -> label); optional: the `peers` extra.
PEERS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
OPENVINO_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16"}


def runnable_peers(dtype: torch.dtype) -> tuple[dict[str, str], list[str]]:
    """The peers that can run a CPU comparison in ``dtype`` here (module -> label, OpenVINO's with its
    precision, e.g. "OpenVINO bf16"), and a one-line note for each that cannot (not installed, not in
    this dtype on this CPU). ONNX Runtime computes in float32 and runs at ``dtype`` float32 only;
    OpenVINO's precision hint follows ``dtype``."""
    try:
        importlib.import_module("onnx")  # torch.onnx.export writes their graph with it
    except ImportError:
        return {}, [f"{', '.join(PEERS.values())} skipped: onnx is not installed (pip install 'resnet-fused[peers]')"]
    runnable, notes = {}, []
    for module, label in PEERS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            notes.append(f"{label} skipped: {module} is not installed (pip install 'resnet-fused[peers]')")
            continue
        if module == "onnxruntime":
            if dtype != torch.float32:
                notes.append(f"{label} skipped: it runs this model in float32 only, not {str(dtype).replace('torch.', '')}")
                continue
            runnable[module] = label
        else:
            precision = OPENVINO_PRECISION.get(dtype)
            reason = openvino_unsupported(precision)
            if reason:
                notes.append(f"{label} skipped: {reason}")
                continue
            runnable[module] = f"{label} {precision}"
    return runnable, notes


def peer_variants(model: nn.Module, *, dtype: torch.dtype, device: torch.device | str,
                  example: torch.Tensor) -> tuple[list[Variant], list[str]]:
    """ONNX Runtime and OpenVINO running one ``torch.onnx`` export of ``model`` (eval, float32): the
    variants that can run here, and a one-line note for each peer that cannot (not on this device,
    or see :func:`runnable_peers`). Both take float32 images (``input_dtype``: :meth:`Variant.feed`
    converts a bf16 batch once, before timing; the callables convert nothing, so no timed call
    allocates its input) and return float32 logits.
    """
    if torch.device(device).type != "cpu":
        return [], [f"{', '.join(PEERS.values())}: compared on the CPU only, skipped on {device}"]
    runnable, notes = runnable_peers(dtype)
    onnx = functools.cache(lambda: onnx_bytes(model, example))  # one export, built with the first peer
    variants = []
    for module, label in runnable.items():
        if module == "onnxruntime":
            variants.append(Variant(label, lambda: _onnxruntime(onnx()), kind="peer", input_dtype=torch.float32))
        else:
            precision = OPENVINO_PRECISION[dtype]
            variants.append(Variant(label, lambda p=precision: _openvino(onnx(), p), kind="peer",
                                    input_dtype=torch.float32))
    return variants, notes


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    # The TorchScript-based exporter (dynamo=False) at opset 17: what the ONNX Runtime and OpenVINO
    # numbers in the field were measured with, and it needs no onnxscript.
    model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        # The exporter is chosen on purpose (above); its deprecation warnings only repeat that.
        warnings.simplefilter("ignore", DeprecationWarning)
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(model, (example.detach().to(device="cpu", dtype=torch.float32),), path, dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["logits"])
        with open(path, "rb") as f:
            return f.read()


def onnxruntime_options():
    """The ONNX Runtime session options every comparison with it uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # As many threads as torch uses: the comparison is of kernels, not of thread counts.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


def _onnxruntime(onnx: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx, onnxruntime_options(), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def openvino_unsupported(precision: str | None) -> str | None:
    """Why OpenVINO cannot run at ``precision`` here (``None`` when it can)."""
    if precision is None:
        return "compared in float32 and bfloat16 only"
    if precision == "bf16":
        import openvino as ov

        if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            return "this CPU has no bf16 instructions OpenVINO uses (AVX512-BF16 or AMX)"
    return None


def openvino_model(onnx: bytes, precision: str, **config):
    """OpenVINO's compiled model of an ONNX export, configured as every comparison with it runs it
    (latency hint, ``precision`` "f32" or "bf16", torch's thread count); ``config`` adds settings
    (``PERF_COUNT="YES"`` for its per-node counters)."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
              "INFERENCE_NUM_THREADS": torch.get_num_threads(), **config}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(onnx)
        return core.compile_model(core.read_model(path), "CPU", config)


def _openvino(onnx: bytes, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    request = openvino_model(onnx, precision).create_infer_request()
    return lambda x: torch.from_numpy(request.infer({0: x.numpy()})[0])


def environment(device: torch.device | str = "cpu") -> dict:
    """Versions and device facts every published number carries."""
    from . import ops

    device = torch.device(device)
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
    }
    for module in ("triton", *PEERS):
        with contextlib.suppress(ImportError):
            info[module] = importlib.import_module(module).__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            driver=_driver_version(),
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    else:
        info["device_name"] = cpu_name()
    info["cpu_model"] = cpu_name(threads=False)
    info["cpu_flags"] = cpu_flags()
    info["backends"] = {name: asdict_status(status) for name, status in ops.available_backends().items()}
    return info


def asdict_status(status) -> dict:
    return {"available": status.available, "devices": list(status.devices), "reason": status.reason}


def cpu_name(threads: bool = True) -> str:
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    return f"{name} ({torch.get_num_threads()} threads)" if threads else name


def _cpuinfo_field(key: str) -> str | None:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == key:
                    return line.split(":", 1)[1].strip()
    return None


# The instruction sets that decide which kernels run (ours, oneDNN's, the peers'), as /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_flags() -> list[str]:
    """The CPU's instruction sets from :data:`ISA_FLAGS` (Linux; elsewhere empty)."""
    present = set((_cpuinfo_field("flags") or "").split())
    return [flag for flag in ISA_FLAGS if flag in present]


def _driver_version() -> str | None:
    with contextlib.suppress(Exception):
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    return None
