"""Shape arithmetic shared by the op validation and every backend's fake (meta) kernel."""

from __future__ import annotations

from typing import Sequence


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Normalise an int or a 2-sequence of ints (stride, padding) to a tuple of two ints."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        values = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values


def _window_output(
    h: int, w: int, window: Sequence[int], stride: Sequence[int], padding: Sequence[int]
) -> tuple[int, int]:
    """(P, Q) of a window slid over an (H, W) map (floor mode, dilation 1)."""
    return ((h + 2 * padding[0] - window[0]) // stride[0] + 1, (w + 2 * padding[1] - window[1]) // stride[1] + 1)


def conv_output_shape(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> tuple[int, int, int, int]:
    """(N, K, P, Q) of a 2-D convolution of an (N, C, H, W) input with a (K, C/groups, R, S) weight."""
    n, _, h, w = x_shape
    k, _, r, s = weight_shape
    return (n, k, *_window_output(h, w, (r, s), stride, padding))


def pool_output_shape(
    x_shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
) -> tuple[int, int, int, int]:
    """(N, C, P, Q) of a 2-D pooling (floor mode, dilation 1) of an (N, C, H, W) input."""
    n, c, h, w = x_shape
    return (n, c, *_window_output(h, w, kernel_size, stride, padding))
