"""The C++ extension backend (resnet_fused._C) on CPU, and how it was built.

GPU tests of the same ops are in test_extension_cuda.py.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import shutil
import subprocess

import pytest
import torch
from torch.library import opcheck

import resnet_fused
from resnet_fused import ops
from resnet_fused.accuracy import judge
from resnet_fused.backends import extension, torch_backend
from resnet_fused.reference import random_model
from utils import REL_TOL, assert_close, assert_within_eager_error, reference_conv_bias_act, rel_error

if os.environ.get("RESNET_FUSED_NO_EXTENSION") == "1":
    pytest.skip("built without the extension (RESNET_FUSED_NO_EXTENSION=1)", allow_module_level=True)

needs_ext = pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded")

# name: (in channels, out channels, kernel, stride, padding, groups, H, W); small odd sizes.
SHAPES = {
    "stem7x7s2": (3, 16, 7, 2, 3, 1, 19, 21),
    "3x3s1": (16, 24, 3, 1, 1, 1, 10, 9),
    "3x3s2": (16, 32, 3, 2, 1, 1, 11, 12),
    "1x1s1": (32, 16, 1, 1, 0, 1, 7, 8),
    "1x1s2": (24, 32, 1, 2, 0, 1, 9, 10),
    "grouped3x3": (16, 32, 3, 1, 1, 4, 8, 9),
}
# name: (bias, residual, relu)
FLAGS = {
    "bias_relu": (True, False, True),
    "bias": (True, False, False),
    "bias_res_relu": (True, True, True),
    "res": (False, True, False),
    "res_relu": (False, True, True),
    "relu": (False, False, True),
}
LAYOUTS = ("nchw", "channels_last", "sliced", "misaligned")


def make_4d(shape, layout, dtype, device="cpu", generator=None):
    """A random (N, C, H, W) tensor in the given memory layout.

    sliced: a channels_last view cut out of a larger tensor (no dense layout at all);
    misaligned: dense NCHW starting one element into its storage, which defeats vector loads.
    """
    n, c, h, w = shape
    if layout == "nchw":
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    if layout == "channels_last":
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    if layout == "sliced":
        big = torch.randn(n, c + 2, h + 1, w + 3, generator=generator).to(device=device, dtype=dtype)
        return big.contiguous(memory_format=torch.channels_last)[:, 1 : c + 1, 1:, 2 : w + 2]
    if layout == "misaligned":
        flat = torch.randn(n * c * h * w + 1, generator=generator).to(device=device, dtype=dtype)
        return flat[1:].view(shape)
    raise ValueError(layout)


def make_conv_case(shape_name, flags_name, layout, dtype, device="cpu", seed=0):
    c, k, r, stride, padding, groups, h, w = SHAPES[shape_name]
    with_bias, with_residual, relu = FLAGS[flags_name]
    g = torch.Generator().manual_seed(seed)
    x = make_4d((2, c, h, w), layout, dtype, device, g)
    weight = (torch.randn(k, c // groups, r, r, generator=g) / (c // groups * r * r) ** 0.5).to(device, dtype)
    bias = (0.5 * torch.randn(k, generator=g)).to(device, dtype) if with_bias else None
    p, q = (h + 2 * padding - r) // stride + 1, (w + 2 * padding - r) // stride + 1
    # The residual in another layout than x's, to exercise the conversion.
    residual_layout = "nchw" if layout == "channels_last" else "channels_last" if layout == "nchw" else layout
    residual = make_4d((2, k, p, q), residual_layout, dtype, device, g) if with_residual else None
    kwargs = dict(stride=stride, padding=padding, groups=groups, residual=residual, relu=relu)
    return x, weight, bias, kwargs


def call_conv(x, weight, bias, kwargs):
    return torch.ops.resnet_fused.conv_bias_act(
        x,
        weight,
        bias,
        [kwargs["stride"]] * 2,
        [kwargs["padding"]] * 2,
        kwargs["groups"],
        kwargs["residual"],
        kwargs["relu"],
    )


def expected_format(x, weight=None):
    channels_last = x.dim() == 4 and torch._prims_common.suggest_memory_format(x) == torch.channels_last
    if weight is not None:
        channels_last = channels_last or torch._prims_common.suggest_memory_format(weight) == torch.channels_last
    return torch.channels_last if channels_last else torch.contiguous_format


def epilogue_reference(x, bias, residual, relu):
    """What the epilogue computes, in its own arithmetic: (x + bias) + residual in float (double
    for float64), one rounding at the end. The kernels must match it bit for bit."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(acc)
    if bias is not None:
        out = out + bias.to(acc).view(1, -1, 1, 1)
    if residual is not None:
        out = out + residual.to(acc)
    return (out.relu() if relu else out).to(x.dtype)


@pytest.fixture(params=["onednn", "epilogue", "avx2"])
def cpu_path(request, monkeypatch):
    """Every CPU conv path: oneDNN's fused post-ops, at::convolution + our epilogue, and our AVX2
    kernels (Winograd, 1x1) wherever they apply (test_avx2_conv.py tests those in depth)."""
    monkeypatch.setenv(extension.ONEDNN_FUSED_ENV, "0" if request.param == "epilogue" else "1")
    monkeypatch.setenv(extension.AVX2_CONV_ENV, "1" if request.param == "avx2" else "0")
    return request.param


def test_extension_loads():
    assert extension.load_error() is None, extension.load_error()


def _nvcc_found() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


def _thrower_library(tmp_path, name: str, *link_flags: str) -> str:
    """A loaded shared library that throws a C++ exception, linked with ``link_flags``."""
    source = tmp_path / "thrower.cpp"
    source.write_text('#include <stdexcept>\nextern "C" void resnet_fused_thrower() { throw std::runtime_error("x"); }\n')
    path = tmp_path / f"lib{name}.so"
    compiler = shutil.which("c++") or shutil.which("g++")
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(path), *link_flags], check=True)
    ctypes.CDLL(str(path))  # the check looks at a loaded library, as _C is when it runs
    return str(path)


def test_own_cxx_runtime_is_detected(tmp_path):
    """A library linked with its own libstdc++ (the kind that crashed on the H200 machine) is told
    apart from one that shares the process's."""
    assert extension.defines_own_cxx_runtime(_thrower_library(tmp_path, "static", "-static-libstdc++", "-static-libgcc"))
    assert not extension.defines_own_cxx_runtime(_thrower_library(tmp_path, "shared"))


def test_own_cxx_runtime_refuses_the_build(monkeypatch):
    monkeypatch.setattr(extension, "defines_own_cxx_runtime", lambda path: True)
    reason = extension._load()
    assert "own copy of the C++ runtime" in reason and "CXX=c++" in reason and "pip install" in reason


@needs_ext
def test_loaded_build_shares_the_cxx_runtime():
    import resnet_fused._C as built

    assert not extension.defines_own_cxx_runtime(built.__file__)


@needs_ext
def test_build_matches_torch():
    info = extension.build_info()
    assert info["torch"] == torch.__version__.split("+")[0], info
    assert extension.built_for_torch() == info["torch"]


@needs_ext
def test_cuda_kernels_present_when_cuda_was_expected():
    """A CUDA torch with nvcc around must give a CUDA build: a silent CPU-only build fails here."""
    info = extension.build_info()
    cuda_expected = torch.version.cuda is not None and _nvcc_found()
    if not cuda_expected and not info["with_cuda"]:
        pytest.skip(f"CPU-only build is right here (torch.version.cuda={torch.version.cuda}, nvcc found: {_nvcc_found()})")
    assert info["with_cuda"], (
        f"torch has CUDA {torch.version.cuda} and nvcc is present, but resnet_fused._C was built without CUDA: {info}"
    )
    missing = [
        op
        for op in extension.OPS
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", "CUDA")
    ]
    assert not missing, f"no CUDA kernel registered for {missing}"
    assert extension.unavailable_reason("cuda", torch.float16) is None


@needs_ext
def test_cpu_kernels_registered():
    for op in extension.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", "CPU"), op
    assert extension.unavailable_reason("cpu", None) is None
    assert extension.unavailable_reason("cpu", torch.int32) is not None
    assert extension.unavailable_reason("mps", None) is not None


def _opcheck_samples(device):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, layout="nchw"):
        return make_4d(shape, layout, torch.float32, device, g) if len(shape) == 4 else torch.randn(*shape, generator=g).to(device)

    w = rand(12, 4, 3, 3)
    yield "conv_nchw_res_relu", "conv_bias_act", (
        rand(2, 8, 9, 11), w, rand(12), [2, 2], [1, 1], 2, rand(2, 12, 5, 6), True)
    yield "conv_cl_nobias", "conv_bias_act", (
        rand(2, 8, 9, 11, layout="channels_last"), w, None, [1, 1], [1, 1], 2, None, False)
    yield "conv_sliced_weight_cl", "conv_bias_act", (
        rand(1, 8, 7, 7, layout="sliced"), w.contiguous(memory_format=torch.channels_last), rand(12), [1, 2], [0, 1], 2,
        None, True)
    yield "bias_act_cl", "bias_act", (rand(2, 6, 5, 4, layout="channels_last"), rand(6), True)
    yield "bias_act_sliced", "bias_act", (rand(2, 6, 5, 4, layout="sliced"), rand(6), False)
    yield "add_relu_mixed", "add_relu", (
        rand(2, 6, 5, 4), rand(2, 6, 5, 4, layout="channels_last"))
    yield "max_pool_cl", "max_pool2d", (rand(2, 19, 9, 8, layout="channels_last"), [3, 3], [2, 2], [1, 1])
    yield "max_pool_nchw", "max_pool2d", (rand(1, 6, 7, 9), [2, 3], [2, 1], [0, 1])
    yield "max_pool_sliced", "max_pool2d", (rand(2, 6, 5, 4, layout="sliced"), [3, 3], [1, 1], [1, 1])
    yield "global_avg_pool_cl", "global_avg_pool", (rand(2, 70, 3, 4, layout="channels_last"),)
    yield "global_avg_pool_nchw", "global_avg_pool", (rand(2, 6, 5, 4),)
    yield "global_avg_pool_sliced", "global_avg_pool", (rand(2, 6, 5, 4, layout="sliced"),)
    yield "linear_bias", "linear", (rand(3, 20), rand(9, 20), rand(9))
    yield "linear_no_bias", "linear", (rand(1, 20), rand(9, 20), None)
    yield "linear_many_rows", "linear", (rand(24, 20), rand(9, 20), rand(9))  # ATen's GEMM
    # Two blocks: a strided projection shortcut and a 2-conv chain, then an identity shortcut and a
    # 3-conv chain with a grouped conv and a missing bias.
    yield "residual_blocks", "residual_blocks", (
        rand(2, 8, 7, 9, layout="channels_last"),
        [rand(16, 8, 1, 1), rand(16, 8, 3, 3), rand(16, 16, 3, 3), rand(8, 16, 1, 1), rand(8, 4, 3, 3),
         rand(16, 8, 1, 1)],
        [rand(16), rand(16), rand(16), rand(8), None, rand(16)],
        [2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 2, 1], [2, 3],
        [True, False])


@needs_ext
@pytest.mark.parametrize("name", [name for name, _, _ in _opcheck_samples("cpu")])
def test_opcheck_cpu(name):
    op, args = next((op, args) for n, op, args in _opcheck_samples("cpu") if n == name)
    opcheck(getattr(torch.ops.resnet_fused, op).default, args)


@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_fp32_cpu(shape, flags, layout, cpu_path):
    x, weight, bias, kwargs = make_conv_case(shape, flags, layout, torch.float32)
    out = call_conv(x, weight, bias, kwargs)
    assert out.is_contiguous(memory_format=expected_format(x, weight))
    assert_close(out, reference_conv_bias_act(x, weight, bias, **kwargs))


@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_bf16_cpu(shape, flags, layout, cpu_path):
    x, weight, bias, kwargs = make_conv_case(shape, flags, layout, torch.bfloat16)
    out = call_conv(x, weight, bias, kwargs)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=expected_format(x, weight))
    eager = torch_backend.conv_bias_act(
        x, weight, bias, (kwargs["stride"],) * 2, (kwargs["padding"],) * 2, kwargs["groups"], kwargs["residual"],
        kwargs["relu"])
    assert_within_eager_error(out, eager, reference_conv_bias_act(x, weight, bias, **kwargs))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_conv_other_dtypes_cpu(dtype, cpu_path):
    x, weight, bias, kwargs = make_conv_case("3x3s2", "bias_res_relu", "channels_last", dtype)
    out = call_conv(x, weight, bias, kwargs)
    ref = reference_conv_bias_act(x, weight, bias, **kwargs)
    if dtype == torch.float64:
        assert_close(out, ref)
    else:
        eager = torch_backend.conv_bias_act(x, weight, bias, (2, 2), (1, 1), 1, kwargs["residual"], True)
        assert_within_eager_error(out, eager, ref)


@needs_ext
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("residual", [False, True])
def test_cpu_path_switch(residual, monkeypatch):
    """fp32 goes through oneDNN's fused post-ops unless RESNET_FUSED_ONEDNN_FUSED=0."""
    x, weight, bias, kwargs = make_conv_case("3x3s1", "bias_res_relu" if residual else "bias_relu", "channels_last",
                                             torch.float32)

    def ops_called():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call_conv(x, weight, bias, kwargs)
        return {e.name for e in prof.events()}

    monkeypatch.setenv(extension.ONEDNN_FUSED_ENV, "1")
    assert "mkldnn::_convolution_pointwise" in ops_called()
    with monkeypatch.context() as m:
        m.setattr(torch.backends.mkldnn, "enabled", False)
        assert "mkldnn::_convolution_pointwise" not in ops_called()
    monkeypatch.setenv(extension.ONEDNN_FUSED_ENV, "0")
    called = ops_called()
    assert "mkldnn::_convolution_pointwise" not in called and "aten::convolution" in called


@needs_ext
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize(
    "shape, flags, layout, fused_add",
    [
        ("grouped3x3", "bias_res_relu", "channels_last", False),
        ("grouped3x3", "res_relu", "nchw", False),
        ("3x3s2", "bias_res_relu", "channels_last", True),
        ("3x3s2", "res_relu", "nchw", True),  # NCHW, but the prepacked weight lets ATen fuse
    ],
)
def test_onednn_binary_op_only_where_aten_fuses_it(shape, flags, layout, fused_add, monkeypatch):
    """The residual goes to ATen's conv + add op (13 arguments; the plain conv op has 10) only where
    ATen fuses the add: elsewhere (groups > 1) that op runs the conv and then at::add_relu_, which has
    no bf16 kernel: bf16 grouped convs with a residual failed with "Unsupported datatype for
    add_relu" on CPUs with oneDNN bf16 (AVX512-BF16). Such calls take oneDNN's conv and our epilogue.
    The route does not depend on the dtype, so it is checked in fp32, which every CPU runs; the bf16
    cases of test_conv_bf16_cpu run it where oneDNN has bf16."""
    monkeypatch.setenv(extension.ONEDNN_FUSED_ENV, "1")
    monkeypatch.setenv(extension.AVX2_CONV_ENV, "0")
    x, weight, bias, kwargs = make_conv_case(shape, flags, layout, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out = call_conv(x, weight, bias, kwargs)
    calls = [len(e.input_shapes) for e in prof.events() if e.name == "mkldnn::_convolution_pointwise"]
    assert calls == [13 if fused_add else 10]
    assert out.is_contiguous(memory_format=expected_format(x, weight))
    assert_close(out, reference_conv_bias_act(x, weight, bias, **kwargs))


# ---- oneDNN's path packs each weight once per input shape (csrc/cpu/weight_cache.h) and must never
# answer with the packed copy of an older or another weight.

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _cache_size():
    gc.collect()  # weights in reference cycles would otherwise still count
    return torch.ops.resnet_fused.cpu_weight_cache_size()


def _conv_and_reference(x, weight, bias=None, residual=None, stride=1, padding=1):
    out = torch.ops.resnet_fused.conv_bias_act(x, weight, bias, [stride] * 2, [padding] * 2, 1, residual, True)
    return out, reference_conv_bias_act(x, weight, bias, stride=stride, padding=padding, residual=residual)


@pytest.fixture
def onednn_path(monkeypatch):
    monkeypatch.setenv(extension.ONEDNN_FUSED_ENV, "1")
    monkeypatch.setenv(extension.AVX2_CONV_ENV, "0")


@needs_ext
@needs_onednn
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [False, True])
def test_prepacked_weight_reused(layout, residual, onednn_path):
    """The first call packs the weight, later ones reuse the packed copy, and every result is right."""
    g = torch.Generator().manual_seed(4)
    x = make_4d((1, 16, 9, 10), layout, torch.float32, generator=g)
    weight, bias = torch.randn(24, 16, 3, 3, generator=g) / 12, torch.randn(24, generator=g)
    res = make_4d((1, 24, 9, 10), layout, torch.float32, generator=g) if residual else None
    size = _cache_size()

    def reorders():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out, ref = _conv_and_reference(x, weight, bias, res)
        assert out.is_contiguous(memory_format=expected_format(x))
        assert_close(out, ref)
        return sum(e.name == "aten::mkldnn_reorder_conv2d_weight" for e in prof.events())

    assert reorders() == 1
    assert _cache_size() == size + 1
    assert reorders() == 0
    assert reorders() == 0
    assert _cache_size() == size + 1


@needs_ext
@needs_onednn
def test_prepacked_weight_follows_in_place_changes(onednn_path):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, 7, 7, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(16, 8, 3, 3, generator=g), torch.randn(16, generator=g)
    assert_close(*_conv_and_reference(x, weight, bias))
    weight.add_(torch.randn(weight.shape, generator=g))  # bumps the version counter
    assert_close(*_conv_and_reference(x, weight, bias))
    with torch.no_grad():
        weight.copy_(-weight)  # what load_state_dict does
    assert_close(*_conv_and_reference(x, weight, bias))
    with torch.inference_mode():
        weight.mul_(0.5)  # normal tensors keep counting versions under inference_mode
        assert_close(*_conv_and_reference(x, weight, bias))
    # Through a view: views share the version counter.
    weight[:4].zero_()
    assert_close(*_conv_and_reference(x, weight, bias))


@needs_ext
@needs_onednn
def test_prepacked_weight_follows_data_swap(onednn_path):
    """``p.data = t`` (what Module.to() does to parameters) keeps the TensorImpl and its version: the
    new storage must still be noticed."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 8, 7, 7, generator=g).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
    weight = conv.weight
    with torch.no_grad():
        assert_close(*_conv_and_reference(x, weight))
        version = weight._version
        weight.data = torch.randn(weight.shape, generator=g)  # same sizes and strides
        assert_close(*_conv_and_reference(x, weight))
        conv.to(memory_format=torch.channels_last)
        assert conv.weight is weight and weight._version == version
        assert_close(*_conv_and_reference(x, weight))


@needs_ext
@needs_onednn
def test_prepacked_weight_per_input_shape(onednn_path):
    """One weight, several input shapes: each gets its own packed copy, at most 8 per weight."""
    g = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(16, 8, 3, 3, generator=g) / 8, torch.randn(16, generator=g)
    size = _cache_size()
    shapes = [(1, 8, 7, 7), (2, 8, 7, 7), (1, 8, 12, 9)]
    for _ in range(2):  # the second round hits
        for shape in shapes:
            x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
            assert_close(*_conv_and_reference(x, weight, bias))
            assert_close(*_conv_and_reference(x, weight, bias, stride=2, padding=0))
    assert _cache_size() == size + 2 * len(shapes)
    for h in range(5, 15):
        assert_close(*_conv_and_reference(torch.randn(1, 8, h, 6, generator=g), weight, bias))
    assert _cache_size() == size + 8


@needs_ext
@needs_onednn
def test_prepacked_weight_not_confused_by_reused_memory(onednn_path):
    """A new weight where a freed one was: same shape, version and, most times, the same address and
    storage. It must get its own result, not the freed weight's."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 8, 7, 7, generator=g).contiguous(memory_format=torch.channels_last)
    size = _cache_size()
    for _ in range(6):
        weight = torch.randn(16, 8, 3, 3, generator=g)
        assert_close(*_conv_and_reference(x, weight))
        del weight
    # Deterministically the same storage at version 0 with new values: `.data` writes bypass the
    # version counter, and a new view is a new TensorImpl.
    storage = torch.randn(16 * 8 * 9, generator=g)
    weight = storage.view(16, 8, 3, 3)
    assert_close(*_conv_and_reference(x, weight))
    del weight
    storage.data.copy_(torch.randn(storage.shape, generator=g))
    weight = storage.view(16, 8, 3, 3)
    assert weight._version == 0
    assert_close(*_conv_and_reference(x, weight))
    del weight, storage
    # The freed weights' packed copies are gone, not just unreachable.
    assert _cache_size() <= size


@needs_ext
@needs_onednn
def test_prepacked_weights_freed_with_their_model(onednn_path):
    g = torch.Generator().manual_seed(9)
    size = _cache_size()
    weights = [torch.randn(16, 8, 3, 3, generator=g) for _ in range(3)]
    grad_weight = torch.randn(16, 8, 3, 3, generator=g, requires_grad=True)
    x = torch.randn(1, 8, 7, 7, generator=g)
    for i in range(3):
        assert_close(*_conv_and_reference(x, weights[i]))
    # Packed under grad mode: the packed copy must not hold the weight through an autograd graph.
    out = torch.ops.resnet_fused.conv_bias_act(x, grad_weight, None, [1, 1], [1, 1], 1, None, True)
    assert_close(out.detach(), reference_conv_bias_act(x, grad_weight.detach(), None, stride=1, padding=1))
    assert _cache_size() == size + 4
    del out, grad_weight
    assert _cache_size() == size + 3
    weights.pop()
    assert _cache_size() == size + 2
    weights.clear()
    assert _cache_size() == size


@needs_ext
@needs_onednn
def test_inference_tensor_weights_not_cached(onednn_path):
    """Inference tensors have no version counter, so nothing could tell a changed one: packed per call."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, 8, 7, 7, generator=g)
    size = _cache_size()
    with torch.inference_mode():
        weight = torch.randn(16, 8, 3, 3, generator=g)
        assert_close(*_conv_and_reference(x, weight))
        weight.add_(1.0)
        assert_close(*_conv_and_reference(x, weight))
    assert _cache_size() == size


@needs_ext
@needs_onednn
def test_prepacked_weights_from_threads(onednn_path):
    """Threads sharing weights and shapes (the op runs without the GIL) all get their own weight's result."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(16, 8, 3, 3, generator=g) for _ in range(3)]
    inputs = [torch.randn(n, 8, 6, 6, generator=g) for n in (1, 2)]

    def run(i):
        w, x = weights[i % 3], inputs[i % 2]
        out, ref = _conv_and_reference(x, w)
        return rel_error(out, ref)

    with ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(run, range(48)))
    assert max(errors) <= REL_TOL[torch.float32], errors


@needs_ext
@pytest.mark.parametrize("variable, shape", [("ONEDNN_FUSED_ENV", "3x3s2"), ("AVX2_CONV_ENV", "1x1s1")])
def test_bad_switch_value(variable, shape, monkeypatch):
    """A switch the call reads must hold 0, 1 or auto (3x3s2 reaches oneDNN, 1x1s1 our 1x1 kernel)."""
    monkeypatch.setenv(getattr(extension, variable), "yes")
    x, weight, bias, kwargs = make_conv_case(shape, "bias_relu", "nchw", torch.float32)
    with pytest.raises(RuntimeError, match="must be 0, 1 or auto"):
        call_conv(x, weight, bias, kwargs)


# The epilogue ops are compared bit for bit with their arithmetic's reference, on sizes that take
# the vector loop, its scalar tail, and several parallel chunks.
EPILOGUE_SHAPES = [(2, 5, 3, 7), (2, 64, 9, 9), (4, 64, 33, 35)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES, ids=str)
def test_bias_act_cpu(shape, layout, dtype):
    g = torch.Generator().manual_seed(1)
    x = make_4d(shape, layout, dtype, generator=g)
    bias = torch.randn(shape[1], generator=g).to(dtype)
    for relu in (True, False):
        out = torch.ops.resnet_fused.bias_act(x, bias, relu)
        assert out.is_contiguous(memory_format=expected_format(x))
        torch.testing.assert_close(out, epilogue_reference(x, bias, None, relu), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", EPILOGUE_SHAPES, ids=str)
def test_add_relu_cpu(shape, layout, dtype):
    g = torch.Generator().manual_seed(2)
    x = make_4d(shape, layout, dtype, generator=g)
    residual = make_4d(shape, "channels_last" if layout == "nchw" else "nchw", dtype, generator=g)
    out = torch.ops.resnet_fused.add_relu(x, residual)
    assert out.is_contiguous(memory_format=expected_format(x))
    torch.testing.assert_close(out, epilogue_reference(x, None, residual, True), rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_relu_keeps_nan_cpu(layout):
    x = make_4d((1, 16, 4, 5), layout, torch.float32)
    x[0, 3, 1, 2] = float("nan")
    x[0, 15, 3, 4] = float("nan")  # in the scalar tail of a channels_last row
    out = torch.ops.resnet_fused.bias_act(x, torch.zeros(16), True)
    torch.testing.assert_close(out, x.relu(), equal_nan=True)


@needs_ext
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w, b: torch.ops.resnet_fused.conv_bias_act(x, w, b[:3], [1, 1], [1, 1], 1, None, True), "bias must have shape"),
        (lambda x, w, b: torch.ops.resnet_fused.conv_bias_act(x, w, b, [1, 1], [1, 1], 1, x, True), "residual must have the output's shape"),
        (lambda x, w, b: torch.ops.resnet_fused.conv_bias_act(x, w.double(), b, [1, 1], [1, 1], 1, None, True), "dtype"),
        (lambda x, w, b: torch.ops.resnet_fused.conv_bias_act(x, w, b, [1, 1], [1, 1], 3, None, True), "groups"),
        (lambda x, w, b: torch.ops.resnet_fused.conv_bias_act(x, w, b, [0, 1], [1, 1], 1, None, True), "stride"),
        (lambda x, w, b: torch.ops.resnet_fused.conv_bias_act(x[0], w, b, [1, 1], [1, 1], 1, None, True), "4-D"),
        (lambda x, w, b: torch.ops.resnet_fused.conv_bias_act(x[..., :1, :1], w, b, [1, 1], [0, 0], 1, None, True), "too small"),
        (lambda x, w, b: torch.ops.resnet_fused.bias_act(x, b, True), "bias must have shape"),
        (lambda x, w, b: torch.ops.resnet_fused.add_relu(x, x[:, :2]), "residual must have x's shape"),
        (lambda x, w, b: torch.ops.resnet_fused.add_relu(x, x.int()), "floating dtype"),
    ],
)
def test_op_errors(call, message):
    x, w, b = torch.randn(1, 4, 5, 5), torch.randn(8, 4, 3, 3), torch.randn(8)
    with pytest.raises(RuntimeError, match=message):
        call(x, w, b)


@needs_ext
def test_ops_layer_uses_extension():
    x, weight, bias, kwargs = make_conv_case("3x3s2", "bias_res_relu", "channels_last", torch.float32)
    assert ops.resolve_backend("extension", "cpu", torch.float32) == "extension"
    out = ops.conv_bias_act(x, weight, bias, backend="extension", **kwargs)
    assert_close(out, reference_conv_bias_act(x, weight, bias, **kwargs))
    y = torch.randn(2, 6, 5, 4)
    b = torch.randn(6)
    torch.testing.assert_close(ops.bias_act(y, b, relu=False, backend="extension"), y + b.view(1, -1, 1, 1))
    torch.testing.assert_close(ops.add_relu(y, -y.flip(0), backend="extension"), (y - y.flip(0)).relu())


@needs_ext
def test_torch_compile_fullgraph():
    x, weight, bias, kwargs = make_conv_case("3x3s1", "bias_res_relu", "channels_last", torch.float32)

    def block(x, weight, bias, residual):
        y = torch.ops.resnet_fused.conv_bias_act(x, weight, bias, [1, 1], [1, 1], 1, None, True)
        y = torch.ops.resnet_fused.bias_act(y, bias, False)
        return torch.ops.resnet_fused.add_relu(y, residual)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    args = (x, weight, bias, kwargs["residual"])
    torch.testing.assert_close(compiled(*args), block(*args))


@pytest.fixture(scope="module")
def resnet50_case():
    model = random_model("resnet50", calibration_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        eager = model(x)
        reference = copy.deepcopy(model).double()(x.double())
    return model, x, eager, reference


@needs_ext
def test_fused_resnet50_cpu(resnet50_case, cpu_path):
    model, x, eager, reference = resnet50_case
    fused = resnet_fused.fuse(model, backend="extension")
    with torch.inference_mode():
        out = fused(x)
    verdict = judge(out, eager, reference)
    assert verdict.ok, verdict
