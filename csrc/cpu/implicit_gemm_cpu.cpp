// Convolution on channels_last fp32 as an implicit GEMM: out[pixels x K] = sum over the filter's
// taps (r, s) of x_rs[pixels x C] * W_rs[C x K], where x_rs's row for an output pixel is the input
// pixel under tap (r, s): one contiguous run of C channels, or a zero row in the padding. The taps
// are summed in the micro-kernel's registers (no im2col buffer) and bias, residual and ReLU applied
// before the single store. Why next to oneDNN: its conv + residual-add post-op reads the residual
// in a separate pass on AVX2 machines; the per-shape timing in ops_cpu.cpp keeps whichever is faster.
//
// Inputs with few channels (the 7x7 stem, C=3) make each tap a 3-step loop. There the input is
// copied once into a zero-padded buffer so that a whole filter row (S pixels x C channels, adjacent
// in channels_last) is one contiguous run: R taps of S*C channels instead of R*S taps of C. The
// packed weight (K/16, R*S, C, 16) already is (K/16, R, S*C, 16) in memory.

#include "implicit_gemm.h"

#include "avx2_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

namespace resnet_fused {
namespace implicit_gemm {

using avx2::kPanel;

// Below this many input channels a filter row's taps are merged into one (see the top of the file).
constexpr int64_t kMergeRowsBelowChannels = 16;

at::Tensor pack_weight(const at::Tensor& weight) {
  const int64_t k = weight.size(0), c = weight.size(1), taps = weight.size(2) * weight.size(3);
  // (K, C, R, S) -> (K / 16, 16, C, R * S) -> (K / 16, R * S, C, 16)
  const at::Tensor w = weight.to(at::kFloat).reshape({k / kPanel, kPanel, c, taps}).permute({0, 3, 2, 1});
  return w.contiguous();
}

bool can_split_channels(int64_t out_channels, int64_t threads) {
  return threads > 1 && (out_channels / kPanel) % threads == 0;
}

void conv(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef kernel_size, const at::Tensor& bias,
          const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
          const at::Tensor& out, int64_t block, bool split_channels, bool brgemm) {
#if RF_HAVE_X86
  const int64_t n = x.size(0), k = out.size(1), p = out.size(2), q = out.size(3);
  int64_t c = x.size(1), h = x.size(2), w = x.size(3);
  int64_t kh = kernel_size[0], kw = kernel_size[1], pad_h = padding[0], pad_w = padding[1];
  at::Tensor input = x;
  if (kw > 1 && c < kMergeRowsBelowChannels) {
    if (pad_h > 0 || pad_w > 0) {
      // at::zeros has no memory-format argument (it would drop the one in the options).
      input = at::empty({n, c, h + 2 * pad_h, w + 2 * pad_w}, x.options().memory_format(c10::MemoryFormat::ChannelsLast));
      input.zero_();
      input.narrow(2, pad_h, h).narrow(3, pad_w, w).copy_(x);
      h += 2 * pad_h;
      w += 2 * pad_w;
      pad_h = pad_w = 0;
    }
    // Tap (i, 0) now spans the row's kw pixels; the stride between output pixels is unchanged.
    c *= kw;
    kw = 1;
  }
  const int64_t taps = kh * kw;
  // One input pixel along W is x.size(1) floats, whether or not the taps were merged.
  const int64_t pixel_stride = x.size(1);
  const int64_t pixels = n * p * q;
  TORCH_INTERNAL_ASSERT(block >= 1);
  const int64_t threads = at::get_num_threads();
  const bool by_channels = split_channels && can_split_channels(k, threads);
  const avx2::Blocks split(pixels, std::min(block, pixels), by_channels ? 1 : threads);
  const int64_t blocks = split.count();
  const int64_t panels = k / kPanel;
  int64_t k_groups = threads;
  if (!by_channels) {
    // Output channels are split too, so that a small map (7x7 at batch 1) still gives every thread
    // several work items; no work is duplicated by the split.
    k_groups = 1;
    while (blocks * k_groups < 4 * threads && panels % (k_groups * 2) == 0) {
      k_groups *= 2;
    }
  }
  const int64_t group_panels = panels / k_groups;
  const float* xp = input.const_data_ptr<float>();
  const float* wp = packed.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // A 1x1, stride-1, unpadded conv's rows are the input's pixels as they lie: brgemm reads them in place.
  const bool rows_in_place = taps == 1 && stride[0] == 1 && stride[1] == 1 && pad_h == 0 && pad_w == 0;
  const bool need_rows = !(brgemm && rows_in_place);
  const int64_t reduction = taps * c;
  at::parallel_for(0, blocks * k_groups, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<const float*> rows;
    thread_local std::vector<float> zero;
    thread_local std::vector<float> gathered;
    rows.resize(split.max_size() * taps);
    zero.assign(c, 0.f);
    for (int64_t item = begin; item < end; ++item) {
      // Items in order: by channels, thread t gets group t with every block (its share of the
      // weight read once); by pixels, a thread's items are whole blocks with each of their groups.
      const int64_t blk = by_channels ? item % blocks : item / k_groups;
      const int64_t kg = by_channels ? item / blocks : item % k_groups;
      const int64_t t0 = split.begin(blk), count = split.size(blk);
      for (int64_t r = 0; r < count && need_rows; ++r) {
        const int64_t pixel = t0 + r;
        const int64_t img = pixel / (p * q);
        const int64_t y0 = ((pixel / q) % p) * stride[0] - pad_h, x0 = (pixel % q) * stride[1] - pad_w;
        for (int64_t i = 0; i < kh; ++i) {
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t yy = y0 + i, xx = x0 + j;
            const bool inside = yy >= 0 && yy < h && xx >= 0 && xx < w;
            rows[r * taps + i * kw + j] = inside ? xp + ((img * h + yy) * w + xx) * pixel_stride : zero.data();
          }
        }
      }
      const int64_t panel = kg * group_panels, offset = t0 * k + panel * kPanel;
      if (brgemm) {
        const float* a = xp + t0 * c;
        if (!rows_in_place) {
          // brgemm takes its A rows evenly spaced: each row's taps are copied side by side (an
          // im2col of this block only, count x taps*C, read back from L1/L2).
          gathered.resize(count * reduction);
          for (int64_t i = 0; i < count * taps; ++i) {
            std::copy_n(rows[i], c, gathered.data() + i * c);
          }
          a = gathered.data();
        }
        for (int64_t pp = 0; pp < group_panels; ++pp) {
          float* o = op + offset + pp * kPanel;
          // The panel (taps*C x 16, row-major) is brgemm's B as it is.
          at::native::cpublas::brgemm(count, kPanel, reduction, rows_in_place ? c : reduction, kPanel, k, false, a,
                                      wp + (panel + pp) * reduction * kPanel, o, false);
          avx2::finish_rows(count, o, k,
                            avx2::Epilogue{bp + (panel + pp) * kPanel,
                                           rp == nullptr ? nullptr : rp + offset + pp * kPanel, k, relu});
        }
        continue;
      }
      avx2::gemm_panels(count, c, taps, rows.data(), wp + panel * taps * c * kPanel, group_panels, op + offset, k,
                        avx2::Epilogue{bp + panel * kPanel, rp == nullptr ? nullptr : rp + offset, k, relu});
    }
    if (brgemm) {
      at::native::cpublas::brgemm_release(false);  // frees AMX tile state where oneDNN used it
    }
  });
#else
  TORCH_CHECK(false, "resnet_fused: the AVX2 implicit-GEMM convolution needs an x86-64 CPU");
#endif
}

}  // namespace implicit_gemm
}  // namespace resnet_fused
