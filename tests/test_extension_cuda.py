"""The C++/CUDA extension backend (resnet_fused._C) on the GPU.

GPU tests are marked ``gpu``: skipped without a CUDA device. With one, an extension that does not
load, lacks CUDA kernels or was built for another torch FAILS every one of them with the reason
(never a quiet skip); run pytest with ``-rs`` to list the reason of every skip that remains. fp32
runs with TF32 off (cuDNN would otherwise round its inputs to 10 mantissa bits); fp16 and bf16 are
judged against the error of the eager chain the fused op replaces (conv, then + bias, + residual,
ReLU, each rounded to the dtype).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

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
)
from utils import assert_close, assert_within_eager_error, reference_conv_bias_act

DEVICE = "cuda"
LOW_PRECISION = [torch.float16, torch.bfloat16]
# The profiler name of one fused cuDNN graph call (csrc/cuda/fused_conv_graph.cpp).
FUSED_GRAPH = "resnet_fused::cudnn_conv_bias_act_graph"


def cuda_extension_problem() -> str | None:
    """Why the extension cannot run the tests here on CUDA, or None."""
    reason = extension.unavailable_reason("cuda", None)
    if reason is not None:
        return reason
    # Read from the module, not through an op: one that crashes must fail its own test, not every
    # worker at this gate.
    built, running = extension.built_for_torch(), torch.__version__.split("+")[0]
    if built != running:
        return f"resnet_fused._C was built against torch {built}, this is torch {running}; rebuild it"
    return None


def require_cuda_extension() -> None:
    problem = cuda_extension_problem()
    if problem is not None:
        pytest.fail(f"the CUDA extension cannot run: {problem}", pytrace=False)


@pytest.fixture(scope="module")
def cuda_extension():
    require_cuda_extension()


def gpu(test):
    """Marks a test as needing the GPU and a working CUDA extension (a failure, not a skip)."""
    return pytest.mark.gpu(pytest.mark.usefixtures("cuda_extension")(test))


def test_load_failure_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(extension, "_LOAD_ERROR", "resnet_fused._C failed to load: undefined symbol: _ZN3c10")
    with pytest.raises(pytest.fail.Exception, match="cannot run: .*undefined symbol"):
        require_cuda_extension()


def test_build_for_another_torch_fails(monkeypatch):
    monkeypatch.setattr(extension, "_LOAD_ERROR", None)
    monkeypatch.setattr(extension, "unavailable_reason", lambda device_type, dtype: None)
    monkeypatch.setattr(extension, "built_for_torch", lambda: "1.0.0")
    with pytest.raises(pytest.fail.Exception, match="built against torch 1.0.0, this is torch"):
        require_cuda_extension()


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    found = os.path.join(home, "bin", "nvcc")
    return found if os.path.exists(found) else shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="needs nvcc (the check compiles PTX, no GPU needed)")
def test_epilogue_vector_path_moves_16_bytes_at_a_time(tmp_path):
    """The half/bfloat16 vector kernels must load and store whole 16-byte packs: a pack copied as
    a struct of c10::Half moves element by element (8 two-byte loads of the residual per pack, as
    once seen in the sm_90 PTX). Only the NCHW walk's per-plane bias is a scalar load."""
    root = Path(__file__).resolve().parent.parent
    include = Path(torch.__file__).parent / "include"
    ptx = tmp_path / "epilogue.ptx"
    subprocess.run(
        [_nvcc(), "-arch=sm_90", "-ptx", "-O3", "--expt-relaxed-constexpr", "-std=c++17", f"-I{include}",
         f"-I{include / 'torch/csrc/api/include'}", str(root / "csrc/cuda/epilogue_cuda.cu"), "-o", str(ptx)],
        check=True, capture_output=True, text=True, timeout=600)
    kernels = dict(re.findall(r"\.entry (\S+)\((.*?)\n\}\n", ptx.read_text(), re.S))
    vector = {name: body for name, body in kernels.items() if re.search(r"(4Half|8BFloat16)ELi8E", name)}
    assert len(vector) == 4, sorted(kernels)
    for name, body in vector.items():
        scalar_loads = len(re.findall(r"ld\.global(?:\.nc)?\.[bu]16", body))
        assert scalar_loads <= (1 if "nchw" in name else 0), (name, scalar_loads)
        assert re.search(r"ld\.global(?:\.nc)?\.v4", body) and re.search(r"st\.global\.v4", body), name


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


@gpu
@pytest.mark.parametrize("name", [name for name, _, _ in _opcheck_samples("cpu")])
def test_opcheck_cuda(name):
    op, args = next((op, args) for n, op, args in _opcheck_samples(DEVICE) if n == name)
    opcheck(getattr(torch.ops.resnet_fused, op).default, args)


@gpu
@pytest.mark.parametrize("cudnn_fused", ["0"], indirect=True)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_conv_cuda(dtype, shape, flags, layout, cudnn_fused, no_tf32):
    """cuDNN's convolution followed by our epilogue kernel, on every layout (misaligned views
    take the scalar path)."""
    check_conv(*make_conv_case(shape, flags, layout, dtype, DEVICE))


# (flags, layout) pairs for the forced fused path: every epilogue in the layout the fused engines
# are made for, and the two ResNet epilogues in NCHW.
FUSED_CASES = [(flags, "channels_last") for flags in FLAGS] + [("bias_res_relu", "nchw"), ("bias_relu", "nchw")]


@gpu
@pytest.mark.parametrize("cudnn_fused", ["1"], indirect=True)
@pytest.mark.parametrize("flags, layout", FUSED_CASES)
@pytest.mark.parametrize("shape", ["stem7x7s2", "3x3s1", "1x1s2", "grouped3x3"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_conv_cudnn_fused_cuda(dtype, shape, flags, layout, cudnn_fused, no_tf32):
    """One fused cuDNN call, forced wherever it applies (every conv with an epilogue). Where cuDNN
    has no engine for a graph the op falls back to the unfused path with a warning; results must
    be right either way. A different cuDNN engine than eager's may round differently: factor 3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_conv(*make_conv_case(shape, flags, layout, dtype, DEVICE), factor=3.0)


@gpu
def test_cudnn_graph_available():
    """The fused graphs need cuDNN's headers at build time (setup.py finds them) and torch's cuDNN
    at run time; without either every conv silently takes two kernels."""
    info = extension.build_info()
    assert info["cudnn_graph"], f"fused cuDNN graphs are off: {info.get('cudnn_graph_reason')}"


def resnet_like_case(dtype, flags, seed=0):
    """A 64-channel 3x3 conv in channels_last: what cuDNN's fused engines are made for."""
    with_bias, with_residual, relu = FLAGS[flags]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 64, 14, 14, generator=g).to(DEVICE, dtype, memory_format=torch.channels_last)
    weight = (torch.randn(64, 64, 3, 3, generator=g) / 24).to(DEVICE, dtype)
    bias = torch.randn(64, generator=g).to(DEVICE, dtype) if with_bias else None
    residual = (torch.randn(2, 64, 14, 14, generator=g).to(DEVICE, dtype, memory_format=torch.channels_last)
                if with_residual else None)
    return x, weight, bias, dict(stride=1, padding=1, groups=1, residual=residual, relu=relu)


@gpu
@pytest.mark.parametrize("flags", ["bias_res_relu", "bias_relu", "bias"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cudnn_fused_switch(dtype, flags, monkeypatch):
    """RESNET_FUSED_CUDNN_FUSED=0 runs convolution + epilogue; =1 one fused cuDNN call, which must
    really be one: neither our fallback (aten::convolution) nor ATen's own unfused fallback
    (aten::add_) may show up. With a residual and without one (conv + bias + ReLU, and the
    downsample's conv + bias)."""
    x, weight, bias, kwargs = resnet_like_case(dtype, flags)
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "0")
    called = ops_called(lambda: call_conv(x, weight, bias, kwargs))
    assert FUSED_GRAPH not in called and "aten::convolution" in called, sorted(called)
    check_conv(x, weight, bias, kwargs)
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "1")
    called = ops_called(lambda: call_conv(x, weight, bias, kwargs))
    assert FUSED_GRAPH in called and "aten::convolution" not in called and "aten::add_" not in called, (
        f"no single fused cuDNN call for {flags} in {dtype} on this GPU/cuDNN: {sorted(called)}")
    check_conv(x, weight, bias, kwargs, factor=3.0)


@gpu
@pytest.mark.parametrize("plans", ["4", "64"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cudnn_plans_timed_keep_the_result(dtype, plans, monkeypatch):
    """RESNET_FUSED_CUDNN_PLANS=N builds up to N of cuDNN's engine configs and times them on the first
    call; whichever wins, the one fused call computes the conv, then and on later calls."""
    x, weight, bias, kwargs = resnet_like_case(dtype, "bias_res_relu", seed=3)
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "1")
    monkeypatch.setenv(extension.CUDNN_PLANS_ENV, plans)
    for _ in range(2):
        assert FUSED_GRAPH in ops_called(lambda: call_conv(x, weight, bias, kwargs))
        check_conv(x, weight, bias, kwargs, factor=3.0)


@gpu
@pytest.mark.parametrize("value", ["0", "65", "many", "2.5"])
def test_cudnn_plans_bad_value_raises(value, monkeypatch):
    x, weight, bias, kwargs = resnet_like_case(torch.float16, "bias_relu")
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "1")
    monkeypatch.setenv(extension.CUDNN_PLANS_ENV, value)
    with pytest.raises(RuntimeError, match="RESNET_FUSED_CUDNN_PLANS must be a whole number from 1 to 64"):
        call_conv(x, weight, bias, kwargs)


@gpu
def test_cudnn_plans_first_built_during_capture(monkeypatch):
    """A signature first seen during CUDA graph capture runs cuDNN's first plan untimed (timing
    synchronises, illegal there); the replay computes the conv, and a later eager call times."""
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "1")
    monkeypatch.setenv(extension.CUDNN_PLANS_ENV, "8")
    x, weight, bias, kwargs = resnet_like_case(torch.float16, "bias_relu", seed=4)
    x = x[:1].clone()  # a signature no other test built
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        F.conv2d(x, weight)  # cuDNN's handle for this stream exists before capture, as after any warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = call_conv(x, weight, bias, kwargs)
    x.copy_(torch.randn_like(x))  # fresh input: the replay must read it
    graph.replay()
    torch.cuda.synchronize()
    ref = reference(x, weight, bias, kwargs)
    assert_within_eager_error(captured, eager_chain(x, weight, bias, kwargs), ref, factor=3.0)
    check_conv(x, weight, bias, kwargs, factor=3.0)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_auto_times_once_then_keeps_its_choice(dtype, monkeypatch, no_tf32):
    """auto: the first call of a signature runs both paths (timing them), every later call only the
    one chosen."""
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "auto")
    x, weight, bias, kwargs = resnet_like_case(dtype, "bias_relu", seed=1)
    x = x[:1]  # a signature no other test timed
    first = ops_called(lambda: call_conv(x, weight, bias, kwargs))
    later = [ops_called(lambda: call_conv(x, weight, bias, kwargs)) for _ in range(3)]
    if FUSED_GRAPH in first:  # the graph built: both paths were timed
        assert "aten::convolution" in first, sorted(first)
    for called in later:
        assert (FUSED_GRAPH in called) != ("aten::convolution" in called), sorted(called)
        assert (FUSED_GRAPH in called) == (FUSED_GRAPH in later[0])
    check_conv(x, weight, bias, kwargs, factor=3.0)


@gpu
def test_failed_fused_graph_is_not_retried(monkeypatch, no_tf32):
    """A signature cuDNN builds no fused graph for falls back, and is remembered: later calls go
    straight to convolution + epilogue. Which signatures fail depends on the GPU and cuDNN, so the
    test looks for one among convs cuDNN's fused engines are least likely to take (fp32 without
    TF32, grouped, the 3-channel stem, misaligned views)."""
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "1")
    candidates = [
        (shape, layout, dtype)
        for dtype in (torch.float32, torch.float16)
        for shape in ("grouped3x3", "stem7x7s2", "3x3s2")
        for layout in ("nchw", "misaligned")
    ]
    failed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for shape, layout, dtype in candidates:
            x, weight, bias, kwargs = make_conv_case(shape, "bias_relu", layout, dtype, DEVICE, seed=2)
            first = ops_called(lambda: call_conv(x, weight, bias, kwargs))
            if FUSED_GRAPH in first and "aten::convolution" in first:  # tried, failed, fell back
                second = ops_called(lambda: call_conv(x, weight, bias, kwargs))
                assert FUSED_GRAPH not in second and "aten::convolution" in second, (shape, layout, dtype, sorted(second))
                check_conv(x, weight, bias, kwargs)
                failed.append((shape, layout, str(dtype)))
    if not failed:
        pytest.xfail("cuDNN built a fused graph for every candidate: the memory of failures is untested on this GPU")


@gpu
@pytest.mark.parametrize("flags", ["bias_relu", "bias", "relu", "bias_res_relu"])
def test_fused_never_reads_uninitialised_memory(flags, monkeypatch):
    """The caching allocator hands out blocks just freed: fill them with NaN first. A fused call
    that scaled an uninitialised addend by 0 (as at::cudnn_convolution_relu does) returns NaN."""
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "1")
    x, weight, bias, kwargs = resnet_like_case(torch.float16, flags, seed=3)
    call_conv(x, weight, bias, kwargs)  # plan built, workspace sized
    for _ in range(3):
        torch.cuda.synchronize()
        for numel in (x.numel(), 4 * x.numel(), 1 << 20):
            torch.full((numel,), float("nan"), device=DEVICE, dtype=torch.float16)
        out = call_conv(x, weight, bias, kwargs)
        assert torch.isfinite(out).all(), "the fused conv read uninitialised memory"
    check_conv(x, weight, bias, kwargs, factor=3.0)


@gpu
def test_auto_never_times_during_capture(monkeypatch, no_tf32):
    """Timing synchronises, which a capture forbids: a signature first seen during capture takes
    the default guess untimed (fp32 NCHW: convolution + epilogue), and is timed later, outside."""
    monkeypatch.setenv(extension.CUDNN_FUSED_ENV, "auto")
    x, weight, bias, kwargs = make_conv_case("3x3s1", "bias_relu", "nchw", torch.float32, DEVICE, seed=4)
    x = x[:1].contiguous()  # a signature no other test timed
    call_conv(*make_conv_case("1x1s1", "bias", "nchw", torch.float32, DEVICE))  # cuDNN handle made
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call_conv(x, weight, bias, kwargs)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, reference(x, weight, bias, kwargs))
    check_conv(x, weight, bias, kwargs)  # timed now, outside the capture


# Sizes for the epilogue kernels: scalar path (C=5, H*W odd), vector path in both layouts (C=24,
# H*W=16), a grid-stride loop over more vectors than the grid has threads (NHWC), and more
# planes than a grid's y dimension holds (NCHW, 80000 planes).
CUDA_EPILOGUE_SHAPES = [(2, 5, 3, 7), (2, 64, 9, 9), (2, 24, 4, 4), (16, 64, 56, 56), (2, 40000, 2, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@gpu
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


@gpu
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


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_misaligned_bias_cuda(dtype):
    """A bias view off 16-byte alignment must push a channels_last epilogue onto the scalar path."""
    x = make_4d((2, 32, 5, 5), "channels_last", dtype, DEVICE)
    bias = torch.randn(33, device=DEVICE).to(dtype)[1:]
    out = torch.ops.resnet_fused.bias_act(x, bias, True)
    torch.testing.assert_close(out, epilogue_reference(x, bias, None, True), rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_relu_keeps_nan_cuda(layout):
    x = make_4d((1, 16, 4, 5), layout, torch.float32, DEVICE)
    x[0, 3, 1, 2] = float("nan")
    out = torch.ops.resnet_fused.bias_act(x, torch.zeros(16, device=DEVICE), True)
    torch.testing.assert_close(out, x.relu(), equal_nan=True)


@gpu
@pytest.mark.parametrize("cudnn_fused", ["0", "1"], indirect=True)
def test_cuda_graph_capture(cudnn_fused):
    """Capture only records work queued on the capturing stream: a kernel launched on any other
    stream fails the capture or is missing from the replay. The fused cuDNN graph (1) runs on
    torch's current stream through torch's cuDNN handle, so it is captured too."""
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


@gpu
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


@gpu
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


@gpu
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
        again = fused(x)  # each stage now one residual_blocks call, running the same conv kernels
        eager = gpu_model.to(dtype)(x)
    assert fused.layer_1._plan is not None
    torch.testing.assert_close(again, out)
    verdict = judge(out, eager, reference)
    assert verdict.ok, verdict
