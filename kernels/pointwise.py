"""Elementwise epilogues for a conv that is not ours: ``relu(x + residual)`` and ``relu?(x + bias[c])``.

One kernel serves both. It tiles the (N*H*W, C) view of the tensor, reads its inputs through their
own strides (any layout, no copies) and writes a fresh channels_last output, so fused models stay
channels_last end to end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs


@triton.jit
def bias_residual_act_kernel(
    x_ptr, bias_ptr, res_ptr, out_ptr,
    M, C, H, W,
    sxn, sxc, sxh, sxw,
    srn, src, srh, srw,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    # int64 offsets: these tensors may hold more than 2^31 elements.
    w = (offs_m % W).to(tl.int64)
    h = ((offs_m // W) % H).to(tl.int64)
    n = (offs_m // (H * W)).to(tl.int64)
    c = offs_c.to(tl.int64)

    x = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + (c * sxc)[None, :], mask=mask)
    acc = x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=offs_c < C).to(tl.float32)[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + (n * srn + h * srh + w * srw)[:, None] + (c * src)[None, :], mask=mask)
        acc += res.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out_offs = offs_m.to(tl.int64)[:, None] * C + c[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    m = n * h * w
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    # 4096-element tiles, as wide in C as the tensor allows so that channels_last rows load contiguously.
    block_c = min(128, configs.next_power_of_2(c))
    block_m = 4096 // block_c
    grid = (configs.cdiv(m, block_m), configs.cdiv(c, block_c))
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    bias_residual_act_kernel[grid](
        x, bias, residual, out,
        m, c, h, w,
        *x.stride(), *res_strides,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu,
        BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=4,
    )
    return out


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return _launch(x, None, residual, True)


def bias_act(x: torch.Tensor, bias: torch.Tensor, relu: bool) -> torch.Tensor:
    return _launch(x, bias.contiguous(), None, relu)
