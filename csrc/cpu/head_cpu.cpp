// See head.h for why the classifier head has kernels of ours.

#include "head.h"

#include "avx512_gemm.h"
#include "lanes.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace resnet_fused {
namespace {

#if RF_HAVE_X86
// Channels per task of the pool: eight accumulators of eight lanes.
constexpr int64_t kPoolChannels = 64;

template <typename T>
RF_AVX2_F16C void pool_channels(const T* x, int64_t pixels, int64_t c, int64_t c0, int64_t count, T* out) {
  // Divided, not multiplied by a reciprocal: ATen's pool divides.
  const __m256 count_v = _mm256_set1_ps(static_cast<float>(pixels));
  int64_t ch = c0;
  if (count == kPoolChannels) {
    __m256 acc[8];
    for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps();
    for (int64_t p = 0; p < pixels; ++p) {
      const T* row = x + p * c + ch;
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_add_ps(acc[v], Lanes<T>::load(row + 8 * v));
    }
    for (int v = 0; v < 8; ++v) store_rounded(out + ch + 8 * v, _mm256_div_ps(acc[v], count_v));
    return;
  }
  for (; ch + 8 <= c0 + count; ch += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t p = 0; p < pixels; ++p) acc = _mm256_add_ps(acc, Lanes<T>::load(x + p * c + ch));
    store_rounded(out + ch, _mm256_div_ps(acc, count_v));
  }
  for (; ch < c0 + count; ++ch) {
    float acc = 0.0f;
    for (int64_t p = 0; p < pixels; ++p) acc += static_cast<float>(x[p * c + ch]);
    out[ch] = static_cast<T>(acc / static_cast<float>(pixels));
  }
}

template <typename T>
void pool(const at::Tensor& x, const at::Tensor& out) {
  const int64_t n = x.size(0), c = x.size(1), pixels = x.size(2) * x.size(3);
  const int64_t chunks = (c + kPoolChannels - 1) / kPoolChannels;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / chunks, c0 = (task % chunks) * kPoolChannels;
      pool_channels<T>(xp + img * pixels * c, pixels, c, c0, std::min(kPoolChannels, c - c0), op + img * c);
    }
  });
}

RF_AVX2_F16C inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// sums[r * RN + i] = dot(w row r, x row i) over k, for RJ rows of the weight (ldw apart) and RN
// rows of the fp32 x (ldx apart): RJ x RN accumulators, each weight vector loaded once for RN rows.
template <typename T, int RJ, int RN>
RF_AVX2_F16C void dot_tile(const T* w, int64_t ldw, const float* x, int64_t ldx, int64_t k, float* sums) {
  __m256 acc[RJ][RN];
  for (int r = 0; r < RJ; ++r)
    for (int i = 0; i < RN; ++i) acc[r][i] = _mm256_setzero_ps();
  int64_t kk = 0;
  for (; kk + 8 <= k; kk += 8) {
    __m256 wv[RJ];
    for (int r = 0; r < RJ; ++r) wv[r] = Lanes<T>::load(w + r * ldw + kk);
    for (int i = 0; i < RN; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + kk);
      for (int r = 0; r < RJ; ++r) acc[r][i] = _mm256_fmadd_ps(wv[r], xv, acc[r][i]);
    }
  }
  for (int r = 0; r < RJ; ++r) {
    for (int i = 0; i < RN; ++i) {
      float s = hsum(acc[r][i]);
      for (int64_t t = kk; t < k; ++t) s += static_cast<float>(w[r * ldw + t]) * x[i * ldx + t];
      sums[r * RN + i] = s;
    }
  }
}

// Weight rows per block: a block (64 KB of fp32 at K = 2048) stays in L2 while every row of x
// passes over it, so the weight is read from memory once whatever the batch.
constexpr int64_t kBlockRows = 8;

// out rows [0, n) x columns [j0, j1) of one block, x's rows in groups of up to four. Fewer rows
// per group take more weight rows per tile, keeping eight accumulators busy: the FMA latency
// needs about that many chains.
template <typename T, int RN>
void block_rows(const T* w, int64_t k, const float* x, int64_t row0, const float* bias, int64_t j0, int64_t j1,
                int64_t jn, T* out) {
  constexpr int RJ = RN == 1 ? 8 : RN == 2 ? 4 : 2;
  float sums[RJ * RN];
  auto emit = [&](int64_t j, int rows) {
    for (int r = 0; r < rows; ++r) {
      const float b = bias == nullptr ? 0.0f : bias[j + r];
      for (int i = 0; i < RN; ++i) out[(row0 + i) * jn + j + r] = static_cast<T>(sums[r * RN + i] + b);
    }
  };
  int64_t j = j0;
  for (; j + RJ <= j1; j += RJ) {
    dot_tile<T, RJ, RN>(w + j * k, k, x + row0 * k, k, k, sums);
    emit(j, RJ);
  }
  for (; j < j1; ++j) {
    dot_tile<T, 1, RN>(w + j * k, k, x + row0 * k, k, k, sums);
    emit(j, 1);
  }
}

// p's `count` values in fp32: a copy for bf16 / fp16, none for fp32 (`p` itself; `storage` unused).
template <typename T>
const float* widened(const T* p, int64_t count, std::vector<float>& storage) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    storage.resize(count);
    for (int64_t i = 0; i < count; ++i) {
      storage[i] = static_cast<float>(p[i]);
    }
    return storage.data();
  }
}

template <typename T>
void linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t n = x.size(0), k = x.size(1), jn = weight.size(0);
  // x and the bias in fp32 once (x: a few rows, linear_rows_limit), so the tiles widen only the
  // weight. WHY a loop and not Tensor::to: at batch 1 the two ATen conversions took 50 us of a
  // bf16 resnet18's 7.5 ms forward (their calls' cost, cold after the convs), the loop ~1 us.
  std::vector<float> x_storage, bias_storage;
  const float* xp = widened(x.const_data_ptr<T>(), n * k, x_storage);
  const float* bp = bias.defined() ? widened(bias.const_data_ptr<T>(), jn, bias_storage) : nullptr;
  const T* wp = weight.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t blocks = (jn + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t j0 = b * kBlockRows, j1 = std::min(jn, j0 + kBlockRows);
      int64_t row = 0;
      for (; row + 4 <= n; row += 4) block_rows<T, 4>(wp, k, xp, row, bp, j0, j1, jn, op);
      switch (n - row) {
        case 3: block_rows<T, 3>(wp, k, xp, row, bp, j0, j1, jn, op); break;
        case 2: block_rows<T, 2>(wp, k, xp, row, bp, j0, j1, jn, op); break;
        case 1: block_rows<T, 1>(wp, k, xp, row, bp, j0, j1, jn, op); break;
        default: break;
      }
    }
  });
}
#endif

// body(T{}) for the dtypes the kernels take (the callers send float64 to ATen).
template <typename F>
void dispatch_reduced_float(at::ScalarType type, const char* name, F&& body) {
  switch (type) {
    case at::kFloat: body(float{}); break;
    case at::kBFloat16: body(c10::BFloat16{}); break;
    case at::kHalf: body(c10::Half{}); break;
    default: TORCH_CHECK(false, "resnet_fused: ", name, " has no kernel for ", type);
  }
}

}  // namespace

bool can_run_head_kernels() { return cpu_has_avx2_f16c(); }

// Crossovers measured on Zen 4 (2 threads, 2048 -> 1000, weight cold): fp32 and fp16 win through
// 16 rows, bf16 through 4, lost at 8, where ATen's GEMM runs AVX512-BF16 dot products (four
// times the multiply-adds per instruction of our widening FMA). Without that instruction ATen's
// bf16 GEMM has none either, so bf16 takes fp16's limit (not measured: no such CPU this far).
int64_t linear_rows_limit(at::ScalarType type) {
  return type == at::kBFloat16 && avx512_bf16::cpu_has_avx512_bf16() ? 4 : 16;
}

void global_avg_pool_channels_last(const at::Tensor& x, const at::Tensor& out) {
#if RF_HAVE_X86
  TORCH_CHECK(can_run_head_kernels(), "resnet_fused: global_avg_pool_channels_last needs AVX2, FMA and F16C");
  dispatch_reduced_float(x.scalar_type(), "global_avg_pool", [&](auto tag) { pool<decltype(tag)>(x, out); });
#else
  TORCH_CHECK(false, "resnet_fused: global_avg_pool_channels_last needs an x86-64 CPU");
#endif
}

void linear_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out) {
#if RF_HAVE_X86
  TORCH_CHECK(can_run_head_kernels(), "resnet_fused: linear_rows needs AVX2, FMA and F16C");
  dispatch_reduced_float(x.scalar_type(), "linear", [&](auto tag) { linear<decltype(tag)>(x, weight, bias, out); });
#else
  TORCH_CHECK(false, "resnet_fused: linear_rows needs an x86-64 CPU");
#endif
}

}  // namespace resnet_fused
