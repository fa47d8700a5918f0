"""oneDNN fused convolutions on CPU: conv + bias + ReLU and conv + bias + add + ReLU as one primitive.

Uses PyTorch's private op ``torch.ops.mkldnn._convolution_pointwise`` (the one Inductor's CPU
freezing path emits), with weights reordered once into oneDNN's blocked layout for each input
shape: without that reorder oneDNN converts the weight on every call, which costs more than the
convolution at batch 1. Private ops can vanish between releases, so their presence is checked at
import and the backend reports itself unavailable (and ``ops`` falls back) when they are missing.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from .torch_backend import add_relu, bias_act  # noqa: F401 - oneDNN adds nothing to elementwise ops

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


def conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu):
    if weight.is_inference():
        # Inference tensors carry no version counter: pack per call rather than risk a stale cache.
        packed = weight.contiguous()
    else:
        packed = _PACKED.get(weight, tuple(x.shape), stride, padding, groups)
    unary = "relu" if relu else "none"
    if residual is None:
        return _OPS[0](x, packed, bias, list(padding), list(stride), _ONE, groups, unary, [None], None)
    # The binary post-op reads the residual in the output's layout, which follows the input's.
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    residual = residual.contiguous(memory_format=layout)
    return _OPS[1](x, residual, packed, bias, list(padding), list(stride), _ONE, groups, "add", 1.0, unary, [None], None)
