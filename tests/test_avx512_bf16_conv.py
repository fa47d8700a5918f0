"""Our kernels on the bf16 GEMM core (csrc/cpu/avx512_gemm.h), on CPUs with AVX512-BF16: the
implicit GEMM on bf16 operands (fp32 sums, the epilogue in fp32, one rounding to bf16) and Winograd
F(2x2, 3x3) with its transformed points rounded to bf16. RESNET_FUSED_AVX2_CONV=1 picks them first
for bf16 calls on such a CPU (Winograd for 3x3 stride 1 unless RESNET_FUSED_WINOGRAD_TILE=off);
RESNET_FUSED_CPU_ISA=avx2 takes them out (the fp32 kernels on converted activations, as on an
AVX2-only CPU); these tests set RESNET_FUSED_CPU_ISA=avx512, which keeps AMX out (a CPU with AMX-BF16
would take the AMX implicit GEMM first: test_amx_conv.py). Skipped, saying so, where the CPU lacks AVX512-BF16: there they are never
candidates (test_avx2_conv.py covers what such CPUs run)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import bench
from resnet_fused.accuracy import judge
from resnet_fused.backends import extension
from resnet_fused.reference import random_model
from test_avx2_conv import FLAGS, SHAPES, SHAPES_IGEMM, conv, make_case, own_kernel_ran, reference, to_dtype
from utils import assert_close, assert_within_eager_error

pytestmark = [
    pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded"),
    pytest.mark.skipif("avx512_bf16" not in bench.cpu_flags(),
                       reason="this CPU has no AVX512-BF16: the native bf16 kernel never runs here"),
]

# Every implicit-GEMM shape (1x1, strided, the few-channel stem with merged filter rows, odd C:
# the lone last channel), and the 3x3 stride-1 shapes Winograd takes in fp32: the native kernel is
# a candidate for those too.
CASES = [tuple(s) for s in SHAPES_IGEMM] + [(*s, 3, 1, 1) for s in SHAPES]


def kernel_ran(call, kernel: str = "implicit_gemm_bf16") -> bool:
    """own_kernel_ran after a first, unprofiled call (it packs the weight and, unforced, times the
    candidates, the direct convolution among them)."""
    call()
    return own_kernel_ran(call, kernel)


@pytest.fixture
def native(monkeypatch, nan_filled_empty_exact_fp32):
    """Forced onto the bf16 implicit GEMM, 3x3 stride-1 convs included (no Winograd), off AMX."""
    monkeypatch.setenv(extension.AVX2_CONV_ENV, "1")
    monkeypatch.setenv(extension.WINOGRAD_TILE_ENV, "off")
    monkeypatch.setenv(extension.CPU_ISA_ENV, "avx512")


@pytest.fixture
def winograd_bf16(monkeypatch, nan_filled_empty_exact_fp32):
    monkeypatch.setenv(extension.AVX2_CONV_ENV, "1")
    monkeypatch.setenv(extension.WINOGRAD_TILE_ENV, "2")
    monkeypatch.setenv(extension.CPU_ISA_ENV, "avx512")


def bf16_case(case, flags, layout="channels_last", seed=0):
    *dims, kernel, stride, padding = case
    made = make_case(dims, flags, layout, seed=seed, kernel=kernel, stride=stride, padding=padding)
    return (*to_dtype(made[:4], torch.bfloat16), made[4]), stride, padding


@pytest.mark.parametrize("split", ["pixels", "channels"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("flags", FLAGS, ids=["bias_relu", "bias_res_relu", "res", "bias"])
@pytest.mark.parametrize("case", CASES, ids=[f"n{n}c{c}k{k}_{h}x{w}_{r}x{r}s{s}p{p}" for n, c, k, h, w, r, s, p in CASES])
def test_native_bf16_matches_float64(case, flags, layout, split, native, monkeypatch):
    """Within bf16's tolerance of float64 and within twice eager bf16's own error; every element written."""
    monkeypatch.setenv(extension.THREAD_SPLIT_ENV, split)
    (x, weight, bias, residual, relu), stride, padding = bf16_case(case, flags, layout)
    call = lambda: conv(x, weight, bias, residual, relu, stride, padding)  # noqa: E731
    assert kernel_ran(call)
    out = call()
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.contiguous_format if layout == "nchw" else torch.channels_last)
    ref = reference(x, weight, bias, residual, relu, stride, padding)
    assert_close(out, ref)
    eager = F.conv2d(x, weight, bias, stride, padding)
    eager = eager + residual if residual is not None else eager
    assert_within_eager_error(out, eager.relu() if relu else eager, ref)


# C = 29: the 16-lane, 8-lane and one-channel loops of the transforms (winograd_tiles.h) in one call.
WINOGRAD_SHAPES = SHAPES + [(1, 29, 32, 6, 7)]


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("flags", FLAGS, ids=["bias_relu", "bias_res_relu", "res", "bias"])
@pytest.mark.parametrize("shape", WINOGRAD_SHAPES, ids=[f"n{n}c{c}k{k}_{h}x{w}" for n, c, k, h, w in WINOGRAD_SHAPES])
def test_winograd_bf16_matches_float64(shape, flags, layout, winograd_bf16):
    """F(2x2) on the bf16 core (odd sizes: partial tiles; odd C: the lone last channel): within
    bf16's tolerance of float64, and within 3x eager bf16's error on one conv. WHY 3x: eager rounds
    a lone conv once, while F(2x2) also rounds its transformed inputs and weights to bf16 (measured
    here 2.0-2.5x eager's error per conv; whole models, where eager rounds after every op, stay
    within 2x eager's: test_bf16_model_on_the_bf16_core)."""
    (x, weight, bias, residual, relu), stride, padding = bf16_case((*shape, 3, 1, 1), flags, layout)
    call = lambda: conv(x, weight, bias, residual, relu, stride, padding)  # noqa: E731
    assert kernel_ran(call, "winograd_f2x2_bf16")
    # Finite inputs: no output flagged non-finite, so no redo by the implicit GEMM (winograd.h).
    assert not own_kernel_ran(call, "implicit_gemm_bf16")
    out = call()
    assert out.dtype == torch.bfloat16
    ref = reference(x, weight, bias, residual, relu, stride, padding)
    assert_close(out, ref)
    eager = F.conv2d(x, weight, bias, stride, padding)
    eager = eager + residual if residual is not None else eager
    assert_within_eager_error(out, eager.relu() if relu else eager, ref, factor=3.0)


def test_native_bf16_rounds_once(native):
    """The fp32 sums rounded once: against float64 on the same bf16 operands, at most half a bf16
    ulp plus fp32 summation error (a second rounding, e.g. of the conv before the residual add,
    would reach a whole ulp)."""
    (x, weight, bias, residual, relu), stride, padding = bf16_case((2, 64, 32, 7, 6, 3, 1, 1), (True, True, False))
    out = conv(x, weight, bias, residual, relu, stride, padding).double()
    ref = reference(x, weight, bias, residual, relu, stride, padding).double()
    ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref)[1] - 8)  # bf16 keeps 8 significant bits
    assert ((out - ref).abs() <= 0.5 * ulp + 1e-5 * ref.abs().amax()).all()


def test_lone_last_channel_reads_no_neighbour(native):
    """An odd channel count's last channel is broadcast alone: a NaN in the next pixel's first
    channel must not reach this pixel (a 32-bit read of the last channel would pull it in, and
    NaN times the padded zero weight is NaN)."""
    (x, weight, bias, _, relu), _, _ = bf16_case((1, 5, 16, 3, 4, 1, 1, 0), (True, False, True))
    x = x.contiguous(memory_format=torch.channels_last)
    x[0, 0, 1, 2] = float("nan")
    out = conv(x, weight, bias, None, relu, 1, 0)
    assert torch.isnan(out[0, :, 1, 2]).all()
    nan = torch.isnan(out)
    assert nan.sum() == 16, "only the corrupted pixel's outputs are NaN"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_bf16_any_thread_count(threads, native):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (x, weight, bias, residual, relu), stride, padding = bf16_case((2, 48, 64, 13, 11, 3, 1, 1), (True, True, True))
        assert_close(conv(x, weight, bias, residual, relu, stride, padding),
                     reference(x, weight, bias, residual, relu, stride, padding))
    finally:
        torch.set_num_threads(previous)


def test_isa_switch_takes_the_native_kernel_out(native, monkeypatch):
    (x, weight, bias, residual, relu), stride, padding = bf16_case((1, 32, 32, 6, 5, 1, 1, 0), (True, True, True))
    monkeypatch.setenv(extension.CPU_ISA_ENV, "avx2")
    call = lambda: conv(x, weight, bias, residual, relu, stride, padding)  # noqa: E731
    assert own_kernel_ran(call) and not kernel_ran(call)
    monkeypatch.setenv(extension.CPU_ISA_ENV, "avx512f")
    with pytest.raises(RuntimeError, match="RESNET_FUSED_CPU_ISA must be avx2, avx512 or auto"):
        call()


def test_native_bf16_is_a_timed_candidate(monkeypatch):
    """Timed (no switch): every bf16 shape's choice is listed, and one where bf16's doubled rate
    has nothing to beat but conversions (1x1, many channels) may take it; whichever wins is exact
    to bf16's tolerance."""
    monkeypatch.delenv(extension.AVX2_CONV_ENV, raising=False)
    monkeypatch.delenv(extension.CPU_ISA_ENV, raising=False)
    (x, weight, bias, residual, relu), stride, padding = bf16_case((1, 256, 256, 14, 13, 1, 1, 0), (True, True, True))
    assert_close(conv(x, weight, bias, residual, relu, stride, padding),
                 reference(x, weight, bias, residual, relu, stride, padding))
    lines = [line for line in extension.cpu_conv_choices()
             if line.startswith("x 1x256x14x13, weight 256x256x1x1, stride 1, padding 0, residual, BFloat16,")]
    assert len(lines) == 1, lines


@pytest.mark.parametrize("winograd", ["off", "2"], ids=["implicit_gemm", "winograd"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_bf16_model_on_the_bf16_core(arch, winograd, native, monkeypatch):
    """A whole bf16 model with every conv on the bf16 core (3x3 stride 1 on the implicit GEMM or on
    Winograd): within twice eager bf16's error."""
    monkeypatch.setenv(extension.WINOGRAD_TILE_ENV, winograd)
    model = random_model(arch, calibration_size=16)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    fused = resnet_fused.fuse(model, backend="extension", dtype=torch.bfloat16)
    with torch.inference_mode():
        assert kernel_ran(lambda: fused(x))
        assert (winograd == "2") == kernel_ran(lambda: fused(x), "winograd_f2x2_bf16")
        out = fused(x)
        eager = copy.deepcopy(model).bfloat16()(x)
        ref = copy.deepcopy(model).double()(x.double())
    verdict = judge(out, eager, ref)
    assert verdict.ok, verdict


def test_amx_kernel_on_emulated_tiles():
    """The AMX implicit GEMM's row handling (rows in place or copied, the padded input, taps side by
    side, the row map, the epilogue) on any CPU with AVX512-BF16: tests/test_amx_conv.py in a fresh
    process with RESNET_FUSED_AMX_EMULATE=1 (read once per process), the tile instructions replaced
    by scalar code computing the same sums."""
    tests = Path(__file__).parent
    env = dict(os.environ, RESNET_FUSED_AMX_EMULATE="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_amx_conv.py")],
                          env=env, cwd=tests.parent, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-1000:]
