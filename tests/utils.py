"""Shared test helpers: float64 references and per-dtype tolerances."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest accepted relative error (max |out - ref| / max |ref|) against a float64 reference.
# Low-precision dtypes are also judged against the error eager PyTorch itself makes (see
# ``assert_within_eager_error``); these bounds are the absolute backstop.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}


def reference_conv_bias_act(x, weight, bias, *, stride=1, padding=0, groups=1, residual=None, relu=True):
    """The op's definition, evaluated in float64."""
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, 1, groups)
    if residual is not None:
        out = out + residual.double()
    return out.relu() if relu else out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-30)
    return float((out - ref).abs().max() / scale)


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
