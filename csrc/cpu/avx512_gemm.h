#pragma once
// The AVX-512 GEMM micro-kernel of the implicit-GEMM convolution and Winograd's GEMMs, written once
// (avx512_gemm_core.h) and compiled for two operand types, each in its own namespace and target
// region:
// - avx512_fp32: fp32 operands and sums, one FMA of 16 lanes per input channel; any CPU with
//   AVX512F. Sums in the order of avx2_gemm.h's core (from zero, channel by channel, then + bias,
//   + residual, ReLU), so its results are bit-identical to that core's.
//   WHY next to the AVX2 core: 32 registers hold 12 rows x 2 panels of sums where 16 hold 6 x 1,
//   so a channel step issues 14 loads for 24 FMAs (not 8 for 12) and the call's epilogue is spread
//   over 4x the work. On Zen 4, whose 512-bit FMAs run at the 256-bit rate, that is what pays.
// - avx512_bf16 (CPUs with AVX512-BF16: Zen 4, Cooper Lake, Sapphire Rapids and later): bf16
//   activations and weights, fp32 sums, the epilogue (bias, bf16 residual, ReLU) applied in fp32
//   and the result rounded once to bf16 in the store. VDPBF16PS multiplies 16 pairs of bf16 and
//   adds both products to 16 fp32 sums: 32 multiply-adds where an fp32 FMA on the same 512 bits
//   does 16. So the reduction runs over pairs of input channels: the weight is packed (K / 16,
//   taps, ceil(C / 2), 16, 2), one 64-byte vector per channel pair of a 16-channel panel, and each
//   row broadcasts its two adjacent channels (one 32-bit load: channels_last keeps them side by
//   side). An odd C's last channel is broadcast alone (the pair's other half zero, as is its packed
//   weight): reading the next two bytes instead would pull the next pixel's first channel in, and a
//   NaN there times a zero weight would leak a NaN into a pixel that has none. Products of two bf16
//   are exact in fp32, so the only rounding beyond fp32 accumulation is the output's one to bf16.
//   VDPBF16PS treats bf16 denormal inputs as zero (as oneDNN's bf16 convolutions, which use it
//   too); NaN and Inf propagate as in any fp32 sum.
//
// 12 rows x 2 panels = 24 zmm sums + 2 weight vectors + the broadcast: 27 of the 32 zmm registers;
// per reduction step 14 loads feed 24 multiply-adds, so the loads keep up and the panel can stream
// from L2. Hence no chunking of the reduction as in avx2_gemm.h (whose 6 rows need the panel in L1).
//
// The code carries no target attributes: the regions below give each copy its ISA, so that the
// extension still loads on CPUs without these instructions; callers check cpu_has_avx512() or
// cpu_has_avx512_bf16() first.

#include "avx2_gemm.h"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace resnet_fused {

namespace avx512_fp32 {
inline bool cpu_has_avx512() {
#if RF_HAVE_X86
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}
}  // namespace avx512_fp32

namespace avx512_bf16 {
inline bool cpu_has_avx512_bf16() {
#if RF_HAVE_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}
}  // namespace avx512_bf16

#if RF_HAVE_X86
RF_TARGET_REGION_BEGIN_AVX512
namespace avx512_fp32 {
// One reduction step is one input channel: a 16-lane FMA with the channel broadcast.
struct Ops {
  using Element = float;
  static constexpr int kStep = 1;
  using Weights = __m512;
  using Broadcast = __m512;
  static Weights load_weights(const float* w) { return _mm512_loadu_ps(w); }
  static Broadcast broadcast(const float* v) { return _mm512_set1_ps(*v); }
  static Broadcast broadcast_first(const float* v) { return broadcast(v); }  // a step has one channel
  static Broadcast from_bits(__m512 bits) { return bits; }
  static __m512 multiply_add(__m512 acc, Broadcast b, Weights w) { return _mm512_fmadd_ps(b, w, acc); }
  // Sums start from zero and the bias is added after them, as the AVX2 core does.
  static __m512 start(const float*) { return _mm512_setzero_ps(); }
  static __m512 add_bias(__m512 acc, const float* bias) { return _mm512_add_ps(acc, _mm512_loadu_ps(bias)); }
  static __m512 add_residual(__m512 acc, const float* residual) {
    return _mm512_add_ps(acc, _mm512_loadu_ps(residual));
  }
  template <int P>
  static void store(const __m512 (&acc)[P], float* out) {
    for (int p = 0; p < P; ++p) {
      _mm512_storeu_ps(out + p * avx2::kPanel, acc[p]);
    }
  }
};
#include "avx512_gemm_core.h"
}  // namespace avx512_fp32
RF_TARGET_REGION_END

RF_TARGET_REGION_BEGIN_AVX512_BF16
namespace avx512_bf16 {
inline __m512 widen(const uint16_t* p) {
  // bf16 is the top half of an fp32: shifting the 16 bits up is the exact conversion. (The
  // all-ones-masked forms compile to the same instructions without GCC 12's -Wmaybe-uninitialized
  // on the unmasked ones' undefined pass-through operand.)
  const __m512i bits = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, bits, 16));
}

// One reduction step is a pair of input channels (see the top of the file).
struct Ops {
  using Element = uint16_t;
  static constexpr int kStep = 2;
  using Weights = __m512bh;
  using Broadcast = __m512bh;
  static Weights load_weights(const uint16_t* w) { return (__m512bh)_mm512_loadu_si512(w); }
  static Broadcast broadcast(const uint16_t* v) {
    int32_t pair;
    std::memcpy(&pair, v, sizeof(pair));
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  // An odd C's last channel, its partner zero.
  static Broadcast broadcast_first(const uint16_t* v) { return (__m512bh)_mm512_set1_epi32(*v); }
  static Broadcast from_bits(__m512 bits) { return (__m512bh)bits; }
  static __m512 multiply_add(__m512 acc, Broadcast b, Weights w) { return _mm512_dpbf16_ps(acc, b, w); }
  // WHY the sums start from the bias, the residual is added by one VDPBF16PS and two panels are
  // rounded and stored as one 64-byte vector: with a 1x1 conv over 64 channels, the 32 channel-pair
  // steps of a call leave the epilogue a fifth of its work. Together these took resnet50's 64 ->
  // 256 1x1 conv with a residual from 0.40 to 0.35 ms at batch 1 (Zen 4 EPYC, 2 threads,
  // in-process A/B); whole bf16 resnet50 +3.9% (batch 1) and +2.1% (batch 8).
  static __m512 start(const uint16_t* bias) { return widen(bias); }
  static __m512 add_bias(__m512 acc, const uint16_t*) { return acc; }
  static __m512 add_residual(__m512 acc, const uint16_t* residual) {
    // The residual value zero-extended into the low half of a pair, dotted with the pair (1, 0):
    // + residual * 1 + 0 * 0, the exact sum of an add (bf16 denormals read as zero, as VDPBF16PS
    // reads every bf16) in one instruction where widening and adding take two.
    const __m512bh one_zero = (__m512bh)_mm512_set1_epi32(0x3F80);
    const auto* r = reinterpret_cast<const __m256i*>(residual);
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(r)), one_zero);
  }
  template <int P>
  static void store(const __m512 (&acc)[P], uint16_t* out) {
    if constexpr (P == 2) {
      // Panel 0's 16 outputs in the low half, panel 1's in the high half: the row's 32 in order.
      _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(acc[1], acc[0]));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(acc[0]));
    }
  }
};
#include "avx512_gemm_core.h"
}  // namespace avx512_bf16
RF_TARGET_REGION_END
#endif

}  // namespace resnet_fused
