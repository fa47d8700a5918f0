"""How fused results are judged: relative error against a float64 reference, per-dtype bounds.

Low-precision results are also judged against the error eager PyTorch itself makes in that dtype
(as flash-attention does): a fused fp16 model may be as far from float64 as eager fp16 is, with
a margin, but no further. Even in fp32 eager is not exact: for an ill-conditioned random model
(a torchvision resnet50 with random weights) eager fp32 logits sit ~3e-5 from float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Largest accepted relative error (max |out - ref| / max |ref|) against float64, before the
# eager-error allowance below.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}
# A result may be this many times further from float64 than eager in the same dtype.
EAGER_FACTOR = 2.0


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, computed in float64 (inf when ``out`` has non-finite values)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if out.numel() else 0.0


@dataclass
class Verdict:
    error: float  # fused vs float64
    eager_error: float  # eager in the same dtype vs float64
    max_abs: float  # fused vs eager, same dtype
    bound: float
    argmax_agreement: float  # fraction of rows whose argmax matches the float64 reference

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


def judge(fused: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor) -> Verdict:
    """Compare a fused output with eager's (same dtype) and with the float64 reference."""
    eager_error = rel_error(eager, reference)
    bound = max(REL_TOL[fused.dtype], EAGER_FACTOR * eager_error)
    if fused.dim() >= 2 and fused.shape[0] > 0:
        agreement = float((fused.float().argmax(1).cpu() == reference.argmax(1).cpu()).float().mean())
    else:
        agreement = 1.0
    return Verdict(
        error=rel_error(fused, reference),
        eager_error=eager_error,
        max_abs=float((fused.double() - eager.double()).abs().max()) if fused.numel() else 0.0,
        bound=bound,
        argmax_agreement=agreement,
    )
