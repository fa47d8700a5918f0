#pragma once
// The register-blocked AVX2/FMA GEMM micro-kernel shared by the CPU convolutions of our own
// (Winograd's GEMMs, the implicit GEMM) on CPUs without AVX-512 (avx512_gemm.h's fp32 core, which
// sums in this one's order, runs where there is): out[R x 16] = sum over taps t of
// rows_t[R x C] * panel_t[C x 16], where the weight is packed in panels of 16 output channels,
// (K / 16, taps, C, 16), so each step of the C loop loads two vectors of the panel and broadcasts one
// element of each row. A tap is one (r, s) position of the filter (a 1x1 conv or a GEMM has one);
// summing taps in registers is what makes a KxK convolution one kernel without an im2col buffer. 6 rows x 2 vectors = 12
// accumulators + 2 panel vectors + 1 broadcast fill 15 of the 16 ymm registers. Long reductions
// are cut into chunks that keep their slice of the panel in L1 (gemm_panels), the partial sums
// parked in the output between chunks, in the same order as one pass: results are bit-identical.
//
// Functions carry target("avx2,fma") instead of the whole build using -mavx2: the extension must
// load on any x86-64 CPU, and callers check cpu_has_avx2_fma() before calling in.

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RF_AVX2 __attribute__((target("avx2,fma")))
#define RF_HAVE_X86 1
// Every function defined between a BEGIN and the END is compiled for that ISA, as if it carried the
// target attribute: code written once over its vector type and compiled once per ISA
// (winograd_tiles.h), where an attribute on each function would pin every copy to one ISA.
#if defined(__clang__)
#define RF_TARGET_REGION_BEGIN_AVX2 _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)")
#define RF_TARGET_REGION_BEGIN_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,avx512f\"))), apply_to = function)")
#define RF_TARGET_REGION_BEGIN_AVX512_BF16 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16\"))), apply_to = function)")
#define RF_TARGET_REGION_END _Pragma("clang attribute pop")
#else
#define RF_TARGET_REGION_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")")
#define RF_TARGET_REGION_BEGIN_AVX512 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,avx512f\")")
#define RF_TARGET_REGION_BEGIN_AVX512_BF16 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16\")")
#define RF_TARGET_REGION_END _Pragma("GCC pop_options")
#endif
#else
#define RF_AVX2
#define RF_HAVE_X86 0
#endif

namespace resnet_fused {
namespace avx2 {

constexpr int64_t kPanel = 16;  // output channels per packed weight panel
constexpr int64_t kRows = 6;    // rows per micro-kernel call

inline bool cpu_has_avx2_fma() {
#if RF_HAVE_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Applied to the accumulators before the one store: + bias[16] (+ residual row) then ReLU.
// bias == nullptr means a raw store (an intermediate result, as in Winograd).
struct Epilogue {
  const float* bias = nullptr;      // this panel's 16 biases
  const float* residual = nullptr;  // row 0 of this panel's residual; rows `ld_residual` apart
  int64_t ld_residual = 0;
  bool relu = false;
};

// `total` rows (pixels, tiles) cut into blocks of about `block` rows, for at::parallel_for, which
// hands each thread an equal count of consecutive blocks.
// WHY: at batch 1 a map has few rows (49 tiles of a 14x14 map): cut into blocks of 48, one thread
// got 48 tiles and the other 1. So the rows are first shared between the threads, then each
// thread's share is cut into the same number of blocks. Shares and blocks are whole micro-tiles of
// kRows rows (only the very last block may end in a partial one): a block of 43 rows would run
// a 1-row micro-kernel call, which costs about a third of a full one. A single block is left
// whole: the callers then split the output channels between the threads instead. A core with
// another row blocking passes its own `unit` (the AMX core: 32 rows).
class Blocks {
 public:
  Blocks(int64_t total, int64_t block, int64_t threads, int64_t unit = kRows) : unit_(unit) {
    const int64_t units = (total + unit - 1) / unit;
    const int64_t block_units = std::max<int64_t>(1, block / unit);
    threads = std::max<int64_t>(1, std::min(threads, units));
    const int64_t per_thread = (units + threads - 1) / threads;
    // At most a block per unit of the smallest share, so that every thread gets the same count.
    const int64_t blocks_per_thread =
        std::max<int64_t>(1, std::min((per_thread + block_units - 1) / block_units, units / threads));
    if (units <= block_units || threads == 1) {
      const int64_t count = units <= block_units ? 1 : (units + block_units - 1) / block_units;
      cut(0, units, count, total);
    } else {
      for (int64_t t = 0; t < threads; ++t) {
        cut(units * t / threads, units * (t + 1) / threads, blocks_per_thread, total);
      }
    }
    starts_.push_back(total);
    for (size_t i = 0; i + 1 < starts_.size(); ++i) {
      max_size_ = std::max(max_size_, starts_[i + 1] - starts_[i]);
    }
  }
  int64_t count() const {
    return static_cast<int64_t>(starts_.size()) - 1;
  }
  int64_t max_size() const {
    return max_size_;
  }
  int64_t begin(int64_t i) const {
    return starts_[i];
  }
  int64_t size(int64_t i) const {
    return starts_[i + 1] - starts_[i];
  }
  // The most rows one thread gets when at::parallel_for hands `threads` threads equal runs of the
  // blocks, as it does: ceil(count / threads) consecutive blocks each.
  int64_t largest_share(int64_t threads) const {
    const int64_t n = count(), per = (n + threads - 1) / threads;
    int64_t most = 0;
    for (int64_t first = 0; first < n; first += per) {
      most = std::max(most, starts_[std::min(n, first + per)] - starts_[first]);
    }
    return most;
  }

 private:
  // Units [first, last) into `count` blocks within one unit of each other (none empty).
  void cut(int64_t first, int64_t last, int64_t count, int64_t total) {
    count = std::max<int64_t>(1, std::min(count, last - first));
    for (int64_t b = 0; b < count; ++b) {
      starts_.push_back(std::min(total, (first + (last - first) * b / count) * unit_));
    }
  }
  int64_t unit_;
  std::vector<int64_t> starts_;
  int64_t max_size_ = 0;
};

#if RF_HAVE_X86
RF_AVX2 inline __m256 finish(__m256 acc, const Epilogue& e, int r, int half) {
  acc = _mm256_add_ps(acc, _mm256_loadu_ps(e.bias + 8 * half));
  if (e.residual != nullptr) {
    acc = _mm256_add_ps(acc, _mm256_loadu_ps(e.residual + r * e.ld_residual + 8 * half));
  }
  if (e.relu) {
    // Zero where acc < 0; a NaN compares false and stays NaN, like torch.relu.
    acc = _mm256_andnot_ps(_mm256_cmp_ps(acc, _mm256_setzero_ps(), _CMP_LT_OQ), acc);
  }
  return acc;
}

// One micro-tile: `count` of the reduction's taps, channels [c0, c0 + c) of each, for R rows.
// rows[r * row_taps + t] is row r's input row under tap t. `first`: the accumulators start at zero,
// else from `out` (the sums of the earlier chunks); `e.bias == nullptr`: a raw store.
template <int R>
RF_AVX2 inline void micro_kernel(int64_t c0, int64_t c, int64_t taps, int64_t row_taps, const float* const* rows,
                                 const float* panel, int64_t tap_stride, float* out, int64_t ld_out, bool first,
                                 const Epilogue& e) {
  static_assert(R >= 1 && R <= kRows, "1 to 6 rows");
  // Named accumulators, not an array: GCC keeps an array of __m256 in memory and spills every FMA.
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  if (!first) {
    a00 = _mm256_loadu_ps(out), a01 = _mm256_loadu_ps(out + 8);
    if constexpr (R > 1) a10 = _mm256_loadu_ps(out + ld_out), a11 = _mm256_loadu_ps(out + ld_out + 8);
    if constexpr (R > 2) a20 = _mm256_loadu_ps(out + 2 * ld_out), a21 = _mm256_loadu_ps(out + 2 * ld_out + 8);
    if constexpr (R > 3) a30 = _mm256_loadu_ps(out + 3 * ld_out), a31 = _mm256_loadu_ps(out + 3 * ld_out + 8);
    if constexpr (R > 4) a40 = _mm256_loadu_ps(out + 4 * ld_out), a41 = _mm256_loadu_ps(out + 4 * ld_out + 8);
    if constexpr (R > 5) a50 = _mm256_loadu_ps(out + 5 * ld_out), a51 = _mm256_loadu_ps(out + 5 * ld_out + 8);
  }
  // The epilogue's lines (output, residual) are fetched now, so they arrive during the C loop: at
  // batch 8 they come from DRAM, one 64-byte line per row, rows a whole pixel (K floats) apart, a
  // pattern the hardware prefetcher does not follow (measured: +14-16% on 1x1 convs with a residual).
  if (e.bias != nullptr) {
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(out + r * ld_out, 1, 3);
      if (e.residual != nullptr) {
        __builtin_prefetch(e.residual + r * e.ld_residual, 0, 3);
      }
    }
  }
  for (int64_t t = 0; t < taps; ++t) {
    const float* v0 = rows[t] + c0;
    const float* v1 = R > 1 ? rows[row_taps + t] + c0 : nullptr;
    const float* v2 = R > 2 ? rows[2 * row_taps + t] + c0 : nullptr;
    const float* v3 = R > 3 ? rows[3 * row_taps + t] + c0 : nullptr;
    const float* v4 = R > 4 ? rows[4 * row_taps + t] + c0 : nullptr;
    const float* v5 = R > 5 ? rows[5 * row_taps + t] + c0 : nullptr;
    const float* u = panel + t * tap_stride;
    for (int64_t ch = 0; ch < c; ++ch) {
      const __m256 u0 = _mm256_loadu_ps(u + ch * kPanel);
      const __m256 u1 = _mm256_loadu_ps(u + ch * kPanel + 8);
      __m256 b = _mm256_broadcast_ss(v0 + ch);
      a00 = _mm256_fmadd_ps(b, u0, a00);
      a01 = _mm256_fmadd_ps(b, u1, a01);
      if constexpr (R > 1) {
        b = _mm256_broadcast_ss(v1 + ch);
        a10 = _mm256_fmadd_ps(b, u0, a10);
        a11 = _mm256_fmadd_ps(b, u1, a11);
      }
      if constexpr (R > 2) {
        b = _mm256_broadcast_ss(v2 + ch);
        a20 = _mm256_fmadd_ps(b, u0, a20);
        a21 = _mm256_fmadd_ps(b, u1, a21);
      }
      if constexpr (R > 3) {
        b = _mm256_broadcast_ss(v3 + ch);
        a30 = _mm256_fmadd_ps(b, u0, a30);
        a31 = _mm256_fmadd_ps(b, u1, a31);
      }
      if constexpr (R > 4) {
        b = _mm256_broadcast_ss(v4 + ch);
        a40 = _mm256_fmadd_ps(b, u0, a40);
        a41 = _mm256_fmadd_ps(b, u1, a41);
      }
      if constexpr (R > 5) {
        b = _mm256_broadcast_ss(v5 + ch);
        a50 = _mm256_fmadd_ps(b, u0, a50);
        a51 = _mm256_fmadd_ps(b, u1, a51);
      }
    }
  }
  const __m256 acc[kRows][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
  for (int r = 0; r < R; ++r) {
    __m256 lo = acc[r][0], hi = acc[r][1];
    if (e.bias != nullptr) {
      lo = finish(lo, e, r, 0);
      hi = finish(hi, e, r, 1);
    }
    _mm256_storeu_ps(out + r * ld_out, lo);
    _mm256_storeu_ps(out + r * ld_out + 8, hi);
  }
}

// The epilogue applied in place to `count` rows of one 16-column panel already summed in `out`
// (by oneDNN's brgemm, which has no post-ops here): one pass while the tile is still in L1.
RF_AVX2 inline void finish_rows(int64_t count, float* out, int64_t ld_out, const Epilogue& e) {
  for (int64_t r = 0; r < count; ++r) {
    Epilogue er = e;
    if (e.residual != nullptr) {
      er.residual += r * e.ld_residual;
    }
    float* o = out + r * ld_out;
    _mm256_storeu_ps(o, finish(_mm256_loadu_ps(o), er, 0, 0));
    _mm256_storeu_ps(o + 8, finish(_mm256_loadu_ps(o + 8), er, 0, 1));
  }
}

// Products (taps x channels) per chunk of the reduction: a chunk's slice of a panel (16 KiB)
// stays in L1 while every row group of the call uses it. WHY: with the whole reduction at once,
// a 1x1 conv over 1024 channels streamed its 64 KiB panel from L2 once per six rows.
constexpr int64_t kChunk = 256;

// All `count` output rows against `panels` consecutive panels (each taps x c x 16, taps `c * 16`
// floats apart, panels `taps * c * 16` apart; output columns 16 apart), six rows at a time; rows
// holds `taps` pointers per row. The reduction is cut into chunks of whole taps (small c) or of one
// tap's channels (large c), and the chunk loop is the outer one: the rows' slice for a chunk is
// read from L2 for every panel, where one panel at a time through all chunks would sweep all of the
// rows' channels per panel (800 KB for 196 pixels x 1024 channels: from L3, 16 times per thread).
// The partial sums wait in the output; every output element still sums its chunks in order, so the
// result does not depend on the loop order. The last chunk applies the epilogue (`e.bias` and
// `e.residual` point at the first panel's columns).
RF_AVX2 inline void gemm_panels(int64_t count, int64_t c, int64_t taps, const float* const* rows, const float* panel,
                                int64_t panels, float* out, int64_t ld_out, const Epilogue& e) {
  const int64_t taps_per_chunk = std::max<int64_t>(1, kChunk / c);
  const int64_t c_chunk = std::min(c, kChunk);
  const int64_t panel_stride = taps * c * kPanel;
  const int64_t tiles = (count + kRows - 1) / kRows;
  for (int64_t t0 = 0; t0 < taps; t0 += taps_per_chunk) {
    const int64_t nt = std::min(taps_per_chunk, taps - t0);
    for (int64_t c0 = 0; c0 < c; c0 += c_chunk) {
      const int64_t cc = std::min(c_chunk, c - c0);
      const bool first = t0 == 0 && c0 == 0;
      const bool last = t0 + nt == taps && c0 + cc == c;
      for (int64_t p = 0; p < panels; ++p) {
        const float* chunk_panel = panel + p * panel_stride + (t0 * c + c0) * kPanel;
        // The next panel's slice of this chunk, fetched into L2 in equal shares before this panel's
        // calls. WHY: where few rows share a weight (batch 1, 14x14 and 7x7 maps) the slice comes
        // from DRAM, and the hardware prefetcher starts each slice cold. Measured (Zen 4, 2 threads,
        // fp32, with and without in one process): resnet18 batch 1 1.06x, batch 8 1.05x; resnet50
        // batch 1 1.07x, batch 8 1.00x.
        // (The next chunk's first panel too, from the last panel: 1.01x, not kept.)
        const int64_t next_lines = p + 1 < panels ? nt * cc : 0;  // 64-byte lines: one per channel of a tap
        for (int64_t r = 0; r < count; r += kRows) {
          const int64_t tile = r / kRows, line0 = next_lines * tile / tiles, line1 = next_lines * (tile + 1) / tiles;
          for (int64_t l = line0; l < line1; ++l) {
            _mm_prefetch(reinterpret_cast<const char*>(chunk_panel + panel_stride + l * 16), _MM_HINT_T1);
          }
          const float* const* rr = rows + r * taps + t0;
          float* o = out + r * ld_out + p * kPanel;
          Epilogue er;
          if (last && e.bias != nullptr) {
            er = e;
            er.bias += p * kPanel;
            if (e.residual != nullptr) {
              er.residual += r * e.ld_residual + p * kPanel;
            }
          }
          switch (std::min<int64_t>(kRows, count - r)) {
            case 6: micro_kernel<6>(c0, cc, nt, taps, rr, chunk_panel, c * kPanel, o, ld_out, first, er); break;
            case 5: micro_kernel<5>(c0, cc, nt, taps, rr, chunk_panel, c * kPanel, o, ld_out, first, er); break;
            case 4: micro_kernel<4>(c0, cc, nt, taps, rr, chunk_panel, c * kPanel, o, ld_out, first, er); break;
            case 3: micro_kernel<3>(c0, cc, nt, taps, rr, chunk_panel, c * kPanel, o, ld_out, first, er); break;
            case 2: micro_kernel<2>(c0, cc, nt, taps, rr, chunk_panel, c * kPanel, o, ld_out, first, er); break;
            default: micro_kernel<1>(c0, cc, nt, taps, rr, chunk_panel, c * kPanel, o, ld_out, first, er); break;
          }
        }
      }
    }
  }
}
#endif

}  // namespace avx2
}  // namespace resnet_fused
