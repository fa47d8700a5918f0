#pragma once
// Winograd F(2x2, 3x3) convolution on CPU (csrc/cpu/winograd_cpu.cpp): 3x3, stride 1, padding 1,
// groups 1, fp32, channels_last, output channels a multiple of 16, x86-64 with AVX2 and FMA
// (avx2_gemm.h).

#include <ATen/core/Tensor.h>

#include <optional>

namespace resnet_fused {
namespace winograd {

// The (K, C, 3, 3) weight transformed and packed for conv(): float32 (16, K / 16, C, 16).
at::Tensor transform_weight(const at::Tensor& weight);

// out = relu?(conv3x3(x, weight) + bias (+ residual)), all dense channels_last fp32, `u` from
// transform_weight; `block` tiles per work item (the tuning knob: cache reuse vs weight traffic).
void conv(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
          bool relu, const at::Tensor& out, int64_t block);

}  // namespace winograd
}  // namespace resnet_fused
