"""The extension's own AVX2 CPU convolutions, Winograd F(2x2, 3x3) and F(4x4, 3x3)
(csrc/cpu/winograd_cpu.cpp) and the implicit GEMM (csrc/cpu/implicit_gemm_cpu.cpp), and the
per-shape choice between them and the direct (oneDNN) convolution.

RESNET_FUSED_AVX2_CONV=1 forces them wherever they apply (fp32, or bf16/fp16 computed in fp32;
groups 1, output channels a multiple of 16, AVX2+FMA; Winograd for 3x3 stride 1 padding 1, the
implicit GEMM for every other kernel size, stride and padding), =0 turns them off, unset times all
candidates on a shape's first call. RESNET_FUSED_WINOGRAD_TILE=2 or 4 picks the Winograd variant,
RESNET_FUSED_GEMM_CORE=own or brgemm the GEMM under both (our micro-kernel: AVX-512 where the CPU
has it, AVX2 under RESNET_FUSED_CPU_ISA=avx2, with bit-identical results; or oneDNN's brgemm
through ATen; the implicit GEMM then applies its epilogue after each brgemm call),
RESNET_FUSED_THREAD_SPLIT=pixels or channels how the implicit GEMM shares its work between threads.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import bench
from resnet_fused.accuracy import judge
from resnet_fused.backends import extension
from resnet_fused.reference import random_model
from test_extension import make_4d
from utils import assert_close, assert_within_eager_error, reference_conv_bias_act

AVX2_CONV_ENV = extension.AVX2_CONV_ENV
WINOGRAD_TILE_ENV = extension.WINOGRAD_TILE_ENV
GEMM_CORE_ENV = extension.GEMM_CORE_ENV
THREAD_SPLIT_ENV = extension.THREAD_SPLIT_ENV
CPU_ISA_ENV = extension.CPU_ISA_ENV
# Output tile sides of the two Winograd variants.
TILES = [2, 4]

pytestmark = [
    pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 kernels are x86-64 only"),
]

# (N, C, K, H, W): odd sizes leave partial 2x2 and 4x4 tiles at the bottom and right edges; C not a
# multiple of the vector width; 1x1 maps are a single tile of padding; 384x384 makes the packed
# weight larger than 8 MiB, which selects the large tile block.
SHAPES = [
    (2, 16, 16, 8, 8),
    (2, 5, 32, 7, 9),
    (1, 1, 16, 1, 1),
    (3, 32, 48, 3, 2),
    (1, 64, 64, 13, 14),
    (1, 128, 256, 6, 5),
    (1, 384, 384, 5, 3),
]
# (bias, residual, relu)
FLAGS = [(True, False, True), (True, True, True), (False, True, False), (True, False, False)]


def own_kernel_ran(call, kernel: str | None = None) -> bool:
    """Whether the call went through our kernels (the only path that calls no convolution op) and,
    given `kernel`, ran that one: each call of one of our kernels is a profiler scope named after it
    (``winograd_f4x4``, ``implicit_gemm``, ...; csrc/cpu/ops_cpu.cpp)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    names = {e.name for e in prof.events()}
    return not any("convolution" in name for name in names) and (kernel is None or kernel in names)


def make_case(shape, flags, layout, seed=0, kernel=3, stride=1, padding=None):
    n, c, k, h, w = shape
    with_bias, with_residual, relu = flags
    padding = kernel // 2 if padding is None else padding
    g = torch.Generator().manual_seed(seed)
    x = make_4d((n, c, h, w), layout, torch.float32, generator=g)
    weight = torch.randn(k, c, kernel, kernel, generator=g) / (kernel * kernel * c) ** 0.5
    bias = 0.5 * torch.randn(k, generator=g) if with_bias else None
    p, q = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    residual = make_4d((n, k, p, q), layout, torch.float32, generator=g) if with_residual else None
    return x, weight, bias, residual, relu


def conv(x, weight, bias, residual, relu, stride=1, padding=None):
    padding = weight.shape[-1] // 2 if padding is None else padding
    return torch.ops.resnet_fused.conv_bias_act(x, weight, bias, [stride] * 2, [padding] * 2, 1, residual, relu)


def reference(x, weight, bias, residual, relu, stride=1, padding=None):
    padding = weight.shape[-1] // 2 if padding is None else padding
    return reference_conv_bias_act(x, weight, bias, stride=stride, padding=padding, residual=residual, relu=relu)


@pytest.fixture
def forced(monkeypatch, nan_filled_empty_exact_fp32):
    monkeypatch.setenv(AVX2_CONV_ENV, "1")


@pytest.fixture(params=TILES, ids=[f"F{t}x{t}" for t in TILES])
def tile(request, monkeypatch):
    monkeypatch.setenv(WINOGRAD_TILE_ENV, str(request.param))
    return request.param


# Our widest micro-kernel (AVX-512 where the CPU has it), oneDNN's brgemm, and, on AVX-512 CPUs, our
# AVX2 one too (RESNET_FUSED_CPU_ISA=avx2), which is what AVX2-only CPUs run.
HAS_AVX512 = "avx512f" in bench.cpu_flags()
CORES = ["own", "brgemm"] + (["own_avx2"] if HAS_AVX512 else [])


@pytest.fixture(params=CORES)
def core(request, monkeypatch):
    monkeypatch.setenv(GEMM_CORE_ENV, request.param.removesuffix("_avx2"))
    monkeypatch.setenv(CPU_ISA_ENV, "avx2" if request.param.endswith("_avx2") else "auto")
    return request.param


@pytest.fixture(params=["pixels", "channels"])
def split(request, monkeypatch):
    monkeypatch.setenv(THREAD_SPLIT_ENV, request.param)
    return request.param


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("flags", FLAGS, ids=["bias_relu", "bias_res_relu", "res", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{n}c{c}k{k}_{h}x{w}" for n, c, k, h, w in SHAPES])
def test_winograd_matches_float64(shape, flags, layout, tile, core, forced):
    x, weight, bias, residual, relu = make_case(shape, flags, layout)
    assert own_kernel_ran(lambda: conv(x, weight, bias, residual, relu), f"winograd_f{tile}x{tile}")
    # Finite inputs: no output flagged non-finite, so no redo by the implicit GEMM (winograd.h).
    assert not own_kernel_ran(lambda: conv(x, weight, bias, residual, relu), "implicit_gemm")
    out = conv(x, weight, bias, residual, relu)
    expected_format = torch.contiguous_format if layout == "nchw" else torch.channels_last
    assert out.is_contiguous(memory_format=expected_format)
    assert_close(out, reference_conv_bias_act(x, weight, bias, padding=1, residual=residual, relu=relu))


# (N, C, K, H, W, kernel, stride, padding): the 1x1 convs of every ResNet kind (expand, reduce,
# strided shortcut), ResNet's 3x3 stride-2 and 7x7 stride-2 stem, and unusual ones (1x1 padded,
# 5x5, 3x3 unpadded); under 16 input channels (3, 5, 7: a filter row's taps merged, from a padded
# copy or, unpadded, in place); odd pixel counts (a partial 6-row micro-tile), C of 1 and odd, K=2048 split
# across threads; reductions cut into chunks of 256 products (avx2_gemm.h): 600 channels of one tap
# (256 + 256 + 88), 9 taps of 40 channels (6 taps + 3), 9 taps of 300 channels (each 256 + 44).
SHAPES_IGEMM = [
    (2, 16, 32, 5, 7, 1, 1, 0),
    (1, 1, 16, 3, 3, 1, 1, 0),
    (1, 37, 64, 4, 5, 1, 1, 0),
    (2, 24, 48, 9, 7, 1, 2, 0),
    (1, 64, 2048, 3, 3, 1, 1, 0),
    (3, 48, 16, 2, 1, 1, 2, 0),
    (2, 16, 32, 9, 8, 3, 2, 1),
    (1, 3, 16, 17, 15, 7, 2, 3),
    (2, 7, 16, 9, 8, 3, 2, 0),
    (1, 8, 16, 5, 6, 1, 1, 1),
    (2, 5, 32, 8, 9, 5, 1, 2),
    (1, 16, 16, 6, 5, 3, 1, 0),
    (1, 600, 32, 3, 4, 1, 1, 0),
    (2, 40, 16, 7, 6, 3, 2, 1),
    (1, 300, 16, 5, 5, 3, 2, 1),
]


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("flags", FLAGS, ids=["bias_relu", "bias_res_relu", "res", "bias"])
@pytest.mark.parametrize("shape", SHAPES_IGEMM, ids=[f"n{n}c{c}k{k}_{h}x{w}_{r}x{r}s{s}p{p}" for n, c, k, h, w, r, s, p in SHAPES_IGEMM])
def test_implicit_gemm_matches_float64(shape, flags, layout, split, core, forced):
    *dims, kernel, stride, padding = shape
    x, weight, bias, residual, relu = make_case(dims, flags, layout, kernel=kernel, stride=stride, padding=padding)
    assert own_kernel_ran(lambda: conv(x, weight, bias, residual, relu, stride, padding), "implicit_gemm")
    out = conv(x, weight, bias, residual, relu, stride, padding)
    expected_format = torch.contiguous_format if layout == "nchw" else torch.channels_last
    assert out.is_contiguous(memory_format=expected_format)
    assert_close(out, reference(x, weight, bias, residual, relu, stride, padding))


# (shape, kernel, stride, padding) for Winograd (3x3 stride 1) and the implicit GEMM: row counts that
# leave partial micro-tiles of both cores (6 and 12 rows), odd panel counts, reductions past the
# AVX2 core's 256-channel chunk, the stem's merged filter rows.
CORE_CASES = [((2, 16, 32, 5, 7), 3, 1, 1), ((1, 600, 48, 3, 4), 3, 1, 1), ((1, 64, 2048, 3, 3), 1, 1, 0),
              ((2, 300, 80, 5, 7), 1, 1, 0), ((1, 600, 32, 3, 4), 1, 1, 0), ((2, 16, 32, 9, 8), 3, 2, 1),
              ((1, 3, 16, 17, 15), 7, 2, 3)]


@pytest.mark.skipif(not HAS_AVX512, reason="the AVX-512 GEMM core needs a CPU with AVX512F")
@pytest.mark.parametrize("tile", TILES, ids=[f"F{t}x{t}" for t in TILES])
@pytest.mark.parametrize("case", CORE_CASES,
                         ids=[f"c{s[1]}k{s[2]}_{s[3]}x{s[4]}_{r}x{r}s{st}" for s, r, st, _ in CORE_CASES])
def test_avx512_core_matches_avx2_core_bit_for_bit(case, tile, forced, monkeypatch):
    """Our AVX-512 micro-kernel sums in the AVX2 one's order (avx512_gemm.h): every output, NaN and
    Inf included, is the same bit pattern whichever runs (RESNET_FUSED_CPU_ISA picks)."""
    shape, kernel, stride, padding = case
    monkeypatch.setenv(GEMM_CORE_ENV, "own")
    monkeypatch.setenv(WINOGRAD_TILE_ENV, str(tile))
    x, weight, bias, residual, relu = make_case(shape, (True, True, True), "channels_last", kernel=kernel,
                                                stride=stride, padding=padding)
    x[0, 0, 1, 1] = float("nan")
    x[-1, -1, 2, 0] = float("inf")
    outs = {}
    for isa in ("auto", "avx2"):
        monkeypatch.setenv(CPU_ISA_ENV, isa)
        outs[isa] = conv(x, weight, bias, residual, relu, stride, padding)
    assert torch.equal(outs["auto"].view(torch.int32), outs["avx2"].view(torch.int32))
    out, expected = outs["auto"], reference(x, weight, bias, residual, relu, stride, padding)
    assert torch.isnan(out).any()
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert_close(out[finite], expected[finite])


# bf16 and fp16 calls run the same fp32 kernels: their activations converted to fp32 on the way in,
# the result rounded once on the way out. (shape, kernel, stride, padding): Winograd's 3x3 stride 1
# and the implicit GEMM's 1x1, strided 3x3 and the stem.
LOW_PRECISION_CASES = [
    ((2, 32, 48, 9, 7), 3, 1, 1),
    ((1, 64, 64, 13, 14), 3, 1, 1),
    ((2, 40, 64, 5, 7), 1, 1, 0),
    ((2, 16, 32, 9, 8), 3, 2, 1),
    ((1, 3, 16, 17, 15), 7, 2, 3),
]
LOW_PRECISION = [torch.bfloat16, torch.float16]


def to_dtype(case, dtype):
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in case)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("flags", FLAGS, ids=["bias_relu", "bias_res_relu", "res", "bias"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=[f"c{s[1]}k{s[2]}_{s[3]}x{s[4]}_{r}x{r}s{st}" for s, r, st, _ in LOW_PRECISION_CASES])
def test_low_precision_runs_the_fp32_kernels(case, flags, dtype, tile, forced, monkeypatch):
    """Bit for bit the fp32 kernel's result on the same (widened) inputs, rounded once: no other
    rounding on the way; so within the dtype's tolerance of float64, and no worse than eager. (On a
    CPU with AVX512-BF16, bf16 would take the native kernel first: test_avx512_bf16_conv.py.)"""
    monkeypatch.setenv(CPU_ISA_ENV, "avx2")
    shape, kernel, stride, padding = case
    x, weight, bias, residual, relu = to_dtype(
        make_case(shape, flags, "channels_last", kernel=kernel, stride=stride, padding=padding), dtype)
    name = f"winograd_f{tile}x{tile}" if (kernel, stride, padding) == (3, 1, 1) else "implicit_gemm"
    assert own_kernel_ran(lambda: conv(x, weight, bias, residual, relu, stride, padding), name)
    out = conv(x, weight, bias, residual, relu, stride, padding)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    widened = to_dtype((x, weight, bias, residual), torch.float32)
    torch.testing.assert_close(out, conv(*widened, relu, stride, padding).to(dtype), rtol=0, atol=0)
    assert_close(out, reference(x, weight, bias, residual, relu, stride, padding))
    eager = F.conv2d(x, weight, bias, stride, padding)
    eager = eager + residual if residual is not None else eager
    assert_within_eager_error(out, eager.relu() if relu else eager, reference(x, weight, bias, residual, relu, stride, padding))


def test_low_precision_is_timed_apart_from_fp32(monkeypatch):
    """A shape's choice is per dtype: bf16 pays conversions fp32 does not, and the direct
    convolution it competes with is another kernel (oneDNN's bf16 one, or ATen's fallback)."""
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    case = make_case((1, 24, 32, 7, 6), (True, False, True), "channels_last", kernel=1, padding=0)
    for dtype in (torch.float32, torch.bfloat16):
        x, weight, bias, residual, relu = to_dtype(case, dtype)
        assert_close(conv(x, weight, bias, residual, relu, 1, 0), reference(x, weight, bias, residual, relu, 1, 0))
    lines = [line for line in extension.cpu_conv_choices() if line.startswith("x 1x24x7x6, weight 32x24x1x1, stride 1, padding 0,")]
    assert sorted(line.split(", ")[4] for line in lines) == ["BFloat16", "Float"], lines


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
def test_low_precision_skips_atens_fallback_in_the_timing(dtype, monkeypatch):
    """Without oneDNN (switched off here; on CPUs without native bf16/fp16 it cannot run them), the
    direct candidate would be ATen's fallback convolution, which is not timed: the shape's first
    call, the one that times the candidates, runs no convolution op, and ours is chosen."""
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    monkeypatch.setenv(extension.ONEDNN_FUSED_ENV, "0")
    x, weight, bias, residual, relu = to_dtype(make_case((1, 16, 32, 5, 9), (True, True, True), "channels_last"), dtype)
    assert own_kernel_ran(lambda: conv(x, weight, bias, residual, relu))
    assert_close(conv(x, weight, bias, residual, relu), reference(x, weight, bias, residual, relu))
    prefix = f"x 1x16x5x9, weight 32x16x3x3, stride 1, padding 1, residual, {'BFloat16' if dtype == torch.bfloat16 else 'Half'},"
    lines = [line for line in extension.cpu_conv_choices() if line.startswith(prefix)]
    native = ("winograd_", "implicit_gemm_bf16", "implicit_gemm_amx")
    assert len(lines) == 1 and lines[0].split(": ")[1].startswith(native), lines


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["groups2", "k_not_multiple_of_16", "own_kernels_off"])
def test_low_precision_beyond_our_kernels_runs_onednn(case, dtype, monkeypatch):
    """bf16/fp16 convs ours cannot take run oneDNN's convolution: natively where the CPU has
    those instructions, else its fp32 one on widened copies (ATen's generic fallback is ~10x slower)."""
    monkeypatch.setenv(AVX2_CONV_ENV, "0" if case == "own_kernels_off" else "1")
    x, weight, bias, residual, relu = make_case((2, 16, 32, 6, 7), (True, True, True), "channels_last")
    groups = 1
    if case == "groups2":
        groups, weight = 2, weight[:, :8].contiguous()
    elif case == "k_not_multiple_of_16":
        weight, bias, residual = weight[:24].contiguous(), bias[:24].contiguous(), residual[:, :24].contiguous(
            memory_format=torch.channels_last)
    x, weight, bias, residual = to_dtype((x, weight, bias, residual), dtype)

    def call():
        return torch.ops.resnet_fused.conv_bias_act(x, weight, bias, [1, 1], [1, 1], groups, residual, relu)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    names = {e.name for e in prof.events()}
    assert "mkldnn::_convolution_pointwise" in names and "aten::convolution" not in names, names
    out = call()
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    ref = reference_conv_bias_act(x, weight, bias, padding=1, groups=groups, residual=residual, relu=relu)
    assert_close(out, ref)
    eager = (F.conv2d(x, weight, bias, 1, 1, 1, groups) + residual).relu()
    assert_within_eager_error(out, eager, ref)

@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_low_precision_model_on_own_kernels(arch, dtype, forced, monkeypatch):
    """A whole bf16/fp16 model on our fp32 kernels: within twice eager's own error in that dtype."""
    monkeypatch.setenv(CPU_ISA_ENV, "avx2")
    model = random_model(arch, calibration_size=16)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    fused = resnet_fused.fuse(model, backend="extension", dtype=dtype)
    with torch.inference_mode():
        assert own_kernel_ran(lambda: fused(x.to(dtype)))
        out = fused(x.to(dtype))
        eager = copy.deepcopy(model).to(dtype)(x.to(dtype))
        reference = copy.deepcopy(model).double()(x.double())
    assert out.dtype == dtype
    verdict = judge(out, eager, reference)
    assert verdict.ok, verdict


def test_implicit_gemm_keeps_nan(core, forced):
    x, weight, bias, _, _ = make_case((1, 16, 32, 3, 3), (True, False, True), "channels_last", kernel=1)
    x[0, 5, 1, 2] = float("nan")
    out = conv(x, weight, bias, None, True)
    assert torch.isnan(out[0, :, 1, 2]).all()
    assert torch.isfinite(out).sum() == out.numel() - 32


# (shape, kernel): one block split across output channels; many blocks (390 tiles, 286 pixels)
# whose count is rounded up to a multiple of the threads and whose rows are shared out evenly.
THREAD_CASES = [((1, 64, 128, 6, 6), 3), ((2, 16, 32, 30, 26), 3), ((2, 16, 32, 13, 11), 1)]


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@pytest.mark.parametrize("case", THREAD_CASES, ids=["one_block", "winograd_blocks", "igemm_blocks"])
def test_any_thread_count(case, threads, tile, core, forced):
    """The work split (row blocks x output-channel groups) depends on the thread count."""
    shape, kernel = case
    assert_correct_on_threads(shape, kernel, threads)


def assert_correct_on_threads(shape, kernel, threads):
    x, weight, bias, residual, relu = make_case(shape, (True, True, True), "channels_last", kernel=kernel)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = conv(x, weight, bias, residual, relu)
    finally:
        torch.set_num_threads(before)
    assert_close(out, reference(x, weight, bias, residual, relu))


def test_winograd_keeps_nan(tile, core, forced):
    x, weight, bias, _, _ = make_case((1, 16, 16, 4, 4), (True, False, True), "channels_last")
    x[0, 3, 1, 2] = float("nan")
    out = conv(x, weight, bias, None, True)
    # The NaN reaches exactly the 3x3 neighbourhood of its pixel, through every output channel.
    assert torch.isnan(out[0, :, 0:3, 1:4]).all()
    assert torch.isfinite(out[0, :, 3:, :]).all() and torch.isfinite(out[0, :, :, 0]).all()


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_implicit_gemm_any_thread_count(threads, split, core, forced):
    """Split by channels, each thread takes a whole share of the 6 panels (96 channels) with all of
    the 286 pixels' 6 blocks; 4 threads cannot share 6 panels evenly and fall back to pixels."""
    assert_correct_on_threads((2, 24, 96, 13, 11), 1, threads)


@pytest.mark.parametrize("case", THREAD_CASES[1:], ids=["winograd_blocks", "igemm_blocks"])
def test_threads_take_over_items_with_the_same_results(case, forced):
    """A thread done with its share takes the items left at the end of another's (parallel_items.h).
    With four times as many threads as cores some threads always start late, so takeovers happen;
    every result stays bit-identical to the single-thread one, whoever ran which item."""
    shape, kernel = case
    x, weight, bias, residual, relu = make_case(shape, (True, True, True), "channels_last", kernel=kernel)
    before = torch.get_num_threads()
    taken_before = torch.ops.resnet_fused.cpu_items_taken_over()
    try:
        torch.set_num_threads(1)
        alone = conv(x, weight, bias, residual, relu)
        torch.set_num_threads(4 * (os.cpu_count() or 1))
        for attempt in range(200):
            assert torch.equal(conv(x, weight, bias, residual, relu), alone), f"attempt {attempt}"
            if torch.ops.resnet_fused.cpu_items_taken_over() > taken_before and attempt >= 10:
                break
    finally:
        torch.set_num_threads(before)
    assert torch.ops.resnet_fused.cpu_items_taken_over() > taken_before, "no thread ever took over an item"
    assert_close(alone, reference(x, weight, bias, residual, relu))


# Run in a fresh process: oneDNN reads ONEDNN_MAX_CPU_ISA once, when it first generates code.
CAPPED_ISA_SCRIPT = """
import json, torch, torch.nn.functional as F
import resnet_fused.backends.extension
errors = {}
g = torch.Generator().manual_seed(3)
for name, (c, k, size, kernel, stride) in {"winograd": (24, 32, 9, 3, 1), "1x1": (40, 48, 7, 1, 1),
                                            "3x3s2": (24, 32, 9, 3, 2), "stem": (3, 16, 15, 7, 2)}.items():
    x = torch.randn(2, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, c, kernel, kernel, generator=g) / (c * kernel * kernel) ** 0.5
    b, pad = torch.randn(k, generator=g), kernel // 2
    r = torch.randn(2, k, (size + 2 * pad - kernel) // stride + 1, (size + 2 * pad - kernel) // stride + 1, generator=g)
    out = torch.ops.resnet_fused.conv_bias_act(x, w, b, [stride] * 2, [pad] * 2, 1, r, True)
    ref = (F.conv2d(x.double(), w.double(), b.double(), stride, pad) + r.double()).relu()
    errors[name] = ((out.double() - ref).abs().max() / ref.abs().max()).item()
print(json.dumps(errors))
"""


@pytest.mark.parametrize("isa", ["SSE41", "AVX2"])
def test_brgemm_core_under_a_capped_isa(isa):
    """oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, the switch that runs the AVX2 code on an AVX-512
    machine) still gives the convolution on the brgemm core, for Winograd and the implicit GEMM:
    below AVX2 oneDNN generates no brgemm and ATen's brgemm computes the GEMM another way."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, **{AVX2_CONV_ENV: "1", GEMM_CORE_ENV: "brgemm"})
    done = subprocess.run([sys.executable, "-c", CAPPED_ISA_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) == {"winograd", "1x1", "3x3s2", "stem"}
    assert all(e < 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("env, value", [(WINOGRAD_TILE_ENV, "3"), (WINOGRAD_TILE_ENV, "F4"), (GEMM_CORE_ENV, "mkl"),
                                        (GEMM_CORE_ENV, "1"), (THREAD_SPLIT_ENV, "rows"), (CPU_ISA_ENV, "avx512f")])
def test_switch_values_are_checked(env, value, monkeypatch, forced):
    monkeypatch.setenv(env, value)
    kernel = 1 if env == THREAD_SPLIT_ENV else 3
    x, weight, bias, residual, relu = make_case((1, 16, 32, 6, 7), (True, False, True), "channels_last", kernel=kernel)
    with pytest.raises(RuntimeError, match=env):
        conv(x, weight, bias, residual, relu)


def test_timing_keeps_one_transformed_weight(monkeypatch):
    """Both Winograd variants are timed on a shape's first call; the loser's transformed weight (an
    F(4x4) copy is 4x the weight) is dropped, the winner's kept."""
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    monkeypatch.delenv(WINOGRAD_TILE_ENV, raising=False)
    monkeypatch.setenv(extension.ONEDNN_FUSED_ENV, "0")  # the direct candidate packs nothing
    x, weight, bias, residual, relu = make_case((1, 32, 48, 11, 13), (True, True, True), "channels_last")
    weight.requires_grad_(False)
    gc.collect()
    before = torch.ops.resnet_fused.cpu_weight_cache_size()
    assert_close(conv(x, weight, bias, residual, relu), reference(x, weight, bias, residual, relu))
    gc.collect()
    held = torch.ops.resnet_fused.cpu_weight_cache_size() - before
    assert held == (1 if own_kernel_ran(lambda: conv(x, weight, bias, residual, relu)) else 0)


def test_timed_choices_are_listed(monkeypatch):
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    monkeypatch.delenv(WINOGRAD_TILE_ENV, raising=False)
    monkeypatch.delenv(GEMM_CORE_ENV, raising=False)
    x, weight, bias, residual, relu = make_case((1, 48, 32, 9, 10), (True, True, True), "channels_last")
    conv(x, weight, bias, residual, relu)
    lines = [line for line in extension.cpu_conv_choices() if line.startswith("x 1x48x9x10, weight 32x48x3x3, stride 1, padding 1, residual")]
    assert len(lines) == 1, extension.cpu_conv_choices()
    kernel = lines[0].split(": ")[1].split()[0]
    assert kernel in ("direct", "winograd_f2x2", "winograd_f4x4")
    assert (kernel != "direct") == own_kernel_ran(lambda: conv(x, weight, bias, residual, relu))


@pytest.mark.parametrize("env, setting, channels, marker", [
    (THREAD_SPLIT_ENV, "pixels", 40, "split channels"), (THREAD_SPLIT_ENV, "channels", 41, "split channels"),
    (GEMM_CORE_ENV, "own", 56, "brgemm"), (GEMM_CORE_ENV, "brgemm", 57, "brgemm")])
def test_switch_narrows_the_implicit_gemm_candidates(env, setting, channels, marker, monkeypatch):
    """Timed under RESNET_FUSED_THREAD_SPLIT (RESNET_FUSED_GEMM_CORE), an implicit-GEMM choice shares
    the work (runs its GEMMs) that way. Each setting on its own shape: the list does not name the
    setting a choice was made under."""
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    monkeypatch.setenv(env, setting)
    x, weight, bias, residual, relu = make_case((1, channels, 64, 5, 6), (True, True, True), "channels_last", kernel=1)
    assert_close(conv(x, weight, bias, residual, relu), reference(x, weight, bias, residual, relu))
    prefix = f"x 1x{channels}x5x6, weight 64x{channels}x1x1, stride 1, padding 0, residual"
    lines = [line for line in extension.cpu_conv_choices() if line.startswith(prefix)]
    assert len(lines) == 1, extension.cpu_conv_choices()
    kernel = lines[0].split(": ")[1].split()[0]
    assert kernel in ("direct", "implicit_gemm")
    if kernel == "implicit_gemm":
        assert (marker in lines[0]) == (setting in ("channels", "brgemm")), lines[0]


def test_many_pixel_fp32_convs_split_their_pixels_between_threads(monkeypatch):
    """Unforced, the fp32 implicit GEMM's timing offers the channel split only below 64 output pixels
    a thread (ops_cpu.cpp, kSplitChannelsBelowPixels): above, a thread would read every channel of
    an input the other core wrote. Shapes where the channel split wins when timed alone (resnet50's
    layer3 1x1 convs at batch 1: few pixels, many output channels)."""
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    monkeypatch.delenv(THREAD_SPLIT_ENV, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for channels, size in ((264, 14), (136, 12), (520, 12)):  # 196 and 144 pixels: >= 64 a thread
            case = make_case((1, channels, 1024, size, size), (True, True, True), "channels_last", kernel=1)
            assert_close(conv(*case), reference(*case))
            prefix = f"x 1x{channels}x{size}x{size}, weight 1024x{channels}x1x1,"
            lines = [line for line in extension.cpu_conv_choices() if line.startswith(prefix)]
            assert len(lines) == 1, extension.cpu_conv_choices()
            assert "split channels" not in lines[0], lines[0]
    finally:
        torch.set_num_threads(threads)


def test_implicit_gemm_core_is_timed_only_with_avx512(monkeypatch):
    """Unforced, the implicit GEMM runs brgemm only where the CPU has AVX-512 (there brgemm is wider
    code than our AVX2 kernel and is timed against it); Winograd's core is timed everywhere."""
    from resnet_fused.bench import cpu_flags

    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    monkeypatch.delenv(GEMM_CORE_ENV, raising=False)
    monkeypatch.delenv(THREAD_SPLIT_ENV, raising=False)
    for channels in (72, 88, 104, 120):  # shapes of their own, each timed on its first call
        case = make_case((1, channels, 64, 7, 5), (True, True, True), "channels_last", kernel=1)
        assert_close(conv(*case), reference(*case))
        prefix = f"x 1x{channels}x7x5, weight 64x{channels}x1x1,"
        lines = [line for line in extension.cpu_conv_choices() if line.startswith(prefix)]
        assert len(lines) == 1, extension.cpu_conv_choices()
        if "avx512f" not in cpu_flags():
            assert "brgemm" not in lines[0], lines[0]


def test_changed_switch_is_obeyed_after_timing(monkeypatch):
    """A shape timed under RESNET_FUSED_WINOGRAD_TILE=2 is timed again under =4, not served the
    F(2x2) choice: the switches are read on every call."""
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    monkeypatch.delenv(GEMM_CORE_ENV, raising=False)
    x, weight, bias, residual, relu = make_case((1, 32, 48, 7, 11), (True, False, True), "channels_last")
    ref = reference(x, weight, bias, residual, relu)
    kernels = []
    for tile in ("2", "4"):
        monkeypatch.setenv(WINOGRAD_TILE_ENV, tile)
        assert_close(conv(x, weight, bias, residual, relu), ref)
        lines = [line for line in extension.cpu_conv_choices() if line.startswith("x 1x32x7x11, weight 48x32x3x3,")]
        kernels = [line.split(": ")[1].split()[0] for line in lines]
        assert len(kernels) == int(tile) // 2, lines
    assert kernels.count("winograd_f2x2") <= 1 and kernels.count("winograd_f4x4") <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padding_is_part_of_the_timed_choice(dtype, monkeypatch):
    """Two 3x3 stride-1 convs on one input shape, padded 1 and 0, get a choice each: Winograd (which
    takes padding 1 only) chosen for the first must not serve the second. Before padding was in the
    key, a bf16 pair on a CPU with AVX512-BF16 ran the padding-0 call through Winograd's geometry and
    corrupted the heap."""
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    monkeypatch.delenv(WINOGRAD_TILE_ENV, raising=False)
    monkeypatch.delenv(GEMM_CORE_ENV, raising=False)
    case = to_dtype(make_case((1, 32, 32, 10, 10 + (dtype == torch.bfloat16)), (True, False, True), "channels_last"), dtype)
    for padding in (1, 0):
        assert_close(conv(*case, 1, padding), reference(*case, 1, padding))
    w = case[0].shape[-1]
    lines = [line for line in extension.cpu_conv_choices() if line.startswith(f"x 1x32x10x{w}, weight 32x32x3x3, stride 1,")]
    assert [line.split(", ")[3] for line in lines] == ["padding 0", "padding 1"], lines
    assert "winograd" not in lines[0], lines


@pytest.mark.parametrize(
    "case",
    ["groups2", "k_not_multiple_of_16", "float64"],
)
def test_not_applicable_falls_back(case, forced):
    """Forced on, calls our kernels cannot compute still go to the direct convolution, correctly."""
    x, weight, bias, _, _ = make_case((1, 16, 32, 6, 7), (True, False, True), "channels_last")
    stride, padding, groups = [1, 1], [1, 1], 1
    if case == "groups2":
        groups, weight = 2, weight[:, :8].contiguous()
    elif case == "k_not_multiple_of_16":
        weight, bias = weight[:24].contiguous(), bias[:24].contiguous()
    elif case == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()

    def call():
        return torch.ops.resnet_fused.conv_bias_act(x, weight, bias, stride, padding, groups, None, True)

    assert not own_kernel_ran(call)
    ref = reference_conv_bias_act(x, weight, bias, stride=stride, padding=padding, groups=groups)
    assert_close(call(), ref)


def test_switch_off_uses_direct(monkeypatch):
    monkeypatch.setenv(AVX2_CONV_ENV, "0")
    x, weight, bias, residual, relu = make_case((1, 16, 32, 6, 7), (True, True, True), "channels_last")
    assert not own_kernel_ran(lambda: conv(x, weight, bias, residual, relu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_winograd_off_takes_the_implicit_gemm(dtype, forced, monkeypatch):
    """RESNET_FUSED_WINOGRAD_TILE=off: a 3x3 stride-1 conv runs the implicit GEMM (the profiler
    scope of each kernel call names the kernel), with a direct convolution's rounding."""
    monkeypatch.setenv(WINOGRAD_TILE_ENV, "off")
    monkeypatch.setenv(CPU_ISA_ENV, "avx2")
    x, weight, bias, residual, relu = to_dtype(make_case((1, 16, 32, 6, 7), (True, True, True), "channels_last"), dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = conv(x, weight, bias, residual, relu)
    names = {e.name for e in prof.events()}
    assert "implicit_gemm" in names and not any(n.startswith("winograd") for n in names), names
    assert_close(out, reference(x, weight, bias, residual, relu))


@pytest.mark.parametrize("kernel", [3, 1])
def test_autotuned_choice_is_correct_and_stable(kernel, monkeypatch, nan_filled_empty_exact_fp32):
    """Unset, the first call of a shape times every candidate; every call is correct whichever
    wins, and later calls of the shape keep the first call's choice."""
    monkeypatch.delenv(AVX2_CONV_ENV, raising=False)
    x, weight, bias, residual, relu = make_case((2, 32, 64, 12, 10), (True, True, True), "channels_last", kernel=kernel)
    ref = reference(x, weight, bias, residual, relu)
    assert_close(conv(x, weight, bias, residual, relu), ref)
    first = own_kernel_ran(lambda: conv(x, weight, bias, residual, relu))
    for _ in range(2):
        assert own_kernel_ran(lambda: conv(x, weight, bias, residual, relu)) == first
    assert_close(conv(x, weight, bias, residual, relu), ref)


@pytest.mark.parametrize("kernel", [3, 1])
def test_weight_changed_in_place_is_seen(kernel, forced):
    """The packed weight is cached per weight; an in-place update must invalidate it."""
    x, weight, bias, residual, relu = make_case((1, 16, 32, 6, 6), (True, False, True), "channels_last", kernel=kernel)
    conv(x, weight, bias, residual, relu)
    weight.mul_(-1.5)
    assert_close(conv(x, weight, bias, residual, relu), reference(x, weight, bias, residual, relu))


@pytest.mark.parametrize("kernel", [3, 1])
def test_new_weight_at_a_freed_weights_address_is_not_confused(kernel, forced):
    """A weight freed and replaced by another of the same shape (often at the same address) must
    not be served the old weight's packed copy."""
    x, weight, bias, _, _ = make_case((1, 16, 32, 6, 6), (True, False, True), "channels_last", kernel=kernel)
    for seed in range(4):
        del weight
        weight = torch.randn(32, 16, kernel, kernel, generator=torch.Generator().manual_seed(seed)) / 12
        assert_close(conv(x, weight, bias, None, True), reference(x, weight, bias, None, True))


@pytest.mark.parametrize("kernel", [3, 1])
def test_weight_data_swap_is_seen(kernel, forced):
    """``p.data = t`` (what Module.to() does) keeps the tensor object and its version: the cache
    must notice the new storage."""
    x, weight, bias, _, _ = make_case((1, 16, 32, 5, 6), (True, False, True), "channels_last", kernel=kernel)
    conv(x, weight, bias, None, True)
    weight.data = torch.randn_like(weight)
    assert_close(conv(x, weight, bias, None, True), reference(x, weight, bias, None, True))


# The output pool (csrc/cpu/output_pool.h): our kernels' outputs are blocks reused once nobody
# else holds them.
POOL_CASE = ((2, 16, 32, 8, 8), (True, True, True))


def pool_bytes(in_use: bool) -> int:
    return torch.ops.resnet_fused.cpu_output_pool_bytes(in_use)


def test_pool_reuses_a_freed_output(forced):
    x, weight, bias, residual, relu = make_case(*POOL_CASE, "channels_last")
    first = conv(x, weight, bias, residual, relu)
    address = first.data_ptr()
    del first
    x2, weight2, bias2, residual2, _ = make_case(*POOL_CASE, "channels_last", seed=1)
    second = conv(x2, weight2, bias2, residual2, relu)
    assert second.data_ptr() == address
    assert second.is_contiguous(memory_format=torch.channels_last)
    assert_close(second, reference(x2, weight2, bias2, residual2, relu))


def empty_pool(monkeypatch):
    """Drops every free block (a call with the budget at 0 trims them all), then restores the default."""
    monkeypatch.setenv(extension.CPU_POOL_ENV, "0")
    x, weight, bias, residual, relu = make_case(*POOL_CASE, "channels_last")
    conv(x, weight, bias, residual, relu)
    monkeypatch.delenv(extension.CPU_POOL_ENV)
    assert pool_bytes(in_use=False) == 0


def conv_output(h, seed):
    """A fresh (8, 32, h, h) conv output, checked against the float64 reference."""
    x, weight, bias, residual, relu = make_case((8, 16, 32, h, h), (True, True, True), "channels_last", seed=seed)
    out = conv(x, weight, bias, residual, relu)
    assert_close(out, reference(x, weight, bias, residual, relu))
    return out


def test_pool_serves_a_smaller_output_from_the_smallest_free_block_that_holds_it(monkeypatch, forced):
    # Under the `forced` fixture new and reused blocks read as NaN until written, so assert_close
    # also sees that every element of the smaller output in the larger block was written.
    empty_pool(monkeypatch)
    # data_ptr() of the tensors (their storage offset is 0): a Python storage object made by
    # untyped_storage() would hold the block until the garbage collector ran.
    large, medium = conv_output(24, seed=1), conv_output(20, seed=2)
    large_block, medium_block = large.data_ptr(), medium.data_ptr()
    del large, medium
    small = conv_output(16, seed=3)  # 256 KiB in the 400 KiB block, not the 576 KiB one
    assert small.data_ptr() == medium_block
    assert small.is_contiguous(memory_format=torch.channels_last)
    next_small = conv_output(16, seed=4)  # the medium block is held: the large one
    assert next_small.data_ptr() == large_block
    # Pointers, not pool_bytes totals: blocks held by tensors outside this test count too (CI,
    # CPU-only torch 2.13: 29 KB more in use than this test's two blocks).


def test_pool_never_serves_an_output_from_a_block_over_four_times_its_size(monkeypatch, forced):
    empty_pool(monkeypatch)
    large = conv_output(24, seed=1)
    block = large.data_ptr()
    del large
    tiny = conv_output(8, seed=2)  # 64 KiB: the 576 KiB block is 9 times that
    assert tiny.data_ptr() != block


@pytest.mark.parametrize("held", ["tensor", "view"])
def test_pool_never_hands_out_a_held_output(held, forced):
    x, weight, bias, residual, relu = make_case(*POOL_CASE, "channels_last")
    first = conv(x, weight, bias, residual, relu)
    kept = first if held == "tensor" else first[1:, :5]
    saved = kept.clone()
    del first
    x2, weight2, bias2, residual2, _ = make_case(*POOL_CASE, "channels_last", seed=1)
    second = conv(x2, weight2, bias2, residual2, relu)
    assert second.untyped_storage().data_ptr() != kept.untyped_storage().data_ptr()
    assert torch.equal(kept, saved)
    assert_close(second, reference(x2, weight2, bias2, residual2, relu))


def test_pool_off_keeps_nothing(monkeypatch, forced):
    monkeypatch.setenv(extension.CPU_POOL_ENV, "0")
    x, weight, bias, residual, relu = make_case(*POOL_CASE, "channels_last")
    out = conv(x, weight, bias, residual, relu)
    assert_close(out, reference(x, weight, bias, residual, relu))
    del out
    assert pool_bytes(in_use=False) == 0


def test_pool_budget_bounds_the_free_blocks(monkeypatch, forced):
    monkeypatch.setenv(extension.CPU_POOL_ENV, "1")
    largest = 0
    for h in (48, 56, 64, 72):  # outputs of 0.6 to 1.3 MiB, each a new size
        x, weight, bias, residual, relu = make_case((1, 16, 64, h, h), (True, False, True), "channels_last", seed=h)
        out = conv(x, weight, bias, residual, relu)
        assert_close(out, reference(x, weight, bias, residual, relu))
        largest = max(largest, out.untyped_storage().nbytes())
        del out
        # Trimmed before the new output was added; that output is free again now.
        assert pool_bytes(in_use=False) <= (1 << 20) + largest


@pytest.mark.parametrize("value", ["-1", "lots", "1.5"])
def test_pool_budget_must_be_a_whole_number(value, monkeypatch, forced):
    monkeypatch.setenv(extension.CPU_POOL_ENV, value)
    x, weight, bias, residual, relu = make_case(*POOL_CASE, "channels_last")
    with pytest.raises(RuntimeError, match=extension.CPU_POOL_ENV):
        conv(x, weight, bias, residual, relu)


def test_pool_is_safe_across_threads(forced):
    from concurrent.futures import ThreadPoolExecutor

    cases = [make_case(*POOL_CASE, "channels_last", seed=seed) for seed in range(4)]
    expected = [reference(*case) for case in cases]

    def run(i):
        # Each thread keeps its outputs until checked, while the others free theirs into the pool.
        return [conv(*cases[i % 4]) for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        for i, outs in enumerate(pool.map(run, range(16))):
            assert len({o.data_ptr() for o in outs}) == 3
            for out in outs:
                assert_close(out, expected[i % 4])
