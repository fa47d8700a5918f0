#pragma once
// Output buffers of the CPU convolutions, kept for reuse once nobody else holds them.
//
// WHY: a ResNet forward allocates and frees the same activation sizes every call (tens of MB each
// at batch 8). glibc hands such blocks back to the kernel (munmap, or trimming the heap top) when
// they are freed, so the next call page-faults them in again, and the kernel zeroes every page:
// measured on resnet50 batch 8 (2-core EPYC), 28k page faults and ~0.1 s of system time per
// forward, 13% of its wall time. torch.compile avoids it by planning its buffers; eager pays it.
//
// A pooled block is free when the pool holds the only reference to its storage (every tensor or
// view on it holds one more), so a caller that keeps an output keeps it to itself. Free blocks of
// the right size are reused, the least recently used first dropped when the free ones exceed a
// byte budget: RESNET_FUSED_CPU_POOL_MB (default 1024; 0 turns the pool off).

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>

#include <cstdint>

namespace resnet_fused {

// An uninitialised channels_last tensor of `sizes` (N, C, H, W), from the pool when one is free.
at::Tensor pooled_empty_channels_last(c10::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes held by the pool, in blocks in use and in free ones (for tests and the debug op).
int64_t cpu_output_pool_bytes(bool in_use);

}  // namespace resnet_fused
