// Convolution on channels_last fp32 as an implicit GEMM: out[pixels x K] = sum over the filter's
// taps (r, s) of x_rs[pixels x C] * W_rs[C x K], where x_rs's row for an output pixel is the input
// pixel under tap (r, s): one contiguous run of C channels, or a zero row in the padding. The taps
// are summed in the micro-kernel's registers (no im2col buffer) and bias, residual and ReLU applied
// before the single store. Why next to oneDNN: its conv + residual-add post-op reads the residual
// in a separate pass on AVX2 machines; the per-shape timing in ops_cpu.cpp keeps whichever is faster.
//
// Inputs with few channels (the 7x7 stem, C=3) make each tap a 3-step loop. There the input is
// copied once into a zero-padded buffer so that a whole filter row (S pixels x C channels, adjacent
// in channels_last) is one contiguous run: R taps of S*C channels instead of R*S taps of C. The
// packed weight (K/16, R*S, C, 16) already is (K/16, R, S*C, 16) in memory.

#include "implicit_gemm.h"

#include "amx_gemm.h"
#include "avx2_gemm.h"
#include "avx512_gemm.h"
#include "output_pool.h"
#include "parallel_items.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

namespace resnet_fused {
namespace implicit_gemm {

using avx2::kPanel;

// Below this many input channels a filter row's taps are merged into one (see the top of the file).
constexpr int64_t kMergeRowsBelowChannels = 16;

at::Tensor pack_weight(const at::Tensor& weight) {
  const int64_t k = weight.size(0), c = weight.size(1), taps = weight.size(2) * weight.size(3);
  // (K, C, R, S) -> (K / 16, 16, C, R * S) -> (K / 16, R * S, C, 16)
  const at::Tensor w = weight.to(at::kFloat).reshape({k / kPanel, kPanel, c, taps}).permute({0, 3, 2, 1});
  return w.contiguous();
}

bool can_split_channels(int64_t out_channels, int64_t threads) {
  return threads > 1 && (out_channels / kPanel) % threads == 0;
}

namespace {

bool merges_filter_rows(int64_t channels, int64_t kernel_w) {
  return kernel_w > 1 && channels < kMergeRowsBelowChannels;
}

// For the AMX core, the channels a few-channel input's pixels are widened to (zeros appended) so
// that a merged filter row (kernel_w pixels) is an even number of bf16 values, at most a chunk,
// read by one A tile row (conv_amx_few_channels); 0 where the row is longer or not merged.
int64_t few_channels_widened(int64_t channels, int64_t kernel_w) {
  if (!merges_filter_rows(channels, kernel_w)) {
    return 0;
  }
  const int64_t widened = (kernel_w * channels) % 2 == 0 ? channels : channels + 1;
  return kernel_w * widened <= amx_bf16::kChunk ? widened : 0;
}

// How many groups the output channels' panels are split into, so that a few pixel blocks (a 7x7
// map at batch 1) still give every thread several work items; no work is duplicated by the split.
int64_t panel_groups(int64_t blocks, int64_t panels, int64_t threads) {
  int64_t groups = 1;
  while (blocks * groups < 4 * threads && panels % (groups * 2) == 0) {
    groups *= 2;
  }
  return groups;
}

// Work item `item`'s pixel block and panel group. By channels, thread t's first items (parallel_items
// hands each thread a contiguous run) are group t with every block: its share of the weight read
// once; by pixels, whole blocks with each of their groups.
std::pair<int64_t, int64_t> block_and_group(int64_t item, bool by_channels, int64_t blocks, int64_t k_groups) {
  return by_channels ? std::make_pair(item % blocks, item / blocks) : std::make_pair(item / k_groups, item % k_groups);
}

// Tap (i, j)'s input row, in elements from the pixel under tap (0, 0): input rows `width` pixels
// of `pixel_stride` elements.
std::vector<int64_t> tap_offsets(int64_t kh, int64_t kw, int64_t width, int64_t pixel_stride) {
  std::vector<int64_t> offsets(kh * kw);
  for (int64_t i = 0; i < kh; ++i) {
    for (int64_t j = 0; j < kw; ++j) {
      offsets[i * kw + j] = (i * width + j) * pixel_stride;
    }
  }
  return offsets;
}

// x (dense channels_last) with pad_h zero rows above and below and pad_w zero pixels left and
// right, each pixel's channels followed by zeros up to `channels` (default: none), in one pass of
// row writes, as a flat buffer of its (n, h + 2 pad_h, w + 2 pad_w, channels) elements and `slack`
// zero pixels after them (for reads past the end that are never used), from the output pool
// (output_pool.h: a fresh 3 MB block page-faulted in every call made the AMX 3x3 convs of a
// batch-8 forward 2x slower than alone). WHY not zero_() and a copy into the middle: at batch 1
// those ATen calls (a fill, two narrows, a strided copy) took about 80 us of a forward.
template <typename T>
at::Tensor padded(const at::Tensor& x, int64_t pad_h, int64_t pad_w, int64_t slack = 0, int64_t channels = 0) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t ph = h + 2 * pad_h, pw = w + 2 * pad_w, cp = std::max(c, channels);
  // (1, cp, 1, pixels) in channels_last: the pixels' channels one after the other.
  at::Tensor out = pooled_empty_channels_last({1, cp, 1, n * ph * pw + slack}, x.options());
  const T* xp = x.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  std::fill_n(op + n * ph * pw * cp, slack * cp, T(0));
  at::parallel_for(0, n * ph, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t img = row / ph, y = row % ph - pad_h;
      T* o = op + row * pw * cp;
      if (y < 0 || y >= h) {
        std::fill_n(o, pw * cp, T(0));
        continue;
      }
      std::fill_n(o, pad_w * cp, T(0));
      const T* in = xp + (img * h + y) * w * c;
      if (cp == c) {
        std::copy_n(in, w * c, o + pad_w * c);
      } else if (sizeof(T) == 2 && cp == 4) {
        // Four 16-bit channels (the stem's three, widened: few_channels_widened) make one 64-bit store
        // per pixel. WHY: the copy_n and fill_n below, per pixel, were calls of memmove and memset
        // for 6 and 2 bytes, which took a third as long as the stem's GEMM (perf, batch 1). Intel
        // Xeon with AMX, 2 threads, the stem hot: batch 1 0.30 -> 0.26 ms, batch 8 2.08 -> 1.74;
        // whole bf16 models alternating in one process: resnet18 b1 1.020x, resnet50 b8 1.007x.
        for (int64_t i = 0; i < w; ++i) {
          uint64_t bits = 0;
          for (int64_t j = 0; j < c; ++j) {
            uint16_t value;
            std::memcpy(&value, in + i * c + j, sizeof(value));
            bits |= uint64_t{value} << (16 * j);
          }
          std::memcpy(o + (pad_w + i) * cp, &bits, sizeof(bits));
        }
      } else {
        for (int64_t i = 0; i < w; ++i) {
          T* pixel = o + (pad_w + i) * cp;
          std::copy_n(in + i * c, c, pixel);
          std::fill_n(pixel + c, cp - c, T(0));
        }
      }
      std::fill_n(o + (pad_w + w) * cp, pad_w * cp, T(0));
    }
  });
  return out;
}

// One work item of a call: `count` output pixels from `first_pixel`, against `panels` panels from
// `first_panel`. rows[r * taps + t] is pixel r's input row under tap t (`c` channels each).
template <typename T>
struct Work {
  const T* const* rows;
  int64_t first_pixel, count, first_panel, panels, c, taps;
};

// The loop every implicit-GEMM convolution shares: merges a few-channel input's filter rows (see the
// top of the file), shares the work items between the threads, finds each pixel's input rows and
// hands each item to `gemm` (a Work<T>); `done` runs once per thread after its last item. Items are
// cut in whole `unit`s of pixels (avx2::Blocks), but for the last.
template <typename T, typename Gemm, typename Done>
void for_each_work_item(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, const at::Tensor& out, int64_t block, bool split_channels,
                        bool need_rows, Gemm&& gemm, Done&& done, int64_t unit = avx2::kRows) {
  const int64_t n = x.size(0), k = out.size(1), p = out.size(2), q = out.size(3);
  int64_t c = x.size(1), h = x.size(2), w = x.size(3);
  int64_t kh = kernel_size[0], kw = kernel_size[1], pad_h = padding[0], pad_w = padding[1];
  at::Tensor input = x;
  if (merges_filter_rows(c, kw)) {
    if (pad_h > 0 || pad_w > 0) {
      input = padded<T>(x, pad_h, pad_w);
      h += 2 * pad_h;
      w += 2 * pad_w;
      pad_h = pad_w = 0;
    }
    // Tap (i, 0) now spans the row's kw pixels; the stride between output pixels is unchanged.
    c *= kw;
    kw = 1;
  }
  const int64_t taps = kh * kw;
  // One input pixel along W is x.size(1) elements, whether or not the taps were merged.
  const int64_t pixel_stride = x.size(1);
  const int64_t pixels = n * p * q;
  TORCH_INTERNAL_ASSERT(block >= 1);
  const int64_t threads = at::get_num_threads();
  const bool by_channels = split_channels && can_split_channels(k, threads);
  const avx2::Blocks split(pixels, std::min(block, pixels), by_channels ? 1 : threads, unit);
  const int64_t blocks = split.count();
  const int64_t panels = k / kPanel;
  const int64_t k_groups = by_channels ? threads : panel_groups(blocks, panels, threads);
  const int64_t group_panels = panels / k_groups;
  const T* xp = input.const_data_ptr<T>();
  const int64_t stride_h = stride[0], stride_w = stride[1];
  const std::vector<int64_t> offsets_of_taps = tap_offsets(kh, kw, w, pixel_stride);
  parallel_items(blocks * k_groups, [&](const auto& claim) {
    thread_local std::vector<const T*> rows;
    thread_local std::vector<T> zero;
    rows.resize(split.max_size() * taps);
    zero.assign(c, T(0));
    const T** row = rows.data();
    const T* const zero_row = zero.data();
    const int64_t* const offsets = offsets_of_taps.data();
    for (int64_t item = 0; claim(item);) {
      const auto [blk, kg] = block_and_group(item, by_channels, blocks, k_groups);
      const int64_t t0 = split.begin(blk), count = split.size(blk);
      if (need_rows) {
        // The block's pixels walked in order from its first one's coordinates, interior pixels'
        // taps without bounds checks. WHY: with three divisions and a check per tap these pointers
        // took a quarter of the stem's time (7 merged taps of 21 channels: few multiply-adds per
        // pointer; perf). Zen 4, the stem alone: bf16 1.96 -> 1.51 ms on 1 thread, 0.93 -> 0.75 ms
        // on 2; fp32 3.22 -> 2.55 ms on 1. Whole models, in one process against the old loop (2
        // threads, alternating): resnet18 batch 1 1.035x bf16, 1.012x fp32; resnet50 batch 8 bf16
        // 1.018x; resnet50 batch 1 within this VM's noise.
        int64_t img = t0 / (p * q), oy = (t0 / q) % p, ox = t0 % q;
        for (int64_t r = 0; r < count; ++r) {
          const int64_t y0 = oy * stride_h - pad_h, x0 = ox * stride_w - pad_w;
          const T** tap_rows = row + r * taps;
          if (y0 >= 0 && y0 + kh <= h && x0 >= 0 && x0 + kw <= w) {
            const T* origin = xp + ((img * h + y0) * w + x0) * pixel_stride;
            for (int64_t t = 0; t < taps; ++t) {
              tap_rows[t] = origin + offsets[t];
            }
          } else {
            for (int64_t i = 0; i < kh; ++i) {
              for (int64_t j = 0; j < kw; ++j) {
                const int64_t yy = y0 + i, xx = x0 + j;
                const bool inside = yy >= 0 && yy < h && xx >= 0 && xx < w;
                tap_rows[i * kw + j] = inside ? xp + ((img * h + yy) * w + xx) * pixel_stride : zero_row;
              }
            }
          }
          if (++ox == q) {
            ox = 0;
            if (++oy == p) {
              oy = 0;
              ++img;
            }
          }
        }
      }
      gemm(Work<T>{row, t0, count, kg * group_panels, group_panels, c, taps});
    }
    done();
  });
}

#if RF_HAVE_X86
// conv() on bf16: the GEMMs on the bf16 core (avx512_gemm.h), the epilogue in its store.
void conv_bf16(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef kernel_size, const at::Tensor& bias,
               const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
               const at::Tensor& out, int64_t block, bool split_channels) {
  TORCH_CHECK(avx512_bf16::cpu_has_avx512_bf16(),
              "resnet_fused: the bf16 implicit-GEMM convolution needs a CPU with AVX512-BF16");
  const int64_t k = out.size(1);
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>());
  const auto* bp = reinterpret_cast<const uint16_t*>(bias.const_data_ptr<at::BFloat16>());
  const auto* rp =
      residual.has_value() ? reinterpret_cast<const uint16_t*>(residual->const_data_ptr<at::BFloat16>()) : nullptr;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const auto gemm = [&](const Work<at::BFloat16>& item) {
    const int64_t offset = item.first_pixel * k + item.first_panel * kPanel;
    const int64_t panel_size = item.taps * ((item.c + 1) / 2) * 2 * kPanel;
    avx512_bf16::gemm_panels(item.count, item.c, item.taps, reinterpret_cast<const uint16_t* const*>(item.rows),
                             wp + item.first_panel * panel_size, item.panels, op + offset, k,
                             avx512_bf16::Epilogue{bp + item.first_panel * kPanel,
                                                   rp == nullptr ? nullptr : rp + offset, k, relu});
  };
  for_each_work_item<at::BFloat16>(x, kernel_size, stride, padding, out, block, split_channels, true, gemm, [] {});
}
#endif

#if RF_HAVE_AMX
// The GEMM shape the AMX core runs for an item: `taps` taps of `c` channels (whole 32-channel chunks).
struct AmxShape {
  int64_t taps, c;
};

// Where each row group's rows of each tap are read from by the AMX core (amx_gemm.h), into
// a[g * taps + t] and stride[g * taps + t] (bytes) as amx_bf16::tile_sums takes them. A tap of whole
// 32-channel chunks is read in place where the group's 16 rows are evenly spaced in the input, else
// from a copy in `gathered` (zero rows past the item's last pixel, so a tile never reads past the
// input). Taps of other channel counts (a few-channel input's merged filter rows: the stem's 21)
// are copied side by side into one row per pixel, zero-padded to whole chunks, and run as one tap:
// the stem's 7 x 21 channels as 160, not 7 x 32.
AmxShape amx_rows(const Work<at::BFloat16>& item, std::vector<const uint16_t*>& a, std::vector<int64_t>& stride,
                  std::vector<uint16_t>& gathered) {
  using amx_bf16::kGroupRows;
  const int64_t groups = (item.count + kGroupRows - 1) / kGroupRows, taps = item.taps, c = item.c;
  const auto row = [&](int64_t r, int64_t t) { return reinterpret_cast<const uint16_t*>(item.rows[r * taps + t]); };
  const bool side_by_side = c % amx_bf16::kChunk != 0;
  const AmxShape shape = side_by_side ? AmxShape{1, amx_bf16::padded_reduction(taps * c)} : AmxShape{taps, c};
  a.resize(groups * shape.taps);
  stride.resize(groups * shape.taps);
  gathered.resize(groups * shape.taps * kGroupRows * shape.c);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * kGroupRows, rows = std::min<int64_t>(kGroupRows, item.count - first);
    for (int64_t t = 0; t < shape.taps; ++t) {
      const int64_t at = g * shape.taps + t;
      if (!side_by_side && rows == kGroupRows) {
        const uint16_t* start = row(first, t);
        const int64_t step = row(first + 1, t) - start;
        bool even = step > 0;
        for (int64_t r = 2; even && r < rows; ++r) {
          even = row(first + r, t) == start + r * step;
        }
        if (even) {
          a[at] = start;
          stride[at] = step * static_cast<int64_t>(sizeof(uint16_t));
          continue;
        }
      }
      uint16_t* copy = gathered.data() + at * kGroupRows * shape.c;
      for (int64_t r = 0; r < kGroupRows; ++r) {
        // Rows past the item's last pixel: no taps, all zeros.
        const int64_t pixel = first + std::min(r, rows - 1);
        const auto* from = reinterpret_cast<const uint16_t* const*>(item.rows + pixel * taps + t);
        amx_bf16::copy_taps(copy + r * shape.c, from, r < rows ? (side_by_side ? taps : 1) : 0, c, shape.c);
      }
      a[at] = copy;
      stride[at] = shape.c * static_cast<int64_t>(sizeof(uint16_t));
    }
  }
  return shape;
}

// amx_rows for a 1x1 stride-1 convolution of whole 32-channel chunks, from the input itself: its
// pixels are the GEMM's rows as they lie, so each row group is read in place at the input's pixel
// stride, but a last group of fewer than 16 pixels, copied into `gathered` with zero rows after them
// (a tile reads 16 rows, and rows past the input's end may not be mapped). WHY not amx_rows: the
// pointer per pixel that for_each_work_item writes and amx_rows reads back to find them evenly
// spaced took an eighth of a hot 64 -> 64 conv's samples (Intel Xeon with AMX, perf). Hot, 2
// threads, batch 8 at 56x56: 64 -> 64 0.31 -> 0.24 ms, 256 -> 64 0.66 -> 0.56; batch 1 64 -> 64
// 0.039 -> 0.030. Whole resnet50 bf16 in one process, alternating: batch 8 1.012x, batch 1 1.017x.
AmxShape amx_pixel_rows(const Work<at::BFloat16>& item, const uint16_t* xp, int64_t c,
                        std::vector<const uint16_t*>& a, std::vector<int64_t>& stride,
                        std::vector<uint16_t>& gathered) {
  using amx_bf16::kGroupRows;
  const int64_t groups = (item.count + kGroupRows - 1) / kGroupRows;
  a.resize(groups);
  stride.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = g * kGroupRows, rows = std::min<int64_t>(kGroupRows, item.count - first);
    const uint16_t* start = xp + (item.first_pixel + first) * c;
    stride[g] = c * static_cast<int64_t>(sizeof(uint16_t));
    if (rows == kGroupRows) {
      a[g] = start;
      continue;
    }
    gathered.resize(kGroupRows * c);
    for (int64_t r = 0; r < kGroupRows; ++r) {
      const uint16_t* from = start + std::min(r, rows - 1) * c;
      amx_bf16::copy_taps(gathered.data() + r * c, &from, r < rows ? 1 : 0, c, c);
    }
    a[g] = gathered.data();
  }
  return AmxShape{1, c};
}

// conv_amx for a stride-1 KxK convolution of whole 32-channel chunks, with no copies of rows: over
// a zero-padded copy of the input, output pixel (y, x) of an image is virtual pixel v = y * wpad + x
// (wpad the padded width) and its tap (i, j) input pixel v + i * wpad + j, so 16 consecutive virtual
// pixels read each tap at one stride. The virtual pixels x >= the output width (wpad - q of each row
// but the last) are summed and never stored. WHY: with the rows copied wherever a row group crossed
// a map row or the padding (amx_rows), 3x3 convs ran 1.2-1.5x slower (Intel Xeon with AMX, 2
// threads, hot: 64 channels at 56x56 0.142 -> 0.093 ms, 256 at 14x14 0.154 -> 0.101, 512 at 7x7
// 0.208 -> 0.177), though 7x7 maps sum 20% more pixels this way.
// `block`: virtual pixels per work item, rounded down to whole pairs of row groups (at least one).
// `split_channels` as for conv().
void conv_amx_padded(const at::Tensor& x, const uint16_t* wp, const float* bp, const uint16_t* rp, bool relu,
                     at::IntArrayRef kernel_size, at::IntArrayRef padding, uint16_t* op, int64_t k, int64_t block,
                     bool split_channels) {
  using amx_bf16::kGroupRows;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t hp = h + 2 * padding[0], wpad = w + 2 * padding[1];
  const int64_t p = hp - kh + 1, q = wpad - kw + 1, taps = kh * kw;
  const int64_t per_image = (p - 1) * wpad + q;
  // A tile reads up to 2 * kGroupRows - 1 virtual pixels past an item's last one.
  const at::Tensor input = padded<at::BFloat16>(x, padding[0], padding[1], 2 * kGroupRows + kw);
  const auto* xp = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  const int64_t threads = at::get_num_threads();
  const int64_t item_size = std::max<int64_t>(2 * kGroupRows, block / (2 * kGroupRows) * (2 * kGroupRows));
  const int64_t blocks_per_image = (per_image + item_size - 1) / item_size, blocks = n * blocks_per_image;
  const int64_t panels = k / kPanel;
  const bool by_channels = split_channels && can_split_channels(k, threads);
  const int64_t k_groups = by_channels ? threads : panel_groups(blocks, panels, threads);
  const int64_t group_panels = panels / k_groups;
  const std::vector<int64_t> offsets = tap_offsets(kh, kw, wpad, c);
  parallel_items(blocks * k_groups, [&](const auto& claim) {
    thread_local std::vector<const uint16_t*> a;
    thread_local std::vector<int64_t> strides;
    thread_local std::vector<int64_t> rows;
    amx_bf16::configure();
    for (int64_t item = 0; claim(item);) {
      const auto [blk, kg] = block_and_group(item, by_channels, blocks, k_groups);
      const int64_t img = blk / blocks_per_image, v0 = blk % blocks_per_image * item_size;
      const int64_t count = std::min(item_size, per_image - v0);
      const int64_t groups = (count + kGroupRows - 1) / kGroupRows;
      a.resize(groups * taps);
      strides.assign(groups * taps, c * static_cast<int64_t>(sizeof(uint16_t)));
      for (int64_t g = 0; g < groups; ++g) {
        const uint16_t* first = xp + (img * hp * wpad + v0 + g * kGroupRows) * c;
        for (int64_t t = 0; t < taps; ++t) {
          a[g * taps + t] = first + offsets[t];
        }
      }
      rows.resize(count);
      for (int64_t r = 0; r < count; ++r) {
        const int64_t v = v0 + r, y = v / wpad, xx = v % wpad;
        rows[r] = xx < q ? (img * p + y) * q + xx : -1;
      }
      const int64_t first_panel = kg * group_panels;
      amx_bf16::gemm_panels(count, c, taps, a.data(), strides.data(), wp + first_panel * taps * c * kPanel,
                            group_panels, op + first_panel * kPanel, k,
                            amx_bf16::Epilogue{bp + first_panel * kPanel,
                                               rp == nullptr ? nullptr : rp + first_panel * kPanel, k, relu,
                                               rows.data()});
    }
    amx_bf16::release();
  });
}
// conv_amx for an input of few channels (the stem's 3) whose merged filter rows fit a chunk once
// widened (few_channels_widened): no copies of rows. Over a zero-padded copy of the input with
// each pixel widened to `widened` channels, output pixel (y, x)'s filter row i is kernel_w *
// widened values from input pixel (y * stride_h + i, x * stride_w), so 16 consecutive output
// pixels of a row read it at one stride: an A tile of exactly those values (the tiles configured
// to rows of kernel_w * widened values), one tap per filter row. Row groups stay within an output
// row; a row's last group is filled with pixels past its end, summed and not stored. WHY: the
// copied path joined the 7 taps of 21 values of each of the stem's output pixels side by side
// (160 values, zero-padded), and at batch 8 the stem ran at 0.68x OpenVINO's inside forwards.
// Intel Xeon with AMX, 2 threads: the stem hot 3.2-3.3 -> 2.0-2.1 ms at batch 8, 0.41-0.49 ->
// 0.28-0.30 ms at batch 1; whole models in one process, alternating with the copied path:
// resnet50 bf16 batch 8 1.021x, batch 1 1.049x, resnet18 batch 8 1.031x, batch 1 1.019x.
// `block`: output pixels per work item, as whole output rows (at least one).
void conv_amx_few_channels(const at::Tensor& x, const uint16_t* wp, const float* bp, const uint16_t* rp, bool relu,
                           at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, uint16_t* op,
                           int64_t k, int64_t block, bool split_channels, int64_t widened) {
  using amx_bf16::kGroupRows;
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t hp = h + 2 * padding[0], wpad = w + 2 * padding[1];
  const int64_t p = (hp - kh) / sh + 1, q = (wpad - kw) / sw + 1;
  const int64_t groups_per_row = (q + kGroupRows - 1) / kGroupRows;
  // A row's last group reads up to kGroupRows - 1 pixels (sw input pixels each) past the row's end.
  const at::Tensor input = padded<at::BFloat16>(x, padding[0], padding[1], kGroupRows * sw + kw, widened);
  const auto* xp = reinterpret_cast<const uint16_t*>(input.const_data_ptr<at::BFloat16>());
  const int64_t threads = at::get_num_threads();
  const int64_t rows_per_item = std::max<int64_t>(1, block / q);
  const int64_t items_per_image = (p + rows_per_item - 1) / rows_per_item, blocks = n * items_per_image;
  const int64_t panels = k / kPanel;
  const bool by_channels = split_channels && can_split_channels(k, threads);
  const int64_t k_groups = by_channels ? threads : panel_groups(blocks, panels, threads);
  const int64_t group_panels = panels / k_groups;
  const int64_t row_values = kw * widened, panel_size = kh * amx_bf16::kChunk * kPanel;
  const int64_t row_stride = sw * widened * static_cast<int64_t>(sizeof(uint16_t));
  parallel_items(blocks * k_groups, [&](const auto& claim) {
    thread_local std::vector<const uint16_t*> a;
    thread_local std::vector<int64_t> strides;
    thread_local std::vector<int64_t> rows;
    amx_bf16::configure(static_cast<int>(row_values));
    for (int64_t item = 0; claim(item);) {
      const auto [blk, kg] = block_and_group(item, by_channels, blocks, k_groups);
      const int64_t img = blk / items_per_image, y0 = blk % items_per_image * rows_per_item;
      const int64_t out_rows = std::min(rows_per_item, p - y0), groups = out_rows * groups_per_row;
      a.resize(groups * kh);
      strides.assign(groups * kh, row_stride);
      rows.resize(groups * kGroupRows);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t y = y0 + g / groups_per_row, x0 = g % groups_per_row * kGroupRows;
        for (int64_t i = 0; i < kh; ++i) {
          a[g * kh + i] = xp + ((img * hp + y * sh + i) * wpad + x0 * sw) * widened;
        }
        for (int64_t r = 0; r < kGroupRows; ++r) {
          rows[g * kGroupRows + r] = x0 + r < q ? (img * p + y) * q + x0 + r : -1;
        }
      }
      const int64_t first_panel = kg * group_panels;
      amx_bf16::gemm_panels(groups * kGroupRows, amx_bf16::kChunk, kh, a.data(), strides.data(),
                            wp + first_panel * panel_size, group_panels, op + first_panel * kPanel, k,
                            amx_bf16::Epilogue{bp + first_panel * kPanel,
                                               rp == nullptr ? nullptr : rp + first_panel * kPanel, k, relu,
                                               rows.data()});
    }
    amx_bf16::release();
  });
}
#endif

}  // namespace

void conv(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef kernel_size, const at::Tensor& bias,
          const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
          const at::Tensor& out, int64_t block, bool split_channels, Fp32Core core) {
#if RF_HAVE_X86
  if (x.scalar_type() == at::kBFloat16) {
    TORCH_INTERNAL_ASSERT(core != Fp32Core::kBrgemm && packed.scalar_type() == at::kBFloat16);
    conv_bf16(x, packed, kernel_size, bias, residual, relu, stride, padding, out, block, split_channels);
    return;
  }
  const int64_t k = out.size(1);
  const float* xp = x.const_data_ptr<float>();
  const float* wp = packed.const_data_ptr<float>();
  const float* bp = bias.const_data_ptr<float>();
  const float* rp = residual.has_value() ? residual->const_data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // A 1x1, stride-1, unpadded conv's rows are the input's pixels as they lie: brgemm reads them in place.
  const bool rows_in_place = kernel_size[0] * kernel_size[1] == 1 && stride[0] == 1 && stride[1] == 1 &&
                             padding[0] == 0 && padding[1] == 0;
  const auto avx2_gemm = [&](const Work<float>& item) {
    const int64_t offset = item.first_pixel * k + item.first_panel * kPanel;
    avx2::gemm_panels(item.count, item.c, item.taps, item.rows, wp + item.first_panel * item.taps * item.c * kPanel,
                      item.panels, op + offset, k,
                      avx2::Epilogue{bp + item.first_panel * kPanel, rp == nullptr ? nullptr : rp + offset, k, relu});
  };
  const auto avx512_gemm = [&](const Work<float>& item) {
    const int64_t offset = item.first_pixel * k + item.first_panel * kPanel;
    avx512_fp32::gemm_panels(
        item.count, item.c, item.taps, item.rows, wp + item.first_panel * item.taps * item.c * kPanel, item.panels,
        op + offset, k,
        avx512_fp32::Epilogue{bp + item.first_panel * kPanel, rp == nullptr ? nullptr : rp + offset, k, relu});
  };
  const auto brgemm_gemm = [&](const Work<float>& item) {
    thread_local std::vector<float> gathered;
    const int64_t reduction = item.taps * item.c;
    const float* a = xp + item.first_pixel * item.c;
    if (!rows_in_place) {
      // brgemm takes its A rows evenly spaced: each row's taps are copied side by side (an
      // im2col of this block only, count x taps*C, read back from L1/L2).
      gathered.resize(item.count * reduction);
      for (int64_t i = 0; i < item.count * item.taps; ++i) {
        std::copy_n(item.rows[i], item.c, gathered.data() + i * item.c);
      }
      a = gathered.data();
    }
    for (int64_t pp = item.first_panel; pp < item.first_panel + item.panels; ++pp) {
      const int64_t offset = item.first_pixel * k + pp * kPanel;
      // The panel (taps*C x 16, row-major) is brgemm's B as it is.
      at::native::cpublas::brgemm(item.count, kPanel, reduction, rows_in_place ? item.c : reduction, kPanel, k, false,
                                  a, wp + pp * reduction * kPanel, op + offset, false);
      avx2::finish_rows(item.count, op + offset, k,
                        avx2::Epilogue{bp + pp * kPanel, rp == nullptr ? nullptr : rp + offset, k, relu});
    }
  };
  switch (core) {
    case Fp32Core::kBrgemm:
      // brgemm_release frees AMX tile state where oneDNN used it.
      for_each_work_item<float>(x, kernel_size, stride, padding, out, block, split_channels, !rows_in_place,
                                brgemm_gemm, [] { at::native::cpublas::brgemm_release(false); });
      break;
    case Fp32Core::kAvx512:
      TORCH_INTERNAL_ASSERT(avx512_fp32::cpu_has_avx512());
      for_each_work_item<float>(x, kernel_size, stride, padding, out, block, split_channels, true, avx512_gemm, [] {});
      break;
    default:
      for_each_work_item<float>(x, kernel_size, stride, padding, out, block, split_channels, true, avx2_gemm, [] {});
  }
#else
  TORCH_CHECK(false, "resnet_fused: the AVX2 implicit-GEMM convolution needs an x86-64 CPU");
#endif
}

void conv_amx(const at::Tensor& x, const at::Tensor& packed, at::IntArrayRef kernel_size, const at::Tensor& bias,
              const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride, at::IntArrayRef padding,
              const at::Tensor& out, int64_t block, bool split_channels) {
#if RF_HAVE_AMX
  TORCH_CHECK(can_run_amx(), "resnet_fused: the AMX implicit-GEMM convolution needs a CPU with AMX-BF16");
  TORCH_CHECK(out.size(1) % kPanel == 0 && x.scalar_type() == at::kBFloat16 && packed.scalar_type() == at::kBFloat16,
              "resnet_fused: the AMX convolution takes bf16 with output channels a multiple of 16");
  const int64_t k = out.size(1);
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<at::BFloat16>());
  const auto* rp =
      residual.has_value() ? reinterpret_cast<const uint16_t*>(residual->const_data_ptr<at::BFloat16>()) : nullptr;
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // The tiles' sums start from the bias in fp32. WHY a loop, not bias.to(kFloat): that ATen call
  // took 5 us, a quarter of a millisecond over resnet50's 52 convs at batch 1.
  std::vector<float> bias32(k);
  const at::BFloat16* bias_bf16 = bias.const_data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < k; ++i) {
    bias32[i] = static_cast<float>(bias_bf16[i]);
  }
  const float* bp = bias32.data();
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t widened = few_channels_widened(x.size(1), kw);
  if (widened > 0) {
    conv_amx_few_channels(x, wp, bp, rp, relu, kernel_size, stride, padding, op, k, block, split_channels, widened);
    return;
  }
  if (stride[0] == 1 && stride[1] == 1 && kh * kw > 1 && x.size(1) % amx_bf16::kChunk == 0) {
    conv_amx_padded(x, wp, bp, rp, relu, kernel_size, padding, op, k, block, split_channels);
    return;
  }
  const bool pixels_are_rows = kh * kw == 1 && stride[0] == 1 && stride[1] == 1 && padding[0] == 0 &&
                               padding[1] == 0 && x.size(1) % amx_bf16::kChunk == 0;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  const auto gemm = [&](const Work<at::BFloat16>& item) {
    thread_local std::vector<const uint16_t*> a;
    thread_local std::vector<int64_t> strides;
    thread_local std::vector<uint16_t> gathered;
    thread_local std::vector<int64_t> rows;
    const AmxShape shape = pixels_are_rows ? amx_pixel_rows(item, xp, x.size(1), a, strides, gathered)
                                           : amx_rows(item, a, strides, gathered);
    if (static_cast<int64_t>(rows.size()) < item.count) {  // row i stored at row i; kept for the next items
      rows.resize(item.count);
      std::iota(rows.begin(), rows.end(), int64_t{0});
    }
    const int64_t offset = item.first_pixel * k + item.first_panel * kPanel;
    amx_bf16::configure();
    amx_bf16::gemm_panels(item.count, shape.c, shape.taps, a.data(), strides.data(),
                          wp + item.first_panel * shape.taps * shape.c * kPanel, item.panels, op + offset, k,
                          amx_bf16::Epilogue{bp + item.first_panel * kPanel, rp == nullptr ? nullptr : rp + offset, k,
                                             relu, rows.data()});
  };
  // Items cut in whole pairs of row groups (a tile block's 32 rows), not the AVX2 core's 6-row units:
  // an item of 48 or 186 rows ended in a half-empty tile block, its rows copied and its sums for
  // missing rows computed and dropped. Intel Xeon with AMX, 2 threads, in one process alternating
  // with 6-row units: resnet50 bf16 batch 8 1.023x [1.015-1.033], batch 1 1.012x.
  for_each_work_item<at::BFloat16>(x, kernel_size, stride, padding, out, block, split_channels, !pixels_are_rows,
                                   gemm, [] { amx_bf16::release(); }, 2 * amx_bf16::kGroupRows);
#else
  TORCH_CHECK(false, "resnet_fused: this build has no AMX convolution (x86-64 Linux only)");
#endif
}

bool can_run_amx() {
  return amx_bf16::cpu_has_amx_bf16();
}

bool can_run_bf16() {
  return avx512_bf16::cpu_has_avx512_bf16();
}

namespace {

// The bf16 packing with each tap's reduction padded with zero weights to a multiple of `multiple`;
// with `side_by_side`, the taps' reductions first joined into one tap (the AMX core's taps of
// channel counts that are not whole chunks, see amx_rows).
at::Tensor pack_weight_bf16_padded(const at::Tensor& weight, int64_t multiple, bool side_by_side) {
  const int64_t k = weight.size(0), c = weight.size(1), r = weight.size(2), s = weight.size(3);
  // A few-channel input's filter rows are merged (one tap of S*C channels per filter row), so the
  // channel pairs run along that merged row: (K, R, S, C) is viewed as (K, taps, reduction).
  const bool merged = merges_filter_rows(c, s);
  int64_t taps = merged ? r : r * s, reduction = merged ? s * c : c;
  if (side_by_side) {
    reduction *= taps;
    taps = 1;
  }
  at::Tensor w = weight.to(at::kFloat).permute({0, 2, 3, 1}).reshape({k, taps, reduction});
  if (reduction % multiple != 0) {
    w = at::constant_pad_nd(w, {0, multiple - reduction % multiple});  // zero weights: the lone last channel's partner
  }
  // (K / 16, 16, taps, pairs, 2) -> (K / 16, taps, pairs, 16, 2)
  w = w.reshape({k / kPanel, kPanel, taps, w.size(2) / 2, 2}).permute({0, 2, 3, 1, 4});
  return w.to(at::kBFloat16).contiguous();
}

}  // namespace

at::Tensor pack_weight_bf16(const at::Tensor& weight) {
  return pack_weight_bf16_padded(weight, 2, false);
}

at::Tensor pack_weight_amx(const at::Tensor& weight) {
  const int64_t c = weight.size(1), s = weight.size(3);
  const int64_t widened = few_channels_widened(c, s);
  if (widened > 0) {  // zero weights for the widened channels: one tap of s * widened values per filter row
    return pack_weight_bf16_padded(at::constant_pad_nd(weight, {0, 0, 0, 0, 0, widened - c}), amx_bf16::kChunk, false);
  }
  const int64_t reduction = merges_filter_rows(c, s) ? s * c : c;
  return pack_weight_bf16_padded(weight, amx_bf16::kChunk, reduction % amx_bf16::kChunk != 0);
}

}  // namespace implicit_gemm
}  // namespace resnet_fused
