"""The one timing implementation, used by ``resnet-fused bench`` and by the suites in ``benchmarks/``.

Rules it keeps: warm-up (compilation, autotuning, weight packing) happens before any timed run;
GPU runs are timed with CUDA events and synchronised; inputs rotate through several buffers so a
small model does not time a hot cache; the median is reported.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["Timing", "time_fn", "time_interleaved", "make_inputs", "Variant", "model_variants", "environment"]


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


def time_interleaved(fns: dict[str, Callable[[torch.Tensor], object]], inputs: dict[str, Sequence[torch.Tensor]], *,
                     rounds: int = 8, per_round: int = 3, warmup: int = 2) -> dict[str, Timing]:
    """Time several variants round-robin: each round times every variant ``per_round`` times.

    On a shared or throttling machine the speed drifts over minutes; timing one variant after
    another turns that drift into a false ratio, interleaving spreads it over all of them.
    """
    timings = {name: Timing() for name in fns}
    for name, fn in fns.items():
        time_fn(fn, inputs[name], warmup=warmup, repeat=0)
    for _ in range(rounds):
        for name, fn in fns.items():
            timings[name].times_ms += time_fn(fn, inputs[name], warmup=0, repeat=per_round).times_ms
    return timings


@dataclass
class Variant:
    """One way of running the model: how to build it, and whether it is the baseline others are compared with."""

    name: str
    build: Callable[[], Callable[[torch.Tensor], torch.Tensor]]
    memory_format: torch.memory_format = torch.contiguous_format
    kind: str = "eager"  # eager | compile | fused
    backend: str | None = None  # fused variants: the backend of their kernels
    cuda_graph: bool = False


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


def _cuda_graph(fn: Callable, example: torch.Tensor) -> Callable:
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        static_out = fn(static_in)

    def replay(x):
        static_in.copy_(x)
        graph.replay()
        return static_out

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
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
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
        info["device_name"] = _cpu_name()
    info["backends"] = {name: asdict_status(status) for name, status in ops.available_backends().items()}
    return info


def asdict_status(status) -> dict:
    return {"available": status.available, "devices": list(status.devices), "reason": status.reason}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    with contextlib.suppress(Exception):
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    return None
