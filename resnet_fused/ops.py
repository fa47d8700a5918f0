"""The one door to every kernel: public functional ops, input validation, backend choice.

Every op validates its inputs here, once, for all backends, then hands plain, checked arguments
to a backend module from :mod:`resnet_fused.backends`. Each backend module answers two questions:
``unavailable_reason(device_type, dtype)`` (``None`` when it can run) and how to call it
(``conv_bias_act``, ``add_relu``, ``bias_act``, ``max_pool2d``, ``global_avg_pool``, ``linear``).

The ops are inference-only: none of the kernels has a backward, so an input that requires grad
while grad mode is on is refused with an error rather than given an output silently detached
from the graph. Run fused models under ``torch.inference_mode()`` or ``torch.no_grad()``.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref
from typing import NamedTuple, Sequence

import torch

from . import _shapes
from .backends import extension, onednn, torch_backend, triton

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "BackendFallbackWarning",
    "available_backends",
    "resolve_backend",
    "conv_bias_act",
    "BoundConvBiasAct",
    "residual_blocks",
    "residual_blocks_kernel",
    "add_relu",
    "bias_act",
    "max_pool2d",
    "global_avg_pool",
    "linear",
]

BACKENDS = {
    "torch": torch_backend,
    "onednn": onednn,
    "triton": triton,
    "extension": extension,
}

# Automatic choice, fastest first. Each device type ends with the always-available "torch". On the
# H200 (2026-11-30, fp16) the extension beat our Triton kernels everywhere: resnet50 7.88 vs 13.58 ms
# at batch 256, 0.38 vs 0.66 ms at batch 1 under a CUDA graph; resnet18 3.71 vs 6.02 ms at batch 256.
_PREFERENCE = {
    "cuda": ("extension", "triton", "torch"),
    "cpu": ("extension", "onednn", "torch"),
}

ENV_VAR = "RESNET_FUSED_BACKEND"
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for explicitly but cannot run on this device and dtype."""


class BackendFallbackWarning(UserWarning):
    """The automatic choice skipped a faster backend that cannot run here."""


class BackendStatus(NamedTuple):
    available: bool
    devices: tuple[str, ...]
    reason: str


def _device_types() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def available_backends() -> dict[str, BackendStatus]:
    """For each backend: can it run here, on which device types, and if not (or not everywhere) why."""
    result = {}
    for name, module in BACKENDS.items():
        devices, reasons = [], []
        for device_type in _device_types():
            reason = module.unavailable_reason(device_type, None)
            if reason is None:
                devices.append(device_type)
            else:
                reasons.append(f"{device_type}: {reason}")
        if not torch.cuda.is_available():
            reasons.append("cuda: no CUDA device is visible to PyTorch")
        result[name] = BackendStatus(bool(devices), tuple(devices), "; ".join(reasons))
    return result


# Cached: the choice is made, and any fallback warned about, once per (request, device type, dtype).
@functools.lru_cache(maxsize=None)
def _resolve(requested: str | None, device_type: str, dtype: torch.dtype) -> str:
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; known backends: {', '.join(BACKENDS)}")
        reason = BACKENDS[requested].unavailable_reason(device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run on {device_type} with {dtype}: {reason}")
        return requested
    skipped = []
    for name in _PREFERENCE.get(device_type, ("torch",)):
        reason = BACKENDS[name].unavailable_reason(device_type, dtype)
        if reason is None:
            if skipped:
                warnings.warn(
                    f"resnet_fused: automatic backend on {device_type} with {dtype} falls back to {name!r} "
                    f"({'; '.join(skipped)})",
                    BackendFallbackWarning,
                    stacklevel=4,
                )
            return name
        skipped.append(f"{name!r} unavailable: {reason}")
    raise BackendUnavailableError(f"no backend can run on {device_type} with {dtype}: {'; '.join(skipped)}")


def _constant_when_traced(fn):
    """``torch.compiler.assume_constant_result(fn)`` without its cost: that call only sets this
    attribute, but it imports torch._dynamo first (3-7 s here), and ``import resnet_fused`` must stay
    fast. tests/test_compile_export.py checks that torch still marks functions this way."""
    fn._dynamo_marked_constant = True
    return fn


# Under torch.compile the choice is made once, when Dynamo traces the op (it calls this function
# instead of tracing it), and the graph calls the chosen backend's op: what decides it
# (availability probes, the environment, the cache) is host-side Python that Dynamo cannot trace
# (a probe returns a non-tensor) and need not.
@_constant_when_traced
def resolve_backend(backend: str | None, device: torch.device | str, dtype: torch.dtype) -> str:
    """Name of the backend an op will use: ``backend``, else ``$RESNET_FUSED_BACKEND``, else automatic.

    A compiled or exported model keeps the backend chosen when it was traced.
    """
    requested = backend or os.environ.get(ENV_VAR) or None
    if requested == "auto":
        requested = None
    return _resolve(requested, torch.device(device).type, dtype)


class _Meta(NamedTuple):
    """What validation reads of a tensor: hashable, so the conv checks can be cached per call shape."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    def dim(self) -> int:
        return len(self.shape)


def _meta(name: str, t) -> _Meta:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return _Meta(t.shape, t.dtype, t.device)


def _check_tensor(name: str, t: torch.Tensor | _Meta, ndim: int) -> None:
    if not isinstance(t, (torch.Tensor, _Meta)):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATING:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must be on one device")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all tensors must share one dtype")


def _check_bias(bias: torch.Tensor | _Meta, x: torch.Tensor | _Meta, out_features: int) -> None:
    _check_tensor("bias", bias, 1)
    _check_same("bias", bias, x)
    if bias.shape[0] != out_features:
        raise ValueError(f"bias must have shape ({out_features},) to match weight, got {tuple(bias.shape)}")


def _check_no_grad(**tensors: torch.Tensor | None) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"resnet_fused ops are inference-only and {name} requires grad; "
                "run under torch.inference_mode() or torch.no_grad(), or detach it"
            )


def _hashable(value):
    # [1, 1] -> (1, 1) so that list arguments share the cache; anything odder stays as it is, so an
    # error message shows what the caller passed.
    if isinstance(value, list) and all(type(v) is int for v in value):
        return tuple(value)
    return value


def _check_conv(x: _Meta, weight: _Meta, bias: _Meta | None, stride, padding, groups, residual: _Meta | None):
    """Every check of conv_bias_act's arguments that does not read tensor data; returns the output
    shape and the (stride, padding) pairs."""
    _check_tensor("x", x, 4)
    _check_tensor("weight", weight, 4)
    _check_same("weight", weight, x)
    stride = _shapes.pair(stride, "stride")
    padding = _shapes.pair(padding, "padding")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    k, c_per_group, r, s = weight.shape
    if k % groups != 0:
        raise ValueError(f"weight has {k} output channels, not divisible by groups={groups}")
    if x.shape[1] != c_per_group * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects {c_per_group * groups} "
            f"({c_per_group} per group x groups={groups}); x shape {tuple(x.shape)}, weight shape {tuple(weight.shape)}"
        )
    if bias is not None:
        _check_bias(bias, x, k)
    out_shape = _shapes.conv_output_shape(x.shape, weight.shape, stride, padding)
    if out_shape[2] < 1 or out_shape[3] < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[2:])} is too small for a {r}x{s} kernel with padding {padding} "
            f"(output would be {out_shape[2]}x{out_shape[3]})"
        )
    if residual is not None:
        _check_tensor("residual", residual, 4)
        _check_same("residual", residual, x)
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
    return out_shape, stride, padding


# The checks depend only on shapes, dtypes, devices and the conv parameters: a model calls each conv
# with the same ones every time, and the Python checks cost as much as a small conv's kernel.
_checked_conv = functools.lru_cache(maxsize=4096)(_check_conv)


def _run_check(check, cached_check, args):
    """``check(*args)`` through its cache where the arguments allow it."""
    if torch.compiler.is_compiling():
        # Traced once per graph, so the cache saves nothing there; and Dynamo refuses hash() of a
        # tuple (torch 2.11), while export's symbolic sizes are unhashable.
        return check(*args)
    try:
        hash(args)
    except TypeError:  # arguments of unusual types: checked (and refused) without the cache
        return check(*args)
    return cached_check(*args)


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """``relu?(conv2d(x, weight) + bias (+ residual))`` in one call.

    With BN folded into ``weight``/``bias`` this is conv+BN+ReLU, and with ``residual`` a block's
    last conv + residual add + ReLU. Any memory layout is accepted; the output layout is the
    backend's (channels_last for channels_last inputs on every backend).
    """
    x_meta, w_meta = _meta("x", x), _meta("weight", weight)
    b_meta = None if bias is None else _meta("bias", bias)
    r_meta = None if residual is None else _meta("residual", residual)
    args = (x_meta, w_meta, b_meta, _hashable(stride), _hashable(padding), groups, r_meta)
    out_shape, stride, padding = _run_check(_check_conv, _checked_conv, args)
    _check_no_grad(x=x, weight=weight, bias=bias, residual=residual)
    if x.numel() == 0 or weight.numel() == 0:
        return x.new_zeros(out_shape).contiguous(memory_format=torch.channels_last)
    module = BACKENDS[resolve_backend(backend, x.device, x.dtype)]
    return module.conv_bias_act(x, weight, bias, stride, padding, groups, residual, bool(relu))


def _none():
    return None


class BoundConvBiasAct:
    """:func:`conv_bias_act` with the conv's own arguments bound, for a module that calls it the same
    way on every forward.

    The first call with a given signature (x's and the residual's shape, dtype and device, the very
    weight and bias tensors, and the backend request) runs every check of :func:`conv_bias_act`;
    later calls with that signature go straight to the backend's kernel. WHY: measured on resnet50
    at batch 1 (CPU), the per-call checks and dispatch cost 2-3 ms of a 70 ms forward. Calls with
    grad enabled, with tensor subclasses or under ``torch.compile`` always take the checked path.
    """

    __slots__ = ("stride", "padding", "groups", "relu", "backend", "_plan")

    def __init__(self, *, stride=1, padding=0, groups: int = 1, relu: bool = True, backend: str | None = None):
        self.stride = _shapes.pair(stride, "stride")
        self.padding = _shapes.pair(padding, "padding")
        self.groups = groups
        self.relu = bool(relu)
        self.backend = backend
        self._plan = None  # (signature, weight, bias, backend function), replaced whole so threads see either

    def __getstate__(self):
        return {name: getattr(self, name) for name in self.__slots__ if name != "_plan"}

    def __setstate__(self, state):
        for name, value in state.items():
            setattr(self, name, value)
        self._plan = None

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        # The plan holds weak references to the weight and bias it was checked with: the same objects
        # (a module's buffers) pass by identity, anything else (a .to() copy) takes the checked path,
        # and a replaced weight is not kept alive by the plan. WHY so lean: inside a forward this runs
        # right after a conv kernel has flushed the interpreter's state from the caches, where each
        # step costs several times its micro-benchmark time (see FusedConvBNAct.forward).
        plan = self._plan
        # is_compiling() first: a traced call must never reach the cached plan (its weak references
        # and its environment read).
        if (
            plan is not None
            and not torch.compiler.is_compiling()
            and weight is plan[1]()
            and bias is plan[2]()
            and type(x) is torch.Tensor
        ):
            rkey = None if residual is None else (type(residual), residual.shape, residual.dtype, residual.device)
            if (x.shape, x.dtype, x.device, rkey, torch.is_grad_enabled(), os.environ.get(ENV_VAR)) == plan[0]:
                return plan[3](x, weight, bias, self.stride, self.padding, self.groups, residual, self.relu)
        out = conv_bias_act(
            x,
            weight,
            bias,
            stride=self.stride,
            padding=self.padding,
            groups=self.groups,
            residual=residual,
            relu=self.relu,
            backend=self.backend,
        )
        plannable = (
            not torch.compiler.is_compiling()
            and not torch.is_grad_enabled()
            and type(x) is torch.Tensor
            and type(weight) is torch.Tensor
            and (bias is None or type(bias) is torch.Tensor)
            and (residual is None or type(residual) is torch.Tensor)
            and x.numel() > 0
            and weight.numel() > 0
        )
        if plannable:
            rkey = None if residual is None else (type(residual), residual.shape, residual.dtype, residual.device)
            key = (x.shape, x.dtype, x.device, rkey, False, os.environ.get(ENV_VAR))
            backend = BACKENDS[resolve_backend(self.backend, x.device, x.dtype)]
            bias_ref = _none if bias is None else weakref.ref(bias)
            self._plan = (key, weakref.ref(weight), bias_ref, backend.conv_bias_act)
        return out


def residual_blocks(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    *,
    strides: Sequence,
    paddings: Sequence,
    groups: Sequence[int],
    chain_lengths: Sequence[int],
    projections: Sequence[bool],
    backend: str | None = None,
) -> torch.Tensor:
    """A stage of residual blocks (a ResNet's ``layer1``) in one call.

    Block ``i`` runs a chain of ``chain_lengths[i]`` convs, each ``conv_bias_act`` with ReLU, the
    last one adding the shortcut before its ReLU; the shortcut is the block's input, or where
    ``projections[i]`` is true one more conv of it (conv + folded BN, no ReLU), which comes first.
    ``weights``, ``biases``, ``strides``, ``paddings`` and ``groups`` have one entry per conv, in
    that order (a block's projection, then its chain). Each conv's input is made channels_last
    first, as :class:`~resnet_fused.modules.FusedConvBNAct` does.

    Every conv is checked as :func:`conv_bias_act` checks it. A backend that runs a whole stage in
    one call (the extension: its C++ loop skips the Python and op-call cost per conv) gets it;
    others run the convs one by one.
    """
    counts = {"biases": len(biases), "strides": len(strides), "paddings": len(paddings), "groups": len(groups)}
    wrong = {name: n for name, n in counts.items() if n != len(weights)}
    if wrong:
        raise ValueError(f"residual_blocks takes one entry per weight ({len(weights)}), got {wrong}")
    if len(chain_lengths) != len(projections):
        raise ValueError(
            f"chain_lengths and projections need one entry per block, got {len(chain_lengths)} and {len(projections)}"
        )
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in chain_lengths):
        raise ValueError(f"chain_lengths must be positive ints, got {list(chain_lengths)}")
    needed = sum(chain_lengths) + sum(bool(p) for p in projections)
    if needed != len(weights):
        raise ValueError(f"the blocks described take {needed} convs, got {len(weights)} weights")
    convs = list(zip(weights, biases, strides, paddings, groups))
    # Every conv checked before any runs, on metadata: an error names the block and conv.
    meta, i = _meta("x", x), 0
    for block, (length, projection) in enumerate(zip(chain_lengths, projections)):
        shortcut = meta
        if projection:
            shortcut = _check_block_conv(block, "projection", meta, convs[i], None)
            i += 1
        for j in range(length):
            meta = _check_block_conv(block, f"conv {j}", meta, convs[i], shortcut if j == length - 1 else None)
            i += 1
    _check_no_grad(x=x, **{f"weights[{n}]": w for n, w in enumerate(weights)},
                   **{f"biases[{n}]": b for n, b in enumerate(biases)})
    kernel = residual_blocks_kernel(backend, x.device, x.dtype)
    if kernel is not None and x.numel() > 0 and all(w.numel() > 0 for w in weights):
        flat_stride = [v for stride in strides for v in _shapes.pair(stride, "stride")]
        flat_padding = [v for padding in paddings for v in _shapes.pair(padding, "padding")]
        return kernel(x, list(weights), list(biases), flat_stride, flat_padding, list(groups), list(chain_lengths),
                      [bool(p) for p in projections])
    next_conv = iter(convs)

    def conv(inp, residual, relu):
        weight, bias, stride, padding, group = next(next_conv)
        return conv_bias_act(inp.contiguous(memory_format=torch.channels_last), weight, bias, stride=stride,
                             padding=padding, groups=group, residual=residual, relu=relu, backend=backend)

    for length, projection in zip(chain_lengths, projections):
        shortcut = conv(x, None, False) if projection else x
        for j in range(length):
            x = conv(x, shortcut if j == length - 1 else None, True)
    return x


def _check_block_conv(block: int, name: str, x: _Meta, conv: tuple, residual: _Meta | None) -> _Meta:
    """conv_bias_act's checks of one conv of residual_blocks; the output's metadata."""
    weight, bias, stride, padding, groups = conv
    try:
        args = (x, _meta("weight", weight), None if bias is None else _meta("bias", bias), _hashable(stride),
                _hashable(padding), groups, residual)
        out_shape, _, _ = _run_check(_check_conv, _checked_conv, args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"residual_blocks: block {block}, {name}: {e}") from None
    return _Meta(torch.Size(out_shape), x.dtype, x.device)


def residual_blocks_kernel(backend: str | None, device: torch.device | str, dtype: torch.dtype):
    """The one-call stage kernel of the backend chosen for ``device`` and ``dtype`` (its
    ``residual_blocks``, taking checked arguments with stride and padding flattened), or ``None``
    where that backend runs convs one by one. For callers that check the arguments once and then
    call it many times (:class:`~resnet_fused.modules.FusedStage`)."""
    return getattr(BACKENDS[resolve_backend(backend, device, dtype)], "residual_blocks", None)


def add_relu(x: torch.Tensor, residual: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``relu(x + residual)`` for a block whose conv is not ours."""
    _check_tensor("x", x, 4)
    _check_tensor("residual", residual, 4)
    _check_same("residual", residual, x)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_no_grad(x=x, residual=residual)
    if x.numel() == 0:
        return torch.empty_like(x)
    return BACKENDS[resolve_backend(backend, x.device, x.dtype)].add_relu(x, residual)


def bias_act(x: torch.Tensor, bias: torch.Tensor, *, relu: bool = True, backend: str | None = None) -> torch.Tensor:
    """``relu?(x + bias[channel])`` over an (N, C, H, W) tensor, for a conv that is not ours."""
    _check_tensor("x", x, 4)
    _check_tensor("bias", bias, 1)
    _check_same("bias", bias, x)
    if bias.shape[0] != x.shape[1]:
        raise ValueError(f"bias must have shape ({x.shape[1]},) to match x's channels, got {tuple(bias.shape)}")
    _check_no_grad(x=x, bias=bias)
    if x.numel() == 0:
        return torch.empty_like(x)
    return BACKENDS[resolve_backend(backend, x.device, x.dtype)].bias_act(x, bias, bool(relu))


def _check_pool(x: _Meta, kernel_size, stride, padding):
    """max_pool2d's checks that do not read tensor data; returns the output shape and the
    (kernel_size, stride, padding) pairs."""
    _check_tensor("x", x, 4)
    kernel_size = _shapes.pair(kernel_size, "kernel_size")
    stride = kernel_size if stride is None else _shapes.pair(stride, "stride")
    padding = _shapes.pair(padding, "padding")
    if min(kernel_size) < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel_size}")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(padding) < 0 or any(2 * p > k for p, k in zip(padding, kernel_size)):
        raise ValueError(f"padding must be non-negative and at most half of kernel_size {kernel_size}, got {padding}")
    out_shape = _shapes.pool_output_shape(x.shape, kernel_size, stride, padding)
    if out_shape[2] < 1 or out_shape[3] < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[2:])} is too small for a {kernel_size[0]}x{kernel_size[1]} window "
            f"with padding {padding} (output would be {out_shape[2]}x{out_shape[3]})"
        )
    return out_shape, kernel_size, stride, padding


_checked_pool = functools.lru_cache(maxsize=256)(_check_pool)


def max_pool2d(
    x: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``torch.nn.functional.max_pool2d`` (dilation 1, floor mode, no indices): the max over each
    window, padding never chosen, a NaN in a window giving NaN. ``stride`` defaults to
    ``kernel_size``. The output keeps x's memory layout."""
    args = (_meta("x", x), _hashable(kernel_size), _hashable(stride), _hashable(padding))
    _, kernel_size, stride, padding = _run_check(_check_pool, _checked_pool, args)
    _check_no_grad(x=x)
    return BACKENDS[resolve_backend(backend, x.device, x.dtype)].max_pool2d(x, kernel_size, stride, padding)


def global_avg_pool(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``nn.AdaptiveAvgPool2d(1)``: the mean of each channel over its H x W pixels, summed in at
    least fp32, as an (N, C, 1, 1) tensor (a NaN in a channel gives NaN there)."""
    _check_tensor("x", x, 4)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"global_avg_pool needs at least one pixel, got x of spatial size {tuple(x.shape[2:])}")
    _check_no_grad(x=x)
    if x.numel() == 0:
        return x.new_empty((x.shape[0], x.shape[1], 1, 1))
    return BACKENDS[resolve_backend(backend, x.device, x.dtype)].global_avg_pool(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``: ``x @ weight.T + bias`` over x's last dimension (the
    classifier of a ResNet), products summed in at least fp32."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"x and weight must be torch.Tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features), got a 0-D tensor")
    if x.dtype not in _FLOATING:
        raise TypeError(f"x must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    _check_tensor("weight", weight, 2)
    _check_same("weight", weight, x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} expects {weight.shape[1]} input features, but x of shape "
            f"{tuple(x.shape)} has {x.shape[-1]}"
        )
    if bias is not None:
        _check_bias(bias, x, weight.shape[0])
    _check_no_grad(x=x, weight=weight, bias=bias)
    if x.numel() == 0 or weight.numel() == 0:
        return torch_backend.linear(x, weight, bias)  # empty shapes: torch's rules for what comes out
    rows = x.reshape(-1, x.shape[-1])
    out = BACKENDS[resolve_backend(backend, x.device, x.dtype)].linear(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
