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

Split-K (``LaunchConfig.split_k > 1``, a tuning candidate where output tiles alone leave most SMs
idle): each of ``split_k`` programs per tile sums a contiguous run of the reduction steps into an
fp32 workspace; :func:`splitk_reduce_kernel` then adds the slices in a fixed order (no atomics, so
results are deterministic) and applies the bias/residual/ReLU epilogue once.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .._shapes import conv_output_shape
from . import configs

_MODES = {"conv": 0, "gemm": 1, "flat": 2}


# Output sizes are not specialized on (Triton would compile a kernel per divisibility-by-16 of
# each): no load or store is vectorized along them, and every extra variant is one more compile.
@triton.jit(do_not_specialize=["M", "H", "W", "P", "Q"])
def conv_bias_act_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, H, W, P, Q, C_G, K_G, K_OUT, KH, KW, SH, SW, PH, PW,
    sxn, sxc, sxh, sxw,
    swk, swc, swh, sww,
    srn, src, srh, srw,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RES_C1: tl.constexpr, RELU: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # SPLIT: program_id(2) sums its slice of the reduction steps and stores the fp32 partial sums
    # to out_ptr[program_id(2)] (an (n_split, M, K_OUT) workspace); splitk_reduce_kernel applies
    # the epilogue.
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
        steps = tl.cdiv(k_red, BLOCK_K)
    else:
        c_blocks = tl.cdiv(C_G, BLOCK_K)
        steps = KH * KW * c_blocks
    if SPLIT:
        per_slice = tl.cdiv(steps, tl.num_programs(2))
        first = tl.program_id(2) * per_slice
        last = tl.minimum(first + per_slice, steps)
    else:
        first = 0
        last = steps
    if MODE == 2:
        for step in range(first, last):
            kk = step * BLOCK_K + offs_k
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
        for t in range(first, last):
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

    out_mask = mask_m[:, None] & mask_n[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * K_OUT + chan_out[None, :]
    if SPLIT:
        out_ptr += tl.program_id(2).to(tl.int64) * M * K_OUT
    else:
        acc = _epilogue(acc, bias_ptr, res_ptr, chan_out, mask_n, n, p, q, out_mask, srn, src, srh, srw,
                        HAS_BIAS, HAS_RES, RES_C1, RELU)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["M", "P", "Q", "N_SPLIT"])
def splitk_reduce_kernel(
    ws_ptr, bias_ptr, res_ptr, out_ptr,
    M, K_OUT, P, Q, N_SPLIT, SLICE,
    srn, src, srh, srw,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RES_C1: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Slices are added in a fixed order, without atomics: the result does not depend on scheduling.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < K_OUT
    mask = mask_m[:, None] & mask_n[None, :]
    offs = offs_m.to(tl.int64)[:, None] * K_OUT + offs_n[None, :]
    ws_ptrs = ws_ptr + offs
    acc = tl.load(ws_ptrs, mask=mask)
    for _ in range(1, N_SPLIT):
        ws_ptrs += SLICE
        acc += tl.load(ws_ptrs, mask=mask)
    q = offs_m % Q
    p = (offs_m // Q) % P
    n = offs_m // (P * Q)
    acc = _epilogue(acc, bias_ptr, res_ptr, offs_n, mask_n, n, p, q, mask, srn, src, srh, srw,
                    HAS_BIAS, HAS_RES, RES_C1, RELU)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, bias_ptr, res_ptr, chan, mask_n, n, p, q, mask, srn, src, srh, srw,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RES_C1: tl.constexpr, RELU: tl.constexpr):
    """``relu?(acc + bias (+ residual))`` for output pixels (n, p, q) x output channels ``chan``."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chan, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        res_rows = n.to(tl.int64) * srn + p.to(tl.int64) * srh + q.to(tl.int64) * srw
        if RES_C1:
            # Channels adjacent in memory: without the stride product the compiler sees the run of
            # channels as contiguous and loads it in 16-byte vectors.
            res_cols = chan
        else:
            res_cols = chan.to(tl.int64) * src
        res = tl.load(res_ptr + res_rows[:, None] + res_cols[None, :], mask=mask)
        acc += res.to(tl.float32)
    if RELU:
        # NaN stays NaN, as in torch.relu.
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return acc


@triton.jit
def _round_to_tf32(v):
    # TF32 tensor cores read an fp32 operand's top 19 bits: they truncate toward zero. Every product
    # then shrinks by ~2^-10 on average, and the shrink compounds layer by layer (on the H200 a
    # resnet50's fp32 output was 6.4e-2 from float64 truncated, 1.4e-2 rounded, cuDNN's TF32 1.7e-2).
    # Rounding to nearest (ties away from zero, as cvt.rna.tf32.f32) leaves the error unbiased; Inf
    # and NaN pass unchanged.
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < float("inf"), rounded, v)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if PRECISION == "tf32" and a.dtype == tl.float32:
        a = _round_to_tf32(a)
        b = _round_to_tf32(b)
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


# id(weight) -> (weakref to it, (version, data pointer, shape, strides), its channels_last copy)
_WEIGHT_COPIES: dict[int, tuple] = {}


def _weight_channels_inner(weight: torch.Tensor) -> torch.Tensor:
    """Like :func:`_channels_inner`, but an NCHW weight is copied once and the copy reused until the
    weight changes (in place: its version; or its storage, shape or strides), not on every call.
    Inference tensors keep no version counter, so theirs are copied on every call."""
    if weight.shape[1] == 1 or weight.stride(1) == 1 or weight.is_inference():
        return _channels_inner(weight)
    key = id(weight)
    state = (weight._version, weight.data_ptr(), weight.shape, weight.stride())
    entry = _WEIGHT_COPIES.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == state:
        return entry[2]
    copy = weight.contiguous(memory_format=torch.channels_last)
    ref = weakref.ref(weight, lambda _, key=key: _WEIGHT_COPIES.pop(key, None))
    _WEIGHT_COPIES[key] = (ref, state, copy)
    return copy


def shape_class(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> str:
    c_g, kh, kw = weight.shape[1:]
    if c_g < 16:
        return "flat"
    if (kh, kw) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0) and _rows_collapse(x):
        return "gemm"
    return "conv"


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows PyTorch's cuDNN convolution TF32 setting, as F.conv2d does."""
    if dtype == torch.float32 and not _conv_allows_tf32():
        return "ieee"
    return "tf32"


def _conv_allows_tf32() -> bool:
    # torch >= 2.9 has torch.backends.cudnn.conv.fp32_precision ("tf32", "ieee", or "none", which
    # reads back already resolved through its parents). Reading the legacy allow_tf32 raises once
    # the new API made cuDNN's conv and RNN settings differ, so it is read only where the new one
    # is missing; setting the legacy flag updates the new one.
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision is None:
        return torch.backends.cudnn.allow_tf32
    return precision == "tf32"


class _Plan(NamedTuple):
    """Everything about a call that follows from its signature (shapes, strides, dtype, options)."""

    key: tuple  # the tuner's key, less the device name
    out_shape: tuple
    scalars: tuple  # the kernel's size arguments, M through PW
    constexprs: dict  # MODE and the epilogue's
    precision: str
    cls: str
    k_chunk: int
    taps: int


# Call signature -> _Plan. Small (a ResNet has a couple of dozen conv signatures); the cap only
# guards a process that sweeps shapes.
_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096


def _plan(x, weight, bias, residual, stride, padding, groups, relu, x_strides, w_strides, res_strides) -> _Plan:
    precision = dot_precision(x.dtype)
    stride, padding = tuple(stride), tuple(padding)
    signature = (x.shape, x_strides, weight.shape, w_strides, x.dtype, stride, padding, groups, bias is None,
                 res_strides, relu, precision)
    plan = _PLANS.get(signature)
    if plan is not None:
        return plan
    _, _, h, w = x.shape
    k_out, c_g, kh, kw = weight.shape
    k_g = k_out // groups
    batch, _, p, q = out_shape = conv_output_shape(x.shape, weight.shape, stride, padding)
    cls = shape_class(x, weight, stride, padding)
    constexprs = dict(
        MODE=_MODES[cls], HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        RES_C1=residual is not None and (res_strides[1] == 1 or residual.shape[1] == 1), RELU=relu,
    )
    # Everything that changes the compiled kernel or its speed: a downsample 1x1 and a residual 1x1
    # of one shape, or inputs of one shape with other strides, are tuned apart.
    key = (str(x.dtype), cls, x.shape, x_strides, weight.shape, w_strides, stride, padding, groups, bias is not None,
           res_strides, relu, precision)
    scalars = (batch * p * q, h, w, p, q, c_g, k_g, k_out, kh, kw, *stride, *padding)
    flat = cls == "flat"
    plan = _Plan(key, out_shape, scalars, constexprs, precision, cls, kh * kw * c_g if flat else c_g,
                 1 if flat else kh * kw)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[signature] = plan
    return plan


def conv_bias_act(x, weight, bias, stride, padding, groups, residual, relu, *, config=None):
    """Launch the fused conv; arguments as validated by :func:`resnet_fused.ops.conv_bias_act`.

    The launch config is ``config`` when given (tests, compile checks), the interpreter's single
    config under ``TRITON_INTERPRET=1``, else the tuner's choice (:data:`configs.TUNED`) among
    :func:`configs.candidates` for this shape, listed only when the tuner has none yet.
    """
    x = _channels_inner(x)
    weight = _weight_channels_inner(weight)
    x_strides, w_strides = x.stride(), weight.stride()
    res_strides = None if residual is None else residual.stride()
    if bias is not None:
        bias = bias.contiguous()
    plan = _plan(x, weight, bias, residual, stride, padding, groups, relu, x_strides, w_strides, res_strides)
    m, _, _, p, q, _, k_g, k_out = plan.scalars[:8]
    out = torch.empty(plan.out_shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    kernel_res_strides = res_strides or (0, 0, 0, 0)

    def launch(cfg: configs.LaunchConfig) -> None:
        tiles = configs.cdiv(m, cfg.block_m) * configs.cdiv(k_g, cfg.block_n)
        split = cfg.split_k > 1
        if split:
            # The epilogue runs in the reduction kernel, so the partial-sum kernel gets none: one
            # compiled kernel then serves every epilogue.
            dest = torch.empty((cfg.split_k, m, k_out), device=x.device, dtype=torch.float32)
            epilogue_args, constexprs = (None, None, dest, *plan.scalars, *x_strides, *w_strides, 0, 0, 0, 0), dict(
                plan.constexprs, HAS_BIAS=False, HAS_RES=False, RES_C1=False, RELU=False)
        else:
            epilogue_args = (bias, residual, out, *plan.scalars, *x_strides, *w_strides, *kernel_res_strides)
            constexprs = plan.constexprs
        conv_bias_act_kernel[(tiles, groups, cfg.split_k)](
            x, weight, *epilogue_args,
            **constexprs,
            PRECISION=plan.precision,
            UPCAST=INTERPRETED and x.dtype == torch.bfloat16,
            SPLIT=split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if split:
            block_n = min(128, configs.next_power_of_2(k_out))
            block_m = min(configs.next_power_of_2(m), 4096 // block_n)
            splitk_reduce_kernel[(configs.cdiv(m, block_m), configs.cdiv(k_out, block_n))](
                dest, bias, residual, out,
                m, k_out, p, q, cfg.split_k, m * k_out, *kernel_res_strides,
                HAS_BIAS=plan.constexprs["HAS_BIAS"], HAS_RES=plan.constexprs["HAS_RES"],
                RES_C1=plan.constexprs["RES_C1"], RELU=relu, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
            )

    if config is not None:
        launch(config)
    elif INTERPRETED:
        launch(configs.interpreter_config(m, k_g, plan.k_chunk))
    else:
        device = configs.device_info(x.device)
        configs.TUNED.run(
            (device.name, *plan.key),
            lambda: configs.candidates(plan.cls, m, k_g, plan.k_chunk, x.element_size(), device.shared_memory,
                                       taps=plan.taps, groups=groups, sm_count=device.sm_count),
            launch,
        )
    return out
