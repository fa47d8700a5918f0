"""NaN and Inf inputs give eager's NaNs on every CPU backend and every kernel the extension can pick.

A corrupted sample must come out as NaN, exactly where eager PyTorch gives NaN, and must leave the
other samples' outputs as they would be: per kernel path (each forced through the extension's
switches), and through whole models. And since the extension picks a kernel per shape by timing
it, every choice must give the same results within the dtype's tolerance.

Eager's NaN pattern is well defined: a convolution sums products, so an output is NaN exactly when
its receptive field holds a NaN, an Inf times a zero weight, or Infs of both signs, whatever the
order of the sum; otherwise an Inf gives +-Inf. (Finite values that overflow a sum could differ
between summation orders; the inputs here stay far from that.)
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused import bench
from resnet_fused.accuracy import judge
from resnet_fused.backends import extension, onednn
from resnet_fused.reference import random_model
from test_avx2_conv import own_kernel_ran
from utils import assert_close, reference_conv_bias_act

needs_ext = pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded")

BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# Runs over every path take +Inf only: -Inf goes through the same code with the other sign, and the
# tests of our kernels and of the epilogue take it too.
BAD_ON_EVERY_PATH = ["nan", "inf"]

# Every CPU conv path: (backend, RESNET_FUSED_AVX2_CONV, RESNET_FUSED_ONEDNN_FUSED). For the
# extension, "ours" forces our AVX2 kernels (Winograd for 3x3 stride 1, the implicit GEMM for the
# rest) where they apply and oneDNN elsewhere; "ours_aten" the same with ATen's convolution
# elsewhere; "auto" times the candidates per shape, as users run it.
PATHS = {
    "ext_ours": ("extension", "1", "1"),
    "ext_ours_winograd4": ("extension", "1", "1", "4"),
    "ext_ours_aten": ("extension", "1", "0"),
    "ext_onednn": ("extension", "0", "1"),
    "ext_aten_epilogue": ("extension", "0", "0"),
    "ext_auto": ("extension", "auto", "auto"),
    "onednn": ("onednn", None, None),
    "torch": ("torch", None, None),
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch, nan_filled_empty_exact_fp32):
    backend, avx2, fused, *tile = PATHS[request.param]
    if tile:
        monkeypatch.setenv(extension.WINOGRAD_TILE_ENV, tile[0])
    if backend == "extension" and extension.load_error() is not None:
        pytest.skip(f"resnet_fused._C is not loaded: {extension.load_error()}")
    if backend == "onednn" and onednn.unavailable_reason("cpu", torch.float32) is not None:
        pytest.skip(f"onednn backend unavailable: {onednn.unavailable_reason('cpu', torch.float32)}")
    if avx2 is not None:
        monkeypatch.setenv(extension.AVX2_CONV_ENV, avx2)
        monkeypatch.setenv(extension.ONEDNN_FUSED_ENV, fused)
    return request.param


def assert_same_non_finite(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """NaN, +Inf and -Inf exactly where `expected` has them."""
    out, expected = out.double(), expected.double()
    for name, test in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")), ("-Inf", lambda t: t == -float("inf"))):
        got, want = test(out), test(expected)
        assert torch.equal(got, want), (
            f"{what}: {name} at {int(got.sum())} positions, eager has {int(want.sum())}; "
            f"{int((got & ~want).sum())} extra, {int((want & ~got).sum())} missing"
        )


def assert_finite_part_close(out: torch.Tensor, reference: torch.Tensor) -> None:
    finite = torch.isfinite(reference)
    assert_close(out.double()[finite], reference[finite], dtype=out.dtype)


# ---- One conv per kernel path.

# name: (in channels, out channels, kernel, stride, padding, groups, H, W). Odd sizes: Winograd's
# edge tiles are partial. The stem (3 input channels) takes the implicit GEMM's merged-row path;
# grouped convs and 24 output channels only the direct ones.
SHAPES = {
    "3x3s1": (16, 32, 3, 1, 1, 1, 9, 11),
    "3x3s2": (16, 32, 3, 2, 1, 1, 9, 11),
    "1x1s1": (32, 16, 1, 1, 0, 1, 7, 6),
    "stem7x7s2": (3, 16, 7, 2, 3, 1, 17, 15),
    "grouped3x3": (16, 32, 3, 1, 1, 4, 8, 9),
    "k24": (16, 24, 3, 1, 1, 1, 7, 7),
    # Input channels a multiple of 32: the AMX implicit GEMM's (its 1x1 reads whole row groups in place).
    "3x3s1c32": (32, 32, 3, 1, 1, 1, 9, 11),
    "1x1s1c64": (64, 48, 1, 1, 0, 1, 7, 6),
}
# name: (bias, residual, relu)
FLAGS = {"bias_relu": (True, False, True), "bias_res_relu": (True, True, True), "bias": (True, False, False)}


def make_case(shape_name, flags_name, layout, seed=0):
    c, k, r, stride, padding, groups, h, w = SHAPES[shape_name]
    with_bias, with_residual, relu = FLAGS[flags_name]
    g = torch.Generator().manual_seed(seed)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, c, h, w, generator=g).contiguous(memory_format=memory_format)
    weight = torch.randn(k, c // groups, r, r, generator=g) / (c // groups * r * r) ** 0.5
    bias = 0.5 * torch.randn(k, generator=g) if with_bias else None
    p, q = (h + 2 * padding - r) // stride + 1, (w + 2 * padding - r) // stride + 1
    residual = torch.randn(2, k, p, q, generator=g).contiguous(memory_format=memory_format) if with_residual else None
    return x, weight, bias, dict(stride=stride, padding=padding, groups=groups, residual=residual, relu=relu)


def corrupt(t: torch.Tensor, value: float) -> torch.Tensor:
    """Sample 1 with `value` at an interior pixel and at a corner (an edge tile), in two channels."""
    t = t.clone()
    _, c, h, w = t.shape
    t[1, c // 2, h // 2, w // 2] = value
    t[1, c - 1, h - 1, 0] = value
    return t


def eager_conv(x, weight, bias, stride, padding, groups, residual, relu):
    out = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    if residual is not None:
        out = out + residual
    return out.relu() if relu else out


def fused_conv(backend, x, weight, bias, kwargs):
    return resnet_fused.ops.conv_bias_act(x, weight, bias, backend=backend, **kwargs)


# (flags, which tensor is corrupted)
CORRUPTED = [("bias_relu", "input"), ("bias", "input"), ("bias_res_relu", "input"), ("bias_res_relu", "residual")]


@pytest.mark.parametrize("bad", BAD_ON_EVERY_PATH)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("flags, where", CORRUPTED, ids=[f"{f}-{w}" for f, w in CORRUPTED])
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_non_finite_like_eager(shape, flags, where, layout, bad, path):
    x, weight, bias, kwargs = make_case(shape, flags, layout)
    if where == "input":
        x = corrupt(x, BAD_VALUES[bad])
    else:
        kwargs["residual"] = corrupt(kwargs["residual"], BAD_VALUES[bad])
    backend = PATHS[path][0]
    out = fused_conv(backend, x, weight, bias, kwargs)
    expected = eager_conv(x, weight, bias, **kwargs)
    assert_same_non_finite(out, expected, f"{path} {shape} {flags}")
    assert torch.isfinite(out[0]).all(), "the clean sample must stay finite"
    assert_finite_part_close(out, reference_conv_bias_act(x, weight, bias, **kwargs))


# (shape, kernel, dtype): every kernel of ours in fp32 and in bf16 (converted), and the native bf16 one.
OWN_KERNEL_CASES = [
    (shape, kernel, dtype)
    for shape, kernel in [("3x3s1", "winograd2"), ("3x3s1", "winograd4"), ("3x3s1", "winograd4_brgemm"),
                          ("3x3s2", "implicit_gemm"), ("stem7x7s2", "implicit_gemm"),
                          ("3x3s2", "implicit_gemm_brgemm"), ("stem7x7s2", "implicit_gemm_brgemm")]
    for dtype in (torch.float32, torch.bfloat16)
] + [
    pytest.param(shape, kernel, torch.bfloat16,
                 marks=pytest.mark.skipif("avx512_bf16" not in bench.cpu_flags(), reason="needs AVX512-BF16"))
    for shape, kernel in [("3x3s1", "implicit_gemm_bf16"), ("stem7x7s2", "implicit_gemm_bf16"),
                          ("3x3s1c32", "implicit_gemm_bf16"), ("3x3s1", "winograd2_bf16")]
] + [
    pytest.param(shape, "implicit_gemm_amx", torch.bfloat16,
                 marks=pytest.mark.skipif(not {"amx_tile", "amx_bf16"} <= set(bench.cpu_flags()), reason="needs AMX-BF16"))
    for shape in ("3x3s1c32", "1x1s1c64", "stem7x7s2")
]


@needs_ext
@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("shape, kernel, dtype", OWN_KERNEL_CASES)
def test_own_kernels_non_finite_like_eager(shape, kernel, bad, dtype, monkeypatch, nan_filled_empty_exact_fp32):
    """Our kernels by name: the case runs through them (no oneDNN or ATen convolution). Winograd
    (F(2x2) and F(4x4)) would turn a lone Inf into NaNs (its transforms add and subtract a tile's
    inputs): such calls go to the implicit GEMM, which sums like eager. bf16 runs the same kernels
    in fp32, converted on the way in and out (RESNET_FUSED_CPU_ISA=avx2), or, where the CPU has
    AVX512-BF16, the bf16 core's implicit GEMM and F(2x2) (RESNET_FUSED_CPU_ISA=avx512: not on AMX),
    or, where it has AMX-BF16, the implicit GEMM on AMX tiles."""
    bf16_core, amx = kernel.endswith("_bf16"), kernel.endswith("_amx")
    monkeypatch.setenv(extension.CPU_ISA_ENV, "avx512" if bf16_core else "auto" if amx else "avx2")
    monkeypatch.setenv(extension.AVX2_CONV_ENV, "1")
    if kernel.startswith("winograd"):
        monkeypatch.setenv(extension.WINOGRAD_TILE_ENV, kernel[len("winograd")])
    elif bf16_core or amx:
        monkeypatch.setenv(extension.WINOGRAD_TILE_ENV, "off")
    monkeypatch.setenv(extension.GEMM_CORE_ENV, "brgemm" if kernel.endswith("brgemm") else "own")
    x, weight, bias, kwargs = make_case(shape, "bias_res_relu", "channels_last")
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    kwargs["residual"] = kwargs["residual"].to(dtype)
    x = corrupt(x, BAD_VALUES[bad])
    # The kernel's profiler scope (csrc/cpu/ops_cpu.cpp): winograd4_brgemm -> winograd_f4x4, ...
    scope = re.sub(r"^winograd(\d)", r"winograd_f\1x\1", kernel.removesuffix("_brgemm"))
    assert own_kernel_ran(lambda: fused_conv("extension", x, weight, bias, kwargs), scope), f"{scope} did not run"
    out = fused_conv("extension", x, weight, bias, kwargs)
    assert_same_non_finite(out, eager_conv(x, weight, bias, **kwargs), kernel)
    assert_finite_part_close(out, reference_conv_bias_act(x, weight, bias, **kwargs))


@needs_ext
@pytest.mark.parametrize("relu", [True, False])
def test_elementwise_ops_keep_nan(relu, nan_filled_empty_exact_fp32):
    """bias_act and add_relu (the epilogue on its own) on NaN and +-Inf in the vector body and the tail."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 21, 3, 5, generator=g).contiguous(memory_format=torch.channels_last)
    for i, value in enumerate(BAD_VALUES.values()):
        x[1, 3 + i, 1, 2] = value
        x[1, 20, i, 4] = value  # the last channel of a pixel: the scalar tail of a channels_last run
    bias, residual = torch.randn(21, generator=g), torch.randn(2, 21, 3, 5, generator=g)
    assert_same_non_finite(
        torch.ops.resnet_fused.bias_act(x, bias, relu), F.relu(x + bias.view(1, -1, 1, 1)) if relu else x + bias.view(1, -1, 1, 1), "bias_act")
    assert_same_non_finite(torch.ops.resnet_fused.add_relu(x, residual), (x + residual).relu(), "add_relu")


# ---- Whole models.

MODELS = ["resnet18", "resnet50"]  # basic blocks and bottlenecks
STAGES = ["layer_1", "layer_2", "layer_3", "layer_4", None]  # None: the logits


@pytest.fixture(scope="module", params=MODELS)
def model_case(request):
    model = random_model(request.param, calibration_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(x.double())
    return request.param, model, x, reference


def run_with_stages(model, x):
    """The model's output and each stage's output (where a corrupted pixel has not reached every
    position yet, so that the NaN masks are a sharp test)."""
    outputs = {}
    hooks = [
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name in STAGES
        if name is not None
    ]
    try:
        with torch.inference_mode():
            outputs[None] = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


@pytest.mark.parametrize("bad", BAD_ON_EVERY_PATH)
def test_model_non_finite_like_eager(model_case, bad, path):
    name, model, x, reference = model_case
    x = x.clone()
    x[1, 1, 20, 37] = BAD_VALUES[bad]
    eager = run_with_stages(model, x)
    assert torch.isnan(eager[None][1]).all(), "the test needs eager to give the corrupted sample NaN logits"
    assert not torch.isnan(eager["layer_1"][1]).all(), "and a partly NaN map in the first stage"
    fused_model = resnet_fused.fuse(model, backend=PATHS[path][0])
    # The first call runs the stages module by module; the second, where the backend has a one-call
    # stage kernel (the extension), runs each stage as one residual_blocks call.
    for call in ("modules", "stage calls"):
        fused = run_with_stages(fused_model, x)
        for stage in STAGES:
            assert_same_non_finite(fused[stage], eager[stage], f"{name} {path} {call} {stage or 'logits'}")
        verdict = judge(fused[None][:1], eager[None][:1], reference[:1])
        assert verdict.ok, f"{call}: the clean sample changed: {verdict}"
    assert (fused_model.layer_1._plan is not None) == (PATHS[path][0] == "extension")


def test_every_kernel_choice_agrees_with_float64(model_case, path):
    """The per-shape timing may pick any of these; each one's results are within fp32's tolerance."""
    name, model, x, reference = model_case
    fused = resnet_fused.fuse(model, backend=PATHS[path][0])
    with torch.inference_mode():
        out, eager = fused(x), model(x)
    verdict = judge(out, eager, reference)
    assert verdict.ok, f"{name} {path}: {verdict}"
