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
// The 1-D transforms, applied along columns then rows. Written once for a vector of 8 channels
// and once for one channel (the tail of a C that is not a multiple of 8), with the same operation
// order, so every channel gets bit-identical sums whichever loop computes it.
template <typename V, typename Ops>
RF_AVX2 inline void input_1d(const V (&d)[4], V (&t)[4], Ops ops) {  // B^T d
  t[0] = ops.sub(d[0], d[2]);
  t[1] = ops.add(d[1], d[2]);
  t[2] = ops.sub(d[2], d[1]);
  t[3] = ops.sub(d[1], d[3]);
}

template <typename V, typename Ops>
RF_AVX2 inline void output_1d(const V (&m)[4], V (&a)[2], Ops ops) {  // A^T m
  a[0] = ops.add(ops.add(m[0], m[1]), m[2]);
  a[1] = ops.sub(ops.sub(m[1], m[2]), m[3]);
}

struct VecOps {
  RF_AVX2 __m256 add(__m256 a, __m256 b) const { return _mm256_add_ps(a, b); }
  RF_AVX2 __m256 sub(__m256 a, __m256 b) const { return _mm256_sub_ps(a, b); }
  RF_AVX2 __m256 load(const float* p) const { return _mm256_loadu_ps(p); }
  RF_AVX2 void store(float* p, __m256 v) const { _mm256_storeu_ps(p, v); }
};

struct ScalarOps {
  float add(float a, float b) const { return a + b; }
  float sub(float a, float b) const { return a - b; }
  float load(const float* p) const { return *p; }
  void store(float* p, float v) const { *p = v; }
};

// B^T d B of one 4x4 patch for channels [ch, ch + 8) (or one channel), the 16 results written
// `plane` floats apart. WHY in registers: the two passes went through a scratch row buffer, and at
// C = 64 the input transform took 63% of the GEMMs' time; here each input is loaded once and each
// output stored once.
template <typename V, typename Ops>
RF_AVX2 inline void input_tile(const float* const (&d)[4][4], int64_t ch, int64_t plane, float* out, Ops ops) {
  V cols[4][4];  // cols[j] = B^T applied to column j of the patch
  for (int j = 0; j < 4; ++j) {
    const V column[4] = {ops.load(d[0][j] + ch), ops.load(d[1][j] + ch), ops.load(d[2][j] + ch), ops.load(d[3][j] + ch)};
    input_1d(column, cols[j], ops);
  }
  for (int i = 0; i < 4; ++i) {
    const V row[4] = {cols[0][i], cols[1][i], cols[2][i], cols[3][i]};
    V v[4];
    input_1d(row, v, ops);
    for (int j = 0; j < 4; ++j) {
      ops.store(out + (i * 4 + j) * plane + ch, v[j]);
    }
  }
}

// d (4x4 patch per channel) -> B^T d B, written as 16 rows of `plane` stride.
RF_AVX2 void input_transform(const float* x, const Geometry& g, int64_t t0, int64_t count, const float* zero,
                             float* v) {
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
    float* out = v + u * c;
    int64_t ch = 0;
    for (; ch + 8 <= c; ch += 8) {
      input_tile<__m256>(d, ch, plane, out, VecOps{});
    }
    for (; ch < c; ++ch) {
      input_tile<float>(d, ch, plane, out, ScalarOps{});
    }
  }
}

// The 2x2 outputs of one tile for channels [ch, ch + 8): A^T m A.
template <typename V, typename Ops>
RF_AVX2 inline void output_tile(const float* mt, int64_t plane, int64_t ch, V (&y)[2][2], Ops ops) {
  V cols[4][2];  // cols[j] = A^T applied to column j of the 4x4 points
  for (int j = 0; j < 4; ++j) {
    const V column[4] = {ops.load(mt + (0 * 4 + j) * plane + ch), ops.load(mt + (1 * 4 + j) * plane + ch),
                         ops.load(mt + (2 * 4 + j) * plane + ch), ops.load(mt + (3 * 4 + j) * plane + ch)};
    output_1d(column, cols[j], ops);
  }
  for (int i = 0; i < 2; ++i) {
    const V row[4] = {cols[0][i], cols[1][i], cols[2][i], cols[3][i]};
    output_1d(row, y[i], ops);
  }
}

// A^T m A (2x2 outputs per tile) + bias (+ residual), ReLU, into y for channels [k0, k0 + kc).
// Returns whether any output before the ReLU was Inf or NaN (see conv() in winograd.h for why).
RF_AVX2 bool output_transform(const float* m, const Geometry& g, int64_t t0, int64_t count, int64_t k0, int64_t kc,
                              const float* bias, const float* residual, bool relu, float* y) {
  const int64_t plane = count * kc;
  const float* b = bias + k0;
  const __m256 zero = _mm256_setzero_ps();
  // s - s is 0 for a finite s and NaN for an Inf or NaN: one compare flags both, lane by lane.
  __m256 nonfinite = zero;
  for (int64_t u = 0; u < count; ++u) {
    const int64_t t = t0 + u;
    const int64_t img = t / (g.th * g.tw), rest = t % (g.th * g.tw);
    const int64_t y0 = 2 * (rest / g.tw), x0 = 2 * (rest % g.tw);
    const int64_t rows = std::min<int64_t>(2, g.h - y0), cols = std::min<int64_t>(2, g.w - x0);
    const float* mt = m + u * kc;
    float* dst[2][2] = {};
    const float* res[2][2] = {};
    for (int i = 0; i < rows; ++i) {
      for (int j = 0; j < cols; ++j) {
        const int64_t offset = ((img * g.h + y0 + i) * g.w + x0 + j) * g.k + k0;
        dst[i][j] = y + offset;
        res[i][j] = residual == nullptr ? nullptr : residual + offset;
      }
    }
    for (int64_t ch = 0; ch < kc; ch += 8) {  // kc is a multiple of kPanel
      __m256 out[2][2];
      output_tile<__m256>(mt, plane, ch, out, VecOps{});
      const __m256 bv = _mm256_loadu_ps(b + ch);
      for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < cols; ++j) {
          __m256 s = _mm256_add_ps(out[i][j], bv);
          if (residual != nullptr) {
            s = _mm256_add_ps(s, _mm256_loadu_ps(res[i][j] + ch));
          }
          nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(_mm256_sub_ps(s, s), zero, _CMP_NEQ_UQ));
          if (relu) {
            // Zero where s < 0; a NaN compares false and stays NaN, like torch.relu.
            s = _mm256_andnot_ps(_mm256_cmp_ps(s, zero, _CMP_LT_OQ), s);
          }
          _mm256_storeu_ps(dst[i][j] + ch, s);
        }
      }
    }
  }
  return _mm256_movemask_ps(nonfinite) != 0;
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
    const size_t need = kFreq * block * (g.c + kc) + g.c;
    if (scratch.size() < need) {
      scratch.resize(need);
    }
    float* v = scratch.data();
    float* m = v + kFreq * block * g.c;
    float* zero = m + kFreq * block * kc;
    std::fill(zero, zero + g.c, 0.f);
    thread_local std::vector<const float*> row_ptrs;
    row_ptrs.resize(block);
    int64_t cached_block = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item / k_groups, kg = item % k_groups;
      const int64_t t0 = split.begin(blk), count = split.size(blk);
      if (blk != cached_block) {
        input_transform(xp, g, t0, count, zero, v);
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
      if (output_transform(m, g, t0, count, kg * kc, kc, bp, rp, relu, yp)) {
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
