"""Fused inference modules. They hold folded weights and call only :mod:`resnet_fused.ops`.

Weights are buffers, not parameters: a fused module is for inference, ``.to()`` and
``state_dict()`` carry them, and no optimiser will find them. Like the ops, the modules refuse an
input that requires grad while grad mode is on (see :mod:`resnet_fused.ops`).
"""

from __future__ import annotations

import itertools
import operator
import os

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from . import _shapes, ops

__all__ = ["FusedConvBNAct", "FusedBasicBlock", "FusedBottleneck", "FusedStage", "MaxPool2d", "GlobalAvgPool2d",
           "Linear"]


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


class FusedStage(nn.Sequential):
    """A ResNet stage (``layer1`` .. ``layer4``): fused residual blocks run in sequence.

    The first call with an input signature (shape, dtype, device, grad mode, backend request) runs
    the blocks module by module, every conv checked. Later calls with that signature run the whole
    stage as one :func:`resnet_fused.ops.residual_blocks` call where the backend has a one-call
    kernel, as long as the stage is as it was planned: the same blocks, convs and weight and bias
    tensors, and no hooks on any of them (nor global ones). Anything else runs the modules again.
    WHY: between two conv kernels, the Python and op-call path of one more module call cost 25-60 us
    at batch 1 on a CPU (its code and data evicted by the kernel), 2.7 ms of a 27 ms resnet50 bf16
    forward on a 2-core Zen 4 EPYC, while the second thread waited.
    """

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self._plan = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_plan"] = None  # holds the modules it checked and a kernel function: rebuilt on first use
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        if (
            plan is not None
            and not torch.compiler.is_compiling()
            and type(x) is torch.Tensor
            and (x.shape, x.dtype, x.device, torch.is_grad_enabled(), os.environ.get(ops.ENV_VAR)) == plan.key
            and plan.still_holds()
        ):
            return plan.kernel(x, *plan.arguments)
        out = super().forward(x)
        if not torch.compiler.is_compiling():
            self._plan = _StagePlan.make(self, x)
        return out


def _any_global_hook() -> bool:
    # The global hook dicts nn.Module's call reads to decide whether any hook runs.
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks
                or _nn_module._global_backward_hooks or _nn_module._global_backward_pre_hooks)


class _StagePlan:
    """What a FusedStage checked on a call run module by module, to run later calls in one."""

    __slots__ = ("key", "kernel", "arguments", "_module_dicts", "_children", "_buffer_dicts", "_hooks")

    def __init__(self, key, kernel, arguments, parents, buffer_dicts, hooks):
        self.key = key
        self.kernel = kernel
        self.arguments = arguments  # weights and biases first: the tensors the buffers must still be
        self._module_dicts = [module._modules for module in parents]  # the stage, each block and shortcut
        self._children = [tuple(d.values()) for d in self._module_dicts]
        self._buffer_dicts = buffer_dicts  # each conv's
        self._hooks = hooks  # every hook dict of every module the stage calls

    def still_holds(self) -> bool:
        # In C-level loops (map, any, ==): this runs on every stage call, right after a conv kernel.
        weights, biases = self.arguments[:2]
        return (
            not any(self._hooks)
            and not _any_global_hook()
            and list(map(tuple, map(dict.values, self._module_dicts))) == self._children
            and all(map(operator.is_, map(dict.get, self._buffer_dicts, itertools.repeat("weight")), weights))
            and all(map(operator.is_, map(dict.get, self._buffer_dicts, itertools.repeat("bias")), biases))
        )

    @classmethod
    def make(cls, stage: FusedStage, x: torch.Tensor) -> _StagePlan | None:
        """The plan for calls like this one, or ``None`` where a stage call cannot be made: grad
        mode on, an unusual tensor, an empty batch, a block, conv or shortcut of another kind, a
        hook, or a backend without a one-call kernel."""
        if torch.is_grad_enabled() or type(x) is not torch.Tensor or x.numel() == 0 or _any_global_hook():
            return None
        parents, convs, chain_lengths, projections = [stage], [], [], []
        for block in stage._modules.values():
            if type(block) not in (FusedBasicBlock, FusedBottleneck):
                return None
            chain = [block._modules[name] for name in ("conv_1", "conv_2", "conv_3") if name in block._modules]
            shortcut = block._modules.get("down_sample")
            if shortcut is not None:
                if type(shortcut) is not nn.Sequential or len(shortcut) != 1:
                    return None
                parents.append(shortcut)
                projection = shortcut[0]
                if type(projection) is not FusedConvBNAct or projection.relu:
                    return None
                convs.append(projection)
            if not all(type(conv) is FusedConvBNAct and conv.relu for conv in chain):
                return None
            parents.append(block)
            convs.extend(chain)
            chain_lengths.append(len(chain))
            projections.append(shortcut is not None)
        if not convs or any(not conv.channels_last or conv.backend != convs[0].backend for conv in convs):
            return None
        # The stage's own hooks run around this forward either way; those of what it calls would not.
        hooks = tuple(hook_dict for module in parents[1:] + convs for hook_dict in (
            module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks))
        if any(hooks):
            return None
        kernel = ops.residual_blocks_kernel(convs[0].backend, x.device, x.dtype)
        if kernel is None:
            return None
        weights = [conv._buffers["weight"] for conv in convs]
        biases = [conv._buffers["bias"] for conv in convs]
        arguments = (weights, biases, [v for conv in convs for v in conv.stride],
                     [v for conv in convs for v in conv.padding], [conv.groups for conv in convs], chain_lengths,
                     projections)
        key = (x.shape, x.dtype, x.device, False, os.environ.get(ops.ENV_VAR))
        return cls(key, kernel, arguments, parents, [conv._buffers for conv in convs], hooks)


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
