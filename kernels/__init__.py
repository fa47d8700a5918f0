"""Triton kernels, shipped as ``resnet_fused.kernels`` (never as a top-level ``kernels`` package).

* :mod:`.conv`: the fused ``relu?(conv(x, w) + bias (+ residual))`` implicit-GEMM kernel.
* :mod:`.pointwise`: ``relu(x + residual)`` and ``relu?(x + bias)`` for convs that are not ours.
* :mod:`.configs`: launch configurations per shape class (split-K for deep layers at small batch)
  and the once-per-shape autotuner, whose choices are kept on disk across processes.

Importing any of them imports triton; :mod:`resnet_fused.backends.triton` does so only on demand.
"""
