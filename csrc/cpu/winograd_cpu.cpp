// Winograd F(2x2, 3x3) convolution with the fused epilogue, for fp32 channels_last inputs on x86-64
// CPUs with AVX2 and FMA.
//
// Why: a 3x3 stride-1 convolution computed on 4x4 input tiles needs 16 multiplies per 2x2 outputs
// and input/output channel pair instead of 36, so 2.25x fewer multiply-adds than the direct
// convolution oneDNN runs. The 16 transformed points are 16 independent GEMMs
// (tiles x C) * (C x K), computed here by a register-blocked AVX2 micro-kernel over blocks of tiles
// small enough that a block's transformed input and GEMM output stay in the core's cache between
// the three steps (input transform, GEMMs, output transform + bias + residual + ReLU).
//
// Accuracy: the transforms of F(2x2, 3x3) have coefficients 0, +-1 and +-1/2, so they add only a
// few roundings; the weight transform is done in float64 and rounded once.
#include "winograd.h"

#include "avx2_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace resnet_fused {
namespace winograd {
namespace {

constexpr int64_t kFreq = 16;  // points of a 4x4 transformed tile, one GEMM each
using avx2::kPanel;

int64_t tiles(const at::Tensor& x) {
  return x.size(0) * ((x.size(2) + 1) / 2) * ((x.size(3) + 1) / 2);
}

struct Geometry {
  int64_t n, c, h, w, k, th, tw, tiles;
};

#if RF_HAVE_X86
// d (4x4 patch per channel) -> B^T d B, written as 16 rows of `plane` stride.
RF_AVX2 void input_transform(const float* x, const Geometry& g, int64_t t0, int64_t count, const float* zero,
                             float* rows, float* v) {
  const int64_t c = g.c;
  const int64_t plane = count * c;
  for (int64_t u = 0; u < count; ++u) {
    const int64_t t = t0 + u;
    const int64_t img = t / (g.th * g.tw), rest = t % (g.th * g.tw);
    const int64_t y0 = 2 * (rest / g.tw) - 1, x0 = 2 * (rest % g.tw) - 1;
    const float* d[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        const int64_t yy = y0 + i, xx = x0 + j;
        d[i][j] = (yy < 0 || yy >= g.h || xx < 0 || xx >= g.w) ? zero : x + ((img * g.h + yy) * g.w + xx) * c;
      }
    }
    for (int j = 0; j < 4; ++j) {
      float* r0 = rows + (0 * 4 + j) * c;
      float* r1 = rows + (1 * 4 + j) * c;
      float* r2 = rows + (2 * 4 + j) * c;
      float* r3 = rows + (3 * 4 + j) * c;
      const float *d0 = d[0][j], *d1 = d[1][j], *d2 = d[2][j], *d3 = d[3][j];
      for (int64_t ch = 0; ch < c; ++ch) {
        r0[ch] = d0[ch] - d2[ch];
        r1[ch] = d1[ch] + d2[ch];
        r2[ch] = d2[ch] - d1[ch];
        r3[ch] = d1[ch] - d3[ch];
      }
    }
    float* out = v + u * c;
    for (int i = 0; i < 4; ++i) {
      const float* a0 = rows + (i * 4 + 0) * c;
      const float* a1 = rows + (i * 4 + 1) * c;
      const float* a2 = rows + (i * 4 + 2) * c;
      const float* a3 = rows + (i * 4 + 3) * c;
      float* o0 = out + (i * 4 + 0) * plane;
      float* o1 = out + (i * 4 + 1) * plane;
      float* o2 = out + (i * 4 + 2) * plane;
      float* o3 = out + (i * 4 + 3) * plane;
      for (int64_t ch = 0; ch < c; ++ch) {
        o0[ch] = a0[ch] - a2[ch];
        o1[ch] = a1[ch] + a2[ch];
        o2[ch] = a2[ch] - a1[ch];
        o3[ch] = a1[ch] - a3[ch];
      }
    }
  }
}

// A^T m A (2x2 outputs per tile) + bias (+ residual), ReLU, into y for channels [k0, k0 + kc).
// Returns whether any output before the ReLU was Inf or NaN (see conv() in winograd.h for why).
RF_AVX2 bool output_transform(const float* m, const Geometry& g, int64_t t0, int64_t count, int64_t k0, int64_t kc,
                              const float* bias, const float* residual, bool relu, float* rows, float* y) {
  // An integer OR of "exponent all ones" keeps the channel loop vectorized (a float reduction
  // would not be, without -ffast-math).
  uint32_t nonfinite = 0;
  const int64_t plane = count * kc;
  const float* b = bias + k0;
  for (int64_t u = 0; u < count; ++u) {
    const int64_t t = t0 + u;
    const int64_t img = t / (g.th * g.tw), rest = t % (g.th * g.tw);
    const int64_t y0 = 2 * (rest / g.tw), x0 = 2 * (rest % g.tw);
    const float* mt = m + u * kc;
    for (int j = 0; j < 4; ++j) {
      const float* m0 = mt + (0 * 4 + j) * plane;
      const float* m1 = mt + (1 * 4 + j) * plane;
      const float* m2 = mt + (2 * 4 + j) * plane;
      const float* m3 = mt + (3 * 4 + j) * plane;
      float* a0 = rows + j * kc;
      float* a1 = rows + (4 + j) * kc;
      for (int64_t ch = 0; ch < kc; ++ch) {
        a0[ch] = m0[ch] + m1[ch] + m2[ch];
        a1[ch] = m1[ch] - m2[ch] - m3[ch];
      }
    }
    for (int i = 0; i < 2; ++i) {
      const int64_t yy = y0 + i;
      if (yy >= g.h) {
        break;
      }
      const float* a0 = rows + (i * 4 + 0) * kc;
      const float* a1 = rows + (i * 4 + 1) * kc;
      const float* a2 = rows + (i * 4 + 2) * kc;
      const float* a3 = rows + (i * 4 + 3) * kc;
      for (int j = 0; j < 2; ++j) {
        const int64_t xx = x0 + j;
        if (xx >= g.w) {
          break;
        }
        const int64_t offset = ((img * g.h + yy) * g.w + xx) * g.k + k0;
        float* dst = y + offset;
        const float* res = residual == nullptr ? nullptr : residual + offset;
        for (int64_t ch = 0; ch < kc; ++ch) {
          float s = (j == 0 ? a0[ch] + a1[ch] + a2[ch] : a1[ch] - a2[ch] - a3[ch]) + b[ch];
          if (res != nullptr) {
            s += res[ch];
          }
          uint32_t bits;
          std::memcpy(&bits, &s, sizeof(bits));
          nonfinite |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
          dst[ch] = (relu && s < 0.f) ? 0.f : s;
        }
      }
    }
  }
  return nonfinite != 0;
}
#endif

}  // namespace

at::Tensor transform_weight(const at::Tensor& weight) {
  const int64_t k = weight.size(0), c = weight.size(1);
  // G g G^T in float64, rounded once: G's entries are 0, +-1/2 and 1, so only the sums round.
  const at::Tensor g = weight.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  static const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  at::Tensor u = at::empty({kFreq, k / kPanel, c, kPanel}, weight.options().dtype(at::kFloat));
  float* up = u.data_ptr<float>();
  at::parallel_for(0, k, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t ko = k_begin; ko < k_end; ++ko) {
      for (int64_t ch = 0; ch < c; ++ch) {
        const double* w = gp + (ko * c + ch) * 9;
        double tmp[4][3];
        for (int i = 0; i < 4; ++i) {
          for (int b = 0; b < 3; ++b) {
            tmp[i][b] = G[i][0] * w[0 * 3 + b] + G[i][1] * w[1 * 3 + b] + G[i][2] * w[2 * 3 + b];
          }
        }
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 4; ++j) {
            const double value = tmp[i][0] * G[j][0] + tmp[i][1] * G[j][1] + tmp[i][2] * G[j][2];
            up[((((i * 4 + j) * (k / kPanel) + ko / kPanel) * c + ch) * kPanel) + ko % kPanel] = static_cast<float>(value);
          }
        }
      }
    }
  });
  return u;
}

bool conv(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
          bool relu, const at::Tensor& out, int64_t block) {
#if RF_HAVE_X86
  const Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), out.size(1),
                   (x.size(2) + 1) / 2, (x.size(3) + 1) / 2, tiles(x)};
  TORCH_INTERNAL_ASSERT(block >= 1);
  const int64_t threads = at::get_num_threads();
  const avx2::Blocks split(g.tiles, std::min(block, g.tiles), threads);
  const int64_t blocks = split.count();
  block = split.max_size();
  // Output channels are split too when there are too few tile blocks to keep every thread busy.
  int64_t k_groups = 1;
  while (blocks * k_groups < threads && (g.k / kPanel) % (k_groups * 2) == 0 && g.k / (k_groups * 2) >= 64) {
    k_groups *= 2;
  }
  const int64_t kc = g.k / k_groups;
  const float* xp = x.const_data_ptr<float>();
  const float* up = u.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  const int64_t panels = g.k / kPanel;
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, blocks * k_groups, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch kept across calls: a fresh multi-megabyte buffer per call costs page faults.
    thread_local std::vector<float> scratch;
    const size_t need = kFreq * block * (g.c + kc) + g.c + kFreq * std::max(g.c, kc);
    if (scratch.size() < need) {
      scratch.resize(need);
    }
    float* v = scratch.data();
    float* m = v + kFreq * block * g.c;
    float* zero = m + kFreq * block * kc;
    float* rows = zero + g.c;
    std::fill(zero, zero + g.c, 0.f);
    thread_local std::vector<const float*> row_ptrs;
    row_ptrs.resize(block);
    int64_t cached_block = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item / k_groups, kg = item % k_groups;
      const int64_t t0 = split.begin(blk), count = split.size(blk);
      if (blk != cached_block) {
        input_transform(xp, g, t0, count, zero, rows, v);
        cached_block = blk;
      }
      for (int64_t f = 0; f < kFreq; ++f) {
        for (int64_t r = 0; r < count; ++r) {
          row_ptrs[r] = v + (f * count + r) * g.c;
        }
        for (int64_t p = 0; p < kc / kPanel; ++p) {
          const int64_t panel = kg * (kc / kPanel) + p;
          avx2::gemm_rows(count, g.c, 1, row_ptrs.data(), up + (f * panels + panel) * g.c * kPanel,
                          m + f * count * kc + p * kPanel, kc, avx2::Epilogue{});
        }
      }
      if (output_transform(m, g, t0, count, kg * kc, kc, bp, rp, relu, rows, yp)) {
        nonfinite.store(true, std::memory_order_relaxed);
      }
    }
  });
  return !nonfinite.load();
#else
  TORCH_CHECK(false, "resnet_fused: the Winograd kernel needs an x86-64 CPU");
#endif
}

}  // namespace winograd
}  // namespace resnet_fused
