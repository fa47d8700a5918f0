"""The classifier head: ops.global_avg_pool and ops.linear on every CPU backend, and the extension's
own kernels (csrc/cpu/head_cpu.cpp) against float64: fp32 within REL_TOL, bf16/fp16 within twice
eager's own error in that dtype; NaN and Inf reach exactly the outputs eager's reach; fuse() routes
a ResNet's avgpool and fc through them. The CUDA registrations (ATen's) run in test_extension_cuda.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused import ops
from resnet_fused.backends import extension
from resnet_fused.modules import GlobalAvgPool2d, Linear
from resnet_fused.reference import random_model
from test_extension import make_4d
from utils import assert_close, assert_within_eager_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RUNNABLE = [(name, dtype) for name in ops.BACKENDS for dtype in DTYPES
            if ops.BACKENDS[name].unavailable_reason("cpu", dtype) is None]
BACKENDS = sorted({name for name, _ in RUNNABLE})
needs_ext = pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded")

# (N, C, H, W): resnet50's last map; channels past whole 64-channel tasks (8-lane vectors and a
# scalar tail: 130 = 2 x 64 + 2, 19 = 2 x 8 + 3); one pixel; fewer channels than one vector.
POOL_SHAPES = [(2, 2048, 7, 7), (1, 130, 1, 1), (3, 19, 5, 3), (2, 5, 4, 6)]
# (rows, in_features, out_features): resnet50's classifier at batch 1; batch 3 (a group of three
# rows), 5 (four + one), 16 (the most rows our kernel takes for fp32); 17 and 40 (ATen's GEMM);
# in_features off the 8-lane vectors; out_features off the 8-row blocks and their tiles.
LINEAR_SHAPES = [(1, 2048, 1000), (3, 64, 24), (5, 37, 11), (16, 96, 9), (17, 40, 13), (40, 128, 30)]


def judge(out, eager, ref, dtype):
    """fp32 against float64's bound; bf16/fp16 within twice eager's own error in that dtype."""
    assert out.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float32:
        assert_close(out, ref)
    else:
        assert_within_eager_error(out, eager, ref)


def profiled_aten_ops(call) -> set[str]:
    with torch.profiler.profile() as prof:
        call()
    return {e.name for e in prof.events() if e.name.startswith("aten::")}


@pytest.mark.parametrize("backend, dtype", RUNNABLE, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_global_avg_pool_matches_float64(backend, dtype, layout, shape, nan_filled_empty_exact_fp32):
    x = make_4d(shape, layout, dtype, generator=torch.Generator().manual_seed(sum(shape)))
    out = ops.global_avg_pool(x, backend=backend)
    assert out.shape == (shape[0], shape[1], 1, 1)
    # Deterministic mode fills fresh outputs with NaN: the finiteness checks in judge() also prove
    # every element was written.
    judge(out, F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x.double(), 1), dtype)


@pytest.mark.parametrize("backend, dtype", RUNNABLE, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_matches_float64(backend, dtype, with_bias, shape, nan_filled_empty_exact_fp32):
    rows, k, j = shape
    g = torch.Generator().manual_seed(rows * k + j)
    x = torch.randn(rows, k, generator=g).to(dtype)
    weight = (torch.randn(j, k, generator=g) / k**0.5).to(dtype)
    bias = torch.randn(j, generator=g).to(dtype) if with_bias else None
    out = ops.linear(x, weight, bias, backend=backend)
    ref = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    judge(out, F.linear(x, weight, bias), ref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_keeps_leading_dimensions(backend):
    x, weight, bias = torch.randn(2, 3, 20), torch.randn(7, 20), torch.randn(7)
    out = ops.linear(x, weight, bias, backend=backend)
    assert out.shape == (2, 3, 7)
    assert_close(out, F.linear(x.double(), weight.double(), bias.double()))
    assert ops.linear(x[0, 0], weight, bias, backend=backend).shape == (7,)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_our_kernels_run_where_they_pay(dtype):
    x = make_4d((1, 64, 7, 7), "channels_last", dtype)
    assert not any("pool" in name or "mean" in name for name in profiled_aten_ops(
        lambda: ops.global_avg_pool(x, backend="extension")))
    # NCHW planes go to ATen's reduction, so the check above can fail.
    assert "aten::mean" in profiled_aten_ops(lambda: ops.global_avg_pool(x.contiguous(), backend="extension"))
    weight = torch.randn(10, 64).to(dtype)
    gemm = {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul"}
    assert not gemm & profiled_aten_ops(lambda: ops.linear(x[:, :, 0, 0].contiguous(), weight, backend="extension"))
    # Past the row limit (16, or 4 for bf16 where the CPU has AVX512-BF16) ATen's GEMM runs.
    assert gemm & profiled_aten_ops(lambda: ops.linear(torch.randn(17, 64).to(dtype), weight, backend="extension"))


@pytest.mark.parametrize("backend, dtype", RUNNABLE, ids=str)
@pytest.mark.parametrize("channel", [5, 129], ids=["vector_lanes", "scalar_tail"])
def test_pool_nan_and_inf_reach_their_channels_only(backend, dtype, channel):
    x = make_4d((2, 130, 3, 3), "channels_last", dtype, generator=torch.Generator().manual_seed(5))
    x[1, channel, 2, 1] = float("nan")
    x[0, 7, 0, 0] = float("inf")
    x[0, 8, 0, 0], x[0, 8, 1, 1] = float("inf"), float("-inf")  # inf - inf: NaN, as eager's
    out = ops.global_avg_pool(x, backend=backend)
    eager = F.adaptive_avg_pool2d(x, 1)
    assert torch.equal(out.isnan(), eager.isnan()) and int(out.isnan().sum()) == 2
    assert out[0, 7].item() == float("inf")
    finite = eager.isfinite()
    assert_within_eager_error(out[finite], eager[finite], F.adaptive_avg_pool2d(x.double(), 1)[finite])


@pytest.mark.parametrize("backend, dtype", RUNNABLE, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_linear_nan_reaches_its_row_only(backend, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 37, generator=g).to(dtype)
    weight, bias = torch.randn(11, 37, generator=g).to(dtype), torch.randn(11, generator=g).to(dtype)
    x[rows - 1, 36] = float("nan")  # the k tail of the last row
    out = ops.linear(x, weight, bias, backend=backend)
    assert torch.equal(out.isnan(), F.linear(x, weight, bias).isnan())
    assert out[rows - 1].isnan().all() and out[: rows - 1].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    x = make_4d((1, 8, 3, 3), "channels_last", torch.float32)[:0]
    assert ops.global_avg_pool(x, backend=backend).shape == (0, 8, 1, 1)
    weight, bias = torch.randn(6, 8), torch.randn(6)
    assert ops.linear(torch.randn(0, 8), weight, bias, backend=backend).shape == (0, 6)
    # No input features: the output is the bias, as torch's.
    assert torch.equal(ops.linear(torch.randn(2, 0), torch.randn(6, 0), bias, backend=backend), bias.expand(2, 6))


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda x, w: ops.global_avg_pool(x[0, 0]), ValueError, "x must be 4-D"),
        (lambda x, w: ops.global_avg_pool(x.int()), TypeError, "floating dtype"),
        (lambda x, w: ops.global_avg_pool(x[:, :, :0]), ValueError, "at least one pixel"),
        (lambda x, w: ops.global_avg_pool(x.requires_grad_()), RuntimeError, "inference-only"),
        (lambda x, w: ops.linear(x[:, :, 0, 0], w[:, :3]), ValueError, "expects 3 input features"),
        (lambda x, w: ops.linear(x[:, :, 0, 0], w.double()), TypeError, "dtype torch.float64 but x has torch.float32"),
        (lambda x, w: ops.linear(x[:, :, 0, 0], w, torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
        (lambda x, w: ops.linear(x[:, :, 0, 0], w[0]), ValueError, "weight must be 2-D"),
        (lambda x, w: ops.linear(x[0, 0, 0, 0], w), ValueError, "at least 1 dimension"),
        (lambda x, w: ops.linear(x[:, :, 0, 0].int(), w), TypeError, "floating dtype"),
        (lambda x, w: ops.linear(x[:, :, 0, 0], w.requires_grad_()), RuntimeError, "inference-only"),
        (lambda x, w: ops.linear(x[:, :, 0, 0], w.numpy()), TypeError, "must be torch.Tensors"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, message):
    with pytest.raises(exc, match=message):
        call(torch.randn(2, 4, 3, 3), torch.randn(5, 4))


@needs_ext
def test_ops_refuse_bad_arguments_below_the_python_layer():
    with pytest.raises(RuntimeError, match="must be 4-D"):
        torch.ops.resnet_fused.global_avg_pool.default(torch.randn(4, 3, 3))
    linear = torch.ops.resnet_fused.linear.default
    with pytest.raises(RuntimeError, match="must be 2-D"):
        linear(torch.randn(2, 3, 4), torch.randn(5, 4), None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(out_features, 4\)"):
        linear(torch.randn(2, 4), torch.randn(5, 3), None)
    with pytest.raises(RuntimeError, match="all tensors must share one dtype"):
        linear(torch.randn(2, 4), torch.randn(5, 4).double(), None)


@pytest.mark.parametrize("source", ["ours", "torchvision"])
def test_fuse_routes_the_head_and_keeps_other_layers(source):
    if source == "torchvision":
        torchvision = pytest.importorskip("torchvision")
        model = torchvision.models.resnet18(num_classes=10).eval()
    else:
        model = random_model("resnet18").eval()
    fused = resnet_fused.fuse(model, backend="extension" if extension.load_error() is None else None)
    head = {name: type(m) for name, m in fused.named_modules() if name in ("avgpool", "fc")}
    assert head == {"avgpool": GlobalAvgPool2d, "fc": Linear}
    assert type(model.fc) is nn.Linear and type(model.avgpool) is nn.AdaptiveAvgPool2d  # the user's model is untouched
    assert torch.equal(fused.fc.weight, model.fc.weight) and torch.equal(fused.fc.bias, model.fc.bias)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert_close(fused(x), model.double()(x.double()))
    odd = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(3, 4, bias=False))
    kinds = [type(m) for m in resnet_fused.fuse(odd.eval())]
    assert kinds == [nn.AdaptiveAvgPool2d, GlobalAvgPool2d, nn.Flatten, Linear]
    x = torch.randn(2, 3, 6, 6)
    with torch.inference_mode():
        assert_close(resnet_fused.fuse(odd.eval())(x), odd.double()(x.double()))
