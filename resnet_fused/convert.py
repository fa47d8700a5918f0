"""``fuse()``: turn a ResNet (ours, torchvision's, timm's, or any model holding such blocks) into fused modules.

What is recognised and fused:
- residual blocks of the known classes (:data:`BLOCK_SPECS`) whose convs are plain (dilation 1,
  zero padding) and whose extras (squeeze-excite, anti-aliasing, drop-block, drop-path) are absent;
- the stem ``conv -> BN -> ReLU`` of the known ResNet classes (:data:`STEM_SPECS`);
- inside any ``nn.Sequential`` (a downsample shortcut, a deep stem), each ``Conv2d -> BatchNorm2d``
  pair, together with a following ``nn.ReLU``; a ``nn.Sequential`` of residual blocks only (a stage,
  ``layer1``) becomes a :class:`~resnet_fused.modules.FusedStage`, which runs them in one op call;
- ``nn.MaxPool2d`` without dilation, ceil mode or indices (the pool after the stem) becomes
  :class:`~resnet_fused.modules.MaxPool2d`, on the same backend;
- the head: ``nn.AdaptiveAvgPool2d`` to 1x1 becomes :class:`~resnet_fused.modules.GlobalAvgPool2d`
  and ``nn.Linear`` :class:`~resnet_fused.modules.Linear`, on the same backend.
Everything else is left exactly as it was (deep-copied: the input model is never changed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from . import ops, reference
from .folding import fold_bn
from .modules import FusedBasicBlock, FusedBottleneck, FusedConvBNAct, FusedStage, GlobalAvgPool2d, Linear, MaxPool2d

__all__ = ["fuse", "BlockSpec", "BLOCK_SPECS", "STEM_SPECS"]


@dataclass(frozen=True)
class BlockSpec:
    """Where a residual block class keeps its parts."""

    convs: tuple[tuple[str, str], ...]  # (conv, bn) attribute names, in order
    activations: tuple[str, ...]  # attributes that must be nn.ReLU
    down_sample: str
    absent: tuple[str, ...] = ()  # optional extras that must be None or nn.Identity


_OURS_BASIC = BlockSpec((("conv_1", "bn_1"), ("conv_2", "bn_2")), ("relu",), "down_sample")
_OURS_BOTTLENECK = BlockSpec((("conv_1", "bn_1"), ("conv_2", "bn_2"), ("conv_3", "bn_3")), ("relu",), "down_sample")
_TV_BASIC = BlockSpec((("conv1", "bn1"), ("conv2", "bn2")), ("relu",), "downsample")
_TV_BOTTLENECK = BlockSpec((("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")), ("relu",), "downsample")
_TIMM_EXTRAS = ("drop_block", "aa", "se", "drop_path")
_TIMM_BASIC = BlockSpec(_TV_BASIC.convs, ("act1", "act2"), "downsample", _TIMM_EXTRAS)
_TIMM_BOTTLENECK = BlockSpec(_TV_BOTTLENECK.convs, ("act1", "act2", "act3"), "downsample", _TIMM_EXTRAS)

BLOCK_SPECS: dict[type, BlockSpec] = {
    reference.BasicBlock: _OURS_BASIC,
    reference.BottleNeck: _OURS_BOTTLENECK,
}
# (conv, bn, activation) attribute names of a known ResNet's stem; the activation is used only there.
STEM_SPECS: dict[type, tuple[str, str, str]] = {reference.ResNet: ("conv_1", "bn_1", "relu")}

try:
    import torchvision.models.resnet as _tv

    BLOCK_SPECS[_tv.BasicBlock] = _TV_BASIC
    BLOCK_SPECS[_tv.Bottleneck] = _TV_BOTTLENECK
    STEM_SPECS[_tv.ResNet] = ("conv1", "bn1", "relu")
except ImportError:  # torchvision is optional
    pass

try:
    import timm.models.resnet as _timm

    BLOCK_SPECS[_timm.BasicBlock] = _TIMM_BASIC
    BLOCK_SPECS[_timm.Bottleneck] = _TIMM_BOTTLENECK
    STEM_SPECS[_timm.ResNet] = ("conv1", "bn1", "act1")
except ImportError:  # timm is optional
    pass


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


class _Fuser:
    def __init__(self, backend: str | None, memory_format: torch.memory_format, dtype: torch.dtype | None):
        self.backend = backend
        self.memory_format = memory_format
        self.dtype = dtype

    def conv(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool) -> FusedConvBNAct:
        # fold_bn computes in fp32 (fp64 for fp64 models) and casts once, straight to the target dtype.
        weight, bias = fold_bn(conv, bn, dtype=self.dtype)
        return FusedConvBNAct(
            weight,
            bias,
            stride=conv.stride,
            padding=conv.padding,
            groups=conv.groups,
            relu=relu,
            backend=self.backend,
            memory_format=self.memory_format,
        )

    def block(self, block: nn.Module, spec: BlockSpec) -> nn.Module | None:
        pairs = [(getattr(block, c, None), getattr(block, b, None)) for c, b in spec.convs]
        if not all(_foldable(c, b) for c, b in pairs):
            return None
        if not all(isinstance(getattr(block, a, None), nn.ReLU) for a in spec.activations):
            return None
        if not all(getattr(block, a, None) is None or isinstance(getattr(block, a), nn.Identity) for a in spec.absent):
            return None
        convs = [self.conv(c, b, relu=True) for c, b in pairs]
        down_sample = getattr(block, spec.down_sample, None)
        if down_sample is not None:
            down_sample = self.walk(down_sample)
        return (FusedBasicBlock if len(convs) == 2 else FusedBottleneck)(*convs, down_sample)

    def sequential(self, seq: nn.Sequential) -> nn.Sequential:
        children = list(seq.children())
        fused, i = [], 0
        while i < len(children):
            if i + 1 < len(children) and _foldable(children[i], children[i + 1]):
                relu = i + 2 < len(children) and isinstance(children[i + 2], nn.ReLU)
                fused.append(self.conv(children[i], children[i + 1], relu=relu))
                i += 3 if relu else 2
            else:
                fused.append(self.walk(children[i]))
                i += 1
        if fused and all(type(m) in (FusedBasicBlock, FusedBottleneck) for m in fused):
            return FusedStage(*fused)  # a stage of residual blocks: run in one op call where it can be
        return nn.Sequential(*fused)

    def stem(self, model: nn.Module, names: tuple[str, str, str]) -> None:
        conv, bn, act = (getattr(model, n, None) for n in names)
        if _foldable(conv, bn) and isinstance(act, nn.ReLU):
            setattr(model, names[0], self.conv(conv, bn, relu=True))
            setattr(model, names[1], nn.Identity())
            setattr(model, names[2], nn.Identity())

    def max_pool(self, pool: nn.MaxPool2d) -> nn.Module:
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
            return pool
        return MaxPool2d(pool.kernel_size, pool.stride, pool.padding, backend=self.backend)

    def walk(self, module: nn.Module) -> nn.Module:
        """Fused replacement for ``module`` (which belongs to the deep copy and may be reused)."""
        if type(module) is nn.MaxPool2d:
            return self.max_pool(module)
        if type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1)):
            return GlobalAvgPool2d(backend=self.backend)
        if type(module) is nn.Linear:
            return Linear(module.weight, module.bias, backend=self.backend)
        spec = BLOCK_SPECS.get(type(module))
        if spec is not None:
            return self.block(module, spec) or module
        if type(module) is nn.Sequential:
            return self.sequential(module)
        stem = STEM_SPECS.get(type(module))
        if stem is not None:
            self.stem(module, stem)
        for name, child in list(module.named_children()):
            setattr(module, name, self.walk(child))
        return module


def fuse(
    model: nn.Module,
    *,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.channels_last,
) -> nn.Module:
    """Return a new inference module computing ``model``'s function with fused kernels.

    BatchNorm is folded into each conv in fp32; conv+BN+ReLU becomes one op, and each block's last
    conv+BN, residual add and ReLU another. ``backend`` fixes the kernels (default: chosen per call
    by device and dtype, see :func:`resnet_fused.available_backends`); ``dtype`` converts the
    result after folding; ``memory_format`` is the activation layout (channels_last by default).
    ``model`` must be in eval mode and is not modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() takes an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fuse() needs a model in eval mode (BatchNorm must use its running statistics); "
            f"in training mode: {', '.join(training[:5])}{' ...' if len(training) > 5 else ''}. Call model.eval() first"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if memory_format not in (torch.channels_last, torch.contiguous_format):
        raise ValueError(f"memory_format must be torch.channels_last or torch.contiguous_format, got {memory_format}")
    first = next(iter(model.parameters()), None)
    if first is not None:
        # Fail now, not at the first forward, when the requested backend cannot run this model.
        ops.resolve_backend(backend, first.device, dtype or first.dtype)
    elif backend is not None and backend not in ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: {', '.join(ops.BACKENDS)}")

    # Outside inference mode even when called inside it: inference tensors have no version
    # counter, so the kernels could not cache their re-laid-out weights and would redo it per call.
    with torch.inference_mode(False):
        fused = _Fuser(backend, memory_format, dtype).walk(copy.deepcopy(model))
        if dtype is not None:
            fused = fused.to(dtype)
    fused.requires_grad_(False)
    return fused.eval()
