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
// view on it holds one more), so a caller that keeps an output keeps it to itself. A request gets
// the smallest free block that holds it and is at most 4 times its size (its tensor uses the
// block's first bytes; the bound limits what a kept output holds on to), a new one only where
// none does; the least recently used free blocks are dropped when the free ones exceed
// a byte budget: RESNET_FUSED_CPU_POOL_MB (default 1024; 0 turns the pool off).
//
// WHY the smallest that holds it, not one of the same size only: with same-size reuse, every
// activation size of a forward kept blocks of its own (147 MB for resnet50 bf16 at batch 8), so a
// forward cycled through more memory than this Xeon's L3 keeps (about 64 MB measured with copies),
// and output lines were fetched from DRAM before being written. Best fit lets later stages reuse
// the early stages' larger blocks: 88 MB there; resnet50 bf16 batch 8 about 2% faster in separate
// processes (Intel Xeon with AMX, 2 threads; per process medians 48.8/49.3/46.0/48.4 ms against
// 50.6/48.7/52.2/48.6), a chain of layer1-layer2 bottleneck convs 1.14x; fp32 batch 8 unchanged
// (212.9/207.9/193.7 ms against 213.2/203.8/210.3).

#include <ATen/core/Tensor.h>
#include <c10/core/Storage.h>

#include <cstdint>

namespace resnet_fused {

// An uninitialised channels_last tensor of `sizes` (N, C, H, W), from the pool when one is free.
at::Tensor pooled_empty_channels_last(c10::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes held by the pool, in blocks in use and in free ones (for tests and the debug op).
int64_t cpu_output_pool_bytes(bool in_use);

}  // namespace resnet_fused
