#pragma once
// The bf16 GEMM micro-kernel of the implicit-GEMM convolution on CPUs with AVX512-BF16 (Zen 4,
// Cooper Lake, Sapphire Rapids and later): bf16 activations and weights, fp32 sums, the epilogue
// (bias, bf16 residual, ReLU) applied in fp32 and the result rounded once to bf16 in the store.
//
// VDPBF16PS multiplies 16 pairs of bf16 and adds both products to 16 fp32 sums: one instruction
// does 32 multiply-adds where an fp32 FMA on the same 512 bits does 16. So the reduction runs over
// pairs of input channels: the weight is packed (K / 16, taps, ceil(C / 2), 16, 2), one 64-byte
// vector per channel pair of a 16-channel panel, and each row broadcasts its two adjacent
// channels (one 32-bit load: channels_last keeps them side by side). An odd C's last channel is
// broadcast alone (the pair's other half zero, as is its packed weight): reading the next two
// bytes instead would pull the next pixel's first channel in, and a NaN there times a zero weight
// would leak a NaN into a pixel that has none.
//
// 12 rows x 2 panels = 24 zmm sums + 2 weight vectors + the broadcast: 27 of the 32 zmm registers;
// per channel pair 14 loads feed 24 VDPBF16PS, so the loads keep up and the panel can stream from
// L2. Hence no chunking of the reduction as in avx2_gemm.h (whose 6 rows need the panel in L1),
// and no partial sums parked in the bf16 output.
//
// Products of two bf16 are exact in fp32 and the sums are fp32, so the only rounding beyond fp32
// accumulation is the output's one to bf16. VDPBF16PS treats bf16 denormal inputs as zero (as
// oneDNN's bf16 convolutions, which use it too); NaN and Inf propagate as in any fp32 sum.
//
// Functions carry target(...) so that the extension still loads on CPUs without these
// instructions; callers check cpu_has_avx512_bf16() first.

#include "avx2_gemm.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

#if RF_HAVE_X86
#define RF_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#else
#define RF_AVX512_BF16
#endif

namespace resnet_fused {
namespace avx512_bf16 {

using avx2::kPanel;
constexpr int kRows = 12;  // rows per micro-kernel call

inline bool cpu_has_avx512_bf16() {
#if RF_HAVE_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// bias: this panel's 16 (the first panel of the call's); residual: row 0 of the first panel, rows
// `ld_residual` elements apart; both bf16, widened exactly to fp32 in the store.
struct Epilogue {
  const uint16_t* bias = nullptr;
  const uint16_t* residual = nullptr;
  int64_t ld_residual = 0;
  bool relu = false;
};

// What the next micro-kernel call of a gemm_panels() touches first (bf16 output only): its first
// output row and residual row (rows ld_out and Epilogue::ld_residual apart) and how many rows it
// has; where it is the first to read its input rows, their pointers, count and 64-byte lines each.
struct NextCall {
  const uint16_t* out = nullptr;
  const uint16_t* residual = nullptr;
  int rows = 0;
  const uint16_t* const* in = nullptr;
  int in_rows = 0;
  int lines_per_row = 0;
  // This call's share of the next panel pair's weights, fetched into L2: `weight_lines` 64-byte
  // lines from `weights`, `weight_lines_per_step` per channel-pair step.
  const uint16_t* weights = nullptr;
  int64_t weight_lines = 0;
  int weight_lines_per_step = 0;
};

#if RF_HAVE_X86
RF_AVX512_BF16 inline __m512 widen(const uint16_t* p) {
  // bf16 is the top half of an fp32: shifting the 16 bits up is the exact conversion. (The
  // all-ones-masked forms compile to the same instructions without GCC 12's -Wmaybe-uninitialized
  // on the unmasked ones' undefined pass-through operand.)
  const __m512i bits = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, bits, 16));
}

RF_AVX512_BF16 inline __m512i broadcast_pair(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return _mm512_set1_epi32(pair);
}

// Channel pair i of every row times its packed weights `w` (panels `panel_stride` apart), into
// the sums; `kLone`: the lone last channel of an odd C, broadcast alone (see the top of the file).
template <int R, int P, bool kLone>
__attribute__((always_inline)) RF_AVX512_BF16 inline void add_pair(__m512 (&acc)[R][P], const uint16_t* const (&v)[R],
                                                                   const uint16_t* w, int64_t panel_stride, int64_t i) {
  __m512bh wp[P];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
    wp[p] = (__m512bh)_mm512_loadu_si512(w + p * panel_stride);
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
    const __m512bh b = (__m512bh)(kLone ? _mm512_set1_epi32(v[r][2 * i]) : broadcast_pair(v[r] + 2 * i));
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      acc[r][p] = _mm512_dpbf16_ps(acc[r][p], b, wp[p]);
    }
  }
}

// The epilogue and the store of R rows x P panels of sums that started from the bias: + residual,
// ReLU, rounded to bf16. WHY this form: with a 1x1 conv over 64 channels, the 32 channel-pair
// steps of a call leave the epilogue a fifth of its work. Starting the sums from the bias, adding
// the residual with one VDPBF16PS, ReLU as one max and two panels' 32 outputs rounded and stored
// as one 64-byte vector took it from 0.40 to 0.35 ms on resnet50's 64 -> 256 1x1 conv with a
// residual at batch 1 (Zen 4 EPYC, 2 threads, in-process A/B); whole bf16 resnet50 +3.9% (batch
// 1) and +2.1% (batch 8).
template <int R, int P>
__attribute__((always_inline)) RF_AVX512_BF16 inline void store_bf16(__m512 (&acc)[R][P], uint16_t* out,
                                                                     int64_t ld_out, const Epilogue& e) {
  if (e.residual != nullptr) {
    // Each residual value zero-extended into the low half of a pair, dotted with the pair (1, 0):
    // + residual * 1 + 0 * 0, the exact sum of an add (bf16 denormals read as zero, as VDPBF16PS
    // reads every bf16) in one instruction where widening and adding take two.
    const __m512bh one_zero = (__m512bh)_mm512_set1_epi32(0x3F80);
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) {
        const auto* res = reinterpret_cast<const __m256i*>(e.residual + r * e.ld_residual + p * kPanel);
        acc[r][p] = _mm512_dpbf16_ps(acc[r][p], (__m512bh)_mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(res)),
                                     one_zero);
      }
    }
  }
  if (e.relu) {
    const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) {
        // max(0, s) returns its second operand where one is NaN: a NaN stays NaN, like torch.relu.
        acc[r][p] = _mm512_maskz_max_ps(0xFFFF, zero, acc[r][p]);
      }
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
    if constexpr (P == 2) {
      // Panel 0's 16 outputs in the low half, panel 1's in the high half: the row's 32 in order.
      _mm512_storeu_si512(out + r * ld_out, (__m512i)_mm512_cvtne2ps_pbh(acc[r][1], acc[r][0]));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ld_out), (__m256i)_mm512_cvtneps_pbh(acc[r][0]));
    }
  }
}

// R rows x P panels: the sums over `taps` taps of `pairs` channel pairs (+ the lone last channel
// when `odd`), then the store: into bf16 (Out = uint16_t) after the epilogue (store_bf16), or the
// raw fp32 sums (Out = float, `e` unused: Winograd's transformed points). rows[r * row_taps + t] is
// row r's input under tap t; tap t of panel p is at panel + p * panel_stride + t * tap_stride.
template <int R, int P, typename Out>
RF_AVX512_BF16 inline void micro_kernel(int64_t pairs, bool odd, int64_t taps, int64_t row_taps,
                                        const uint16_t* const* rows, const uint16_t* panel, int64_t tap_stride,
                                        int64_t panel_stride, Out* out, int64_t ld_out, const Epilogue& e,
                                        const NextCall& next) {
  static_assert(R >= 1 && R <= kRows && (P == 1 || P == 2), "1 to 12 rows, 1 or 2 panels");
  // The bf16 output's sums start from the bias (see store_bf16); Winograd's raw sums from zero.
  __m512 init[P];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
    if constexpr (std::is_same_v<Out, float>) {
      init[p] = _mm512_setzero_ps();
    } else {
      init[p] = widen(e.bias + p * kPanel);
    }
  }
  __m512 acc[R][P];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      acc[r][p] = init[p];
    }
  }
  // The lines the next call's epilogue reads and writes (`next`), one row per channel-pair step,
  // and those of its input rows, one line per step, so that it does not wait on memory. WHY: at
  // batch 8 a 1x1 conv's activations live in DRAM, and each call began with a burst of input
  // misses and ended with one of residual loads and output stores. On the Zen 4 EPYC (in-process
  // A/B, medians of 14 alternating rounds, two runs each), bf16 resnet50 batch 8: the epilogue's
  // lines 4.8-5.9% faster, the input rows another 2.9-4.1%; batch 1 0.6-1.4% and 0-1.8%; resnet18
  // batch 1 and 8 within +-1.1%. (avx2_gemm.h's core fetches its own epilogue lines at the start of
  // a call instead; input rows are read from a call's first step, so they must come a call ahead,
  // and the epilogue's lines come with them. That scheme in the AVX2 core: +0.7-1.8%, not kept.)
  int next_row = 0, in_row = 0, in_line = 0;
  int64_t weight_line = 0;
  for (int64_t t = 0; t < taps; ++t) {
    const uint16_t* v[R];
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      v[r] = rows[r * row_taps + t];
    }
    const uint16_t* u = panel + t * tap_stride;
    for (int64_t i = 0; i < pairs; ++i) {
      add_pair<R, P, false>(acc, v, u + i * 2 * kPanel, panel_stride, i);
      if constexpr (!std::is_same_v<Out, float>) {
        if (next_row < next.rows) {
          _mm_prefetch(reinterpret_cast<const char*>(next.out + next_row * ld_out), _MM_HINT_T0);
          if (next.residual != nullptr) {
            _mm_prefetch(reinterpret_cast<const char*>(next.residual + next_row * e.ld_residual), _MM_HINT_T0);
          }
          ++next_row;
        }
        if (in_row < next.in_rows) {
          _mm_prefetch(reinterpret_cast<const char*>(next.in[in_row] + in_line * 32), _MM_HINT_T0);
          if (++in_line == next.lines_per_row) {
            in_line = 0;
            ++in_row;
          }
        }
      }
      for (int l = 0; l < next.weight_lines_per_step && weight_line < next.weight_lines; ++l, ++weight_line) {
        _mm_prefetch(reinterpret_cast<const char*>(next.weights + weight_line * 32), _MM_HINT_T1);
      }
    }
    if (odd) {
      add_pair<R, P, true>(acc, v, u + pairs * 2 * kPanel, panel_stride, pairs);
    }
  }
  if constexpr (std::is_same_v<Out, float>) {
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) {
        _mm512_storeu_ps(out + r * ld_out + p * kPanel, acc[r][p]);
      }
    }
  } else {
    store_bf16<R, P>(acc, out, ld_out, e);
  }
}

template <int P, typename Out>
RF_AVX512_BF16 inline void rows_of(int64_t n_rows, int64_t pairs, bool odd, int64_t taps, const uint16_t* const* rows,
                                   const uint16_t* panel, int64_t tap_stride, int64_t panel_stride, Out* out,
                                   int64_t ld_out, const Epilogue& e, const NextCall& next) {
  switch (n_rows) {
#define RF_ROWS_CASE(R) \
  case R: micro_kernel<R, P, Out>(pairs, odd, taps, taps, rows, panel, tap_stride, panel_stride, out, ld_out, e, next); break;
    RF_ROWS_CASE(12) RF_ROWS_CASE(11) RF_ROWS_CASE(10) RF_ROWS_CASE(9) RF_ROWS_CASE(8) RF_ROWS_CASE(7)
    RF_ROWS_CASE(6) RF_ROWS_CASE(5) RF_ROWS_CASE(4) RF_ROWS_CASE(3) RF_ROWS_CASE(2) RF_ROWS_CASE(1)
#undef RF_ROWS_CASE
  }
}

// All `count` output rows against `panels` consecutive panels (each taps x pairs x 32 bf16, panels
// `panel_stride` apart; output columns 16 apart), two panels and 12 rows at a time; rows holds
// `taps` pointers per row. `e` is for the first panel and row (bf16 output only).
template <typename Out>
RF_AVX512_BF16 inline void gemm_panels(int64_t count, int64_t c, int64_t taps, const uint16_t* const* rows,
                                       const uint16_t* panel, int64_t panels, Out* out, int64_t ld_out,
                                       const Epilogue& e) {
  const int64_t pairs = c / 2, tap_stride = (c + 1) / 2 * 2 * kPanel, panel_stride = taps * tap_stride;
  const bool odd = c % 2 != 0;
  const int64_t tiles = (count + kRows - 1) / kRows, steps = taps * pairs;  // calls per panel pair, steps per call
  for (int64_t p = 0; p < panels; p += 2) {
    for (int64_t r = 0; r < count; r += kRows) {
      Epilogue er = e;
      if (e.bias != nullptr) {
        er.bias += p * kPanel;
      }
      if (e.residual != nullptr) {
        er.residual += r * e.ld_residual + p * kPanel;
      }
      const int64_t n_rows = std::min<int64_t>(kRows, count - r);
      const uint16_t* const* rr = rows + r * taps;
      Out* o = out + r * ld_out + p * kPanel;
      NextCall next;
      if constexpr (!std::is_same_v<Out, float>) {
        // The next call: 12 rows on, else the next two panels from row 0, else none.
        const int64_t next_r = r + kRows < count ? r + kRows : 0, next_p = r + kRows < count ? p : p + 2;
        if (next_p < panels) {
          next.out = out + next_r * ld_out + next_p * kPanel;
          next.residual = e.residual == nullptr ? nullptr : e.residual + next_r * e.ld_residual + next_p * kPanel;
          next.rows = static_cast<int>(std::min<int64_t>(kRows, count - next_r));
        }
        if (p == 0 && taps == 1 && r + kRows < count) {
          // A 1x1 conv's next rows too, on the first two panels (where they are first read).
          next.in = rows + r + kRows;
          next.in_rows = static_cast<int>(std::min<int64_t>(kRows, count - r - kRows));
          next.lines_per_row = static_cast<int>((c * 2 + 63) / 64);
        }
      }
      if (p + 2 < panels && steps > 0) {
        // The next pair's weights, in equal shares over this pair's calls, a few lines per step:
        // where few rows share a weight (batch 1, 7x7 maps) it comes from DRAM, which one call's
        // compute cannot hide. Measured (Zen 4, 2 threads, bf16, with and without in one process):
        // resnet18 batch 1 1.16x, batch 8 1.01x; resnet50 batch 1 1.05x, batch 8 1.01x.
        const int64_t lines = std::min<int64_t>(2, panels - p - 2) * panel_stride / 32, tile = r / kRows;
        const int64_t line0 = lines * tile / tiles, line1 = lines * (tile + 1) / tiles;
        next.weights = panel + (p + 2) * panel_stride + line0 * 32;
        next.weight_lines = line1 - line0;
        next.weight_lines_per_step = static_cast<int>((next.weight_lines + steps - 1) / steps);
      }
      if (p + 1 < panels) {
        rows_of<2>(n_rows, pairs, odd, taps, rr, panel + p * panel_stride, tap_stride, panel_stride, o, ld_out, er, next);
      } else {
        rows_of<1>(n_rows, pairs, odd, taps, rr, panel + p * panel_stride, tap_stride, panel_stride, o, ld_out, er, next);
      }
    }
  }
}
#endif

}  // namespace avx512_bf16
}  // namespace resnet_fused
