"""BatchNorm folding for inference."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fold_bn"]


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(weight, bias)`` of one conv computing ``bn(conv(x))`` with BN's running statistics.

    The arithmetic runs in float64 when the parameters are float64 and in float32 otherwise
    (folding in fp16/bf16 loses accuracy), then the result is cast to ``dtype`` (default: the
    conv weight's dtype). New tensors are returned; neither module is modified.
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fold_bn: conv must be nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fold_bn: bn must be a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fold_bn: the BatchNorm has no running statistics (track_running_stats=False); "
            "it normalises with batch statistics and cannot be folded into a conv"
        )
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"fold_bn: conv has {conv.out_channels} output channels but the BatchNorm has {bn.num_features} features"
        )
    out_dtype = conv.weight.dtype if dtype is None else dtype
    work = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32

    weight = conv.weight.detach().to(work)
    mean = bn.running_mean.detach().to(work)
    inv_std = torch.rsqrt(bn.running_var.detach().to(work) + bn.eps)
    gamma = bn.weight.detach().to(work) if bn.affine else torch.ones_like(mean)
    beta = bn.bias.detach().to(work) if bn.affine else torch.zeros_like(mean)
    conv_bias = conv.bias.detach().to(work) if conv.bias is not None else torch.zeros_like(mean)

    scale = gamma * inv_std
    folded_weight = weight * scale.reshape(-1, 1, 1, 1)
    folded_bias = (conv_bias - mean) * scale + beta
    return folded_weight.to(out_dtype), folded_bias.to(out_dtype)
