"""Backends, one small module each. Only :mod:`resnet_fused.ops` imports them.

Each module provides ``NAME``, ``unavailable_reason(device_type, dtype) -> str | None`` (``dtype``
may be ``None``: "for any dtype") and the kernels ``conv_bias_act(x, weight, bias, stride,
padding, groups, residual, relu)``, ``add_relu(x, residual)`` and ``bias_act(x, bias, relu)``,
called with arguments already validated by ``ops`` (stride and padding as pairs, non-empty tensors).
"""
