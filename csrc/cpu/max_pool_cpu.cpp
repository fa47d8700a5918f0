// See max_pool.h for why max pooling has a kernel of ours.

#include "max_pool.h"

#include "lanes.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace resnet_fused {
namespace {

// The larger of a and b, or NaN where either is NaN (torch's rule; a plain `>` drops a NaN in b).
template <typename T>
T max_keep_nan(T a, T b) {
  const float fa = static_cast<float>(a), fb = static_cast<float>(b);
  return (std::isnan(fb) || fb > fa) ? b : a;
}

#if RF_HAVE_X86
// Channels [ch, ch + 8 * V) of one output pixel: the max over the window's pixels (`first`, then
// `count` more at `others`); a NaN anywhere in a channel's window makes it NaN. The window is the
// inner loop so that its pointers are read once per V vectors.
template <typename T, int V>
__attribute__((always_inline)) RF_AVX2_F16C inline void window_max_lanes(const T* first, const T* const* others,
                                                                          int64_t count, int64_t ch, T* out) {
  __m256 m[V], nan[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    m[v] = Lanes<T>::load(first + ch + 8 * v);
    nan[v] = _mm256_cmp_ps(m[v], m[v], _CMP_UNORD_Q);
  }
  for (int64_t i = 0; i < count; ++i) {
    const T* p = others[i] + ch;
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __m256 x = Lanes<T>::load(p + 8 * v);
      // max_ps returns its second operand where either is NaN: m's NaN is kept, x's is noted.
      m[v] = _mm256_max_ps(x, m[v]);
      nan[v] = _mm256_or_ps(nan[v], _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    Lanes<T>::store(out + ch + 8 * v, _mm256_or_ps(m[v], nan[v]));  // all ones: a NaN
  }
}

// One output pixel's `c` channels, 32 at a time, then 8, then one by one.
// WHY 32 at a time: eight channels at a time, the window's pointers were reloaded for each 8 and
// the resnet stem's pool (64 channels, 112x112 -> 56x56) took 125 us in bf16, 91 in fp32.
template <typename T>
RF_AVX2_F16C void window_max(const T* first, const T* const* others, int64_t count, int64_t c, T* out) {
  int64_t ch = 0;
  for (; ch + 32 <= c; ch += 32) {
    window_max_lanes<T, 4>(first, others, count, ch, out);
  }
  for (; ch + 8 <= c; ch += 8) {
    window_max_lanes<T, 1>(first, others, count, ch, out);
  }
  for (; ch < c; ++ch) {
    T m = first[ch];
    for (int64_t i = 0; i < count; ++i) {
      m = max_keep_nan(m, others[i][ch]);
    }
    out[ch] = m;
  }
}

template <typename T>
void pool(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
          const at::Tensor& out) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t p = out.size(2), q = out.size(3);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  // Output rows (n, p) shared between the threads.
  at::parallel_for(0, n * p, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> window(kernel_size[0] * kernel_size[1]);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / p, oy = row % p;
      const int64_t y0 = std::max<int64_t>(oy * stride[0] - padding[0], 0);
      const int64_t y1 = std::min<int64_t>(oy * stride[0] - padding[0] + kernel_size[0], h);
      for (int64_t ox = 0; ox < q; ++ox) {
        const int64_t x0 = std::max<int64_t>(ox * stride[1] - padding[1], 0);
        const int64_t x1 = std::min<int64_t>(ox * stride[1] - padding[1] + kernel_size[1], w);
        // The window's pixels inside the input (padding is never the max); at least one, as
        // check_pool_args keeps the padding within half the kernel.
        int64_t count = 0;
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t xx = x0; xx < x1; ++xx) {
            window[count++] = xp + ((img * h + y) * w + xx) * c;
          }
        }
        window_max<T>(window[0], window.data() + 1, count - 1, c, op + ((img * p + oy) * q + ox) * c);
      }
    }
  });
}
#endif

}  // namespace

bool can_max_pool2d_channels_last() { return cpu_has_avx2_f16c(); }

void max_pool2d_channels_last(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, const at::Tensor& out) {
#if RF_HAVE_X86
  TORCH_CHECK(can_max_pool2d_channels_last(), "resnet_fused: max_pool2d_channels_last needs AVX2 and F16C");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resnet_fused::max_pool2d", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "resnet_fused: max_pool2d_channels_last has no float64 kernel");
    } else {
      pool<scalar_t>(x, kernel_size, stride, padding, out);
    }
  });
#else
  TORCH_CHECK(false, "resnet_fused: max_pool2d_channels_last needs an x86-64 CPU");
#endif
}

}  // namespace resnet_fused
