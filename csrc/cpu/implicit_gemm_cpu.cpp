// Convolution on channels_last fp32 as an implicit GEMM: out[pixels x K] = sum over the filter's
// taps (r, s) of x_rs[pixels x C] * W_rs[C x K], where x_rs's row for an output pixel is the input
// pixel under tap (r, s): one contiguous run of C channels, or a zero row in the padding. The taps
// are summed in the micro-kernel's registers (no im2col buffer) and bias, residual and ReLU applied
// before the single store. Why next to oneDNN: its conv + residual-add post-op reads the residual
// in a separate pass on AVX2 machines; the per-shape timing in ops_cpu.cpp keeps whichever is faster.

#include "implicit_gemm.h"

#include "avx2_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace resnet_fused {
namespace implicit_gemm {

using avx2::kPanel;

at::Tensor pack_weight(const at::Tensor& weight) {
  const int64_t k = weight.size(0), c = weight.size(1), taps = weight.size(2) * weight.size(3);
  // (K, C, R, S) -> (K / 16, 16, C, R * S) -> (K / 16, R * S, C, 16)
  const at::Tensor w = weight.to(at::kFloat).reshape({k / kPanel, kPanel, c, taps}).permute({0, 3, 2, 1});
  return w.contiguous();
}

void conv(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef kernel_size, const at::Tensor& bias,
          const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
          const at::Tensor& out, int64_t block) {
#if RF_HAVE_X86
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = out.size(1), p = out.size(2), q = out.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], taps = kh * kw;
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
    thread_local std::vector<float> zero;
    rows.resize(block * taps);
    zero.assign(c, 0.f);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t0 = (item / k_groups) * block, kg = item % k_groups;
      const int64_t count = std::min(block, pixels - t0);
      for (int64_t r = 0; r < count; ++r) {
        const int64_t pixel = t0 + r;
        const int64_t img = pixel / (p * q);
        const int64_t y0 = ((pixel / q) % p) * stride[0] - padding[0], x0 = (pixel % q) * stride[1] - padding[1];
        for (int64_t i = 0; i < kh; ++i) {
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t yy = y0 + i, xx = x0 + j;
            const bool inside = yy >= 0 && yy < h && xx >= 0 && xx < w;
            rows[r * taps + i * kw + j] = inside ? xp + ((img * h + yy) * w + xx) * c : zero.data();
          }
        }
      }
      for (int64_t panel = kg * group_panels; panel < (kg + 1) * group_panels; ++panel) {
        const int64_t offset = t0 * k + panel * kPanel;
        avx2::gemm_rows(count, c, taps, rows.data(), wp + panel * taps * c * kPanel, op + offset, k,
                        avx2::Epilogue{bp + panel * kPanel, rp == nullptr ? nullptr : rp + offset, k, relu});
      }
    }
  });
#else
  TORCH_CHECK(false, "resnet_fused: the AVX2 implicit-GEMM convolution needs an x86-64 CPU");
#endif
}

}  // namespace implicit_gemm
}  // namespace resnet_fused
