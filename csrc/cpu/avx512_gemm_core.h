// The AVX-512 GEMM micro-kernel over one operand type (see avx512_gemm.h, which includes this file,
// without an include guard, once per type: inside a namespace that defines `Ops`, and a target
// region). Ops gives the element type, the input channels per reduction step (kStep), and the
// step's loads and multiply-add, the sums' start and the epilogue's pieces.

using Element = Ops::Element;
using avx2::kPanel;
constexpr int kRows = 12;  // rows per micro-kernel call

// bias: this panel's 16 (the first panel of the call's); residual: row 0 of the first panel, rows
// `ld_residual` elements apart; both of the activations' type.
struct Epilogue {
  const Element* bias = nullptr;
  const Element* residual = nullptr;
  int64_t ld_residual = 0;
  bool relu = false;
};

// What the next micro-kernel call of a gemm_panels() touches first (epilogue output only): its first
// output row and residual row (rows ld_out and Epilogue::ld_residual apart) and how many rows it
// has; where it is the first to read its input rows, their pointers, count and 64-byte lines each.
struct NextCall {
  const Element* out = nullptr;
  const Element* residual = nullptr;
  int rows = 0;
  const Element* const* in = nullptr;
  int in_rows = 0;
  int lines_per_row = 0;
  // The next panel pair's weights (this call's share), fetched into L2: `weight_lines`
  // 64-byte lines from `weights`, `weight_lines_per_step` per reduction step.
  const Element* weights = nullptr;
  int64_t weight_lines = 0;
  int weight_lines_per_step = 0;
};

// 64-byte line `line` from p, into L1 (kToL1) or L2.
template <bool kToL1>
inline void prefetch_line(const Element* p, int64_t line) {
  const char* at = reinterpret_cast<const char*>(p) + line * 64;
  if constexpr (kToL1) {
    _mm_prefetch(at, _MM_HINT_T0);
  } else {
    _mm_prefetch(at, _MM_HINT_T1);
  }
}

// One reduction step of every row times its packed weights `w` (panels `panel_stride` apart), into
// the sums; `row(r)` is row r's broadcast of the step.
template <int R, int P, typename RowBroadcast>
__attribute__((always_inline)) inline void multiply_add_rows(__m512 (&acc)[R][P], const Element* w,
                                                             int64_t panel_stride, RowBroadcast&& row) {
  typename Ops::Weights wp[P];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
    wp[p] = Ops::load_weights(w + p * panel_stride);
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
    const typename Ops::Broadcast b = row(r);
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      acc[r][p] = Ops::multiply_add(acc[r][p], b, wp[p]);
    }
  }
}

// Reduction step i of rows at any addresses (v); `kFirstOnly`: the step's first channel only (the
// lone last channel of a C that is not a multiple of kStep), the others read as zero.
template <int R, int P, bool kFirstOnly>
__attribute__((always_inline)) inline void add_step(__m512 (&acc)[R][P], const Element* const (&v)[R],
                                                    const Element* w, int64_t panel_stride, int64_t i) {
  multiply_add_rows<R, P>(acc, w, panel_stride, [&](int r) __attribute__((always_inline)) {
    if constexpr (kFirstOnly) {
      return Ops::broadcast_first(v[r] + Ops::kStep * i);
    } else {
      return Ops::broadcast(v[r] + Ops::kStep * i);
    }
  });
}

// 32 bits from `base` + kScale * `index` bytes, broadcast to 16 lanes (a step's channel, or bf16
// channel pair, of one row). WHY asm: with the rows' pointers evenly spaced, the 12 rows of a call
// are three base pointers (rows 0, 4, 8) with offsets 0, ld, 2 ld and 3 ld, each an x86 address
// (base + index * scale); written in C, GCC hoisted all 11 row offsets into registers, spilled half of
// them to the stack and to xmm registers, and read them back every step with moves that take the
// FMA's port 0 (perf, fp32 resnet50 batch 1, Intel Xeon: 3 vmovq and 5 stack loads a step).
// Intel Xeon (AVX-512, 2 threads), fp32, old and new builds alternating in separate processes: hot
// 1x1 convs at batch 1 0.296 -> 0.280 ms (256 -> 1024 at 14x14 with a residual), 0.278 -> 0.264
// (1024 -> 256), 0.371 -> 0.339 (64 -> 256 at 56x56); resnet50 batch 8 156-158 -> 150-152 ms,
// batch 1 23.4-23.9 -> 22.7-23.4, resnet18 batch 1 7.51-7.55 -> 7.37-7.43.
template <int kScale>
__attribute__((always_inline)) inline __m512 broadcast_bits(const char* base, int64_t index) {
  __m512 out;
  if constexpr (kScale == 0) {
    asm("vbroadcastss (%1), %0" : "=v"(out) : "r"(base));
  } else if constexpr (kScale == 1) {
    asm("vbroadcastss (%1,%2,1), %0" : "=v"(out) : "r"(base), "r"(index));
  } else {
    static_assert(kScale == 2, "scale 0, 1 or 2");
    asm("vbroadcastss (%1,%2,2), %0" : "=v"(out) : "r"(base), "r"(index));
  }
  return out;
}

// add_step for rows evenly spaced: row r's step is at group[r / 4] + (r % 4) * ld bytes (the
// groups' pointers advanced one step per call; ld3 = 3 * ld). The asm above reads memory the
// compiler does not know of: the group pointers come through spaced_groups(), ordered after every
// store before it.
template <int R, int P>
__attribute__((always_inline)) inline void add_spaced_step(__m512 (&acc)[R][P], const char* const* group,
                                                           int64_t ld, int64_t ld3, const Element* w,
                                                           int64_t panel_stride) {
  multiply_add_rows<R, P>(acc, w, panel_stride, [&](int r) __attribute__((always_inline)) {
    const char* base = group[r / 4];
    switch (r % 4) {
      case 0: return Ops::from_bits(broadcast_bits<0>(base, 0));
      case 1: return Ops::from_bits(broadcast_bits<1>(base, ld));
      case 2: return Ops::from_bits(broadcast_bits<2>(base, ld));
      default: return Ops::from_bits(broadcast_bits<1>(base, ld3));
    }
  });
}

// Whether the `rows` pointers of v are evenly spaced (ld elements apart, ld > 0), and if so the
// three group pointers of add_spaced_step. The empty asm with a memory clobber orders the pointers
// (and so every broadcast from them) after all stores before it: the rows a Winograd transform just
// wrote.
inline bool spaced_groups(const Element* const* v, int rows, int64_t& ld, const char* (&group)[3]) {
  if (rows < 2) {
    return false;
  }
  ld = v[1] - v[0];
  if (ld <= 0) {
    return false;
  }
  for (int r = 2; r < rows; ++r) {
    if (v[r] != v[0] + r * ld) {
      return false;
    }
  }
  for (int g = 0; g < 3; ++g) {
    group[g] = reinterpret_cast<const char*>(v[0] + std::min(4 * g, rows - 1) * ld);
    asm volatile("" : "+r"(group[g]) : : "memory");
  }
  return true;
}

// The epilogue and the store of R rows x P panels of sums started by Ops::start: + bias, +
// residual, ReLU, in the activations' type.
template <int R, int P>
__attribute__((always_inline)) inline void store_epilogue(__m512 (&acc)[R][P], Element* out, int64_t ld_out,
                                                          const Epilogue& e) {
  // Each step over all the sums before the next (not row by row), so the residual's loads all
  // issue first: row by row, hot bf16 1x1 convs ran 1-3% slower (Zen 4, 2 threads).
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      acc[r][p] = Ops::add_bias(acc[r][p], e.bias + p * kPanel);
    }
  }
  if (e.residual != nullptr) {
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) {
        acc[r][p] = Ops::add_residual(acc[r][p], e.residual + r * e.ld_residual + p * kPanel);
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
        // (The all-ones-masked max compiles to the unmasked instruction, without GCC 12's
        // -Wmaybe-uninitialized on the unmasked intrinsic's undefined pass-through operand.)
        acc[r][p] = _mm512_maskz_max_ps(0xFFFF, zero, acc[r][p]);
      }
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
    Ops::template store<P>(acc[r], out + r * ld_out);
  }
}

// R rows x P panels: the sums over `taps` taps of `steps` reduction steps (+ the lone last channel
// when `odd`: C not a multiple of kStep), then the store: into Element after the epilogue (kRaw
// false), or the raw fp32 sums (kRaw: Winograd's transformed points; `e` unused).
// rows[r * row_taps + t] is row r's input under tap t; tap t of panel p is at
// panel + p * panel_stride + t * tap_stride.
template <int R, int P, bool kRaw>
inline void micro_kernel(int64_t steps, bool odd, int64_t taps, int64_t row_taps, const Element* const* rows,
                         const Element* panel, int64_t tap_stride, int64_t panel_stride,
                         std::conditional_t<kRaw, float, Element>* out, int64_t ld_out, const Epilogue& e,
                         const NextCall& next) {
  static_assert(R >= 1 && R <= kRows && (P == 1 || P == 2), "1 to 12 rows, 1 or 2 panels");
  __m512 init[P];
#pragma GCC unroll 2
  for (int p = 0; p < P; ++p) {
    init[p] = kRaw ? _mm512_setzero_ps() : Ops::start(e.bias + p * kPanel);
  }
  __m512 acc[R][P];
#pragma GCC unroll 24
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int p = 0; p < P; ++p) {
      acc[r][p] = init[p];
    }
  }
  // The lines the next call's epilogue reads and writes (`next`), one row per reduction step, and
  // those of its input rows, one line per step, so that it does not wait on memory. WHY: at batch 8
  // a 1x1 conv's activations live in DRAM, and each call began with a burst of input misses and
  // ended with one of residual loads and output stores. On the Zen 4 EPYC (in-process A/B, medians
  // of 14 alternating rounds, two runs each), bf16 resnet50 batch 8: the epilogue's lines 4.8-5.9%
  // faster, the input rows another 2.9-4.1%; batch 1 0.6-1.4% and 0-1.8%; resnet18 batch 1 and 8
  // within +-1.1%. (avx2_gemm.h's core fetches its own epilogue lines at the start of a call
  // instead; input rows are read from a call's first step, so they must come a call ahead, and the
  // epilogue's lines come with them. That scheme in the AVX2 core: +0.7-1.8%, not kept.)
  constexpr int kRowLines = static_cast<int>((2 * kPanel * sizeof(Element) + 63) / 64);  // a row of two panels
  int next_row = 0, in_row = 0, in_line = 0;
  int64_t weight_line = 0;
  for (int64_t t = 0; t < taps; ++t) {
    const Element* v[R];
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
      v[r] = rows[r * row_taps + t];
    }
    const Element* u = panel + t * tap_stride;
    const auto prefetch_for_step = [&] {
      if constexpr (!kRaw) {
        if (next_row < next.rows) {
          for (int l = 0; l < kRowLines; ++l) {
            prefetch_line<true>(next.out + next_row * ld_out, l);
            if (next.residual != nullptr) {
              prefetch_line<true>(next.residual + next_row * e.ld_residual, l);
            }
          }
          ++next_row;
        }
        if (in_row < next.in_rows) {
          prefetch_line<true>(next.in[in_row], in_line);
          if (++in_line == next.lines_per_row) {
            in_line = 0;
            ++in_row;
          }
        }
      }
      for (int l = 0; l < next.weight_lines_per_step && weight_line < next.weight_lines; ++l, ++weight_line) {
        prefetch_line<false>(next.weights, weight_line);
      }
    };
    int64_t ld = 0;
    const char* group[3];
    if (spaced_groups(v, R, ld, group)) {
      const int64_t ld_bytes = ld * static_cast<int64_t>(sizeof(Element));
      for (int64_t i = 0; i < steps; ++i) {
        add_spaced_step<R, P>(acc, group, ld_bytes, 3 * ld_bytes, u + i * Ops::kStep * kPanel, panel_stride);
        for (auto& g : group) {
          g += Ops::kStep * sizeof(Element);
        }
        prefetch_for_step();
      }
    } else {
      for (int64_t i = 0; i < steps; ++i) {
        add_step<R, P, false>(acc, v, u + i * Ops::kStep * kPanel, panel_stride, i);
        prefetch_for_step();
      }
    }
    if (odd) {
      add_step<R, P, true>(acc, v, u + steps * Ops::kStep * kPanel, panel_stride, steps);
    }
  }
  if constexpr (kRaw) {
#pragma GCC unroll 24
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) {
        _mm512_storeu_ps(out + r * ld_out + p * kPanel, acc[r][p]);
      }
    }
  } else {
    store_epilogue<R, P>(acc, out, ld_out, e);
  }
}

template <int P, bool kRaw>
inline void rows_of(int64_t n_rows, int64_t steps, bool odd, int64_t taps, const Element* const* rows,
                    const Element* panel, int64_t tap_stride, int64_t panel_stride,
                    std::conditional_t<kRaw, float, Element>* out, int64_t ld_out, const Epilogue& e,
                    const NextCall& next) {
  switch (n_rows) {
#define RF_ROWS_CASE(R)                                                                                           \
  case R:                                                                                                         \
    micro_kernel<R, P, kRaw>(steps, odd, taps, taps, rows, panel, tap_stride, panel_stride, out, ld_out, e, next); \
    break;
    RF_ROWS_CASE(12) RF_ROWS_CASE(11) RF_ROWS_CASE(10) RF_ROWS_CASE(9) RF_ROWS_CASE(8) RF_ROWS_CASE(7)
    RF_ROWS_CASE(6) RF_ROWS_CASE(5) RF_ROWS_CASE(4) RF_ROWS_CASE(3) RF_ROWS_CASE(2) RF_ROWS_CASE(1)
#undef RF_ROWS_CASE
  }
}

// All `count` output rows against `panels` consecutive panels (each taps x ceil(c / kStep) steps
// of kStep x 16 elements, panels `panel_stride` apart; output columns 16 apart), two panels and 12
// rows at a time; rows holds `taps` pointers per row. `e` is for the first panel and row.
// `then`, `then_lines`: the weights the caller's next GEMM starts with, fetched like the next pair's
// during the last pair's first call.
template <bool kRaw>
inline void panels_of(int64_t count, int64_t c, int64_t taps, const Element* const* rows, const Element* panel,
                      int64_t panels, std::conditional_t<kRaw, float, Element>* out, int64_t ld_out,
                      const Epilogue& e, const Element* then = nullptr, int64_t then_lines = 0) {
  constexpr int64_t kStep = Ops::kStep;
  const int64_t steps = c / kStep, tap_stride = (c + kStep - 1) / kStep * kStep * kPanel;
  const int64_t panel_stride = taps * tap_stride;
  const bool odd = c % kStep != 0;
  const int64_t call_steps = taps * steps;  // reduction steps per call
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
      const Element* const* rr = rows + r * taps;
      auto* o = out + r * ld_out + p * kPanel;
      NextCall next;
      if constexpr (!kRaw) {
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
          next.lines_per_row = static_cast<int>((c * static_cast<int64_t>(sizeof(Element)) + 63) / 64);
        }
      }
      if (p + 2 < panels && call_steps > 0) {
        // The next pair's weights, fetched into L2 over this pair's calls (each call its share of
        // the lines, spread over its reduction steps): where few rows share a weight (batch 1,
        // 14x14 and 7x7 maps) it comes from DRAM, which the calls' compute hides if asked early.
        // Measured on the Intel Xeon (AVX-512, 2 threads), whole fp32 models after 0.1 s idle and
        // a 128 MB sweep, three forwards each, against the whole fetch in the pair's first call:
        // resnet50 batch 1 1.04-1.05x, batch 8 1.03x, resnet18 batch 1 1.03-1.08x; the bf16 core
        // (AMX off) resnet50 batch 1 1.016x, resnet18 1.06x; spread over half the calls or three,
        // in between; no fetch 0.97x. (On the Zen 4 EPYC, session 18, the first-call burst had
        // measured better, bf16 resnet50 batch 1 1.014-1.035x, batch 8 1.039x: not re-measured
        // there with this code.)
        const int64_t calls = (count + kRows - 1) / kRows, call = r / kRows;
        const int64_t lines = std::min<int64_t>(2, panels - p - 2) * panel_stride * sizeof(Element) / 64;
        const int64_t per_call = (lines + calls - 1) / calls;
        next.weights = panel + (p + 2) * panel_stride + call * per_call * (64 / static_cast<int64_t>(sizeof(Element)));
        next.weight_lines = std::max<int64_t>(0, std::min(per_call, lines - call * per_call));
        next.weight_lines_per_step = static_cast<int>((next.weight_lines + call_steps - 1) / call_steps);
      } else if (p + 2 >= panels && then != nullptr && call_steps > 0 && r == 0) {
        next.weights = then;
        next.weight_lines = then_lines;
        next.weight_lines_per_step = static_cast<int>((then_lines + call_steps - 1) / call_steps);
      }
      if (p + 1 < panels) {
        rows_of<2, kRaw>(n_rows, steps, odd, taps, rr, panel + p * panel_stride, tap_stride, panel_stride, o, ld_out,
                         er, next);
      } else {
        rows_of<1, kRaw>(n_rows, steps, odd, taps, rr, panel + p * panel_stride, tap_stride, panel_stride, o, ld_out,
                         er, next);
      }
    }
  }
}

// The convolution's GEMM: out (Element) = epilogue(sums), e.bias set.
inline void gemm_panels(int64_t count, int64_t c, int64_t taps, const Element* const* rows, const Element* panel,
                        int64_t panels, Element* out, int64_t ld_out, const Epilogue& e) {
  panels_of<false>(count, c, taps, rows, panel, panels, out, ld_out, e);
}

// Winograd's GEMMs: the raw fp32 sums. `then`: see panels_of.
inline void gemm_panels_raw(int64_t count, int64_t c, int64_t taps, const Element* const* rows, const Element* panel,
                            int64_t panels, float* out, int64_t ld_out, const Element* then = nullptr,
                            int64_t then_lines = 0) {
  panels_of<true>(count, c, taps, rows, panel, panels, out, ld_out, Epilogue{}, then, then_lines);
}
