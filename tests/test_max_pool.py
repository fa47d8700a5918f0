"""ops.max_pool2d on every CPU backend, and the extension's own channels_last kernel
(csrc/cpu/max_pool_cpu.cpp) against float64: max is exact, so outputs must equal the float64 pool
of the same values; NaN in a window gives NaN there only; fuse() routes nn.MaxPool2d through it.
The CUDA registration (ATen's pool) is exercised in test_extension_cuda.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused import ops
from resnet_fused.backends import extension
from resnet_fused.modules import MaxPool2d
from resnet_fused.reference import random_model
from test_extension import make_4d

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every (backend, dtype) this machine runs: the extension's kernel, and torch's pool behind the others.
RUNNABLE = [(name, dtype) for name in ops.BACKENDS for dtype in DTYPES
            if ops.BACKENDS[name].unavailable_reason("cpu", dtype) is None]
BACKENDS = sorted({name for name, _ in RUNNABLE})
needs_ext = pytest.mark.skipif(extension.load_error() is not None, reason="resnet_fused._C is not loaded")
# (N, C, H, W, kernel, stride, padding): the ResNet pool; channels that are not a multiple of the
# kernel's 8 lanes (the scalar tail); 32 + 8 + 3 channels (each of the kernel's three loops); stride
# 1; no padding; a window wider than tall.
SHAPES = [
    (2, 64, 17, 15, 3, 2, 1),
    (1, 19, 9, 12, 3, 2, 1),
    (1, 43, 9, 8, 3, 2, 1),
    (2, 8, 7, 6, 3, 1, 1),
    (1, 3, 8, 9, 2, 2, 0),
    (2, 24, 11, 10, (3, 5), (1, 2), (1, 2)),
]


def reference(x, kernel, stride, padding):
    return F.max_pool2d(x.double(), kernel, stride, padding)


def own_kernel_ran(call) -> bool:
    """No ATen pool under the profiler: the call went through our kernel."""
    with torch.profiler.profile() as prof:
        call()
    return not any("max_pool2d" in e.name and e.name.startswith("aten::") for e in prof.events())


@pytest.mark.parametrize("backend, dtype", RUNNABLE, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_max_pool2d_equals_float64(backend, dtype, layout, shape, nan_filled_empty_exact_fp32):
    *dims, kernel, stride, padding = shape
    x = make_4d(tuple(dims), layout, dtype, generator=torch.Generator().manual_seed(sum(dims)))
    out = ops.max_pool2d(x, kernel, stride, padding, backend=backend)
    ref = reference(x, kernel, stride, padding)
    assert out.dtype == dtype and out.shape == ref.shape
    # Deterministic mode fills fresh outputs with NaN: equality also proves every element was written.
    assert torch.equal(out.double(), ref)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_last_input_runs_our_kernel(dtype):
    x = make_4d((1, 16, 9, 9), "channels_last", dtype)
    assert own_kernel_ran(lambda: ops.max_pool2d(x, 3, 2, 1, backend="extension"))
    # ATen's pool takes what ours does not (NCHW here), so the check above can fail.
    assert not own_kernel_ran(lambda: ops.max_pool2d(x.contiguous(), 3, 2, 1, backend="extension"))


@pytest.mark.parametrize("backend, dtype", RUNNABLE, ids=str)
@pytest.mark.parametrize("channel", [5, 17], ids=["vector_lanes", "scalar_tail"])
def test_nan_reaches_its_windows_only(backend, dtype, channel):
    x = make_4d((2, 19, 9, 9), "channels_last", dtype, generator=torch.Generator().manual_seed(3))
    x[1, channel, 3, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    x[0, 3, 1, 1] = float("-inf")
    out = ops.max_pool2d(x, 3, 2, 1, backend=backend)
    ref = reference(x, 3, 2, 1)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[1, channel].isnan().sum() == 4  # (3, 3) lies in the windows of outputs (1..2, 1..2)
    assert out[0].isfinite().sum() == out[0].numel() - 1  # the +inf is kept, the -inf never wins
    finite = ~ref.isnan()
    assert torch.equal(out.double()[finite], ref[finite])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = make_4d((1, 8, 9, 9), "channels_last", torch.float32)[:0]
    assert ops.max_pool2d(x, 3, 2, 1, backend=backend).shape == (0, 8, 5, 5)


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda x: ops.max_pool2d(x[0], 3, 2, 1), ValueError, "x must be 4-D"),
        (lambda x: ops.max_pool2d(x.int(), 3, 2, 1), TypeError, "floating dtype"),
        (lambda x: ops.max_pool2d(x, 3, 2, 2), ValueError, "at most half of kernel_size"),
        (lambda x: ops.max_pool2d(x, 0, 2, 0), ValueError, "kernel_size must be positive"),
        (lambda x: ops.max_pool2d(x, 3, 0, 1), ValueError, "stride must be positive"),
        (lambda x: ops.max_pool2d(x, 12, 1, 0), ValueError, "too small"),
        (lambda x: ops.max_pool2d(x, (3, 3, 3), 2, 1), TypeError, "kernel_size must be an int or a pair"),
        (lambda x: ops.max_pool2d(x.requires_grad_(), 3, 2, 1), RuntimeError, "inference-only"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, exc, message):
    with pytest.raises(exc, match=message):
        call(torch.randn(1, 4, 9, 9))


@needs_ext
def test_op_refuses_bad_arguments_below_the_python_layer():
    op = torch.ops.resnet_fused.max_pool2d.default
    with pytest.raises(RuntimeError, match="at most half of kernel_size"):
        op(torch.randn(1, 4, 9, 9), [3, 3], [2, 2], [2, 2])
    with pytest.raises(RuntimeError, match="must be 4-D"):
        op(torch.randn(4, 9, 9), [3, 3], [2, 2], [1, 1])


def test_fuse_routes_the_stem_pool_and_keeps_other_pools():
    model = random_model("resnet18").eval()
    fused = resnet_fused.fuse(model, backend="extension" if extension.load_error() is None else None)
    assert type(fused.max_pool) is MaxPool2d
    assert (fused.max_pool.kernel_size, fused.max_pool.stride, fused.max_pool.padding) == ((3, 3), (2, 2), (1, 1))
    assert type(model.max_pool) is nn.MaxPool2d  # the user's model is untouched
    odd = nn.Sequential(nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(3, 2, 1, dilation=2),
                        nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1, return_indices=True))
    kinds = [type(m) for m in resnet_fused.fuse(odd.eval())]
    assert kinds == [nn.MaxPool2d, nn.MaxPool2d, MaxPool2d, nn.MaxPool2d]
    x = torch.randn(2, 3, 40, 40)
    with torch.inference_mode():
        assert torch.equal(fused.max_pool(x), model.max_pool(x))
        assert torch.equal(resnet_fused.fuse(odd.eval())[2](x), F.max_pool2d(x, 2))
