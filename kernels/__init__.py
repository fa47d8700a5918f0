"""Triton kernels, shipped as ``resnet_fused.kernels`` (never as a top-level ``kernels`` package)."""
