"""What the three suites share: their options, their cases, and the one way a case is measured.

Timing is :func:`resnet_fused.bench.time_fn` (the same code as ``resnet-fused bench``): warm-up,
compilation and autotuning happen before it times anything, GPU runs are timed with CUDA events,
inputs rotate, and pytest-benchmark is then fed exactly the times it measured (see
:class:`ReplayClock`), so its median is time_fn's median. Before any timing each variant's output
is judged against a float64 reference: a fast wrong kernel fails its benchmark.
"""

from __future__ import annotations

import copy
import functools
import gc
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import pytest
import torch
from torch import nn

from resnet_fused import ops, reference
from resnet_fused.accuracy import judge
from resnet_fused.bench import Variant, environment, make_inputs, time_fn
from resnet_fused.cli import DTYPES, build_model

SEED = 0
DEFAULT_MODELS = ("resnet18", "resnet50", "resnet101")
DEFAULT_BATCHES = {"cpu": (1, 8), "cuda": (1, 64, 256)}
# Environment facts copied into every benchmark's extra_info (the full record is in machine_info).
ENV_KEYS = ("device_name", "torch", "triton", "cuda", "cudnn", "driver", "tf32_cudnn", "tf32_matmul", "cudnn_benchmark",
            "threads")
# Images of a batch whose outputs are judged: enough to catch batch-indexing errors, while judging
# (in float64, on the host) a layer's output at batch 256 would move gigabytes.
JUDGED_IMAGES = 16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def add_options(parser) -> None:
    group = parser.getgroup("resnet-fused benchmarks")
    group.addoption("--bench-device", default=None, help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    group.addoption("--bench-dtype", default=None,
                    help="comma-separated dtypes (default: cpu fp32, plus bf16 where oneDNN supports it; cuda fp32,fp16,bf16)")
    group.addoption("--bench-batch", default=None, help="comma-separated batch sizes (default: cpu 1,8; cuda 1,64,256)")
    group.addoption("--bench-size", type=int, default=224, help="input height and width of the model (default 224)")
    group.addoption("--bench-models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated models; the ops and blocks suites take their layer shapes from them")
    group.addoption("--bench-backends", default=None,
                    help="comma-separated fused backends (default: every backend that runs on the device; "
                         "triton on cpu only when asked, its interpreter being far too slow to time)")
    group.addoption("--bench-no-compile", action="store_true", help="leave out torch.compile (its compilation is slow)")
    group.addoption("--bench-repeat", type=int, default=20, help="at least this many timed runs per variant")
    group.addoption("--bench-warmup", type=int, default=3, help="untimed runs per variant before timing")
    group.addoption("--bench-min-time", type=float, default=1.0, help="time each variant for at least this many seconds")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class Config:
    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    batches: tuple[int, ...]
    size: int
    models: tuple[str, ...]
    backends: tuple[str, ...] | None  # as asked; None: every backend that runs on the device
    compile: bool
    repeat: int
    warmup: int
    min_time: float

    @classmethod
    def from_options(cls, option) -> "Config":
        device = torch.device(option.bench_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--bench-device cuda, but PyTorch sees no CUDA device")
        if device.type not in DEFAULT_BATCHES:
            raise pytest.UsageError(f"--bench-device must be cpu or cuda, got {device}")
        if option.bench_dtype:
            unknown = [d for d in _split(option.bench_dtype) if d not in DTYPES]
            if unknown:
                raise pytest.UsageError(f"--bench-dtype: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
            dtypes = tuple(dict.fromkeys(DTYPES[d] for d in _split(option.bench_dtype)))
        elif device.type == "cuda":
            dtypes = (torch.float32, torch.float16, torch.bfloat16)
        else:
            dtypes = (torch.float32,) + ((torch.bfloat16,) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())
        try:
            batches = tuple(int(b) for b in _split(option.bench_batch)) if option.bench_batch else DEFAULT_BATCHES[device.type]
        except ValueError:
            raise pytest.UsageError(f"--bench-batch takes comma-separated integers, got {option.bench_batch!r}") from None
        backends = tuple(_split(option.bench_backends)) if option.bench_backends else None
        unknown = [b for b in backends or () if b not in ops.BACKENDS]
        if unknown:
            raise pytest.UsageError(f"--bench-backends: unknown {', '.join(unknown)}; known: {', '.join(ops.BACKENDS)}")
        if min(batches, default=0) < 1 or option.bench_size < 1 or option.bench_repeat < 1 or option.bench_warmup < 0:
            raise pytest.UsageError("--bench-batch, --bench-size and --bench-repeat must be positive, --bench-warmup not negative")
        return cls(device, dtypes, batches, option.bench_size, tuple(_split(option.bench_models)), backends,
                   not option.bench_no_compile, option.bench_repeat, option.bench_warmup, option.bench_min_time)

    def backends_for(self, dtype: torch.dtype) -> list[tuple[str, str | None]]:
        """(backend, reason to skip it or None) for each backend this run covers in ``dtype``."""
        if self.backends is not None:
            return [(name, ops.BACKENDS[name].unavailable_reason(self.device.type, dtype)) for name in self.backends]
        return [(name, module.unavailable_reason(self.device.type, dtype)) for name, module in ops.BACKENDS.items()
                if name in self.default_backends()]

    def default_backends(self) -> list[str]:
        return [name for name, module in ops.BACKENDS.items()
                if module.unavailable_reason(self.device.type, None) is None
                and not (name == "triton" and self.device.type == "cpu")]

    def describe(self) -> list[str]:
        """Lines for pytest's header: what this run covers and which backends it leaves out, and why."""
        left_out = [f"{name} ({module.unavailable_reason(self.device.type, None) or 'interpreter only: ask for it'})"
                    for name, module in ops.BACKENDS.items() if name not in (self.backends or self.default_backends())]
        env = env_info(self.device)
        return [
            f"resnet-fused benchmarks on {self.device} ({env['device_name']}), torch {env['torch']}"
            + (f", TF32 conv={env['tf32_cudnn']} matmul={env['tf32_matmul']}" if "tf32_cudnn" in env else ""),
            f"  dtypes {', '.join(map(dtype_name, self.dtypes))}; batches {self.batches}; {self.size}x{self.size}; "
            f"models {', '.join(self.models)}; torch.compile {'on' if self.compile else 'off'}",
            f"  fused backends {', '.join(self.backends or self.default_backends())}"
            + (f"; left out: {'; '.join(left_out)}" if left_out else ""),
            f"  each variant: {self.warmup} warm-up runs, then >= {self.repeat} timed runs and >= {self.min_time:g} s",
        ]


@dataclass(frozen=True)
class Case:
    """One benchmark: a variant of one subject (model, block or op) at one batch size and dtype."""

    suite: str  # models | blocks | ops
    subject: str  # the model's name, or a layer's label
    model: str  # the model the subject is, or is taken from
    path: str  # the subject's module path inside that model ("" for the model itself)
    batch: int
    dtype: torch.dtype
    variant: str
    kind: str
    backend: str | None
    skip: str | None = None

    @property
    def group(self) -> str:
        return f"{self.suite}: {self.subject}, batch {self.batch}, {dtype_name(self.dtype)}"

    @property
    def id(self) -> str:
        return "-".join([self.subject, f"b{self.batch}", dtype_name(self.dtype), self.variant]).replace(" + ", "+").replace(" ", "_")

    def param(self):
        return pytest.param(self, id=self.id, marks=[pytest.mark.skip(reason=self.skip)] if self.skip else [])

    def info(self) -> dict:
        info = asdict(self)
        del info["skip"]
        info["dtype"] = dtype_name(self.dtype)
        return info


def cases(cfg: Config, suite: str, subjects: Sequence[tuple[str, str, str]], variants) -> Iterator[Case]:
    """Every (subject, batch, dtype, variant) case, the variants of one group next to each other.

    ``subjects`` are (label, model, path); ``variants(dtype, batch)`` lists the suite's variants
    (before any is built, so it is cheap).
    """
    for subject, model, path in subjects:
        for batch in cfg.batches:
            for dtype in cfg.dtypes:
                skips = dict(cfg.backends_for(dtype))
                for v in variants(dtype, batch):
                    yield Case(suite, subject, model, path, batch, dtype, v.name, v.kind, v.backend, skips.get(v.backend))


def pick(variants: Sequence[Variant], case: Case) -> Variant:
    return next(v for v in variants if v.name == case.variant)


@functools.lru_cache(maxsize=None)
def traced(model: str, size: int) -> tuple[str, nn.Module, dict[str, tuple[torch.Size, torch.Size]]]:
    """Our reference architecture of ``model``, on the meta device (shapes only, no data), with the input
    and output shape (batch 1) of each of its modules at ``size``x``size``.

    The ops and blocks suites take their layers from here; ``torchvision:resnet50`` and the like
    have the same layer shapes as our ``resnet50``.
    """
    arch = model.rpartition(":")[2]
    if arch not in reference.MODELS:
        raise pytest.UsageError(f"the ops and blocks suites take layer shapes from our models ({', '.join(reference.MODELS)}), "
                                f"not {model!r}")
    with torch.device("meta"):
        net = reference.MODELS[arch]().eval()
    shapes = {}

    def record(path, module, args, output):
        shapes[path] = (args[0].shape, output.shape)

    for path, module in net.named_modules():
        module.register_forward_hook(functools.partial(record, path))
    net(torch.empty(1, 3, size, size, device="meta"))
    return arch, net, shapes


@functools.lru_cache(maxsize=1)  # cases run model by model: one cached model is enough
def calibrated_model(name: str) -> nn.Module:
    """The float32 eval-mode model ``resnet-fused bench`` uses: seeded random weights, BN calibrated."""
    return build_model(name, weights=None, seed=SEED)


@functools.lru_cache(maxsize=2)
def inputs(batch: int, size: tuple[int, int], channels: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    return make_inputs(batch, size, dtype=dtype, device=device, channels=channels, seed=SEED + 1)


@functools.lru_cache(maxsize=1)
def env_info(device: torch.device) -> dict:
    return environment(device)


_expected: dict = {}


def expected(case: Case, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager ``module``'s output on ``x`` in x's dtype, and the float64 reference (of the first
    :data:`JUDGED_IMAGES` images), for ``case``'s group.

    Kept for one group at a time: the variants of a group run back to back.
    """
    if case.group not in _expected:
        _expected.clear()
        with torch.inference_mode():
            # clone(): a slice would keep the whole batch's output alive
            eager = copy.deepcopy(module).to(device=x.device, dtype=x.dtype)(x)[:JUDGED_IMAGES].clone()
            reference = copy.deepcopy(module).to(device=x.device, dtype=torch.float64)(x.double())[:JUDGED_IMAGES].clone()
        _expected[case.group] = (eager, reference)
    return _expected[case.group]


class ReplayClock:
    """pytest-benchmark's timer for these suites: a clock that moves only by the durations time_fn measured.

    pytest-benchmark times each round as the difference of two timer readings around its target;
    with this timer and :meth:`advance` as the target, each round lasts exactly one duration that
    time_fn measured (with CUDA events on a GPU), and pytest-benchmark's statistics are time_fn's.
    """

    __name__ = "resnet_fused.bench.time_fn"  # what pytest-benchmark records as the timer

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def measure(benchmark, clock: ReplayClock, cfg: Config, case: Case, variant: Variant, xs: Sequence[torch.Tensor],
            expect: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Build ``variant``, judge its output against ``expect`` (eager, float64), time it, and hand the times to ``benchmark``."""
    fn = variant.build()
    try:
        xs = [variant.feed(x) for x in xs]
        with torch.inference_mode():
            out = fn(xs[0])[:JUDGED_IMAGES].clone()  # a CUDA-graph replay overwrites its output: keep this one
        verdict = judge(out, *expect)
        env = env_info(cfg.device)
        benchmark.extra_info.update(
            case.info(), size=cfg.size, device=str(cfg.device), cuda_graph=variant.cuda_graph,
            rel_error_vs_fp64=verdict.error, eager_rel_error_vs_fp64=verdict.eager_error,
            **{key: env[key] for key in ENV_KEYS if key in env},
        )
        if not verdict.ok:
            pytest.fail(f"MISMATCH: {case.variant} is further from float64 than allowed: relative error "
                        f"{verdict.error:.3g} > bound {verdict.bound:.3g} (eager {dtype_name(case.dtype)}: "
                        f"{verdict.eager_error:.3g}); not timed")
        timing = time_fn(fn, xs, warmup=cfg.warmup, repeat=cfg.repeat, min_time_s=cfg.min_time)
        benchmark.extra_info.update(median_ms=timing.median_ms, images_per_s=timing.images_per_s(case.batch))
        durations = iter([t / 1000.0 for t in timing.times_ms])
        benchmark.pedantic(clock.advance, setup=lambda: ((next(durations),), {}), rounds=len(timing.times_ms))
    finally:
        if cfg.device.type == "cuda":
            # Give the next variant the whole GPU: at batch 256 the memory of this one's activations,
            # compiled graph or CUDA graph pool matters.
            del fn
            gc.collect()
            torch.cuda.empty_cache()
