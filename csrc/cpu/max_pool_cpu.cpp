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
// One output pixel's `c` channels: the max over the window's pixels (`first`, then `count` more
// at `others`), eight channels at a time; a NaN anywhere in a channel's window makes it NaN.
template <typename T>
RF_AVX2_F16C void window_max(const T* first, const T* const* others, int64_t count,
                                                         int64_t c, T* out) {
  int64_t ch = 0;
  for (; ch + 8 <= c; ch += 8) {
    __m256 m = Lanes<T>::load(first + ch);
    __m256 nan = _mm256_cmp_ps(m, m, _CMP_UNORD_Q);
    for (int64_t i = 0; i < count; ++i) {
      const __m256 v = Lanes<T>::load(others[i] + ch);
      // max_ps returns its second operand where either is NaN: m's NaN is kept, v's is noted.
      m = _mm256_max_ps(v, m);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    Lanes<T>::store(out + ch, _mm256_or_ps(m, nan));  // all ones: a NaN
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
