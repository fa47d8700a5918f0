"""Fused convolution: ``relu?(conv2d(x, w) + bias (+ residual))`` as one implicit-GEMM Triton kernel.

The GEMM is M = N*P*Q output pixels by N = output channels (per group) with a reduction over
K = kh*kw*C/groups. Activations are read as NHWC through their strides and the output is written
once, channels_last, after the whole epilogue ran in registers on the fp32 accumulator.

Three ways to walk the reduction, picked per shape class (see :mod:`.configs`):

* ``conv``: loop over (r, s) filter taps and blocks of input channels; each A tile is a block of
  output pixels x a contiguous run of input channels. The general case (3x3, 1x1 stride 2, ...).
* ``gemm``: a 1x1 stride-1 unpadded conv whose NHW dims collapse into one strided axis is a plain
  GEMM over the (N*H*W, C) activation matrix: no spatial decomposition, no boundary masks.
* ``flat``: with fewer than 16 channels per group (the 3-channel stem, ResNeXt's narrow groups)
  channel blocks would be mostly padding, so the reduction index runs over (r, s, c) jointly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .._shapes import conv_output_shape
from . import configs

_MODES = {"conv": 0, "gemm": 1, "flat": 2}


@triton.jit
def conv_bias_act_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, H, W, P, Q, C_G, K_G, K_OUT, KH, KW, SH, SW, PH, PW,
    sxn, sxc, sxh, sxw,
    swk, swc, swh, sww,
    srn, src, srh, srw,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Output-channel blocks vary fastest so that consecutive programs share one A (activation) tile
    # in L2; the whole weight matrix of a ResNet layer fits in L2 anyway.
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(K_G, BLOCK_N)
    pid_m = pid // blocks_n
    pid_n = pid % blocks_n
    g = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < K_G
    q = offs_m % Q
    p = (offs_m // Q) % P
    n = offs_m // (P * Q)

    # Activation offsets are int64: a tensor may hold more than 2^31 elements. Weight offsets stay
    # int32 (no ResNet-family weight comes near 2^31 elements).
    x_ptr += (g * C_G).to(tl.int64) * sxc
    chan_out = g * K_G + offs_n
    w_cols = w_ptr + (chan_out * swk)[None, :]
    if MODE == 1:
        x_rows = offs_m.to(tl.int64) * sxw
    else:
        # top-left input pixel of each output pixel's window; negative inside the padding
        ih0 = p * SH - PH
        iw0 = q * SW - PW
        x_rows = n.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 2:
        k_red = KH * KW * C_G
        for k0 in range(0, k_red, BLOCK_K):
            kk = k0 + offs_k
            c = kk % C_G
            rs = kk // C_G
            r = rs // KW
            s = rs % KW
            ih = ih0[:, None] + r[None, :]
            iw = iw0[:, None] + s[None, :]
            k_ok = kk < k_red
            a_mask = mask_m[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_cols = r.to(tl.int64) * sxh + s.to(tl.int64) * sxw + c.to(tl.int64) * sxc
            a = tl.load(x_ptr + x_rows[:, None] + a_cols[None, :], mask=a_mask, other=0.0)
            b = tl.load(w_cols + (c * swc + r * swh + s * sww)[:, None],
                        mask=k_ok[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, UPCAST)
    else:
        c_blocks = tl.cdiv(C_G, BLOCK_K)
        for t in range(0, KH * KW * c_blocks):
            rs = t // c_blocks
            r = rs // KW
            s = rs % KW
            c = (t % c_blocks) * BLOCK_K + offs_k
            c_ok = c < C_G
            if MODE == 1:
                a_ptrs = x_ptr + x_rows[:, None] + (c.to(tl.int64) * sxc)[None, :]
                a_mask = mask_m[:, None] & c_ok[None, :]
            else:
                ih = ih0 + r
                iw = iw0 + s
                row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                rows = x_rows + (r.to(tl.int64) * sxh + s.to(tl.int64) * sxw)
                a_ptrs = x_ptr + rows[:, None] + (c.to(tl.int64) * sxc)[None, :]
                a_mask = row_ok[:, None] & c_ok[None, :]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(w_cols + (c * swc + r * swh + s * sww)[:, None],
                        mask=c_ok[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION, UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + chan_out, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        res_rows = n.to(tl.int64) * srn + p.to(tl.int64) * srh + q.to(tl.int64) * srw
        res = tl.load(res_ptr + res_rows[:, None] + (chan_out.to(tl.int64) * src)[None, :], mask=out_mask)
        acc += res.to(tl.float32)
    if RELU:
        # NaN stays NaN, as in torch.relu.
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out_offs = offs_m.to(tl.int64)[:, None] * K_OUT + chan_out[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # Triton's interpreter keeps bfloat16 as raw uint16 bits and would multiply those as
        # integers; in fp32 the product is the same as a bf16 tensor-core MMA with fp32 accumulation.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


# Set by TRITON_INTERPRET=1 when this module was imported: the kernels then run on CPU tensors.
INTERPRETED = isinstance(conv_bias_act_kernel, InterpretedFunction)


def _rows_collapse(x: torch.Tensor) -> bool:
    """Whether (N, H, W) of an NCHW-indexed tensor form one axis of stride ``x.stride(3)``."""
    n, _, h, w = x.shape
    sn, _, sh, sw = x.stride()
    return (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)


def _channels_inner(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its channels are contiguous (channels_last, or a slice of one), else an NHWC copy."""
    if t.shape[1] == 1 or t.stride(1) == 1:
        return t
    return t.contiguous(memory_format=torch.channels_last)


def shape_class(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> str:
    c_g, kh, kw = weight.shape[1:]
    if c_g < 16:
        return "flat"
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and _rows_collapse(x):
        return "gemm"
    return "conv"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's convolution TF32 switch (``torch.backends.cudnn.allow_tf32``), as F.conv2d does."""
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu):
    """Launch the fused conv; arguments as validated by :func:`resnet_fused.ops.conv_bias_act`."""
    x = _channels_inner(x)
    weight = _channels_inner(weight)
    _, _, h, w = x.shape
    k_out, c_g, kh, kw = weight.shape
    k_g = k_out // groups
    batch, _, p, q = out_shape = conv_output_shape(x.shape, weight.shape, stride, padding)
    m = batch * p * q
    out = torch.empty(out_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    cls = shape_class(x, weight, stride, padding)
    if bias is not None:
        bias = bias.contiguous()
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)

    def launch(cfg: configs.LaunchConfig) -> None:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(k_g, cfg.block_n), groups)
        conv_bias_act_kernel[grid](
            x, weight, bias, residual, out,
            m, h, w, p, q, c_g, k_g, k_out, kh, kw, stride[0], stride[1], padding[0], padding[1],
            *x.stride(), *weight.stride(), *res_strides,
            MODE=_MODES[cls],
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu,
            PRECISION=dot_precision(x.dtype),
            UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    k_chunk = kh * kw * c_g if cls == "flat" else c_g
    if INTERPRETED:
        launch(configs.interpreter_config(m, k_g, k_chunk))
    else:
        key = (x.device.index, x.dtype, cls, tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding),
               groups, dot_precision(x.dtype))
        candidates = configs.candidates(cls, m, k_g, k_chunk, x.element_size(), configs.shared_memory(x.device))
        configs.TUNED.run(key, candidates, launch)
    return out
