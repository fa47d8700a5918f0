"""The implicit GEMM on AMX tiles (csrc/cpu/amx_gemm.h), on CPUs with AMX-BF16 (Intel Xeon from
Sapphire Rapids on): bf16 operands, fp32 sums in the tiles started from the bias, the epilogue in
fp32 and one rounding to bf16, for bf16 convs (a tap's channels zero-padded to whole 32-channel
chunks where they are not). RESNET_FUSED_AVX2_CONV=1 picks it first (3x3 stride 1 too, with
RESNET_FUSED_WINOGRAD_TILE=off); RESNET_FUSED_CPU_ISA=avx512 takes it out. Skipped, saying so, where
the CPU lacks AMX-BF16, unless RESNET_FUSED_AMX_EMULATE=1 replaces the tile instructions by scalar
code (CPUs with AVX512-BF16): test_avx512_bf16_conv.py runs this file so on every such CPU."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import bench
from resnet_fused.accuracy import judge
from resnet_fused.backends import extension
from resnet_fused.reference import random_model
from test_avx2_conv import FLAGS, conv, own_kernel_ran, reference
from test_avx512_bf16_conv import bf16_case, kernel_ran
from utils import assert_close, assert_within_eager_error

EMULATED = os.environ.get("RESNET_FUSED_AMX_EMULATE") == "1" and "avx512_bf16" in bench.cpu_flags()
pytestmark = [
    pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded"),
    pytest.mark.skipif(not {"amx_tile", "amx_bf16"} <= set(bench.cpu_flags()) and not EMULATED,
                       reason="this CPU has no AMX-BF16: the AMX kernel never runs here "
                              "(test_avx512_bf16_conv.py runs these tests on emulated tiles)"),
]

KERNEL = "implicit_gemm_amx"

# (n, c, k, h, w, kernel, stride, padding). Row groups of 16 output pixels read in place (1x1
# stride 1; KxK stride 1 over the zero-padded copy, with padding or without) or copied (stride 2,
# the item's last partial group);
# an odd count of 16-channel panels (k = 48, 16) leaves one panel alone; stride 2; 5x5; channels
# that are not whole 32-channel chunks, padded with zeros in the copy (48, 5, and 6 with 7-pixel
# filter rows: 42 values). Inputs of few channels whose merged filter rows fit a tile row once
# widened read in place, one tap per filter row (the stem's 3 widened to 4: 7 x 4 values; 3 in
# 3x3: 12; 8 in 3x3 stride 2: 24, not widened; 5 in 5x5: 30), output rows of 11, 16 (whole row
# groups) and 20 pixels.
CASES = [
    (1, 3, 64, 23, 21, 7, 2, 3),
    (2, 3, 64, 32, 32, 7, 2, 3),
    (1, 3, 32, 9, 20, 3, 1, 1),
    (2, 8, 16, 10, 11, 3, 2, 1),
    (1, 5, 48, 9, 11, 5, 1, 2),
    (1, 6, 32, 9, 9, 7, 1, 3),
    (2, 48, 32, 7, 6, 3, 1, 1),
    (1, 5, 16, 8, 9, 1, 1, 0),
    (2, 32, 32, 5, 7, 1, 1, 0),
    (1, 64, 64, 56, 3, 1, 1, 0),
    (1, 64, 2048, 3, 3, 1, 1, 0),
    (2, 32, 16, 17, 16, 1, 2, 0),
    (1, 64, 48, 13, 14, 3, 1, 1),
    (1, 32, 32, 20, 20, 3, 1, 1),
    (2, 32, 32, 7, 6, 3, 1, 0),
    (3, 32, 64, 9, 7, 3, 2, 1),
    (2, 96, 32, 8, 9, 5, 1, 2),
    (1, 128, 256, 6, 5, 3, 1, 1),
]
IDS = [f"n{n}c{c}k{k}_{h}x{w}_{r}x{r}s{s}p{p}" for n, c, k, h, w, r, s, p in CASES]


@pytest.fixture
def amx(monkeypatch, nan_filled_empty_exact_fp32):
    """Forced onto our kernels with no Winograd: bf16 convs that fit take the AMX implicit GEMM."""
    monkeypatch.setenv(extension.AVX2_CONV_ENV, "1")
    monkeypatch.setenv(extension.WINOGRAD_TILE_ENV, "off")
    monkeypatch.delenv(extension.CPU_ISA_ENV, raising=False)


@pytest.mark.parametrize("split", ["pixels", "channels"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("flags", FLAGS, ids=["bias_relu", "bias_res_relu", "res", "bias"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_amx_matches_float64(case, flags, layout, split, amx, monkeypatch):
    """Within bf16's tolerance of float64 and within twice eager bf16's own error; every element
    written (outputs start as NaN)."""
    monkeypatch.setenv(extension.THREAD_SPLIT_ENV, split)
    (x, weight, bias, residual, relu), stride, padding = bf16_case(case, flags, layout)
    call = lambda: conv(x, weight, bias, residual, relu, stride, padding)  # noqa: E731
    assert kernel_ran(call, KERNEL)
    out = call()
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    ref = reference(x, weight, bias, residual, relu, stride, padding)
    assert_close(out, ref)
    eager = F.conv2d(x, weight, bias, stride, padding)
    eager = eager + residual if residual is not None else eager
    assert_within_eager_error(out, eager.relu() if relu else eager, ref)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_amx_matches_the_bf16_core(case, amx, monkeypatch):
    """The AMX tiles and the AVX512-BF16 core both sum bf16 products in fp32 and round once: their
    outputs differ by at most one bf16 ulp (the summation order)."""
    (x, weight, bias, residual, relu), stride, padding = bf16_case(case, (True, True, True), seed=4)
    out = conv(x, weight, bias, residual, relu, stride, padding).float()
    monkeypatch.setenv(extension.CPU_ISA_ENV, "avx512")
    assert kernel_ran(lambda: conv(x, weight, bias, residual, relu, stride, padding), "implicit_gemm_bf16")
    core = conv(x, weight, bias, residual, relu, stride, padding).float()
    ulp = torch.ldexp(torch.ones_like(core), torch.frexp(core)[1] - 8)
    assert ((out - core).abs() <= ulp).all()


def test_amx_rounds_once(amx):
    """Half a bf16 ulp of float64 on the same operands, plus fp32 summation error: a second
    rounding (of the conv before the residual add, say) would reach a whole ulp."""
    (x, weight, bias, residual, relu), stride, padding = bf16_case((2, 64, 32, 7, 6, 3, 1, 1), (True, True, False))
    out = conv(x, weight, bias, residual, relu, stride, padding).double()
    ref = reference(x, weight, bias, residual, relu, stride, padding).double()
    ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref)[1] - 8)
    assert ((out - ref).abs() <= 0.5 * ulp + 1e-5 * ref.abs().amax()).all()


@pytest.mark.parametrize("where", [(0, 0), (3, 2), (55, 2)], ids=["first", "inside", "last"])
def test_amx_nan_stays_in_its_pixel(where, amx):
    """A NaN input pixel of a 1x1 conv gives NaN in that output pixel's channels only: in a row
    group read in place (the first 16 pixels, the middle), and in the last, gathered one (a tile
    reads 16 rows: the rows past the item's end are zeros, never the next pixels)."""
    (x, weight, bias, _, relu), _, _ = bf16_case((1, 64, 48, 56, 3, 1, 1, 0), (True, False, False))
    x = x.contiguous(memory_format=torch.channels_last)
    x[0, 5, where[0], where[1]] = float("nan")
    out = conv(x, weight, bias, None, relu, 1, 0)
    assert torch.isnan(out[0, :, where[0], where[1]]).all()
    assert torch.isnan(out).sum() == 48, "only the corrupted pixel's outputs are NaN"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_any_thread_count(threads, amx):
    """Each thread loads the tile configuration before its items and releases the tiles after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (x, weight, bias, residual, relu), stride, padding = bf16_case((2, 64, 48, 13, 11, 3, 1, 1), (True, True, True))
        call = lambda: conv(x, weight, bias, residual, relu, stride, padding)  # noqa: E731
        assert kernel_ran(call, KERNEL)
        assert_close(call(), reference(x, weight, bias, residual, relu, stride, padding))
    finally:
        torch.set_num_threads(previous)


def test_isa_switch_takes_amx_out(amx, monkeypatch):
    (x, weight, bias, residual, relu), stride, padding = bf16_case((1, 32, 32, 6, 5, 1, 1, 0), (True, True, True))
    call = lambda: conv(x, weight, bias, residual, relu, stride, padding)  # noqa: E731
    assert kernel_ran(call, KERNEL)
    monkeypatch.setenv(extension.CPU_ISA_ENV, "avx512")
    assert kernel_ran(call, "implicit_gemm_bf16") and not own_kernel_ran(call, KERNEL)


@pytest.mark.skipif(EMULATED, reason="the emulated tiles are scalar code: timing would never pick them")
def test_amx_wins_the_timing_of_a_wide_conv(monkeypatch, nan_filled_empty_exact_fp32):
    """Timed (no switch), a 1x1 conv over 512 channels, where the tiles have the most to win (5-7x
    the AVX512-BF16 core hot on the Xeon measured, 1.5-4x oneDNN's AMX call): AMX is chosen, and the
    result is exact to bf16's tolerance. (test_avx512_bf16_conv.py's timed test covers the listing.)"""
    monkeypatch.delenv(extension.AVX2_CONV_ENV, raising=False)
    monkeypatch.delenv(extension.CPU_ISA_ENV, raising=False)
    (x, weight, bias, residual, relu), stride, padding = bf16_case((1, 512, 512, 9, 7, 1, 1, 0), (True, True, True))
    call = lambda: conv(x, weight, bias, residual, relu, stride, padding)  # noqa: E731
    assert kernel_ran(call, KERNEL)
    assert_close(call(), reference(x, weight, bias, residual, relu, stride, padding))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_bf16_model_on_amx(arch, amx):
    """A whole bf16 model with every conv on AMX (the stem's merged taps side by side): within twice
    eager bf16's error."""
    model = random_model(arch, calibration_size=16)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    fused = resnet_fused.fuse(model, backend="extension", dtype=torch.bfloat16)
    with torch.inference_mode():
        assert kernel_ran(lambda: fused(x), KERNEL)
        out = fused(x)
        eager = copy.deepcopy(model).bfloat16()(x)
        ref = copy.deepcopy(model).double()(x.double())
    verdict = judge(out, eager, ref)
    assert verdict.ok, verdict


def test_padded_channels_read_no_neighbour(amx):
    """5 channels are padded to a 32-channel chunk with zeros in the copy: a NaN in the next
    pixel's first channel must not reach this pixel (reading 32 channels in place would pull it
    in, and NaN times the padded zero weight is NaN)."""
    (x, weight, bias, _, relu), _, _ = bf16_case((1, 5, 16, 3, 4, 1, 1, 0), (True, False, True))
    x = x.contiguous(memory_format=torch.channels_last)
    x[0, 0, 1, 2] = float("nan")
    call = lambda: conv(x, weight, bias, None, relu, 1, 0)  # noqa: E731
    assert kernel_ran(call, KERNEL)
    out = call()
    assert torch.isnan(out[0, :, 1, 2]).all()
    assert torch.isnan(out).sum() == 16, "only the corrupted pixel's outputs are NaN"
