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
//
// The transforms are written once and compiled per ISA (winograd_tiles.h): 8 lanes (AVX2) for fp32,
// 16 (AVX-512) for the bf16 path, which only CPUs with AVX512-BF16 take. fp32 on 16 lanes was
// measured and not kept: on Zen 4, which runs 512-bit ops as two 256-bit halves, resnet18 and
// resnet50 batch 1 moved 1.006x and 0.998x (in-process A/B, 2 threads).
#include "winograd.h"

#include "avx2_gemm.h"
#include "avx512_gemm.h"
#include "parallel_items.h"

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

// F(M x M, 3 x 3)'s tile side and its weight transform G (winograd_tiles.h has B^T and A^T).
template <int M>
struct Tile;

template <>
struct Tile<2> {
  static constexpr int kT = 4;  // input tile side
  static constexpr double kG[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
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
};

struct Geometry {
  int64_t m, n, c, h, w, k, th, tw, tiles;

  Geometry(int64_t tile, const at::Tensor& x, int64_t out_channels)
      : m(tile), n(x.size(0)), c(x.size(1)), h(x.size(2)), w(x.size(3)), k(out_channels),
        th((h + tile - 1) / tile), tw((w + tile - 1) / tile), tiles(n * th * tw) {}
};

#if RF_HAVE_X86
// The transforms, once per ISA (winograd_tiles.h): `lanes8` for fp32 on any CPU with AVX2 + FMA,
// `lanes16` for bf16, which runs only on CPUs with AVX512-BF16 (the bf16 GEMM core's).
RF_TARGET_REGION_BEGIN_AVX2
namespace lanes8 {
#include "winograd_tiles.h"
}  // namespace lanes8
RF_TARGET_REGION_END

RF_TARGET_REGION_BEGIN_AVX512_BF16
namespace lanes16 {
#define RF_WINOGRAD_LANES16 1
#include "winograd_tiles.h"
#undef RF_WINOGRAD_LANES16
}  // namespace lanes16
RF_TARGET_REGION_END

// T: the activations' element type: float (the GEMMs on `core`, all in fp32), or bf16 as uint16_t
// (the GEMMs on the bf16 core, the transformed inputs rounded to bf16).
template <int M, typename T>
bool conv_tiles(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias,
                const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out, int64_t block,
                Fp32Core core) {
  constexpr int64_t kFreq = Tile<M>::kT * Tile<M>::kT;  // transformed points, one GEMM each
  const Geometry g(M, x, out.size(1));
  TORCH_INTERNAL_ASSERT(block >= 1);
  const int64_t threads = at::get_num_threads();
  // Tiles cut in whole micro-tiles can leave the threads' shares far apart where there are few (a
  // 7x7 map's 16 at batch 1: 6 and 10). There the threads share the output channels instead, each
  // transforming every tile: resnet50's 512-channel 3x3 conv at 7x7 alone 0.42 -> 0.36 ms in bf16,
  // 1.12 -> 0.87 ms in fp32; resnet18 fp32 batch 1 1.07x (2 threads, Zen 4 EPYC).
  const avx2::Blocks by_tiles(g.tiles, std::min(block, g.tiles), threads);
  const bool uneven = threads > 1 && by_tiles.largest_share(threads) * threads > g.tiles * 9 / 8;
  const bool channels_shareable = (g.k / kPanel) % 2 == 0 && g.k / 2 >= 64;  // the k_groups rule below
  const int64_t whole = (g.tiles + avx2::kRows - 1) / avx2::kRows * avx2::kRows;  // one block of every tile
  const avx2::Blocks split = uneven && channels_shareable ? avx2::Blocks(g.tiles, whole, 1) : by_tiles;
  const int64_t blocks = split.count();
  block = split.max_size();
  // Output channels are split too when there are too few tile blocks to keep every thread busy.
  int64_t k_groups = 1;
  while (blocks * k_groups < threads && (g.k / kPanel) % (k_groups * 2) == 0 && g.k / (k_groups * 2) >= 64) {
    k_groups *= 2;
  }
  const int64_t kc = g.k / k_groups;
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  TORCH_INTERNAL_ASSERT((u.scalar_type() == at::kBFloat16) == bf16 && !(bf16 && core == Fp32Core::kBrgemm));
  TORCH_INTERNAL_ASSERT(!bf16 || avx512_bf16::cpu_has_avx512_bf16(), "the lanes16 transforms need AVX512-BF16");
  // Elements of one transformed point's 16-channel panel: C fp32, or C rounded up to pairs of bf16.
  const int64_t panel_len = bf16 ? (g.c + 1) / 2 * 2 * kPanel : g.c * kPanel;
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  const T* up = static_cast<const T*>(u.const_data_ptr());
  const T* bp = static_cast<const T*>(bias.const_data_ptr());
  const T* rp = residual.has_value() ? static_cast<const T*>(residual->const_data_ptr()) : nullptr;
  T* yp = static_cast<T*>(out.data_ptr());
  const int64_t panels = g.k / kPanel;
  std::atomic<bool> nonfinite{false};
  parallel_items(blocks * k_groups, [&](const auto& claim) {
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
    for (int64_t item = 0; claim(item);) {
      const int64_t blk = item / k_groups, kg = item % k_groups;
      const int64_t t0 = split.begin(blk), count = split.size(blk);
      if (blk != cached_block) {
        if constexpr (bf16) {
          lanes16::input_transform<M>(xp, g, t0, count, zero_row, v);
        } else {
          lanes8::input_transform<M>(xp, g, t0, count, zero_row, v);
        }
        cached_block = blk;
      }
      for (int64_t f = 0; f < kFreq; ++f) {
        const T* a = v + f * count * g.c;  // this point's rows, one per tile, g.c elements apart
        for (int64_t r = 0; r < count && core != Fp32Core::kBrgemm; ++r) {
          row_ptrs[r] = a + r * g.c;
        }
        const T* group = up + (f * panels + kg * (kc / kPanel)) * panel_len;
        float* c = m + f * count * kc;
        // The next point's first two panels, fetched during this point's last two (AVX-512 cores).
        // WHY: at batch 1 on 14x14 and 7x7 maps a point's GEMM is a few calls per panel pair, and
        // each began on weights in DRAM (resnet50's 512-channel 3x3: 8.4 MB of bf16 points).
        // Zen 4, 2 threads, one conv after a 64 MB sweep, with and without in one process: bf16
        // 1.004-1.047x (512 channels at 7x7), 1.009-1.042x (256 at 14x14); fp32 1.018-1.051x;
        // resnet18 batch 1 bf16 1.032x, resnet50 batch 1 1.006x bf16, 1.002x fp32. Issuing the
        // lines two or four times as fast ran these convs at 0.83-0.99x.
        const T* then = f + 1 < kFreq ? group + panels * panel_len : nullptr;
        const int64_t then_lines = std::min<int64_t>(2, kc / kPanel) * panel_len * sizeof(T) / 64;
        if constexpr (bf16) {
          avx512_bf16::gemm_panels_raw(count, g.c, 1, row_ptrs.data(), group, kc / kPanel, c, kc, then, then_lines);
        } else if (core == Fp32Core::kBrgemm) {
          for (int64_t p = 0; p < kc / kPanel; ++p) {
            // The panel (C x 16, row-major) is brgemm's B as it is.
            at::native::cpublas::brgemm(count, kPanel, g.c, g.c, kPanel, kc, false, a, group + p * g.c * kPanel,
                                        c + p * kPanel, false);
          }
        } else if (core == Fp32Core::kAvx512) {
          avx512_fp32::gemm_panels_raw(count, g.c, 1, row_ptrs.data(), group, kc / kPanel, c, kc, then, then_lines);
        } else {
          avx2::gemm_panels(count, g.c, 1, row_ptrs.data(), group, kc / kPanel, c, kc, avx2::Epilogue{});
        }
      }
      const bool flagged = bf16 ? lanes16::output_transform<M>(m, g, t0, count, kg * kc, kc, bp, rp, relu, yp)
                                : lanes8::output_transform<M>(m, g, t0, count, kg * kc, kc, bp, rp, relu, yp);
      if (flagged) {
        nonfinite.store(true, std::memory_order_relaxed);
      }
    }
    if (core == Fp32Core::kBrgemm) {
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
  // (16, K / 16, C / 2, 2, 16) -> (16, K / 16, C / 2, 16, 2): the channel pairs of avx512_gemm.h.
  return u.reshape({u.size(0), u.size(1), u.size(2) / 2, 2, kPanel}).permute({0, 1, 2, 4, 3}).to(at::kBFloat16).contiguous();
}

bool conv(const at::Tensor& x, const at::Tensor& u, const at::Tensor& bias, const std::optional<at::Tensor>& residual,
          bool relu, const at::Tensor& out, int64_t block, Fp32Core core) {
#if RF_HAVE_X86
  // The transformed weight says which tile it was made for: (T*T, K / 16, C, 16).
  // bf16 activations go with the bf16 transformed weight (conv_tiles checks the pair).
  switch (u.size(0)) {
    case 16:
      return x.scalar_type() == at::kBFloat16 ? conv_tiles<2, uint16_t>(x, u, bias, residual, relu, out, block, core)
                              : conv_tiles<2, float>(x, u, bias, residual, relu, out, block, core);
    case 36:
      return conv_tiles<4, float>(x, u, bias, residual, relu, out, block, core);
    default:
      TORCH_INTERNAL_ASSERT(false, "not a Winograd-transformed weight");
  }
#else
  TORCH_CHECK(false, "resnet_fused: the Winograd kernel needs an x86-64 CPU");
#endif
}

}  // namespace winograd
}  // namespace resnet_fused
