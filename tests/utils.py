"""Shared test helpers: float64 references and per-dtype tolerances."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnet_fused.accuracy import REL_TOL, rel_error  # noqa: F401 - re-exported for the tests


def reference_conv_bias_act(x, weight, bias, *, stride=1, padding=0, groups=1, residual=None, relu=True):
    """The op's definition, evaluated in float64."""
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, 1, groups)
    if residual is not None:
        out = out + residual.double()
    return out.relu() if relu else out


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, rel: float | None = None):
    """Shape match, every element finite (so none was left unwritten), error within the dtype's tolerance."""
    dtype = dtype or out.dtype
    assert tuple(out.shape) == tuple(ref.shape), f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "output has non-finite elements (unwritten or overflowed)"
    err = rel_error(out, ref)
    bound = REL_TOL[dtype] if rel is None else rel
    assert err <= bound, f"relative error {err:.3g} exceeds {bound:.3g} for {dtype}"
    return err


def assert_within_eager_error(out, eager, ref, factor: float = 2.0, floor: float = 1e-6):
    """Low-precision result no worse than ``factor`` times eager PyTorch's own error in that dtype."""
    ours, theirs = rel_error(out, ref), rel_error(eager, ref)
    assert torch.isfinite(out).all(), "output has non-finite elements"
    assert ours <= factor * theirs + floor, f"error {ours:.3g} vs eager's {theirs:.3g} in {out.dtype}"
    return ours, theirs
