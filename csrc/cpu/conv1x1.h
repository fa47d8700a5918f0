#pragma once
// 1x1 convolution as one GEMM over pixels with the epilogue fused into the micro-kernel's store
// (csrc/cpu/conv1x1_cpu.cpp): 1x1, padding 0, any stride, groups 1, fp32, channels_last, output
// channels a multiple of 16, x86-64 with AVX2 and FMA.

#include <ATen/core/Tensor.h>

#include <optional>

namespace resnet_fused {
namespace conv1x1 {

// The (K, C, 1, 1) weight packed in panels of 16 output channels: float32 (K / 16, C, 16).
at::Tensor pack_weight(const at::Tensor& weight);

// out = relu?(conv1x1(x, weight, stride) + bias (+ residual)), all dense channels_last fp32;
// `block` output pixels per work item.
void conv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
          const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, const at::Tensor& out,
          int64_t block);

}  // namespace conv1x1
}  // namespace resnet_fused
