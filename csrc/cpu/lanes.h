#pragma once
// Eight values of float, bfloat16 or half as the fp32 lanes of a __m256, for the memory-bound
// kernels (max pooling, the classifier head) that compute in fp32 whatever the stored dtype.
// Widening is exact. Lanes<T>::store cuts a bf16 short (exact only for values loaded from bf16,
// as max pooling stores); a computed value goes through store_rounded.

#include "avx2_gemm.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#if RF_HAVE_X86
#define RF_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#else
#define RF_AVX2_F16C
#endif

namespace resnet_fused {

// Whether this CPU runs the kernels built on Lanes (x86-64 with AVX2, FMA and F16C).
inline bool cpu_has_avx2_f16c() {
#if RF_HAVE_X86
  static const bool ok = avx2::cpu_has_avx2_fma() && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

#if RF_HAVE_X86
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  RF_AVX2_F16C static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  RF_AVX2_F16C static void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
};

template <>
struct Lanes<c10::BFloat16> {
  RF_AVX2_F16C static __m256 load(const c10::BFloat16* p) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  // Keeps the high 16 bits: exact for values that came from bf16 (max pooling's); a computed
  // value (a sum) goes through store_rounded instead.
  RF_AVX2_F16C static void store(c10::BFloat16* p, __m256 v) {
    const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    // packus works within 128-bit halves: the 8 results land in 64-bit quarters 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high, high), 0b1000);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};

template <>
struct Lanes<c10::Half> {
  RF_AVX2_F16C static __m256 load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  RF_AVX2_F16C static void store(c10::Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
};

// A computed fp32 vector stored as T, rounded to nearest even as torch converts (a NaN stays NaN).
template <typename T>
RF_AVX2_F16C inline void store_rounded(T* p, __m256 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
    // Rounding could carry a NaN's payload into an Inf: NaNs keep their bits, made quiet.
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000));
    Lanes<T>::store(p, _mm256_castsi256_ps(_mm256_blendv_epi8(rounded, quiet, nan)));
  } else {
    Lanes<T>::store(p, v);
  }
}
#endif

}  // namespace resnet_fused
