#pragma once
// KxK convolution as an implicit GEMM over output pixels, with bias, residual and ReLU applied in
// the micro-kernel's store (csrc/cpu/implicit_gemm_cpu.cpp): any kernel size, stride and padding,
// groups 1, fp32 or bf16, channels_last, output channels a multiple of 16, x86-64 with AVX2 and FMA.

#include "gemm_core.h"

#include <ATen/core/Tensor.h>

#include <optional>

namespace resnet_fused {
namespace implicit_gemm {

// The (K, C, R, S) weight packed in panels of 16 output channels: float32 (K / 16, R * S, C, 16).
at::Tensor pack_weight(const at::Tensor& weight);

// out = relu?(conv2d(x, weight, stride, padding) + bias (+ residual)), all dense channels_last fp32
// with `packed` from pack_weight, or all bf16 with `packed` from pack_weight_bf16 (the GEMMs on
// the bf16 core, fp32 sums rounded once to bf16 in the store; `core` then ignored, never brgemm);
// `kernel_size` is the weight's (R, S); `block` output pixels per work item. The threads share
// the output pixels, or with `split_channels` the output channels (each thread then reads its
// share of the weight once and all of the input; possible when the panels divide evenly). fp32's
// GEMMs run on `core`; on brgemm the epilogue follows each call on the 16-column tile it wrote.
void conv(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef kernel_size, const at::Tensor& bias,
          const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
          const at::Tensor& out, int64_t block, bool split_channels, Fp32Core core);

// The (K, C, R, S) weight packed for conv() on bf16 (CPUs with AVX512-BF16, avx512_gemm.h): bf16
// (K / 16, taps, ceil(reduction / 2), 16, 2), where a tap is one filter position of `reduction` = C
// channels, or for inputs of few channels (the stem) one filter row of S * C
// (implicit_gemm_cpu.cpp); an odd reduction is padded with a zero.
at::Tensor pack_weight_bf16(const at::Tensor& weight);

// conv() on bf16 with the GEMMs on AMX tiles (amx_gemm.h): the same bias, residual and ReLU, the
// weight from pack_weight_amx. Needs can_run_amx().
void conv_amx(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef kernel_size, const at::Tensor& bias,
              const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
              const at::Tensor& out, int64_t block, bool split_channels);

// pack_weight_bf16's layout for the AMX core: a tap's reduction of whole 32-channel chunks as
// pack_weight_bf16 packs it; a few-channel input's merged filter rows that fit a chunk once each
// pixel's channels are widened (the stem's 7 pixels x 3 channels as 7 x 4) one tap each, zero for
// the widened channels and the rest of the chunk (bf16 (K / 16, R, 16, 16, 2)); other reductions
// joined into one tap of all of them, zero-padded to whole chunks (bf16 (K / 16, 1, ceil(taps *
// reduction / 32) * 16, 16, 2)).
at::Tensor pack_weight_amx(const at::Tensor& weight);

// Whether this CPU runs conv() on bf16 (AVX512-BF16).
bool can_run_bf16();

// Whether this CPU (and OS) runs conv_amx(): AMX-TILE and AMX-BF16 on x86-64 Linux.
bool can_run_amx();

// Whether `split_channels` can apply: the output channels' panels divide evenly between the threads.
bool can_split_channels(int64_t out_channels, int64_t threads);

}  // namespace implicit_gemm
}  // namespace resnet_fused
