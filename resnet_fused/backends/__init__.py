"""Backends, one small module each. Only :mod:`resnet_fused.ops` imports them.

Each module provides ``NAME``, ``unavailable_reason(device_type, dtype) -> str | None`` (``dtype``
may be ``None``: "for any dtype") and the kernels ``conv_bias_act(x, weight, bias, stride,
padding, groups, residual, relu)``, ``add_relu(x, residual)``, ``bias_act(x, bias, relu)``,
``max_pool2d(x, kernel_size, stride, padding)``, ``global_avg_pool(x)`` and ``linear(x, weight,
bias)`` (x 2-D), called with arguments already validated by ``ops`` (stride and padding as pairs,
non-empty tensors). A backend may also run a whole stage of residual blocks in one call,
``residual_blocks(x, weights, biases, strides, paddings, groups, chain_lengths, projections)``
(see :func:`resnet_fused.ops.residual_blocks`; stride and padding flattened, two ints per conv);
``ops`` runs the blocks conv by conv on a backend without it.
"""

from typing import Optional

import torch


def plain_eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether a call may skip a Python custom op and run its kernel directly: plain tensors, and
    nobody tracing or intercepting ops (no torch.compile, export, fake tensors or dispatch/function
    modes). WHY: the custom op's dispatch costs 50-60 us per call on CPU, more than the rest of a
    small conv's host path; whoever traces still sees the op."""
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)
