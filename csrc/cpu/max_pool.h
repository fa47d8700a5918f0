#pragma once
// Max pooling on channels_last activations (a ResNet's 3x3 stride-2 pool after the stem), for
// max_pool2d in ops_cpu.cpp. WHY our own: ATen's CPU max_pool2d computes the indices for a
// backward too (max_pool2d_with_indices), an int64 per output. resnet50's pool (64x112x112, 3x3
// stride 2) on its freshly written input, Zen 4 EPYC, 2 threads: batch 8 fp32 1.61 -> 1.13 ms,
// bf16 1.50 -> 0.79 ms (OpenVINO's pool in its bf16 model: 0.70); batch 1 0.21 -> 0.13 ms.

#include <ATen/core/Tensor.h>

namespace resnet_fused {

// Whether this CPU runs max_pool2d_channels_last (x86-64 with AVX2 and F16C).
bool can_max_pool2d_channels_last();

// max over each kernel window (padding never chosen, like -inf; a NaN in a window gives NaN, as
// torch's does) of a dense channels_last x (float, bfloat16 or half), into `out` (N, C, P, Q),
// also dense channels_last.
void max_pool2d_channels_last(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, const at::Tensor& out);

}  // namespace resnet_fused
