"""Fused inference modules. They hold folded weights and call only :mod:`resnet_fused.ops`.

Weights are buffers, not parameters: a fused module is for inference, ``.to()`` and
``state_dict()`` carry them, and no optimiser will find them. Like the ops, the modules refuse an
input that requires grad while grad mode is on (see :mod:`resnet_fused.ops`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _shapes, ops

__all__ = ["FusedConvBNAct", "FusedBasicBlock", "FusedBottleneck", "MaxPool2d", "GlobalAvgPool2d", "Linear"]


class FusedConvBNAct(nn.Module):
    """``relu?(conv(x, weight) + bias (+ residual))`` with BatchNorm already folded into weight and bias.

    ``memory_format`` is the layout the input is brought to first (a no-op when it already has it),
    so a fused model keeps its activations in one layout end to end.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        *,
        stride=1,
        padding=0,
        groups: int = 1,
        relu: bool = True,
        backend: str | None = None,
        memory_format: torch.memory_format = torch.channels_last,
    ):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous(memory_format=memory_format))
        self.register_buffer("bias", bias.detach().clone())
        self.conv = ops.BoundConvBiasAct(stride=stride, padding=padding, groups=groups, relu=relu, backend=backend)
        # A flag, not the torch.memory_format: torch.save cannot pickle a memory_format object.
        self.channels_last = memory_format == torch.channels_last

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    # The conv's arguments live in the bound op (fixed at construction, like a Conv2d's).
    stride = property(lambda self: self.conv.stride)
    padding = property(lambda self: self.conv.padding)
    groups = property(lambda self: self.conv.groups)
    relu = property(lambda self: self.conv.relu)
    backend = property(lambda self: self.conv.backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # Buffers and submodules are read from nn.Module's dicts in the forwards here: as attributes
        # they resolve through nn.Module.__getattr__ after a failed lookup (an AttributeError made and
        # dropped, on Python 3.11), and inside a forward, right after a kernel, such steps cost
        # several times their micro-benchmark time. A flat loop of op calls ran resnet50 bf16 batch 1
        # 5-9% faster than these modules with attribute reads and a conv plan keyed on every tensor;
        # the dict reads and the leaner plan (BoundConvBiasAct) took back 3.5% of it (Zen 4 EPYC).
        buffers = self._buffers
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.conv(x.contiguous(memory_format=memory_format), buffers["weight"], buffers["bias"], residual)

    def extra_repr(self) -> str:
        k, c, r, s = self.weight.shape
        return (
            f"{c * self.groups}, {k}, kernel_size=({r}, {s}), stride={self.stride}, padding={self.padding}, "
            f"groups={self.groups}, relu={self.relu}, backend={self.backend or 'auto'}"
        )


class FusedBasicBlock(nn.Module):
    """conv+BN+ReLU, then conv+BN + residual add + ReLU: two kernels (plus the shortcut's, if any)."""

    def __init__(self, conv_1: FusedConvBNAct, conv_2: FusedConvBNAct, down_sample: nn.Module | None):
        super().__init__()
        self.conv_1 = conv_1
        self.conv_2 = conv_2
        self.down_sample = down_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = self._modules  # see FusedConvBNAct.forward
        down_sample = convs.get("down_sample")  # a None is a plain attribute, not in _modules
        identity = x if down_sample is None else down_sample(x)
        return convs["conv_2"](convs["conv_1"](x), identity)


class FusedBottleneck(nn.Module):
    """Two conv+BN+ReLU kernels, then the last conv+BN with the residual add and ReLU in one."""

    def __init__(self, conv_1: FusedConvBNAct, conv_2: FusedConvBNAct, conv_3: FusedConvBNAct, down_sample: nn.Module | None):
        super().__init__()
        self.conv_1 = conv_1
        self.conv_2 = conv_2
        self.conv_3 = conv_3
        self.down_sample = down_sample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = self._modules  # see FusedConvBNAct.forward
        down_sample = convs.get("down_sample")  # a None is a plain attribute, not in _modules
        identity = x if down_sample is None else down_sample(x)
        return convs["conv_3"](convs["conv_2"](convs["conv_1"](x)), identity)


class MaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (dilation 1, floor mode, no indices) through :func:`resnet_fused.ops.max_pool2d`,
    which on the extension backend's CPU path skips the indices ATen computes for a backward."""

    def __init__(self, kernel_size, stride=None, padding=0, *, backend: str | None = None):
        super().__init__()
        self.kernel_size = _shapes.pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else _shapes.pair(stride, "stride")
        self.padding = _shapes.pair(padding, "padding")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.max_pool2d(x, self.kernel_size, self.stride, self.padding, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"backend={self.backend or 'auto'}"
        )


class GlobalAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(1)`` through :func:`resnet_fused.ops.global_avg_pool`."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.global_avg_pool(x, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend or 'auto'}"


class Linear(nn.Module):
    """``nn.Linear`` (the classifier) through :func:`resnet_fused.ops.linear`; weight and bias are buffers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, backend: str | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.backend = backend

    in_features = property(lambda self: self.weight.shape[1])
    out_features = property(lambda self: self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers  # see FusedConvBNAct.forward
        return ops.linear(x, buffers["weight"], buffers["bias"], backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"backend={self.backend or 'auto'}"
        )
