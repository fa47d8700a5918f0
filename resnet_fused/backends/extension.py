"""The C++/CUDA extension ``resnet_fused._C``: CPU and CUDA kernels behind ``torch.ops.resnet_fused``.

The op schemas, CPU and CUDA kernels live in ``csrc/``; this module loads the library, registers
the fake (meta) kernels that let ``torch.compile`` and ``torch.library.opcheck`` trace the ops, and
implements the backend contract of :mod:`resnet_fused.backends`.

Path switches, read on every call so a benchmark can compare the paths in one process:

- ``RESNET_FUSED_CUDNN_FUSED`` (CUDA): ``1`` runs every conv with an epilogue (bias, residual
  and/or ReLU) as one fused cuDNN call wherever cuDNN has an engine for it (our cuDNN operation
  graph, ``csrc/cuda/fused_conv_graph.cpp``; in a build without cuDNN's headers only conv +
  residual + ReLU, through ``aten::cudnn_convolution_add_relu``); ``0`` never (cuDNN convolution +
  our epilogue kernel); unset or ``auto``: the first call of each conv signature (shapes, dtype,
  layout, epilogue, alignment) times both and keeps the faster. A signature first seen during CUDA
  graph capture, where timing is impossible, takes the fused call untimed only for half/bfloat16
  channels_last convs with channel counts divisible by 8. A signature cuDNN builds no fused graph
  for warns once and runs convolution + epilogue from then on. ``build_info()["cudnn_graph"]``
  says whether the graphs are available (``cudnn_graph_reason``: why not).
- ``RESNET_FUSED_CUDNN_PLANS`` (CUDA): how many of cuDNN's engine configs for a fused graph are
  built and timed on the first call of its signature outside CUDA graph capture, the fastest kept
  (1 to 64; unset or 1: the first acceptable config of cuDNN's heuristic ranking, untimed, as
  before; a bad value raises). Not yet measured on a GPU; ``benchmarks/gpu_check.sh`` compares 8
  with 1.
- ``RESNET_FUSED_ONEDNN_FUSED`` (CPU): ``0`` turns off oneDNN's fused post-ops
  (``mkldnn::_convolution_pointwise``) in favour of ``at::convolution`` + our epilogue.
- ``RESNET_FUSED_AVX2_CONV`` (CPU): our own kernels (AVX2 and AVX-512), computing in fp32: Winograd
  F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 convolutions (``csrc/cpu/winograd_cpu.cpp``) and an
  implicit GEMM with the epilogue in its store for every other convolution
  (``csrc/cpu/implicit_gemm_cpu.cpp``);
  bf16 and fp16 calls converted to fp32 on the way in and rounded once on the way out (on a CPU
  without native bf16 convolutions, ATen's fallback is ~10x slower). On a CPU with AVX512-BF16 a
  bf16 call also has our bf16 GEMM core (``csrc/cpu/avx512_gemm.h``: VDPBF16PS, bf16 operands, fp32
  sums): the implicit GEMM for every kernel size (the epilogue in fp32, one rounding to bf16 in the
  store), and Winograd F(2x2, 3x3) with its transformed points rounded to bf16 (about 2x a direct
  bf16 conv's error per layer). On a CPU with AMX-BF16 (Linux) a bf16 call with input channels a
  multiple of 32 also has the implicit GEMM on AMX tiles (``csrc/cpu/amx_gemm.h``: the same packed
  weight, fp32 sums in the tiles, the same epilogue and rounding); ``1`` picks them first (F(2x2)
  for 3x3 stride 1, else AMX where it applies, else the AVX512-BF16 implicit GEMM).
  Unset or ``auto``: the first call of each shape times them against the direct convolution, with
  the weight and its packed copies flushed from the CPU caches before each timed run (in a model
  every layer reads its weight from DRAM), and keeps the fastest (the losing Winograd variant's
  transformed weight is then dropped); ``1``
  always (where they apply; Winograd F(2x2) unless the next switch says 4), ``0`` never.
- ``RESNET_FUSED_WINOGRAD_TILE`` (CPU): ``2`` or ``4`` keeps only that Winograd variant (its output
  tile side), forced or timed; ``off`` none (3x3 stride-1 convs then take the implicit GEMM, with a
  direct convolution's rounding); unset or ``auto``: both are candidates. F(4x4) does 1.78x fewer
  multiply-adds than F(2x2) on large maps, with about 20x a direct convolution's fp32 rounding error
  (still ~1e-6 of the logits on a whole ResNet).
- ``RESNET_FUSED_GEMM_CORE`` (CPU): the GEMMs under Winograd and the implicit GEMM on ``own`` (our
  micro-kernel: AVX-512 on CPUs with AVX512F, else AVX2; ``RESNET_FUSED_CPU_ISA=avx2`` keeps the
  AVX2 one; the two give bit-identical results) or ``brgemm`` (oneDNN's JIT micro-kernel inside
  ATen, ``at::native::cpublas::brgemm``, generated for the ISA the CPU has: AVX-512 on an AVX-512
  server; the implicit GEMM then adds bias and residual and applies the ReLU right after each brgemm
  call, on the tile it just wrote); unset or ``auto``: timed for each shape's chosen kernel and
  block, for the implicit GEMM only where the CPU has AVX-512 (where both are AVX2 code, timing it changed
  nothing measurable and made the first forward up to 38% longer). oneDNN's own
  ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``), set before the first call, caps the ISA of brgemm and of
  the direct convolution, so an AVX-512 machine can run and time the AVX2 code.
- ``RESNET_FUSED_THREAD_SPLIT`` (CPU): how the implicit GEMM shares a conv between the threads:
  ``pixels`` (each thread a share of the output pixels; what ``RESNET_FUSED_AVX2_CONV=1`` uses
  unless told) or ``channels`` (each a share of the output channels, so it reads its share of the
  weight once: batch-1 layers on small maps); unset or ``auto``: both are timed.
- ``RESNET_FUSED_CPU_ISA`` (CPU): ``avx2`` keeps our own kernels to their AVX2 + FMA code on any
  CPU (the AVX2 fp32 GEMM core, no AVX512-BF16 kernel), so that an AVX-512 machine tests and times
  what an AVX2-only one runs; ``avx512`` keeps them off AMX (the AVX-512 and AVX512-BF16 cores: what
  an AVX-512 CPU without AMX runs); unset or ``auto``: what the CPU has. oneDNN's code is capped by
  ``ONEDNN_MAX_CPU_ISA``.
- ``RESNET_FUSED_CPU_POOL_MB`` (CPU): the outputs of our AVX2 kernels come from a pool of blocks
  reused once nobody holds them (``csrc/cpu/output_pool.h``: without it, glibc returns the freed
  activations to the kernel and every forward page-faults them back in, 13% of resnet50's batch-8
  time here). The value caps the MiB kept in free blocks (default 1024); ``0`` turns the pool off.

NaN: every CPU path gives eager's NaNs, whatever kernel the per-shape timing picks: oneDNN fuses
only the bias and the residual add (its ReLU post-op turns NaN into 0), and Winograd hands calls
with Inf/NaN values to the implicit GEMM.

On oneDNN's path the weight is reordered into oneDNN's blocked layout once per (weight, input
shape) and the packed copy reused (``csrc/cpu/weight_cache.h``), as the ``onednn`` backend does: an
in-place change of the weight (its version counter), a new weight in a freed one's memory, or
``p.data = t`` is a miss, and a freed weight's copies are dropped. Weights that are inference
tensors (made under ``torch.inference_mode()``) have no version counter and are packed on every
call, which is slower (``fuse()`` makes its weights outside inference mode for this reason). Our
own kernels' packed weights are cached the same way.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os

import torch
import torch._prims_common

from .. import _shapes

NAME = "extension"
CUDNN_FUSED_ENV = "RESNET_FUSED_CUDNN_FUSED"
CUDNN_PLANS_ENV = "RESNET_FUSED_CUDNN_PLANS"
ONEDNN_FUSED_ENV = "RESNET_FUSED_ONEDNN_FUSED"
AVX2_CONV_ENV = "RESNET_FUSED_AVX2_CONV"
WINOGRAD_TILE_ENV = "RESNET_FUSED_WINOGRAD_TILE"
GEMM_CORE_ENV = "RESNET_FUSED_GEMM_CORE"
THREAD_SPLIT_ENV = "RESNET_FUSED_THREAD_SPLIT"
CPU_ISA_ENV = "RESNET_FUSED_CPU_ISA"
CPU_POOL_ENV = "RESNET_FUSED_CPU_POOL_MB"
OPS = ("conv_bias_act", "bias_act", "add_relu", "max_pool2d", "global_avg_pool", "linear")
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BUILD_HINT = "build it with: pip install --no-build-isolation -e ."


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def defines_own_cxx_runtime(path: str) -> bool:
    """Whether the loaded shared library at ``path`` defines ``__cxa_throw`` itself: it carries a
    private copy of libstdc++, linked statically (by a compiler built without shared runtime
    libraries, say). torch's exceptions then unwind through frames of another C++ runtime, and
    strings cross between the two: with ``-static-libstdc++`` error messages and op results come
    out cut short, and the likely cause of the segfault on every op error seen on an H200 machine.
    False where ``dladdr`` is missing (not glibc)."""
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        throw = ctypes.cast(lib["__cxa_throw"], ctypes.c_void_p).value
        dladdr = ctypes.CDLL(None).dladdr
    except (OSError, AttributeError):
        return False
    info = _DlInfo()
    if not dladdr(ctypes.c_void_p(throw), ctypes.byref(info)) or info.dli_fname is None:
        return False
    return os.path.realpath(info.dli_fname.decode()) == os.path.realpath(path)


def _load() -> str | None:
    """Import the library (its static initialisers register the ops); the reason if that fails."""
    try:
        module = importlib.import_module("resnet_fused._C")
    except ModuleNotFoundError as e:
        if e.name == "resnet_fused._C":
            return f"resnet_fused._C is not built: {e}; {_BUILD_HINT}"
        return f"resnet_fused._C failed to load: {e}; {_BUILD_HINT}"
    except (ImportError, OSError) as e:
        # Typically undefined symbols: built against another torch than this one.
        return f"resnet_fused._C failed to load (built against another torch than {torch.__version__}?): {e}; {_BUILD_HINT}"
    if defines_own_cxx_runtime(module.__file__):
        return (
            f"{module.__file__} carries its own copy of the C++ runtime (libstdc++ linked statically), so C++ "
            "exceptions and strings crossing into torch crash or come out garbled; rebuild it with a compiler that "
            "links libstdc++ dynamically (torch's build takes $CC and $CXX, e.g. CC=cc CXX=c++); " + _BUILD_HINT
        )
    return None


_LOAD_ERROR = _load()


def built_for_torch() -> str | None:
    """The torch version ``_C`` was compiled against (``"2.11.0"``), read from the module without
    calling any op; ``None`` when ``_C`` is not loaded."""
    if _LOAD_ERROR is not None:
        return None
    return importlib.import_module("resnet_fused._C").torch_version


def build_info() -> dict | None:
    """How ``_C`` was built: ``torch`` (version built against), ``with_cuda``, and for CUDA builds
    ``cuda`` (toolkit version) and ``cuda_archs`` (nvcc's target list, e.g. ``"900"``). ``None``
    when ``_C`` is not loaded (see :func:`load_error`)."""
    if _LOAD_ERROR is not None:
        return None
    return json.loads(torch.ops.resnet_fused.build_info())


def cpu_conv_choices() -> list[str]:
    """The kernel the CPU path's per-shape timing chose for each conv shape this process has run
    (``direct``, ``winograd_f2x2``, ``winograd_f4x4``, ``implicit_gemm`` or, on the bf16 core,
    ``implicit_gemm_bf16`` and ``winograd_f2x2_bf16``, or on AMX tiles ``implicit_gemm_amx``, with
    its block, ``brgemm`` where the GEMMs
    run on it and ``split channels`` where the threads share the output channels), one line per
    shape; empty when ``_C`` is not loaded or nothing was timed. Each call of one of these kernels
    is also a profiler scope named after it (``torch.profiler``), inside
    ``resnet_fused::conv_bias_act``."""
    if _LOAD_ERROR is not None:
        return []
    return list(torch.ops.resnet_fused.cpu_conv_choices())


def load_error() -> str | None:
    """Why ``_C`` could not be loaded, or ``None``."""
    return _LOAD_ERROR


def unavailable_reason(device_type: str, dtype: torch.dtype | None) -> str | None:
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if dtype is not None and dtype not in _FLOATING:
        return f"no kernels for {dtype}"
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        return f"no kernels for device type {device_type!r}"
    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", key)]
    if not missing:
        return None
    if device_type == "cuda":
        info = build_info()
        return (
            f"resnet_fused._C was built without CUDA (for torch {info['torch']}); rebuild it where torch has CUDA "
            "and nvcc is found (set CUDA_HOME, or FORCE_CUDA=1)"
        )
    return f"resnet_fused._C has no {key} kernel for {', '.join(missing)}"


def _suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    # The same stride test as ATen's Tensor::suggest_memory_format, which the C++ kernels use.
    return torch._prims_common.suggest_memory_format(t)


def _conv_output_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    # Mirrors conv_output_format in csrc/common.h.
    if torch.channels_last in (_suggest_memory_format(x), _suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


if _LOAD_ERROR is None:
    _conv_bias_act = torch.ops.resnet_fused.conv_bias_act.default
    _bias_act = torch.ops.resnet_fused.bias_act.default
    _add_relu = torch.ops.resnet_fused.add_relu.default
    _max_pool2d = torch.ops.resnet_fused.max_pool2d.default
    _global_avg_pool = torch.ops.resnet_fused.global_avg_pool.default
    _linear = torch.ops.resnet_fused.linear.default
    _residual_blocks = torch.ops.resnet_fused.residual_blocks.default

    @torch.library.register_fake("resnet_fused::conv_bias_act")
    def _conv_bias_act_fake(x, weight, bias, stride, padding, groups, residual, relu):
        shape = _shapes.conv_output_shape(x.shape, weight.shape, stride, padding)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_conv_output_format(x, weight))

    @torch.library.register_fake("resnet_fused::bias_act")
    def _bias_act_fake(x, bias, relu):
        return torch.empty_like(x, memory_format=_suggest_memory_format(x))

    @torch.library.register_fake("resnet_fused::add_relu")
    def _add_relu_fake(x, residual):
        return torch.empty_like(x, memory_format=_suggest_memory_format(x))

    @torch.library.register_fake("resnet_fused::max_pool2d")
    def _max_pool2d_fake(x, kernel_size, stride, padding):
        shape = _shapes.pool_output_shape(x.shape, kernel_size, stride, padding)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_suggest_memory_format(x))

    @torch.library.register_fake("resnet_fused::global_avg_pool")
    def _global_avg_pool_fake(x):
        return x.new_empty((x.shape[0], x.shape[1], 1, 1))

    @torch.library.register_fake("resnet_fused::linear")
    def _linear_fake(x, weight, bias):
        return x.new_empty((x.shape[0], weight.shape[0]))


def conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu):
    return _conv_bias_act(x, weight, bias, list(stride), list(padding), groups, residual, relu)


def residual_blocks(x, weights, biases, strides, paddings, groups, chain_lengths, projections):
    return _residual_blocks(x, weights, biases, strides, paddings, groups, chain_lengths, projections)


def add_relu(x, residual):
    return _add_relu(x, residual)


def bias_act(x, bias, relu):
    return _bias_act(x, bias, relu)


def max_pool2d(x, kernel_size, stride, padding):
    return _max_pool2d(x, list(kernel_size), list(stride), list(padding))


def global_avg_pool(x):
    return _global_avg_pool(x)


def linear(x, weight, bias):
    return _linear(x, weight, bias)
