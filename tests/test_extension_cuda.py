"""The C++/CUDA extension backend (resnet_fused._C) on the GPU.

Marked ``gpu``: skipped without a CUDA device. fp32 runs with TF32 off (cuDNN would otherwise
round its inputs to 10 mantissa bits); fp16 and bf16 are judged against the error of the eager
chain the fused op replaces (conv, then + bias, + residual, ReLU, each rounded to the dtype).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import resnet_fused
from resnet_fused.accuracy import judge
from resnet_fused.backends import extension
from resnet_fused.reference import random_model
from test_extension import (
    FLAGS,
    LAYOUTS,
    SHAPES,
    _opcheck_samples,
    call_conv,
    epilogue_reference,
    expected_format,
    make_4d,
    make_conv_case,
    needs_ext,
)
from utils import assert_close, assert_within_eager_error, reference_conv_bias_act

pytestmark = [pytest.mark.gpu, needs_ext]

DEVICE = "cuda"
LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def cudnn_fused(request, monkeypatch):
    """Sets RESNET_FUSED_CUDNN_FUSED from the test's ``cudnn_fused`` parameter."""
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, request.param)
    return request.param


def on_cpu(x, weight, bias, kwargs):
    moved = dict(kwargs, residual=None if kwargs["residual"] is None else kwargs["residual"].cpu())
    return x.cpu(), weight.cpu(), None if bias is None else bias.cpu(), moved


def reference(x, weight, bias, kwargs):
    x, weight, bias, kwargs = on_cpu(x, weight, bias, kwargs)
    return reference_conv_bias_act(x, weight, bias, **kwargs)


def eager_chain(x, weight, bias, kwargs):
    """What eager PyTorch computes for an unfused conv (+ bias) (+ residual) (+ ReLU) in x's dtype."""
    out = F.conv2d(x, weight, None, kwargs["stride"], kwargs["padding"], 1, kwargs["groups"])
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    if kwargs["residual"] is not None:
        out = out + kwargs["residual"]
    return out.relu() if kwargs["relu"] else out


def check_conv(x, weight, bias, kwargs, factor=2.0):
    out = call_conv(x, weight, bias, kwargs)
    assert out.device == x.device and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=expected_format(x, weight))
    ref = reference(x, weight, bias, kwargs)
    if x.dtype == torch.float32:
        assert_close(out, ref)
    else:
        assert_within_eager_error(out, eager_chain(x, weight, bias, kwargs), ref, factor=factor)


def ops_called(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("name", [name for name, _, _ in _opcheck_samples("cpu")])
def test_opcheck_cuda(name):
    op, args = next((op, args) for n, op, args in _opcheck_samples(DEVICE) if n == name)
    opcheck(getattr(torch.ops.resnet_fused, op).default, args)


@pytest.mark.parametrize("cudnn_fused", ["0"], indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_conv_cuda(dtype, shape, flags, layout, cudnn_fused, no_tf32):
    """cuDNN's convolution followed by our epilogue kernel, on every layout (misaligned views
    take the scalar path)."""
    check_conv(*make_conv_case(shape, flags, layout, dtype, DEVICE))


@pytest.mark.parametrize("cudnn_fused", ["1"], indirect=True)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("flags", ["bias_res_relu", "res_relu", "bias_relu"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_conv_cudnn_fused_cuda(dtype, shape, flags, layout, cudnn_fused, no_tf32):
    """cuDNN's own fused conv+bias+add+ReLU, forced wherever it applies (with a residual and ReLU;
    bias_relu checks the forced switch leaves the rest unfused). Where cuDNN has no engine for a
    graph the op falls back to the unfused path with a warning; results must be right either way.
    A different cuDNN engine than eager's may round differently: factor 3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_conv(*make_conv_case(shape, flags, layout, dtype, DEVICE), factor=3.0)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cudnn_fused_switch(dtype, monkeypatch):
    """RESNET_FUSED_CUDNN_FUSED picks the path: 0 = convolution + epilogue, 1 = cuDNN's fused op,
    auto = the fused op for a ResNet-like half-precision channels_last conv. When the fused op is
    chosen it must really run fused: neither our fallback (aten::convolution) nor ATen's own
    unfused fallback inside it (aten::add_) may show up."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 14, 14, generator=g).to(DEVICE, dtype, memory_format=torch.channels_last)
    weight = (torch.randn(64, 64, 3, 3, generator=g) / 24).to(DEVICE, dtype)
    bias = torch.randn(64, generator=g).to(DEVICE, dtype)
    residual = torch.randn(2, 64, 14, 14, generator=g).to(DEVICE, dtype, memory_format=torch.channels_last)
    kwargs = dict(stride=1, padding=1, groups=1, residual=residual, relu=True)
    for setting, fused in (("0", False), ("1", True), ("auto", True)):
        monkeypatch.setenv(extension.CUDNN_FUSED_ENV, setting)
        called = ops_called(lambda: call_conv(x, weight, bias, kwargs))
        if fused:
            assert "aten::cudnn_convolution_add_relu" in called, (setting, sorted(called))
            assert "aten::convolution" not in called and "aten::add_" not in called, (
                f"cuDNN's fused op did not run fused for {dtype} (setting {setting}); the auto rule in "
                f"csrc/cuda/ops_cuda.cpp is wrong for this GPU/cuDNN: {sorted(called)}"
            )
        else:
            assert "aten::cudnn_convolution_add_relu" not in called and "aten::convolution" in called
        check_conv(x, weight, bias, kwargs, factor=3.0)


def test_auto_keeps_fp32_unfused(monkeypatch, no_tf32):
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "auto")
    x, weight, bias, kwargs = make_conv_case("3x3s1", "bias_res_relu", "channels_last", torch.float32, DEVICE)
    called = ops_called(lambda: call_conv(x, weight, bias, kwargs))
    assert "aten::convolution" in called and "aten::cudnn_convolution_add_relu" not in called


# Sizes for the epilogue kernels: scalar path (C=5, H*W odd), vector path in both layouts (C=24,
# H*W=16), a grid-stride loop over more vectors than the grid has threads (NHWC), and more
# planes than a grid's y dimension holds (NCHW, 80000 planes).
CUDA_EPILOGUE_SHAPES = [(2, 5, 3, 7), (2, 64, 9, 9), (2, 24, 4, 4), (16, 64, 56, 56), (2, 40000, 2, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CUDA_EPILOGUE_SHAPES, ids=str)
def test_bias_act_cuda(shape, layout, dtype):
    if shape[1] == 40000 and layout != "nchw":
        pytest.skip("the many-planes case is about the NCHW grid")
    g = torch.Generator().manual_seed(1)
    x = make_4d(shape, layout, dtype, DEVICE, g)
    bias = torch.randn(shape[1], generator=g).to(DEVICE, dtype)
    for relu in (True, False):
        out = torch.ops.resnet_fused.bias_act(x, bias, relu)
        assert out.is_contiguous(memory_format=expected_format(x))
        torch.testing.assert_close(out, epilogue_reference(x, bias, None, relu), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", CUDA_EPILOGUE_SHAPES, ids=str)
def test_add_relu_cuda(shape, layout, dtype):
    if shape[1] == 40000 and layout != "nchw":
        pytest.skip("the many-planes case is about the NCHW grid")
    g = torch.Generator().manual_seed(2)
    x = make_4d(shape, layout, dtype, DEVICE, g)
    residual = make_4d(shape, layout, dtype, DEVICE, g)
    out = torch.ops.resnet_fused.add_relu(x, residual)
    assert out.is_contiguous(memory_format=expected_format(x))
    torch.testing.assert_close(out, epilogue_reference(x, None, residual, True), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_misaligned_bias_cuda(dtype):
    """A bias view off 16-byte alignment must push a channels_last epilogue onto the scalar path."""
    x = make_4d((2, 32, 5, 5), "channels_last", dtype, DEVICE)
    bias = torch.randn(33, device=DEVICE).to(dtype)[1:]
    out = torch.ops.resnet_fused.bias_act(x, bias, True)
    torch.testing.assert_close(out, epilogue_reference(x, bias, None, True), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_relu_keeps_nan_cuda(layout):
    x = make_4d((1, 16, 4, 5), layout, torch.float32, DEVICE)
    x[0, 3, 1, 2] = float("nan")
    out = torch.ops.resnet_fused.bias_act(x, torch.zeros(16, device=DEVICE), True)
    torch.testing.assert_close(out, x.relu(), equal_nan=True)


def test_cuda_graph_capture(monkeypatch):
    """Capture only records work queued on the capturing stream: a kernel launched on any other
    stream fails the capture or is missing from the replay."""
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "0")
    x, weight, bias, kwargs = make_conv_case("3x3s1", "bias_res_relu", "channels_last", torch.float16, DEVICE)

    def step():
        y = call_conv(x, weight, bias, kwargs)
        y = torch.ops.resnet_fused.bias_act(y, bias, False)
        return torch.ops.resnet_fused.add_relu(y, kwargs["residual"])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, step())


def test_side_stream_and_device_errors():
    x, weight, bias, kwargs = make_conv_case("1x1s2", "bias_res_relu", "nchw", torch.float32, DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = call_conv(x, weight, bias, kwargs)
    side.synchronize()
    torch.testing.assert_close(out, call_conv(x, weight, bias, kwargs))
    with pytest.raises(RuntimeError, match="is on"):
        call_conv(x, weight.cpu(), bias, kwargs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x, weight, bias, kwargs = make_conv_case("3x3s2", "bias_res_relu", "channels_last", torch.float16, "cuda:1")
    with torch.cuda.device(0):
        out = call_conv(x, weight, bias, kwargs)
        act = torch.ops.resnet_fused.bias_act(x, torch.zeros(x.shape[1], device=x.device, dtype=x.dtype), True)
    assert out.device == x.device and act.device == x.device
    assert_within_eager_error(out, eager_chain(x, weight, bias, kwargs), reference(x, weight, bias, kwargs), factor=3.0)
    torch.testing.assert_close(act, x.relu())


@pytest.fixture(scope="module")
def resnet50_case():
    model = random_model("resnet50", calibration_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        reference = copy.deepcopy(model).double()(x.double())
    return model, x, reference


@pytest.mark.parametrize("cudnn_fused", ["0", "auto", "1"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_resnet50_cuda(resnet50_case, dtype, cudnn_fused, no_tf32):
    model, x, reference = resnet50_case
    gpu_model = copy.deepcopy(model).to(DEVICE)
    fused = resnet_fused.fuse(gpu_model, backend="extension", dtype=dtype)
    x = x.to(DEVICE, dtype)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fused(x)
        eager = gpu_model.to(dtype)(x)
    verdict = judge(out, eager, reference)
    assert verdict.ok, verdict
