"""Plain PyTorch ops: always available, the fallback and the baseline every kernel is judged by."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "torch"


def unavailable_reason(device_type: str, dtype: torch.dtype | None) -> str | None:
    return None


def conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu):
    out = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    if residual is not None:
        out = out.add_(residual)
    return out.relu_() if relu else out


def add_relu(x, residual):
    return torch.add(x, residual).relu_()


def bias_act(x, bias, relu):
    out = x + bias.view(1, -1, 1, 1)
    return out.relu_() if relu else out


def max_pool2d(x, kernel_size, stride, padding):
    return F.max_pool2d(x, kernel_size, stride, padding)


def global_avg_pool(x):
    return F.adaptive_avg_pool2d(x, 1)


def linear(x, weight, bias):
    return F.linear(x, weight, bias)
