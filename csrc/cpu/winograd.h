#pragma once
// Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions on CPU (csrc/cpu/winograd_cpu.cpp): 3x3,
// stride 1, padding 1, groups 1, fp32, channels_last, output channels a multiple of 16, x86-64
// with AVX2 and FMA (avx2_gemm.h).

#include "gemm_core.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace resnet_fused {
namespace winograd {

// The (K, C, 3, 3) weight transformed for output tiles of `tile` x `tile` (2 or 4) and packed for
// conv(): float32 ((tile + 2)^2, K / 16, C, 16).
at::Tensor transform_weight(const at::Tensor& weight, int64_t tile);

// The same F(2x2, 3x3) transform rounded to bf16 and packed in channel pairs for the bf16 GEMM core
// (avx512_gemm.h; CPUs with AVX512-BF16): bf16 (16, K / 16, ceil(C / 2), 16, 2). conv() given it
// rounds the transformed inputs to bf16 too and sums their products in fp32: 2x the multiply-add
// rate of fp32, for bf16 models only (error per layer ~2x a direct bf16 conv's; simulated over C =
// 256: 4.8e-3 of the largest output against 2.9e-3). x, bias, residual and out are then bf16
// (transforms in fp32, the output rounded once).
at::Tensor transform_weight_bf16(const at::Tensor& weight);

// out = relu?(conv3x3(x, weight) + bias (+ residual)), all dense channels_last fp32 with `u` from
// transform_weight (its tile size is read off its shape), or all bf16 with `u` from
// transform_weight_bf16; `block` tiles per work item (the tuning
// knob: cache reuse vs weight traffic).
//
// Returns false when some output was Inf or NaN before the ReLU; `out` is then not the direct
// convolution's answer and the caller must compute it another way. WHY: the transforms add and
// subtract the inputs of a tile, so one Inf input becomes +Inf in one transformed point and -Inf in
// another, and their sum a NaN where the direct convolution gives +-Inf (or 0 after the ReLU), or a
// NaN in an output outside the Inf's 3x3 neighbourhood. The converse holds: when the direct
// convolution of finite weights gives a non-finite output (an Inf or NaN in its receptive field,
// short of overflow), so does Winograd, since that input reaches the output with a nonzero
// coefficient through the transformed points, and an Inf or NaN term never sums to a finite value.
// So a call with all outputs finite is the convolution's answer, and any other is flagged.
//
// fp32's (M+2)^2 GEMMs run on `core` (gemm_core.h); bf16's on the bf16 core (`core` ignored, never brgemm).
bool conv(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
          bool relu, const at::Tensor& out, int64_t block, Fp32Core core);

}  // namespace winograd
}  // namespace resnet_fused
