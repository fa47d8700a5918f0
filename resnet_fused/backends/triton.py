"""Triton kernels (:mod:`resnet_fused.kernels`) behind PyTorch custom ops.

The ops live in namespace ``resnet_fused_triton`` (``torch.ops.resnet_fused_triton.conv_bias_act``,
``.add_relu``, ``.bias_act``) with fake kernels, so ``torch.compile(..., fullgraph=True)`` traces a
fused model without graph breaks. They are ``torch.library.custom_op`` rather than ``triton_op``:
under Triton's interpreter a ``triton_op`` fails fake-tensor tracing. Plain eager calls (plain
tensors, nothing tracing or intercepting ops) run the kernels directly: the custom op's dispatch
cost more host time than the rest of a conv.

Triton itself is imported only when a kernel runs or availability is asked, so ``import
resnet_fused`` works where triton is not installed. On CPU the kernels run only through Triton's
interpreter (``TRITON_INTERPRET=1`` set before triton is imported): slow, for testing.
"""

import contextlib
import os
from typing import Optional

import torch

from .. import _shapes
from . import plain_eager
from .torch_backend import global_avg_pool, linear, max_pool2d  # noqa: F401 - no Triton kernels of ours: torch's

NAME = "triton"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device_type: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install triton"
    if dtype is not None and dtype not in _DTYPES:
        return f"the Triton kernels support float32, float16 and bfloat16, not {dtype}"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return (
                "Triton needs a GPU; set TRITON_INTERPRET=1 before importing triton "
                "to run its interpreter on CPU (slow, for testing)"
            )
        from ..kernels import conv

        if not conv.INTERPRETED:
            return "TRITON_INTERPRET=1 was set only after resnet_fused.kernels was imported; set it before importing triton"
        return None
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible to PyTorch"
        # get_device_properties rather than get_device_capability: torch.compile constant-folds it
        if dtype == torch.bfloat16 and torch.cuda.get_device_properties(torch.cuda.current_device()).major < 8:
            return "bfloat16 tensor-core MMAs need compute capability 8.0 (Ampere) or newer"
        return None
    return f"Triton kernels run on cuda (or cpu through the interpreter), not {device_type}"


def _device_of(t: torch.Tensor):
    """Launch on the tensor's GPU, not whichever is current: custom ops get no device guard."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _kernels():
    """resnet_fused.kernels with its conv and pointwise modules, imported on first use (it imports triton)."""
    global _KERNELS
    if _KERNELS is None:
        from .. import kernels
        from ..kernels import conv, pointwise  # noqa: F401

        _KERNELS = kernels
    return _KERNELS


_KERNELS = None


@torch.library.custom_op("resnet_fused_triton::conv_bias_act", mutates_args=())
def _conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    groups: int,
    residual: Optional[torch.Tensor],
    relu: bool,
) -> torch.Tensor:
    from ..kernels import conv

    with _device_of(x):
        return conv.conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu)


@_conv_bias_act.register_fake
def _(x, weight, bias, stride, padding, groups, residual, relu):
    shape = _shapes.conv_output_shape(x.shape, weight.shape, stride, padding)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op("resnet_fused_triton::add_relu", mutates_args=())
def _add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    from ..kernels import pointwise

    with _device_of(x):
        return pointwise.add_relu(x, residual)


@_add_relu.register_fake
def _(x, residual):
    return torch.empty_like(x, memory_format=torch.channels_last)


@torch.library.custom_op("resnet_fused_triton::bias_act", mutates_args=())
def _bias_act(x: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    from ..kernels import pointwise

    with _device_of(x):
        return pointwise.bias_act(x, bias, relu)


@_bias_act.register_fake
def _(x, bias, relu):
    return torch.empty_like(x, memory_format=torch.channels_last)


def conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu):
    if plain_eager(x, weight, bias, residual):
        with _device_of(x):
            return _kernels().conv.conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu)
    return torch.ops.resnet_fused_triton.conv_bias_act(
        x, weight, bias, list(stride), list(padding), groups, residual, relu
    )


def add_relu(x, residual):
    if plain_eager(x, residual):
        with _device_of(x):
            return _kernels().pointwise.add_relu(x, residual)
    return torch.ops.resnet_fused_triton.add_relu(x, residual)


def bias_act(x, bias, relu):
    if plain_eager(x, bias):
        with _device_of(x):
            return _kernels().pointwise.bias_act(x, bias, relu)
    return torch.ops.resnet_fused_triton.bias_act(x, bias, relu)
