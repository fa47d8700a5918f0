#pragma once
// The bf16 GEMM of the implicit-GEMM convolution on AMX tiles (Intel Xeon from Sapphire Rapids on):
// out[rows x 16*P] = sum over taps t of rows_t[rows x C] * panel_t[C x 16*P] in fp32, the epilogue
// (bias, bf16 residual, ReLU) in fp32 and one rounding to bf16 in the store, as the AVX512-BF16
// core (avx512_gemm.h) computes it. WHY a core of its own: one TDPBF16PS multiplies a 16 x 32 bf16
// tile by a 32 x 16 one into 16 x 16 fp32 sums, 8192 multiply-adds, where a VDPBF16PS does 32.
// Where the CPU has AMX, OpenVINO's and ATen's bf16 convolutions run on it (oneDNN's brgconv) and
// our AVX512-BF16 core reached half their speed; a bare tile loop ran a 3136 x 64 x 256 GEMM at
// 310 GMAC/s on one core of the Xeon measured (2026-12-02).
//
// Tiles: 0-3 the sums of 2 row groups (16 output pixels each) x 2 panels (16 output channels
// each); 4-5 the row groups' 32 input channels of one tap; 6-7 the panels' weights for those
// channels. The weight is the bf16 core's packing, (K / 16, taps, C / 2, 16, 2) (implicit_gemm.h
// pack_weight_amx): the 16 channel pairs of a 32-channel chunk of a tap are 16 rows of 64 bytes, a
// B tile as it lies. A tile's 16 rows are read at one stride, so the callers
// (implicit_gemm_cpu.cpp) hand each row group's tap as a pointer and a stride: in place where its
// 16 input rows are evenly spaced (a 1x1 stride-1 conv; a 3x3 stride-1 conv over a zero-padded copy
// of its input, conv_amx_padded), else rows copied (amx_rows, copy_taps). The sums start from the
// bias, read as a tile of 16 equal rows (stride 0); the epilogue places each row by a row map.
//
// Linux only: a process must ask the kernel for the tile state before its first tile instruction
// (arch_prctl ARCH_REQ_XCOMP_PERM); cpu_has_amx_bf16() does, once. Each thread loads the tile
// configuration before its work and releases the tiles after it (oneDNN's brgemm, which may run
// on the same threads in between, loads its own).

#include "avx2_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#if RF_HAVE_X86 && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define RF_HAVE_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define RF_HAVE_AMX 0
#endif

#if RF_HAVE_AMX
#if defined(__clang__)
#define RF_TARGET_REGION_BEGIN_AMX                                                                         \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16\"))), apply_to = function)")
#else
#define RF_TARGET_REGION_BEGIN_AMX \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16\")")
#endif
#endif

namespace resnet_fused {
namespace amx_bf16 {

constexpr int kGroupRows = 16;   // output pixels per row group (a tile's rows)
constexpr int kChunk = 32;       // input channels per tile step (a tile row's 64 bytes of bf16)

// RESNET_FUSED_AMX_EMULATE=1 (read once, for tests): the tile instructions replaced by scalar code
// computing the same sums (tile_sums_emulated), on any CPU with AVX512-BF16 (the epilogue's
// instructions), so that the row handling around the tiles (in-place and copied row groups, the
// padded input, the row map) is tested on CPUs without AMX too. Far too slow for anything else.
inline bool emulated() {
#if RF_HAVE_AMX
  static const bool on = [] {
    const char* value = std::getenv("RESNET_FUSED_AMX_EMULATE");
    return value != nullptr && std::string(value) == "1" && avx2::cpu_has_avx2_fma() &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return on;
#else
  return false;
#endif
}

// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use them (or the tiles
// are emulated).
inline bool cpu_has_amx_bf16() {
#if RF_HAVE_AMX
  static const bool ok = emulated() || [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) {
      return false;
    }
    const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return tile && bf16 && avx2::cpu_has_avx2_fma() && __builtin_cpu_supports("avx512bf16") &&
           syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// A tap's channels as the tiles read them: whole 32-channel chunks, the last one zero-padded.
inline int64_t padded_reduction(int64_t channels) {
  return (channels + kChunk - 1) / kChunk * kChunk;
}

// bias: this call's first panel's 16 in fp32 (then the next panels'); residual: the first panel's,
// rows `ld_residual` apart; row i of the call is stored rows[i] rows from the output (and its
// residual read as many rows from `residual`), or not at all where rows[i] < 0.
struct Epilogue {
  const float* bias = nullptr;
  const uint16_t* residual = nullptr;
  int64_t ld_residual = 0;
  bool relu = false;
  const int64_t* rows = nullptr;
};

#if RF_HAVE_AMX
RF_TARGET_REGION_BEGIN_AMX

// One pixel's taps (`taps` rows of `c` channels at rows[0], rows[1], ...) side by side at dst,
// zero-padded to `padded_c`: masked 64-byte moves, where a memcpy per tap of the stem's 42 bytes
// and a memset cost more than the copying.
inline void copy_taps(uint16_t* dst, const uint16_t* const* rows, int64_t taps, int64_t c, int64_t padded_c) {
  int64_t at = 0;
  for (int64_t t = 0; t < taps; ++t) {
    for (int64_t i = 0; i < c; i += kChunk) {
      const __mmask32 mask = _cvtu32_mask32(c - i >= kChunk ? 0xFFFFFFFFu : (1u << (c - i)) - 1);
      _mm512_mask_storeu_epi16(dst + at + i, mask, _mm512_maskz_loadu_epi16(mask, rows[t] + i));
    }
    at += c;
  }
  for (; at < padded_c; at += kChunk) {
    const int64_t left = padded_c - at;
    const __mmask32 mask = _cvtu32_mask32(left >= kChunk ? 0xFFFFFFFFu : (1u << left) - 1);
    _mm512_mask_storeu_epi16(dst + at, mask, _mm512_setzero_si512());
  }
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// The bf16 values an A tile row holds (its B tile: half as many rows of channel pairs), as this
// thread's last configure() set them; read by the emulated tiles, which the configuration does not reach.
inline int& tile_row_values() {
  thread_local int values = kChunk;
  return values;
}

// For this thread until release(): sum tiles 16 rows of 64 bytes (16 fp32), A tiles 16 rows of
// `row_values` bf16 (a whole chunk, or fewer: a few-channel tap, conv_amx_few_channels), B tiles
// row_values / 2 rows of 64 bytes. An even row_values <= kChunk.
inline void configure(int row_values = kChunk) {
  tile_row_values() = row_values;
  if (emulated()) {
    return;
  }
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    const bool a = t == 4 || t == 5, b = t == 6 || t == 7;
    config.bytes_per_row[t] = a ? 2 * row_values : 64;
    config.rows[t] = b ? row_values / 2 : kGroupRows;
  }
  // WHY not _tile_loadconfig(&config): GCC 12's tells the compiler it reads 8 bytes of the struct,
  // so the stores of the row counts were dropped as dead and the first tile load faulted. Here
  // the operand is the whole struct.
  __asm__ volatile("ldtilecfg %0" : : "m"(config));
}

inline void release() {
  if (!emulated()) {
    _tile_release();
  }
}

// G row groups x P panels of sums, over `taps` taps of `chunks` 32-channel chunks: group g's rows
// of tap t start at a[g * taps + t], `stride[g * taps + t]` bytes apart; panel p's weights at
// w + p * panel_stride. Stored raw (fp32, 16 x 16 per tile) to sums[g][p].
template <int G, int P>
inline void tile_sums_amx(int64_t taps, int64_t chunks, const uint16_t* const* a, const int64_t* stride,
                          const uint16_t* w, int64_t panel_stride, const float* bias, float (*sums)[2][256]) {
  _tile_loadd(0, bias, 0);
  if constexpr (P == 2) {
    _tile_loadd(1, bias + avx2::kPanel, 0);
  }
  if constexpr (G == 2) {
    _tile_loadd(2, bias, 0);
    if constexpr (P == 2) {
      _tile_loadd(3, bias + avx2::kPanel, 0);
    }
  }
  for (int64_t t = 0; t < taps; ++t) {
    const uint16_t* a0 = a[t];
    const uint16_t* a1 = G == 2 ? a[taps + t] : nullptr;
    const int64_t s0 = stride[t], s1 = G == 2 ? stride[taps + t] : 0;
    const uint16_t* wt = w + t * chunks * kChunk * avx2::kPanel;
    for (int64_t j = 0; j < chunks; ++j) {
      const uint16_t* wj = wt + j * kChunk * avx2::kPanel;
      _tile_loadd(4, a0 + j * kChunk, s0);
      _tile_loadd(6, wj, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (P == 2) {
        _tile_loadd(7, wj + panel_stride, 64);
        _tile_dpbf16ps(1, 4, 7);
      }
      if constexpr (G == 2) {
        _tile_loadd(5, a1 + j * kChunk, s1);
        _tile_dpbf16ps(2, 5, 6);
        if constexpr (P == 2) {
          _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
  }
  _tile_stored(0, sums[0][0], 64);
  if constexpr (P == 2) {
    _tile_stored(1, sums[0][1], 64);
  }
  if constexpr (G == 2) {
    _tile_stored(2, sums[1][0], 64);
    if constexpr (P == 2) {
      _tile_stored(3, sums[1][1], 64);
    }
  }
}

// tile_sums_amx's sums in scalar code, reading the same rows and weights (see emulated()).
template <int G, int P>
inline void tile_sums_emulated(int64_t taps, int64_t chunks, const uint16_t* const* a, const int64_t* stride,
                               const uint16_t* w, int64_t panel_stride, const float* bias, float (*sums)[2][256]) {
  const auto widen = [](uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  };
  for (int g = 0; g < G; ++g) {
    for (int p = 0; p < P; ++p) {
      for (int r = 0; r < kGroupRows; ++r) {
        for (int col = 0; col < avx2::kPanel; ++col) {
          float sum = bias[p * avx2::kPanel + col];
          for (int64_t t = 0; t < taps; ++t) {
            const auto* row = reinterpret_cast<const uint16_t*>(reinterpret_cast<const char*>(a[g * taps + t]) +
                                                                r * stride[g * taps + t]);
            const uint16_t* wt = w + p * panel_stride + t * chunks * kChunk * avx2::kPanel;
            for (int64_t i = 0; i < chunks * kChunk; ++i) {
              if (i % kChunk >= tile_row_values()) {
                continue;  // past the A tile's row, as configured
              }
              sum += widen(row[i]) * widen(wt[(i / 2) * 2 * avx2::kPanel + col * 2 + i % 2]);
            }
          }
          sums[g][p][r * avx2::kPanel + col] = sum;
        }
      }
    }
  }
}

// G row groups x P panels of sums (see tile_sums_amx), on the tiles or emulated.
template <int G, int P>
inline void tile_sums(int64_t taps, int64_t chunks, const uint16_t* const* a, const int64_t* stride,
                      const uint16_t* w, int64_t panel_stride, const float* bias, float (*sums)[2][256]) {
  if (emulated()) {
    tile_sums_emulated<G, P>(taps, chunks, a, stride, w, panel_stride, bias, sums);
  } else {
    tile_sums_amx<G, P>(taps, chunks, a, stride, w, panel_stride, bias, sums);
  }
}

// `rows` output rows of P panels from their fp32 sums (bias included): + residual, ReLU, rounded
// once to bf16.
template <int P>
inline void store_rows(const float (*sums)[256], int rows, uint16_t* out, int64_t ld_out, const Epilogue& e) {
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r) {
    const int64_t at = e.rows[r];
    if (at < 0) {
      continue;
    }
    __m512 v[P];
    for (int p = 0; p < P; ++p) {
      v[p] = _mm512_load_ps(sums[p] + r * avx2::kPanel);
      if (e.residual != nullptr) {
        const auto* res = reinterpret_cast<const __m256i*>(e.residual + at * e.ld_residual + p * avx2::kPanel);
        const __m512i bits = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_loadu_si256(res));
        v[p] = _mm512_add_ps(v[p], _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, bits, 16)));
      }
      if (e.relu) {
        v[p] = _mm512_maskz_max_ps(0xFFFF, zero, v[p]);  // second operand on NaN: NaN stays NaN
      }
    }
    if constexpr (P == 2) {
      _mm512_storeu_si512(out + at * ld_out, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at * ld_out), (__m256i)_mm512_cvtneps_pbh(v[0]));
    }
  }
}

// One block of a work item: `count` rows (up to two row groups) x one panel pair (`pair`) or one
// panel; `out` and e.residual at the block's first panel, e.rows at its first row.
struct Block {
  int64_t count = 0;
  bool pair = false;
  uint16_t* out = nullptr;
  Epilogue e;
};

// The tile sums of block b (its groups' tap rows a / stride, its panels' weights w) into sums.
inline void block_sums(const Block& b, int64_t taps, int64_t chunks, const uint16_t* const* a, const int64_t* stride,
                       const uint16_t* w, int64_t panel_stride, float (*sums)[2][256]) {
  const bool two_groups = b.count > kGroupRows;
  if (b.pair) {
    two_groups ? tile_sums<2, 2>(taps, chunks, a, stride, w, panel_stride, b.e.bias, sums)
               : tile_sums<1, 2>(taps, chunks, a, stride, w, panel_stride, b.e.bias, sums);
  } else {
    two_groups ? tile_sums<2, 1>(taps, chunks, a, stride, w, panel_stride, b.e.bias, sums)
               : tile_sums<1, 1>(taps, chunks, a, stride, w, panel_stride, b.e.bias, sums);
  }
}

// Block b's epilogue and store from its sums.
inline void block_store(const Block& b, const float (*sums)[2][256], int64_t ld_out) {
  for (int g = 0; g * kGroupRows < b.count; ++g) {
    const int rows = static_cast<int>(std::min<int64_t>(kGroupRows, b.count - g * kGroupRows));
    Epilogue eg = b.e;
    eg.rows += g * kGroupRows;
    b.pair ? store_rows<2>(sums[g], rows, b.out, ld_out, eg) : store_rows<1>(sums[g], rows, b.out, ld_out, eg);
  }
}

// The whole GEMM of a work item: `count` rows whose row groups' tap rows are given by `a` and
// `stride` (groups * taps of each, see tile_sums), `panels` panels from `panel` ((taps, C/2, 16, 2)
// each, consecutive), out rows ld_out apart, placed by e.rows. Panel pairs outer, so a pair's
// weights are read from memory once per item and the rows (a few hundred KiB at most) come from L2.
inline void gemm_panels(int64_t count, int64_t c, int64_t taps, const uint16_t* const* a, const int64_t* stride,
                        const uint16_t* panel, int64_t panels, uint16_t* out, int64_t ld_out, const Epilogue& e) {
  const int64_t chunks = c / kChunk, panel_size = taps * c * avx2::kPanel;
  alignas(64) float sums[2][2][256];
  for (int64_t p = 0; p < panels; p += 2) {
    for (int64_t r = 0; r < count; r += 2 * kGroupRows) {
      const int64_t g = r / kGroupRows;
      Block b;
      b.count = std::min<int64_t>(2 * kGroupRows, count - r);
      b.pair = p + 1 < panels;
      b.out = out + p * avx2::kPanel;
      b.e = e;
      b.e.bias = e.bias + p * avx2::kPanel;
      b.e.rows = e.rows + r;
      if (b.e.residual != nullptr) {
        b.e.residual += p * avx2::kPanel;
      }
      // The block's output and residual rows fetched into L2 while the tiles sum. WHY: in a forward
      // the output lines are not in L1 and the epilogue's stores waited on them (a sixth of a hot
      // 1x1 conv's samples, perf). Intel Xeon with AMX, 2 threads, alternating in one process,
      // against none: resnet50 bf16 batch 8 1.031x and 1.043x, batch 1 0.996x and 0.998x, resnet18
      // batch 8 0.989x. To L2, not L1 (prefetchw, as first written): at batch 8 a sixth of the
      // kernel's samples sat on the prefetches themselves, the L1 fill buffers full with the 64 of
      // a block; into L2, resnet50 bf16 batch 8 1.04-1.05x (three runs), batch 1 1.009x, resnet18
      // batch 8 1.011x, batch 1 1.004x. Prefetching a block or two ahead instead: 0.99-1.00x.
      for (int64_t i = 0; i < b.count; ++i) {
        const int64_t at = b.e.rows[i];
        if (at < 0) {
          continue;
        }
        _mm_prefetch(reinterpret_cast<const char*>(b.out + at * ld_out), _MM_HINT_T1);
        if (b.e.residual != nullptr) {
          _mm_prefetch(reinterpret_cast<const char*>(b.e.residual + at * e.ld_residual), _MM_HINT_T1);
        }
      }
      block_sums(b, taps, chunks, a + g * taps, stride + g * taps, panel + p * panel_size, panel_size, sums);
      block_store(b, sums, ld_out);
    }
  }
}

RF_TARGET_REGION_END
#endif

}  // namespace amx_bf16
}  // namespace resnet_fused
