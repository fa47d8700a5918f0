// 1x1 convolution on channels_last fp32: out[pixels x K] = x[pixels x C] * W[C x K], where a
// pixel's C channels are one contiguous row of x. Why not oneDNN's: its conv + residual-add
// post-op reads the residual in a separate pass on AVX2 machines, while here bias, residual and
// ReLU are applied to the accumulators before the single store (the per-shape timing in
// ops_cpu.cpp picks whichever is faster).

#include "conv1x1.h"

#include "avx2_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

namespace resnet_fused {
namespace conv1x1 {

using avx2::kPanel;

at::Tensor pack_weight(const at::Tensor& weight) {
  const int64_t k = weight.size(0), c = weight.size(1);
  const at::Tensor w = weight.to(at::kFloat).reshape({k / kPanel, kPanel, c}).transpose(1, 2);
  return w.contiguous();
}

void conv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias,
          const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, const at::Tensor& out,
          int64_t block) {
#if RF_HAVE_X86
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = out.size(1), p = out.size(2), q = out.size(3);
  const int64_t pixels = n * p * q;
  TORCH_INTERNAL_ASSERT(block >= 1);
  block = std::min(block, pixels);
  const int64_t blocks = (pixels + block - 1) / block;
  const int64_t panels = k / kPanel;
  // Output channels are split too, so that a small map (7x7 at batch 1) still gives every thread
  // several work items; no work is duplicated by the split.
  const int64_t threads = at::get_num_threads();
  int64_t k_groups = 1;
  while (blocks * k_groups < 4 * threads && panels % (k_groups * 2) == 0) {
    k_groups *= 2;
  }
  const int64_t group_panels = panels / k_groups;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = packed.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, blocks * k_groups, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<const float*> rows;
    rows.resize(block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = (item / k_groups) * block, kg = item % k_groups;
      const int64_t count = std::min(block, pixels - t0);
      for (int64_t r = 0; r < count; ++r) {
        const int64_t pixel = t0 + r;
        const int64_t img = pixel / (p * q), y = (pixel / q) % p, xx = pixel % q;
        rows[r] = xp + ((img * h + y * stride[0]) * w + xx * stride[1]) * c;
      }
      for (int64_t panel = kg * group_panels; panel < (kg + 1) * group_panels; ++panel) {
        const int64_t offset = t0 * k + panel * kPanel;
        avx2::gemm_rows(count, c, rows.data(), wp + panel * c * kPanel, op + offset, k,
                        avx2::Epilogue{bp + panel * kPanel, rp == nullptr ? nullptr : rp + offset, k, relu});
      }
    }
  });
#else
  TORCH_CHECK(false, "resnet_fused: the AVX2 1x1 convolution needs an x86-64 CPU");
#endif
}

}  // namespace conv1x1
}  // namespace resnet_fused
