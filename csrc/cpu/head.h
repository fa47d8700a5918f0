#pragma once
// The classifier head of a ResNet on the CPU: the global average pool of the last feature map and
// the fully connected layer, for global_avg_pool and linear in ops_cpu.cpp.
// WHY our own: at batch 1-8 the head is memory-bound (resnet50's classifier weight is 8 MB in fp32,
// 4 MB in bf16, read once per forward from DRAM) and ATen's kernels leave much of the bandwidth
// unused: resnet50's head on Zen 4, 2 threads, caches flushed first, batch 1: ATen's pool + linear
// 0.76 ms fp32 / 0.62 ms bf16, where reading the weight alone takes 0.34 / 0.19 ms. Ours, alone
// (2048 -> 1000, weight flushed from the caches): linear fp32 0.28-0.30 ms vs ATen's 0.54-0.67 at
// batch 1, 0.83 vs 1.39 at 16; bf16 0.18-0.22 vs 0.29-0.44 at 1, within noise at 4 (0.37-0.39 vs
// 0.33-0.45); the pool of a freshly written 2048x7x7 map at batch 1: 8 vs 19-90 us.

#include <ATen/core/Tensor.h>

namespace resnet_fused {

// Whether this CPU runs the kernels below (x86-64 with AVX2, FMA and F16C).
bool can_run_head_kernels();

// The mean over H x W of each channel of a dense channels_last x (N, C, H, W) of float, bfloat16
// or half, summed in fp32, into `out` (N, C) of x's dtype.
void global_avg_pool_channels_last(const at::Tensor& x, const at::Tensor& out);

// The most rows of x for which linear_rows (the weight read once, every row applied to it) beats
// ATen's GEMM, whose blocking wins past it.
int64_t linear_rows_limit(at::ScalarType type);

// out (N, J) = x (N, K) @ weight (J, K)^T + bias (J) (bias may be undefined), all contiguous and of
// one dtype (float, bfloat16 or half), products summed in fp32 and rounded once.
void linear_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out);

}  // namespace resnet_fused
