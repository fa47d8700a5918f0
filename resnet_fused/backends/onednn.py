"""oneDNN fused convolutions on CPU: conv + bias + ReLU and conv + bias + add + ReLU as one primitive.

Uses PyTorch's private op ``torch.ops.mkldnn._convolution_pointwise`` (the one Inductor's CPU
freezing path emits), with weights reordered once into oneDNN's blocked layout for each input
shape: without that reorder oneDNN converts the weight on every call, which costs more than the
convolution at batch 1. Private ops can vanish between releases, so their presence is checked at
import and the backend reports itself unavailable (and ``ops`` falls back) when they are missing.

NaN: oneDNN fuses the bias and the residual add, never the ReLU: its ReLU post-op turns NaN into 0
(measured on AVX2, reported on AVX-512), where eager keeps it; the ReLU is ``relu_`` on the output.

The convolution is the custom op ``torch.ops.resnet_fused_onednn.conv_bias_act`` with a fake
kernel, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque op per conv and
the weight packing and its cache run only in the op's real kernel. Plain eager calls (nobody
tracing) run that kernel directly: the custom op's dispatch would cost more than a cache hit.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Optional

import torch
from torch._prims_common import suggest_memory_format

from .. import _shapes
from . import plain_eager
from .torch_backend import add_relu, bias_act, global_avg_pool, linear, max_pool2d  # noqa: F401 - oneDNN adds nothing to these ops

NAME = "onednn"

_ONE = [1, 1]
# Distinct input shapes kept per weight: a server sees a few batch sizes, not thousands.
_SHAPES_PER_WEIGHT = 8


def _find_ops():
    if not torch.backends.mkldnn.is_available():
        return None, "this PyTorch build has no oneDNN (mkldnn) support"
    try:
        pointwise = torch.ops.mkldnn._convolution_pointwise
        reorder = torch._C._nn.mkldnn_reorder_conv2d_weight
        pointwise.default, pointwise.binary  # noqa: B018 - both overloads must exist
    except (AttributeError, RuntimeError) as exc:
        return None, f"this PyTorch lacks the private oneDNN ops resnet_fused uses ({exc})"
    return (pointwise.default, pointwise.binary, reorder), None


_OPS, _MISSING = _find_ops()


def unavailable_reason(device_type: str, dtype: torch.dtype | None) -> str | None:
    if _MISSING is not None:
        return _MISSING
    if device_type != "cpu":
        return "oneDNN runs on CPU tensors only"
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
        return f"oneDNN fused convolution here supports float32 and bfloat16, not {dtype}"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bfloat16 support in oneDNN"
    return None


class _PackedWeights:
    """Reordered copies of weights, per input shape, dropped when the weight is freed or changed in place."""

    def __init__(self):
        self._entries: dict[int, tuple[int, OrderedDict]] = {}
        self._lock = threading.Lock()

    def get(self, weight: torch.Tensor, x_shape, stride, padding, groups) -> torch.Tensor:
        key = id(weight)
        # The version counter sees in-place writes; the storage address and strides see
        # ``p.data = t`` (what Module.to() does), which keeps the tensor object and its version.
        state = (weight._version, weight.data_ptr(), weight.stride(), weight.dtype)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != state:
                if entry is None:
                    weakref.finalize(weight, self._entries.pop, key, None)
                entry = (state, OrderedDict())
                self._entries[key] = entry
            shapes = entry[1]
            packed = shapes.get((x_shape, stride, padding))
            if packed is None:
                packed = _OPS[2](weight.contiguous().to_mkldnn(), list(padding), list(stride), _ONE, groups, list(x_shape))
                shapes[(x_shape, stride, padding)] = packed
                if len(shapes) > _SHAPES_PER_WEIGHT:
                    shapes.popitem(last=False)
            return packed


_PACKED = _PackedWeights()


def _output_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    # The extension's rule (conv_output_format in csrc/common.h), so that the fake kernel can know it:
    # oneDNN itself answers channels_last or not depending on whether the weight could be packed.
    if torch.channels_last in (suggest_memory_format(x), suggest_memory_format(weight)):
        return torch.channels_last
    return torch.contiguous_format


def _conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu):
    if weight.is_inference():
        # Inference tensors carry no version counter: pack per call rather than risk a stale cache.
        packed = weight.contiguous()
    else:
        packed = _PACKED.get(weight, tuple(x.shape), tuple(stride), tuple(padding), groups)
    if residual is None:
        out = _OPS[0](x, packed, bias, list(padding), list(stride), _ONE, groups, "none", [None], None)
    else:
        # The binary post-op reads the residual in the output's layout, which follows the input's.
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        residual = residual.contiguous(memory_format=layout)
        out = _OPS[1](x, residual, packed, bias, list(padding), list(stride), _ONE, groups, "add", 1.0, None, [None], None)
    out = out.contiguous(memory_format=_output_format(x, weight))
    return out.relu_() if relu else out


@torch.library.custom_op("resnet_fused_onednn::conv_bias_act", mutates_args=(), device_types="cpu")
def _conv_bias_act_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    groups: int,
    residual: Optional[torch.Tensor],
    relu: bool,
) -> torch.Tensor:
    return _conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu)


@_conv_bias_act_op.register_fake
def _(x, weight, bias, stride, padding, groups, residual, relu):
    shape = _shapes.conv_output_shape(x.shape, weight.shape, stride, padding)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_output_format(x, weight))


def conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu):
    if plain_eager(x, weight, bias, residual):
        return _conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu)
    return torch.ops.resnet_fused_onednn.conv_bias_act(x, weight, bias, list(stride), list(padding), groups, residual, relu)
