// Winograd's tile transforms (csrc/cpu/winograd_cpu.cpp), written once over the vector type and
// compiled once per ISA: winograd_cpu.cpp includes this file (no include guard) twice, each time
// inside a namespace and a target region of its own: AVX2 + FMA (8 fp32 lanes), and AVX-512 with
// AVX512-BF16 (16 lanes, RF_WINOGRAD_LANES16 defined), which only CPUs with AVX512-BF16 run.
// WHY per ISA: on the bf16 path the transforms took a third of a Winograd conv's time on 8 lanes
// (Zen 4, 1 thread, 64 channels at 56x56: input transform 18% of the samples, output transform
// 15%, the GEMMs 45%), mostly in widening bf16 and rounding back in 8-lane AVX2 code, where 16 lanes
// load, widen and round (VCVTNEPS2BF16) in a fraction of the instructions. Measured there with 16
// lanes: that conv 0.93 -> 0.73 ms (1 thread); whole bf16 models on 2 threads, 8 against 16 lanes
// alternating in one process (identical outputs): resnet18 batch 1 1.05x, batch 8 1.07x; resnet50
// batch 1 1.01x, batch 8 1.02x.
//
// Inside the regions the functions get the region's target: no RF_AVX2 attributes here (one would
// pin the AVX-512 copy to AVX2).

// Arithmetic on one vector of 8 (or 16) channels, or on one channel (the tail of a C that is not a
// multiple of 8), with the same operations in the same order, so every channel gets bit-identical
// fp32 results whichever loop computes it (roundings to bf16 differ only for denormals: Vec16Ops's
// VCVTNEPS2BF16 flushes them to zero, which the bf16 GEMM core, reading bf16 denormals as zero,
// does anyway).
struct Vec8Ops {
  static constexpr int kLanes = 8;
  __m256 zero() const { return _mm256_setzero_ps(); }
  __m256 add(__m256 a, __m256 b) const { return _mm256_add_ps(a, b); }
  __m256 sub(__m256 a, __m256 b) const { return _mm256_sub_ps(a, b); }
  __m256 fma(__m256 a, float k, __m256 b) const { return _mm256_fmadd_ps(a, _mm256_set1_ps(k), b); }
  __m256 mul(__m256 a, float k) const { return _mm256_mul_ps(a, _mm256_set1_ps(k)); }
  __m256 load(const float* p) const { return _mm256_loadu_ps(p); }
  // bf16 activations: the top halves of fp32s, widened exactly.
  __m256 load(const uint16_t* p) const {
    const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  }
  void store(float* p, __m256 v) const { _mm256_storeu_ps(p, v); }
  // Rounded to bf16 (nearest, ties to even, NaN kept NaN) as c10::BFloat16 rounds, so the scalar
  // tail's channels round alike: the bf16 GEMM core's transformed inputs, bf16 outputs.
  void store(uint16_t* p, __m256 v) const {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    // 8 x 32-bit lanes, each holding its bf16 in the low half -> 8 x 16 bits.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  // Zero where v < 0; a NaN compares false and stays NaN, like torch.relu.
  __m256 relu(__m256 v) const { return _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ), v); }
  bool any_nan(__m256 v) const { return _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) != 0; }
};

#if RF_WINOGRAD_LANES16
// (The all-ones-masked max compiles to the unmasked instruction, without GCC 12's
// -Wmaybe-uninitialized on the unmasked intrinsic's undefined pass-through operand; avx512_gemm.h.)
struct Vec16Ops {
  static constexpr int kLanes = 16;
  __m512 zero() const { return _mm512_setzero_ps(); }
  __m512 add(__m512 a, __m512 b) const { return _mm512_add_ps(a, b); }
  __m512 sub(__m512 a, __m512 b) const { return _mm512_sub_ps(a, b); }
  __m512 fma(__m512 a, float k, __m512 b) const { return _mm512_fmadd_ps(a, _mm512_set1_ps(k), b); }
  __m512 mul(__m512 a, float k) const { return _mm512_mul_ps(a, _mm512_set1_ps(k)); }
  __m512 load(const float* p) const { return _mm512_loadu_ps(p); }
  __m512 load(const uint16_t* p) const { return avx512_bf16::widen(p); }  // the bf16 core's exact widening
  void store(float* p, __m512 v) const { _mm512_storeu_ps(p, v); }
  // Nearest, ties to even, NaN kept NaN (a quiet one); denormals flushed to zero (see above).
  void store(uint16_t* p, __m512 v) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
  }
  // max(0, v) returns its second operand where one is NaN: a NaN stays NaN, like torch.relu.
  __m512 relu(__m512 v) const { return _mm512_maskz_max_ps(0xFFFF, _mm512_setzero_ps(), v); }
  bool any_nan(__m512 v) const { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) != 0; }
};
using WideOps = Vec16Ops;
using Wide = __m512;
#else
using WideOps = Vec8Ops;
using Wide = __m256;
#endif

struct ScalarOps {
  float add(float a, float b) const { return a + b; }
  float sub(float a, float b) const { return a - b; }
  float fma(float a, float k, float b) const { return std::fma(a, k, b); }
  float mul(float a, float k) const { return a * k; }
  float load(const float* p) const { return *p; }
  float load(const uint16_t* p) const { return c10::BFloat16(*p, c10::BFloat16::from_bits()); }
  void store(float* p, float v) const { *p = v; }
  void store(uint16_t* p, float v) const { *p = c10::BFloat16(v).x; }
};

// The transforms of F(M x M, 3 x 3), each applied along columns then rows: B^T d (input) and
// A^T m (output); G, the weight's, is Tile<M>::kG.
template <int M>
struct TileTransform;

template <>
struct TileTransform<2> {
  template <typename V, typename Ops>
  static void input(const V (&d)[4], V (&t)[4], Ops o) {
    t[0] = o.sub(d[0], d[2]);
    t[1] = o.add(d[1], d[2]);
    t[2] = o.sub(d[2], d[1]);
    t[3] = o.sub(d[1], d[3]);
  }

  template <typename V, typename Ops>
  static void output(const V (&m)[4], V (&a)[2], Ops o) {
    a[0] = o.add(o.add(m[0], m[1]), m[2]);
    a[1] = o.sub(o.sub(m[1], m[2]), m[3]);
  }
};

// For the interpolation points 0, +-1/2, +-3/2 (and infinity) of Tile<4>.
template <>
struct TileTransform<4> {
  // B^T rows: (9/16 0 -5/2 0 1 0) (0 -9/8 -9/4 1/2 1 0) (0 9/8 -9/4 -1/2 1 0)
  //           (0 -3/8 -1/4 3/2 1 0) (0 3/8 -1/4 -3/2 1 0) (0 9/16 0 -5/2 0 1)
  template <typename V, typename Ops>
  static void input(const V (&d)[6], V (&t)[6], Ops o) {
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
  static void output(const V (&m)[6], V (&a)[4], Ops o) {
    const V s12 = o.add(m[1], m[2]), d12 = o.sub(m[1], m[2]);
    const V s34 = o.add(m[3], m[4]), d34 = o.sub(m[3], m[4]);
    a[0] = o.add(o.add(m[0], s12), s34);
    a[1] = o.fma(d34, 1.5f, o.mul(d12, 0.5f));
    a[2] = o.fma(s34, 2.25f, o.mul(s12, 0.25f));
    a[3] = o.fma(d34, 3.375f, o.fma(d12, 0.125f, m[5]));
  }
};

// B^T d B of one patch for channels [ch, ch + lanes) (or one channel), the T*T results written
// `plane` floats apart. WHY in registers: the two passes went through a scratch row buffer, and at
// C = 64 the input transform took 63% of the GEMMs' time; here each input is loaded once and each
// output stored once.
template <int M, typename V, typename Ops, typename In, typename Out>
inline void input_tile(const In* const (&d)[Tile<M>::kT][Tile<M>::kT], int64_t ch, int64_t plane, Out* out, Ops o) {
  constexpr int T = Tile<M>::kT;
  V cols[T][T];  // cols[j] = B^T applied to column j of the patch
  for (int j = 0; j < T; ++j) {
    V column[T];
    for (int i = 0; i < T; ++i) {
      column[i] = o.load(d[i][j] + ch);
    }
    TileTransform<M>::input(column, cols[j], o);
  }
  for (int i = 0; i < T; ++i) {
    V row[T], v[T];
    for (int j = 0; j < T; ++j) {
      row[j] = cols[j][i];
    }
    TileTransform<M>::input(row, v, o);
    for (int j = 0; j < T; ++j) {
      o.store(out + (i * T + j) * plane + ch, v[j]);
    }
  }
}

// Each tile's (M+2)^2 patch of x (fp32, or bf16 as uint16_t) -> B^T d B in fp32, written as
// (M+2)^2 rows of `plane` stride: fp32, or bf16 (Out = uint16_t) for the bf16 GEMM core.
template <int M, typename In, typename Out>
void input_transform(const In* x, const Geometry& g, int64_t t0, int64_t count, const In* zero, Out* v) {
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
#if RF_WINOGRAD_LANES16
    for (; ch + 16 <= c; ch += 16) {
      input_tile<M, __m512>(d, ch, plane, out, Vec16Ops{});
    }
#endif
    for (; ch + 8 <= c; ch += 8) {
      input_tile<M, __m256>(d, ch, plane, out, Vec8Ops{});
    }
    for (; ch < c; ++ch) {
      input_tile<M, float>(d, ch, plane, out, ScalarOps{});
    }
  }
}

// The M x M outputs of one tile for channels [ch, ch + lanes): A^T m A.
template <int M>
inline void output_tile(const float* mt, int64_t plane, int64_t ch, Wide (&y)[M][M]) {
  constexpr int T = Tile<M>::kT;
  const WideOps o;
  Wide cols[T][M];  // cols[j] = A^T applied to column j of the points
  for (int j = 0; j < T; ++j) {
    Wide column[T];
    for (int i = 0; i < T; ++i) {
      column[i] = o.load(mt + (i * T + j) * plane + ch);
    }
    TileTransform<M>::output(column, cols[j], o);
  }
  for (int i = 0; i < M; ++i) {
    Wide row[T];
    for (int j = 0; j < T; ++j) {
      row[j] = cols[j][i];
    }
    TileTransform<M>::output(row, y[i], o);
  }
}

// A^T m A (M x M outputs per tile) + bias (+ residual), ReLU, into y for channels [k0, k0 + kc);
// bias, residual and y fp32, or bf16 (T = uint16_t: y rounded once, in the store).
// Returns whether any output before the ReLU was Inf or NaN (see conv() in winograd.h for why).
template <int M, typename T>
bool output_transform(const float* m, const Geometry& g, int64_t t0, int64_t count, int64_t k0, int64_t kc,
                      const T* bias, const T* residual, bool relu, T* y) {
  const WideOps o;
  const int64_t plane = count * kc;
  const T* b = bias + k0;
  // s - s is 0 for a finite s and NaN for an Inf or NaN, and a NaN added in stays: one add per
  // output flags both, lane by lane.
  Wide nonfinite = o.zero();
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
    for (int64_t ch = 0; ch < kc; ch += WideOps::kLanes) {  // kc is a multiple of kPanel (16)
      Wide out[M][M];
      output_tile<M>(mt, plane, ch, out);
      const Wide bv = o.load(b + ch);
      for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < cols; ++j) {
          Wide s = o.add(out[i][j], bv);
          if (residual != nullptr) {
            s = o.add(s, o.load(res[i][j] + ch));
          }
          nonfinite = o.add(nonfinite, o.sub(s, s));
          if (relu) {
            s = o.relu(s);
          }
          o.store(dst[i][j] + ch, s);
        }
      }
    }
  }
  return o.any_nan(nonfinite);
}
