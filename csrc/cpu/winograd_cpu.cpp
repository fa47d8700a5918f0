// Winograd convolutions F(2x2, 3x3) and F(4x4, 3x3) with the fused epilogue, for fp32
// channels_last inputs on x86-64 CPUs with AVX2 and FMA.
//
// Why: a 3x3 stride-1 convolution computed on (m+2)x(m+2) input tiles needs (m+2)^2 multiplies per
// m x m outputs and input/output channel pair instead of 9 m^2: 2.25x fewer multiply-adds than the
// direct convolution oneDNN runs for m = 2, 4x fewer for m = 4. The (m+2)^2 transformed points are
// independent GEMMs (tiles x C) * (C x K), computed here by a register-blocked AVX2 micro-kernel
// over blocks of tiles small enough that a block's transformed input and GEMM output stay in the
// core's cache between the three steps (input transform, GEMMs, output transform + bias + residual
// + ReLU).
//
// Which m: F(4x4) does 1.78x fewer multiply-adds than F(2x2) on large maps but reads a 2.25x larger
// transformed weight and pays more transform work per output, and a 14x14 or 7x7 map wastes part of
// its 4x4 tiles; ops_cpu.cpp times both per shape.
//
// Accuracy: F(2x2)'s transforms have coefficients 0, +-1 and +-1/2 and add only a few roundings.
// F(4x4)'s reach 27/8 (points 0, +-1/2, +-3/2, see Tile<4>): in fp32 its error is about 20x a direct
// convolution's (simulated over C = 256: median 1.9e-6 of the largest output, worst 6.3e-6 in one
// tile), within fp32's tolerance. Weights are transformed in float64 and rounded once.
#include "winograd.h"

#include "avx2_gemm.h"
#include "bf16_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

namespace resnet_fused {
namespace winograd {
namespace {

using avx2::kPanel;

#if RF_HAVE_X86
// Arithmetic on one vector of 8 channels, or on one channel (the tail of a C that is not a multiple
// of 8), with the same operations in the same order, so every channel gets bit-identical results
// whichever loop computes it.
struct VecOps {
  RF_AVX2 __m256 add(__m256 a, __m256 b) const { return _mm256_add_ps(a, b); }
  RF_AVX2 __m256 sub(__m256 a, __m256 b) const { return _mm256_sub_ps(a, b); }
  RF_AVX2 __m256 fma(__m256 a, float k, __m256 b) const { return _mm256_fmadd_ps(a, _mm256_set1_ps(k), b); }
  RF_AVX2 __m256 mul(__m256 a, float k) const { return _mm256_mul_ps(a, _mm256_set1_ps(k)); }
  RF_AVX2 __m256 load(const float* p) const { return _mm256_loadu_ps(p); }
  // bf16 activations: the top halves of fp32s, widened exactly.
  RF_AVX2 __m256 load(const uint16_t* p) const {
    const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  }
  RF_AVX2 void store(float* p, __m256 v) const { _mm256_storeu_ps(p, v); }
  // Rounded to bf16 (nearest, ties to even, NaN kept NaN) as c10::BFloat16 rounds, so the scalar
  // tail's channels round alike: the bf16 GEMM core's transformed inputs, bf16 outputs.
  RF_AVX2 void store(uint16_t* p, __m256 v) const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    // 8 x 32-bit lanes, each holding its bf16 in the low half -> 8 x 16 bits.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
};

struct ScalarOps {
  float add(float a, float b) const { return a + b; }
  float sub(float a, float b) const { return a - b; }
  RF_AVX2 float fma(float a, float k, float b) const { return std::fma(a, k, b); }
  float mul(float a, float k) const { return a * k; }
  float load(const float* p) const { return *p; }
  float load(const uint16_t* p) const { return c10::BFloat16(*p, c10::BFloat16::from_bits()); }
  void store(float* p, float v) const { *p = v; }
  void store(uint16_t* p, float v) const { *p = c10::BFloat16(v).x; }
};
#endif

// The transforms of F(M x M, 3 x 3), each applied along columns then rows: B^T d (input),
// A^T m (output), and G for the weight.
template <int M>
struct Tile;

template <>
struct Tile<2> {
  static constexpr int kT = 4;  // input tile side
  static constexpr double kG[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};

  template <typename V, typename Ops>
  RF_AVX2 static void input(const V (&d)[4], V (&t)[4], Ops o) {
    t[0] = o.sub(d[0], d[2]);
    t[1] = o.add(d[1], d[2]);
    t[2] = o.sub(d[2], d[1]);
    t[3] = o.sub(d[1], d[3]);
  }

  template <typename V, typename Ops>
  RF_AVX2 static void output(const V (&m)[4], V (&a)[2], Ops o) {
    a[0] = o.add(o.add(m[0], m[1]), m[2]);
    a[1] = o.sub(o.sub(m[1], m[2]), m[3]);
  }
};

// Interpolation points 0, +-1/2, +-3/2 (and infinity), not the usual 0, +-1, +-2: the same
// operation count, and in fp32 about half the error (simulated over C = 256, 60 tiles: median
// 1.9e-6 vs 3.0e-6 of the largest output, worst 6.3e-6 vs 1.2e-5), which matters for ill-conditioned
// models (a random resnet50: 9.1e-6 from float64 with the usual points, against a bound of 1e-5).
template <>
struct Tile<4> {
  static constexpr int kT = 6;
  static constexpr double kG[6][3] = {{16.0 / 9, 0, 0},        {-1, -1.0 / 2, -1.0 / 4},      {-1, 1.0 / 2, -1.0 / 4},
                                      {1.0 / 9, 1.0 / 6, 1.0 / 4}, {1.0 / 9, -1.0 / 6, 1.0 / 4}, {0, 0, 1}};

  // B^T rows: (9/16 0 -5/2 0 1 0) (0 -9/8 -9/4 1/2 1 0) (0 9/8 -9/4 -1/2 1 0)
  //           (0 -3/8 -1/4 3/2 1 0) (0 3/8 -1/4 -3/2 1 0) (0 9/16 0 -5/2 0 1)
  template <typename V, typename Ops>
  RF_AVX2 static void input(const V (&d)[6], V (&t)[6], Ops o) {
    const V p = o.fma(d[2], -9.f / 4, d[4]), q = o.fma(d[1], -9.f / 8, o.mul(d[3], 0.5f));
    const V r = o.fma(d[2], -0.25f, d[4]), s = o.fma(d[3], 1.5f, o.mul(d[1], -3.f / 8));
    t[0] = o.fma(d[0], 9.f / 16, o.fma(d[2], -2.5f, d[4]));
    t[1] = o.add(p, q);
    t[2] = o.sub(p, q);
    t[3] = o.add(r, s);
    t[4] = o.sub(r, s);
    t[5] = o.fma(d[1], 9.f / 16, o.fma(d[3], -2.5f, d[5]));
  }

  // A^T rows: (1 1 1 1 1 0) (0 1/2 -1/2 3/2 -3/2 0) (0 1/4 1/4 9/4 9/4 0) (0 1/8 -1/8 27/8 -27/8 1)
  template <typename V, typename Ops>
  RF_AVX2 static void output(const V (&m)[6], V (&a)[4], Ops o) {
    const V s12 = o.add(m[1], m[2]), d12 = o.sub(m[1], m[2]);
    const V s34 = o.add(m[3], m[4]), d34 = o.sub(m[3], m[4]);
    a[0] = o.add(o.add(m[0], s12), s34);
    a[1] = o.fma(d34, 1.5f, o.mul(d12, 0.5f));
    a[2] = o.fma(s34, 2.25f, o.mul(s12, 0.25f));
    a[3] = o.fma(d34, 3.375f, o.fma(d12, 0.125f, m[5]));
  }
};

struct Geometry {
  int64_t m, n, c, h, w, k, th, tw, tiles;

  Geometry(int64_t tile, const at::Tensor& x, int64_t out_channels)
      : m(tile), n(x.size(0)), c(x.size(1)), h(x.size(2)), w(x.size(3)), k(out_channels),
        th((h + tile - 1) / tile), tw((w + tile - 1) / tile), tiles(n * th * tw) {}
};

#if RF_HAVE_X86
// B^T d B of one patch for channels [ch, ch + 8) (or one channel), the T*T results written
// `plane` floats apart. WHY in registers: the two passes went through a scratch row buffer, and at
// C = 64 the input transform took 63% of the GEMMs' time; here each input is loaded once and each
// output stored once.
template <int M, typename V, typename Ops, typename In, typename Out>
RF_AVX2 inline void input_tile(const In* const (&d)[Tile<M>::kT][Tile<M>::kT], int64_t ch, int64_t plane, Out* out,
                               Ops o) {
  constexpr int T = Tile<M>::kT;
  V cols[T][T];  // cols[j] = B^T applied to column j of the patch
  for (int j = 0; j < T; ++j) {
    V column[T];
    for (int i = 0; i < T; ++i) {
      column[i] = o.load(d[i][j] + ch);
    }
    Tile<M>::input(column, cols[j], o);
  }
  for (int i = 0; i < T; ++i) {
    V row[T], v[T];
    for (int j = 0; j < T; ++j) {
      row[j] = cols[j][i];
    }
    Tile<M>::input(row, v, o);
    for (int j = 0; j < T; ++j) {
      o.store(out + (i * T + j) * plane + ch, v[j]);
    }
  }
}

// Each tile's (M+2)^2 patch of x (fp32, or bf16 as uint16_t) -> B^T d B in fp32, written as
// (M+2)^2 rows of `plane` stride: fp32, or bf16 (Out = uint16_t) for the bf16 GEMM core.
template <int M, typename In, typename Out>
RF_AVX2 void input_transform(const In* x, const Geometry& g, int64_t t0, int64_t count, const In* zero, Out* v) {
  constexpr int T = Tile<M>::kT;
  const int64_t c = g.c;
  const int64_t plane = count * c;
  for (int64_t u = 0; u < count; ++u) {
    const int64_t t = t0 + u;
    const int64_t img = t / (g.th * g.tw), rest = t % (g.th * g.tw);
    const int64_t y0 = M * (rest / g.tw) - 1, x0 = M * (rest % g.tw) - 1;
    const In* d[T][T];
    for (int i = 0; i < T; ++i) {
      for (int j = 0; j < T; ++j) {
        const int64_t yy = y0 + i, xx = x0 + j;
        d[i][j] = (yy < 0 || yy >= g.h || xx < 0 || xx >= g.w) ? zero : x + ((img * g.h + yy) * g.w + xx) * c;
      }
    }
    Out* out = v + u * c;
    int64_t ch = 0;
    for (; ch + 8 <= c; ch += 8) {
      input_tile<M, __m256>(d, ch, plane, out, VecOps{});
    }
    for (; ch < c; ++ch) {
      input_tile<M, float>(d, ch, plane, out, ScalarOps{});
    }
  }
}

// The M x M outputs of one tile for channels [ch, ch + 8): A^T m A.
template <int M>
RF_AVX2 inline void output_tile(const float* mt, int64_t plane, int64_t ch, __m256 (&y)[M][M]) {
  constexpr int T = Tile<M>::kT;
  const VecOps o;
  __m256 cols[T][M];  // cols[j] = A^T applied to column j of the points
  for (int j = 0; j < T; ++j) {
    __m256 column[T];
    for (int i = 0; i < T; ++i) {
      column[i] = o.load(mt + (i * T + j) * plane + ch);
    }
    Tile<M>::output(column, cols[j], o);
  }
  for (int i = 0; i < M; ++i) {
    __m256 row[T];
    for (int j = 0; j < T; ++j) {
      row[j] = cols[j][i];
    }
    Tile<M>::output(row, y[i], o);
  }
}

// A^T m A (M x M outputs per tile) + bias (+ residual), ReLU, into y for channels [k0, k0 + kc);
// bias, residual and y fp32, or bf16 (T = uint16_t: y rounded once, in the store).
// Returns whether any output before the ReLU was Inf or NaN (see conv() in winograd.h for why).
template <int M, typename T>
RF_AVX2 bool output_transform(const float* m, const Geometry& g, int64_t t0, int64_t count, int64_t k0, int64_t kc,
                              const T* bias, const T* residual, bool relu, T* y) {
  const VecOps o;
  const int64_t plane = count * kc;
  const T* b = bias + k0;
  const __m256 zero = _mm256_setzero_ps();
  // s - s is 0 for a finite s and NaN for an Inf or NaN: one compare flags both, lane by lane.
  __m256 nonfinite = zero;
  for (int64_t u = 0; u < count; ++u) {
    const int64_t t = t0 + u;
    const int64_t img = t / (g.th * g.tw), rest = t % (g.th * g.tw);
    const int64_t y0 = M * (rest / g.tw), x0 = M * (rest % g.tw);
    const int64_t rows = std::min<int64_t>(M, g.h - y0), cols = std::min<int64_t>(M, g.w - x0);
    const float* mt = m + u * kc;
    T* dst[M][M] = {};
    const T* res[M][M] = {};
    for (int i = 0; i < rows; ++i) {
      for (int j = 0; j < cols; ++j) {
        const int64_t offset = ((img * g.h + y0 + i) * g.w + x0 + j) * g.k + k0;
        dst[i][j] = y + offset;
        res[i][j] = residual == nullptr ? nullptr : residual + offset;
      }
    }
    for (int64_t ch = 0; ch < kc; ch += 8) {  // kc is a multiple of kPanel
      __m256 out[M][M];
      output_tile<M>(mt, plane, ch, out);
      const __m256 bv = o.load(b + ch);
      for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < cols; ++j) {
          __m256 s = _mm256_add_ps(out[i][j], bv);
          if (residual != nullptr) {
            s = _mm256_add_ps(s, o.load(res[i][j] + ch));
          }
          nonfinite = _mm256_or_ps(nonfinite, _mm256_cmp_ps(_mm256_sub_ps(s, s), zero, _CMP_NEQ_UQ));
          if (relu) {
            // Zero where s < 0; a NaN compares false and stays NaN, like torch.relu.
            s = _mm256_andnot_ps(_mm256_cmp_ps(s, zero, _CMP_LT_OQ), s);
          }
          o.store(dst[i][j] + ch, s);
        }
      }
    }
  }
  return _mm256_movemask_ps(nonfinite) != 0;
}

// T: the activations' element type: float (the GEMMs on our AVX2 micro-kernel or brgemm, all in
// fp32), or bf16 as uint16_t (the GEMMs on the bf16 core, the transformed inputs rounded to bf16).
template <int M, typename T>
bool conv_tiles(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias,
                const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out, int64_t block,
                bool brgemm) {
  constexpr int64_t kFreq = Tile<M>::kT * Tile<M>::kT;  // transformed points, one GEMM each
  const Geometry g(M, x, out.size(1));
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
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  TORCH_INTERNAL_ASSERT((u.scalar_type() == at::kBFloat16) == bf16 && !(bf16 && brgemm));
  // Elements of one transformed point's 16-channel panel: C fp32, or C rounded up to pairs of bf16.
  const int64_t panel_len = bf16 ? (g.c + 1) / 2 * 2 * kPanel : g.c * kPanel;
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const T* up = static_cast<const T*>(u.const_data_ptr());
  const T* bp = static_cast<const T*>(bias.const_data_ptr());
  const T* rp = residual.has_value() ? static_cast<const T*>(residual->const_data_ptr()) : nullptr;
  T* yp = static_cast<T*>(out.data_ptr());
  const int64_t panels = g.k / kPanel;
  std::atomic<bool> nonfinite{false};
  at::parallel_for(0, blocks * k_groups, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch kept across calls: a fresh multi-megabyte buffer per call costs page faults.
    thread_local std::vector<float> scratch;
    const size_t need = kFreq * block * (g.c + kc) + g.c;
    if (scratch.size() < need) {
      scratch.resize(need);
    }
    // The transformed inputs, in T (bf16 uses half of the room), then the GEMMs' fp32 outputs.
    T* v = reinterpret_cast<T*>(scratch.data());
    float* m = scratch.data() + kFreq * block * g.c;
    float* zero = m + kFreq * block * kc;
    std::fill(zero, zero + g.c, 0.f);
    const T* zero_row = reinterpret_cast<const T*>(zero);  // g.c zeros of either type
    thread_local std::vector<const T*> row_ptrs;
    row_ptrs.resize(block);
    int64_t cached_block = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item / k_groups, kg = item % k_groups;
      const int64_t t0 = split.begin(blk), count = split.size(blk);
      if (blk != cached_block) {
        input_transform<M>(xp, g, t0, count, zero_row, v);
        cached_block = blk;
      }
      for (int64_t f = 0; f < kFreq; ++f) {
        const T* a = v + f * count * g.c;  // this point's rows, one per tile, g.c elements apart
        for (int64_t r = 0; r < count && !brgemm; ++r) {
          row_ptrs[r] = a + r * g.c;
        }
        const T* group = up + (f * panels + kg * (kc / kPanel)) * panel_len;
        float* c = m + f * count * kc;
        if constexpr (bf16) {
          avx512_bf16::gemm_panels(count, g.c, 1, row_ptrs.data(), group, kc / kPanel, c, kc, avx512_bf16::Epilogue{});
        } else if (brgemm) {
          for (int64_t p = 0; p < kc / kPanel; ++p) {
            // The panel (C x 16, row-major) is brgemm's B as it is.
            at::native::cpublas::brgemm(count, kPanel, g.c, g.c, kPanel, kc, false, a, group + p * g.c * kPanel,
                                        c + p * kPanel, false);
          }
        } else {
          avx2::gemm_panels(count, g.c, 1, row_ptrs.data(), group, kc / kPanel, c, kc, avx2::Epilogue{});
        }
      }
      if (output_transform<M>(m, g, t0, count, kg * kc, kc, bp, rp, relu, yp)) {
        nonfinite.store(true, std::memory_order_relaxed);
      }
    }
    if (brgemm) {
      at::native::cpublas::brgemm_release(false);  // frees AMX tile state where oneDNN used it
    }
  });
  return !nonfinite.load();
}
#endif

template <int M>
at::Tensor transform_weight_tiles(const at::Tensor& weight) {
  constexpr int T = Tile<M>::kT;
  const auto& G = Tile<M>::kG;
  const int64_t k = weight.size(0), c = weight.size(1);
  // G g G^T in float64, rounded once.
  const at::Tensor g = weight.to(at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  at::Tensor u = at::empty({T * T, k / kPanel, c, kPanel}, weight.options().dtype(at::kFloat));
  float* up = u.data_ptr<float>();
  at::parallel_for(0, k, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t ko = k_begin; ko < k_end; ++ko) {
      for (int64_t ch = 0; ch < c; ++ch) {
        const double* w = gp + (ko * c + ch) * 9;
        double tmp[T][3];
        for (int i = 0; i < T; ++i) {
          for (int b = 0; b < 3; ++b) {
            tmp[i][b] = G[i][0] * w[0 * 3 + b] + G[i][1] * w[1 * 3 + b] + G[i][2] * w[2 * 3 + b];
          }
        }
        for (int i = 0; i < T; ++i) {
          for (int j = 0; j < T; ++j) {
            const double value = tmp[i][0] * G[j][0] + tmp[i][1] * G[j][1] + tmp[i][2] * G[j][2];
            up[((((i * T + j) * (k / kPanel) + ko / kPanel) * c + ch) * kPanel) + ko % kPanel] = static_cast<float>(value);
          }
        }
      }
    }
  });
  return u;
}

}  // namespace

at::Tensor transform_weight(const at::Tensor& weight, int64_t tile) {
  TORCH_INTERNAL_ASSERT(tile == 2 || tile == 4);
  return tile == 2 ? transform_weight_tiles<2>(weight) : transform_weight_tiles<4>(weight);
}

at::Tensor transform_weight_bf16(const at::Tensor& weight) {
  TORCH_CHECK(avx512_bf16::cpu_has_avx512_bf16(), "resnet_fused: the bf16 Winograd GEMMs need a CPU with AVX512-BF16");
  at::Tensor u = transform_weight_tiles<2>(weight);  // (16, K / 16, C, 16) fp32
  if (u.size(2) % 2 != 0) {
    u = at::constant_pad_nd(u, {0, 0, 0, 1});  // an odd C's lone last channel pairs with a zero
  }
  // (16, K / 16, C / 2, 2, 16) -> (16, K / 16, C / 2, 16, 2): the channel pairs of bf16_gemm.h.
  return u.reshape({u.size(0), u.size(1), u.size(2) / 2, 2, kPanel}).permute({0, 1, 2, 4, 3}).to(at::kBFloat16).contiguous();
}

bool conv(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
          bool relu, const at::Tensor& out, int64_t block, bool brgemm) {
#if RF_HAVE_X86
  // The transformed weight says which tile it was made for: (T*T, K / 16, C, 16).
  // bf16 activations go with the bf16 transformed weight (conv_tiles checks the pair).
  switch (u.size(0)) {
    case 16:
      return x.scalar_type() == at::kBFloat16 ? conv_tiles<2, uint16_t>(x, u, bias, residual, relu, out, block, brgemm)
                              : conv_tiles<2, float>(x, u, bias, residual, relu, out, block, brgemm);
    case 36:
      return conv_tiles<4, float>(x, u, bias, residual, relu, out, block, brgemm);
    default:
      TORCH_INTERNAL_ASSERT(false, "not a Winograd-transformed weight");
  }
#else
  TORCH_CHECK(false, "resnet_fused: the Winograd kernel needs an x86-64 CPU");
#endif
}

}  // namespace winograd
}  // namespace resnet_fused
