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
//
// Returns false when some output was Inf or NaN before the ReLU; `out` is then not the direct
// convolution's answer and the caller must compute it another way. WHY: the transforms add and
// subtract the inputs of a tile, so one Inf input becomes +Inf in one transformed point and -Inf in
// another, and their sum a NaN where the direct convolution gives +-Inf (or 0 after the ReLU).
// Finite outputs are exact in this respect: an output is non-finite here exactly when its 3x3
// receptive field holds an Inf or NaN (every transform coefficient is 0 or +-1, and the nonzero
// ones of an output's row of A^T, through B^T, reach exactly its three input rows), which is also
// the only way a direct convolution of finite weights gives a NaN short of overflowing.
bool conv(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
          bool relu, const at::Tensor& out, int64_t block);

}  // namespace winograd
}  // namespace resnet_fused
