// CPU kernels: the fused epilogue (vectorized, parallel) and conv_bias_act through our AVX2
// kernels, oneDNN's convolution with fused bias and add when this ATen has it, else ATen's
// convolution, the latter two followed by the epilogue (residual, ReLU) in place.
//
// NaN: every path gives eager's NaNs (a NaN or Inf input makes NaN exactly the outputs eager makes
// NaN, and no others), whichever kernel the per-shape timing picks: ReLUs keep NaN, oneDNN's ReLU
// post-op (which does not) is never used, and Winograd hands calls with non-finite values to the
// implicit GEMM (winograd.h). Finite inputs that overflow a sum may differ, as between any two
// summation orders.

#include "../common.h"
#include "avx2_gemm.h"
#include "avx512_gemm.h"
#include "head.h"
#include "implicit_gemm.h"
#include "max_pool.h"
#include "output_pool.h"
#include "parallel_items.h"
#include "weight_cache.h"
#include "winograd.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/max_pool2d.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace resnet_fused {
namespace {

// This file is compiled once, for the baseline ISA (no -mavx2): Vectorized<T> is then ATen's
// portable implementation, which the compiler vectorizes for SSE2. The epilogue is bound by
// memory bandwidth, so the wider ISAs would gain little, and building several ISA variants of
// one file (as ATen does) is not something a setuptools extension can do per file.

// Elements per parallel task: ATen's own grain (at::internal::GRAIN_SIZE, from a heavy header).
constexpr int64_t kGrainElements = 32768;

template <typename T>
inline T relu_keep_nan(T v) {
  return v < T(0) ? T(0) : v;
}

// One contiguous run of `len` elements. The bias is either a per-element vector (channels_last:
// the run is one pixel's channels) or one scalar (NCHW: the run is one channel plane).
template <typename T>
void epilogue_run(
    T* out,
    const T* in,
    const T* res,
    int64_t len,
    const at::opmath_type<T>* bias_vec,
    at::opmath_type<T> bias_scalar,
    bool relu) {
  using acc_t = at::opmath_type<T>;
  using AVec = at::vec::Vectorized<acc_t>;
  const AVec zero(acc_t(0));
  const AVec bias_splat(bias_scalar);
  // (x + bias) + residual on every path, the order of a convolution with bias followed by an add.
  auto add_bias = [&](AVec v, int64_t offset) {
    return v + (bias_vec != nullptr ? AVec::loadu(bias_vec + offset) : bias_splat);
  };
  // clamp_min(v, 0) is v < 0 ? 0 : v, which keeps NaN, and a plain select the compiler vectorizes;
  // at::vec::maximum also keeps NaN but tests each lane for it, scalar, in this baseline-ISA build.
  auto act = [&](AVec v) { return relu ? at::vec::clamp_min(v, zero) : v; };
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    using Vec = at::vec::Vectorized<T>;
    for (; i + Vec::size() <= len; i += Vec::size()) {
      auto [a0, a1] = at::vec::convert_to_float<T>(Vec::loadu(in + i));
      a0 = add_bias(a0, i);
      a1 = add_bias(a1, i + AVec::size());
      if (res != nullptr) {
        auto [r0, r1] = at::vec::convert_to_float<T>(Vec::loadu(res + i));
        a0 = a0 + r0;
        a1 = a1 + r1;
      }
      at::vec::convert_from_float<T>(act(a0), act(a1)).store(out + i);
    }
  } else {
    for (; i + AVec::size() <= len; i += AVec::size()) {
      AVec a = add_bias(AVec::loadu(in + i), i);
      if (res != nullptr) {
        a = a + AVec::loadu(res + i);
      }
      act(a).store(out + i);
    }
  }
  for (; i < len; ++i) {
    acc_t a = static_cast<acc_t>(in[i]) + (bias_vec != nullptr ? bias_vec[i] : bias_scalar);
    if (res != nullptr) {
      a += static_cast<acc_t>(res[i]);
    }
    out[i] = static_cast<T>(relu ? relu_keep_nan(a) : a);
  }
}

void epilogue_cpu(
    const at::Tensor& out,
    const at::Tensor& in,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous(format) && in.is_contiguous(format));
  TORCH_INTERNAL_ASSERT(!residual.has_value() || residual->is_contiguous(format));
  const int64_t channels = out.size(1);
  const int64_t plane = out.size(2) * out.size(3);
  const bool channels_last = format == c10::MemoryFormat::ChannelsLast;
  // Runs of contiguous elements that share the bias layout: pixels (NHWC) or planes (NCHW).
  const int64_t run_len = channels_last ? channels : plane;
  const int64_t runs = out.numel() / run_len;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "resnet_fused_epilogue_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Widened once so the inner loops load the bias without converting it per pixel.
    std::vector<acc_t> bias_acc(bias.has_value() ? channels : 0);
    if (bias.has_value()) {
      const scalar_t* b = bias->const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < channels; ++c) {
        bias_acc[c] = static_cast<acc_t>(b[c]);
      }
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* x = in.const_data_ptr<scalar_t>();
    const scalar_t* r = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* bias_ptr = bias.has_value() ? bias_acc.data() : nullptr;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / run_len);
    at::parallel_for(0, runs, grain, [&](int64_t begin, int64_t end) {
      for (int64_t run = begin; run < end; ++run) {
        const int64_t offset = run * run_len;
        const acc_t* bias_vec = channels_last ? bias_ptr : nullptr;
        const acc_t bias_scalar = (!channels_last && bias_ptr != nullptr) ? bias_ptr[run % channels] : acc_t(0);
        epilogue_run<scalar_t>(
            o + offset, x + offset, r == nullptr ? nullptr : r + offset, run_len, bias_vec, bias_scalar, relu);
      }
    });
  });
}

// oneDNN's convolution with fused post-ops, looked up through the dispatcher at run time: the ops
// are internal to ATen (no public header), absent from builds without oneDNN, and their C++
// signatures have changed between releases, so they are called boxed.
struct OneDnn {
  std::optional<c10::OperatorHandle> unary;   // conv + bias (+ a unary post-op, "none" here)
  std::optional<c10::OperatorHandle> binary;  // conv + bias + binary post-op ("add") (+ a unary one)
  std::optional<c10::OperatorHandle> reorder;  // weight -> oneDNN's layout for one input shape
  bool bf16 = false;
  bool fp16 = false;
};

bool call_bool_op(const char* name) {
  const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!op.has_value()) {
    return false;
  }
  torch::jit::Stack stack;
  op->callBoxed(&stack);
  return stack.at(0).toBool();
}

const OneDnn& onednn() {
  static const OneDnn ops = [] {
    OneDnn o;
    if (!at::hasMKLDNN()) {
      return o;
    }
    auto& dispatcher = c10::Dispatcher::singleton();
    o.unary = dispatcher.findSchema({"mkldnn::_convolution_pointwise", ""});
    o.binary = dispatcher.findSchema({"mkldnn::_convolution_pointwise", "binary"});
    o.reorder = dispatcher.findSchema({"aten::mkldnn_reorder_conv2d_weight", ""});
    // oneDNN refuses reduced precision on CPUs without the instructions for it, with an error.
    o.bf16 = call_bool_op("mkldnn::_is_mkldnn_bf16_supported");
    o.fp16 = call_bool_op("mkldnn::_is_mkldnn_fp16_supported");
    return o;
  }();
  return ops;
}

constexpr const char* kOneDnnEnv = "RESNET_FUSED_ONEDNN_FUSED";

// Whether this call goes through oneDNN's fused post-ops: yes wherever they can compute it, since
// they run the same oneDNN convolution that at::convolution would pick for these dtypes, with the
// weight prepacked and the bias and add fused. RESNET_FUSED_ONEDNN_FUSED=0 turns it off (for
// comparisons and to test the other path); torch.backends.mkldnn.enabled=False does too.
bool use_onednn(at::ScalarType dtype) {
  if (env_switch(kOneDnnEnv) == 0 || !at::globalContext().userEnabledMkldnn()) {
    return false;
  }
  const OneDnn& ops = onednn();
  if (!ops.unary.has_value()) {
    return false;
  }
  switch (dtype) {
    case at::kFloat:
      return true;
    case at::kBFloat16:
      return ops.bf16;
    case at::kHalf:
      return ops.fp16;
    default:
      return false;
  }
}

// ---- Weights prepacked into oneDNN's blocked layout.
//
// Given a plain weight, oneDNN converts it to the layout its kernel wants on every call, which at
// batch 1 costs about as much as the convolution. The packed copy is made once per weight and
// input shape (the layout depends on the shape) and kept in a WeightCache.

// Packing per dtype turned off after it failed once: the reorder is a private op whose support
// varies across builds and CPUs, and the plain weight always works, only slower.
std::atomic<bool> packing_failed_fp32{false};
std::atomic<bool> packing_failed_bf16{false};

std::atomic<bool>* packing_failed_flag(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return &packing_failed_fp32;
    case at::kBFloat16:
      return &packing_failed_bf16;
    default:
      // Half keeps the plain weight: no CPU here has oneDNN fp16 to test its packing on, and the
      // Python onednn backend does not run fp16 at all.
      return nullptr;
  }
}

WeightCache& onednn_weights() {
  // Never destroyed: its tensors would be freed during static destruction, after the allocators
  // they belong to may be gone.
  static auto* cache = new WeightCache();
  return *cache;
}

at::Tensor pack_weight(
    const at::Tensor& weight,
    at::IntArrayRef input_size,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const std::vector<int64_t>& dilation,
    int64_t groups) {
  torch::jit::Stack stack{weight.contiguous().to_mkldnn(), padding.vec(), stride.vec(), dilation, groups,
                          input_size.vec()};
  onednn().reorder->callBoxed(&stack);
  return stack.at(0).toTensor();
}

// The weight to pass to oneDNN: packed where this ATen can pack it, else the plain weight.
at::Tensor onednn_weight(
    const at::Tensor& x,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const std::vector<int64_t>& dilation,
    int64_t groups) {
  std::atomic<bool>* failed = packing_failed_flag(weight.scalar_type());
  if (!onednn().reorder.has_value() || failed == nullptr || failed->load(std::memory_order_relaxed)) {
    return weight;
  }
  const int64_t key[] = {x.size(0), x.size(1), x.size(2), x.size(3), stride[0], stride[1], padding[0], padding[1],
                         groups};
  try {
    return onednn_weights().get(weight, key, [&](const at::Tensor& w) {
      return pack_weight(w, x.sizes(), stride, padding, dilation, groups);
    });
  } catch (const c10::Error& e) {
    failed->store(true, std::memory_order_relaxed);
    TORCH_WARN(
        "resnet_fused: could not prepack a ", weight.scalar_type(), " weight for oneDNN (",
        e.what_without_backtrace(), "); passing plain weights from now on, which is slower");
    return weight;
  }
}

// oneDNN's convolution with the bias, and the residual add where ATen fuses it, as post-ops; then
// the ReLU in place, or, with an add ATen would not fuse, our epilogue (add + ReLU in one pass).
// WHY not oneDNN's ReLU post-op: it computes max(x, 0) with the operands in the order that turns a
// NaN into 0 (seen on AVX2 here and on AVX-512), so a corrupted input came out as plausible
// activations, unlike eager. Its bias and add post-ops keep NaN (IEEE adds on every ISA).
// WHY the add only where ATen fuses it: elsewhere (groups > 1, or NCHW with an unpacked weight) ATen's
// binary op runs the convolution and then at::add_relu_, a separate pass anyway and one with no
// bf16 kernel (it failed on a CPU with AVX512-BF16).
at::Tensor conv_onednn(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    int64_t groups,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format) {
  const OneDnn& ops = onednn();
  const std::vector<int64_t> dilation{1, 1};
  const c10::IValue bias_value = bias.has_value() ? c10::IValue(*bias) : c10::IValue();
  const at::Tensor w = onednn_weight(x, weight, stride, padding, dilation, groups);
  const bool fused_add = residual.has_value() && ops.binary.has_value() && groups == 1 &&
      (w.is_mkldnn() || format == c10::MemoryFormat::ChannelsLast);
  torch::jit::Stack stack;
  if (fused_add) {
    stack = {x, *residual, w, bias_value, padding.vec(), stride.vec(), dilation, groups, std::string("add"),
             c10::IValue(), c10::IValue(), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    ops.binary->callBoxed(&stack);
  } else {
    stack = {x, w, bias_value, padding.vec(), stride.vec(), dilation, groups, std::string("none"),
             c10::List<std::optional<at::Scalar>>(), c10::IValue()};
    ops.unary->callBoxed(&stack);
  }
  at::Tensor out = stack.at(0).toTensor().contiguous(format);
  if (residual.has_value() && !fused_add) {
    conv_epilogue_with(epilogue_cpu, out, std::nullopt, residual, relu, format);
  } else if (relu) {
    // ATen's relu_ keeps NaN too, and is built for each ISA, unlike our epilogue (see above): on
    // 8x64x56x56 here relu_ took 0.16 ms, our bias_act (with its fresh output) 1.6 ms.
    out.relu_();
  }
  return out;
}

// ---- Our own AVX2 convolutions and the per-shape choice between them and the direct (oneDNN or
// ATen) convolution: Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 convs (winograd_cpu.cpp),
// an implicit GEMM with the epilogue in its store for every other kernel size and stride
// (implicit_gemm_cpu.cpp). They compute in fp32; a bf16 or fp16 call is converted to fp32 on the
// way in and rounded once on the way out (conv_own). WHY: on a CPU without native bf16/fp16
// convolutions (no AVX512-BF16, AMX or AVX512-FP16: oneDNN refuses them and ATen falls back to
// a slow generic path) the direct path ran a bf16 resnet18 at 12x the fp32 time; where the CPU
// has them, the timing weighs oneDNN's native kernels against this.
//
// Which is faster depends on the shape and the machine: Winograd does 2.25x (F(2x2)) or 4x (F(4x4))
// fewer multiply-adds but reads a 16/9x or 4x larger weight and transforms every tile, so it loses
// where the weight dominates (batch 1, 7x7 maps, 512 channels: memory-bound) and wins where the
// GEMMs dominate; the implicit GEMM saves oneDNN's separate residual pass. Like cuDNN's benchmark
// mode, the first call of each shape times the candidates on the real input, with the weight
// evicted from the caches as it is in a model (evict_weight), and keeps the fastest.
// RESNET_FUSED_AVX2_CONV=0 never uses our kernels, =1 always does where they apply (Winograd
// F(2x2) for 3x3 stride 1); RESNET_FUSED_WINOGRAD_TILE=2 or 4 keeps one Winograd variant only
// (forced or timed); RESNET_FUSED_GEMM_CORE=own or brgemm fixes the GEMM under Winograd and the
// implicit GEMM (else timed: Winograd's everywhere, the implicit GEMM's where the CPU has AVX-512);
// RESNET_FUSED_THREAD_SPLIT=pixels or channels fixes how the implicit GEMM shares its work between
// the threads (else timed; forced mode shares pixels unless told).

constexpr const char* kAvx2ConvEnv = "RESNET_FUSED_AVX2_CONV";
constexpr const char* kWinogradTileEnv = "RESNET_FUSED_WINOGRAD_TILE";
constexpr const char* kGemmCoreEnv = "RESNET_FUSED_GEMM_CORE";
constexpr const char* kThreadSplitEnv = "RESNET_FUSED_THREAD_SPLIT";
constexpr const char* kCpuIsaEnv = "RESNET_FUSED_CPU_ISA";

// kImplicitGemmBf16: the implicit GEMM on bf16 operands with AVX512-BF16 (avx512_gemm.h);
// kWinograd2Bf16: F(2x2, 3x3) with its transformed points rounded to bf16 for the same GEMM core
// (transforms in fp32); kImplicitGemmAmx: the implicit GEMM on bf16 operands with AMX tiles
// (amx_gemm.h; its weight from implicit_gemm::pack_weight_amx); the others compute in fp32.
// The values are saved in tuning files (resnet_fused/tuning.py): append, never renumber (or bump its VERSION).
enum class Kernel { kDirect, kWinograd2, kWinograd4, kImplicitGemm, kImplicitGemmBf16, kWinograd2Bf16, kImplicitGemmAmx };
constexpr Kernel kLastKernel = Kernel::kImplicitGemmAmx;

// RESNET_FUSED_WINOGRAD_TILE: 0 (unset or auto: both), 2 or 4; -1 (off): no Winograd, the 3x3
// stride-1 convs then take the implicit GEMM like any other (the direct convolution's rounding).
int winograd_tile_setting() {
  const char* value = std::getenv(kWinogradTileEnv);
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) {
    return 0;
  }
  if (std::strcmp(value, "off") == 0) {
    return -1;
  }
  TORCH_CHECK(std::strcmp(value, "2") == 0 || std::strcmp(value, "4") == 0, "resnet_fused: ", kWinogradTileEnv,
              " must be 2, 4, off or auto, got '", value, "'");
  return value[0] - '0';
}

// The GEMM under Winograd and the implicit GEMM: our AVX2 micro-kernel or oneDNN's brgemm, which
// oneDNN generates for the CPU's widest ISA (AVX-512 where there is one; ours is AVX2 code)
// (winograd.h, implicit_gemm.h).
enum class GemmCore { kAuto, kOwn, kBrgemm };

GemmCore gemm_core_setting() {
  const char* value = std::getenv(kGemmCoreEnv);
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) {
    return GemmCore::kAuto;
  }
  TORCH_CHECK(std::strcmp(value, "own") == 0 || std::strcmp(value, "brgemm") == 0, "resnet_fused: ", kGemmCoreEnv,
              " must be own, brgemm or auto, got '", value, "'");
  return value[0] == 'b' ? GemmCore::kBrgemm : GemmCore::kOwn;
}

enum class ThreadSplit { kAuto, kPixels, kChannels };

ThreadSplit thread_split_setting() {
  const char* value = std::getenv(kThreadSplitEnv);
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) {
    return ThreadSplit::kAuto;
  }
  TORCH_CHECK(std::strcmp(value, "pixels") == 0 || std::strcmp(value, "channels") == 0, "resnet_fused: ",
              kThreadSplitEnv, " must be pixels, channels or auto, got '", value, "'");
  return value[0] == 'c' ? ThreadSplit::kChannels : ThreadSplit::kPixels;
}

// RESNET_FUSED_CPU_ISA=avx2 keeps our kernels to AVX2 + FMA code on any CPU, so that a machine
// with AVX-512 can test and time the paths an AVX2-only one runs; avx512 keeps them off AMX (the
// AVX-512 and AVX512-BF16 cores, what an AVX-512 machine without AMX runs); auto (the default) lets
// them use what the CPU has. It does not reach oneDNN (its convolutions and brgemm):
// ONEDNN_MAX_CPU_ISA does. The values are the shape key's "isa_cap" (saved in tuning files).
enum class IsaCap { kNone, kAvx2, kAvx512 };

IsaCap own_isa_cap() {
  const char* value = std::getenv(kCpuIsaEnv);
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) {
    return IsaCap::kNone;
  }
  TORCH_CHECK(std::strcmp(value, "avx2") == 0 || std::strcmp(value, "avx512") == 0, "resnet_fused: ", kCpuIsaEnv,
              " must be avx2, avx512 or auto, got '", value, "'");
  return std::strcmp(value, "avx2") == 0 ? IsaCap::kAvx2 : IsaCap::kAvx512;
}

bool is_implicit_gemm(Kernel kernel) {
  return kernel == Kernel::kImplicitGemm || kernel == Kernel::kImplicitGemmBf16 || kernel == Kernel::kImplicitGemmAmx;
}

bool is_winograd(Kernel kernel) {
  return kernel == Kernel::kWinograd2 || kernel == Kernel::kWinograd4 || kernel == Kernel::kWinograd2Bf16;
}

// The kernels whose GEMMs run on bf16 operands (the AVX512-BF16 core or AMX; bf16 calls only).
bool on_bf16_core(Kernel kernel) {
  return kernel == Kernel::kImplicitGemmBf16 || kernel == Kernel::kWinograd2Bf16 || kernel == Kernel::kImplicitGemmAmx;
}

// Whether a shape's first call times brgemm against our micro-kernel for `kernel` (when the core is
// not forced). Winograd: everywhere (its 7x7 layers took brgemm on the AVX2 EPYC). The implicit
// GEMM: only where brgemm is AVX-512 code. WHY: on the AVX2 EPYC, where both are AVX2, timing it
// was neutral (resnet50 b1 1.00x, resnet18 b1 0.97x, b8 1.02x, whole-model medians of 60 and 12
// alternating forwards) and made resnet50's first forward 38% (b1) and 23% (b8) longer.
bool times_gemm_core(Kernel kernel) {
  return (is_winograd(kernel) && !on_bf16_core(kernel)) ||
         (kernel == Kernel::kImplicitGemm && avx512_fp32::cpu_has_avx512());
}

// Whether `kernel` runs its GEMMs on brgemm under the GEMM core setting (the bf16 kernels have their own only).
bool on_brgemm(GemmCore core, Kernel kernel) {
  return core == GemmCore::kBrgemm && !on_bf16_core(kernel);
}

bool is_low_precision(const at::Tensor& x) {
  return x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
}

// Our kernels that could compute this call, the one to use when forced first; empty if none. A bf16
// call on a CPU with AVX512-BF16 has the kernels on bf16 operands first (Winograd F(2x2) for 3x3
// stride 1, the implicit GEMM on AMX where the CPU has it, the implicit GEMM on the AVX512-BF16
// core), then the fp32 kernels on converted activations (F(4x4)'s 4x
// fewer multiply-adds can outweigh bf16's 2x rate). `cap`: own_isa_cap(), read once
// per call by the caller.
std::vector<Kernel> own_kernels(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, int64_t groups, IsaCap cap) {
  if ((x.scalar_type() != at::kFloat && !is_low_precision(x)) || groups != 1 || weight.size(0) % avx2::kPanel != 0 ||
      !avx2::cpu_has_avx2_fma()) {
    return {};
  }
  std::vector<Kernel> kernels;
  const bool bf16_core = x.scalar_type() == at::kBFloat16 && implicit_gemm::can_run_bf16() && cap != IsaCap::kAvx2;
  const bool amx = bf16_core && cap == IsaCap::kNone && implicit_gemm::can_run_amx();
  const int64_t r = weight.size(2), s = weight.size(3);
  const int tile = winograd_tile_setting();
  if (r == 3 && s == 3 && stride[0] == 1 && stride[1] == 1 && padding[0] == 1 && padding[1] == 1 && tile >= 0) {
    if (tile != 4 && bf16_core) {
      kernels.push_back(Kernel::kWinograd2Bf16);
    }
    if (amx) {
      kernels.push_back(Kernel::kImplicitGemmAmx);
    }
    if (bf16_core) {
      kernels.push_back(Kernel::kImplicitGemmBf16);
    }
    if (tile != 4) {
      kernels.push_back(Kernel::kWinograd2);
    }
    if (tile != 2) {
      kernels.push_back(Kernel::kWinograd4);
    }
  } else {
    if (amx) {
      kernels.push_back(Kernel::kImplicitGemmAmx);
    }
    if (bf16_core) {
      kernels.push_back(Kernel::kImplicitGemmBf16);
    }
    kernels.push_back(Kernel::kImplicitGemm);
  }
  return kernels;
}

// Tiles (Winograd) or output pixels (implicit GEMM) per work item. Small blocks keep a block's data in L2; large
// ones read the packed weight fewer times, which pays once it no longer fits in cache.
constexpr int64_t kBlockCandidates[] = {12, 48, 192};
constexpr int64_t kSplitChannelsBlockCandidates[] = {48, 192};
// The fp32 implicit GEMM's timing offers the channel split only where the pixel split would leave
// each thread fewer output pixels than this. WHY: timed alone, the channel split won resnet50's
// layer3 1x1 convs (196 pixels at batch 1), but inside a forward each thread then reads every
// channel of its input, half of them written by the other core, where with pixels split it reads
// its own pixels, which it wrote (per conv inside forwards, Intel Xeon with AVX-512, 2 threads:
// 0.33-0.35 -> 0.28-0.29 ms). Whole fp32 models, alternating processes after idle: resnet50 batch
// 1 1.011-1.022x (three runs), batch 8 1.03-1.04x, resnet18 batch 1 1.00x. Not applied to the bf16
// kernels: there AMX measured 0.98-1.02x, the AVX512-BF16 core 0.98-1.02x (noise).
constexpr int64_t kSplitChannelsBelowPixels = 64;

int64_t default_block(const at::Tensor& packed) {
  return packed.nbytes() > (8 << 20) ? 192 : 48;
}

struct Choice {
  Kernel kernel = Kernel::kDirect;
  int64_t block = 0;
  bool brgemm = false;          // the GEMMs on oneDNN's brgemm
  bool split_channels = false;  // implicit GEMM: the threads share output channels, not pixels
};

// The GEMM core of `choice`'s fp32 GEMMs: brgemm where chosen, else our widest micro-kernel the
// CPU and RESNET_FUSED_CPU_ISA (`cap`) allow (the two compute bit-identical results).
Fp32Core fp32_core(const Choice& choice, IsaCap cap) {
  if (choice.brgemm) {
    return Fp32Core::kBrgemm;
  }
  return avx512_fp32::cpu_has_avx512() && cap != IsaCap::kAvx2 ? Fp32Core::kAvx512 : Fp32Core::kAvx2;
}

// A conv call's key in the per-shape choices, and the choice's fields after it: the columns of
// cpu_conv_choice_table()'s rows, named by cpu_conv_choice_fields() (a saved tuning file names
// its values by them: resnet_fused/tuning.py). The switches that narrow the candidates
// (`only_kernel` from the Winograd tile, the GEMM core, the thread split, the ISA cap) are part
// of the key, so a change of them is obeyed (they are read on every call) rather than answered
// with a choice made under the old ones.
constexpr const char* kKeyFields[] = {
    "batch",    "in_channels", "height",      "width",             "out_channels",         "kernel_h",
    "kernel_w", "stride_h",    "stride_w",    "padding_h",         "padding_w",            "threads",
    "only_kernel", "gemm_core_setting", "thread_split_setting", "isa_cap", "dtype", "residual"};
constexpr const char* kChoiceFields[] = {"kernel", "block", "brgemm", "split_channels"};
constexpr size_t kKeySize = std::size(kKeyFields);
constexpr size_t kRowSize = kKeySize + std::size(kChoiceFields);
enum KeyField : size_t { kBatch, kInChannels, kHeight, kWidth, kOutChannels, kKernelH, kKernelW, kStrideH, kStrideW,
                         kPaddingH, kPaddingW, kThreads, kOnlyKernel, kGemmCoreSetting, kThreadSplitSetting,
                         kIsaCap, kDtype, kResidual };
static_assert(kResidual + 1 == kKeySize, "a name for every field of the key");

using ShapeKey = std::array<int64_t, kKeySize>;

struct ShapeKeyHash {
  size_t operator()(const ShapeKey& key) const {
    size_t h = 0;
    for (int64_t v : key) {
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    }
    return h;
  }
};

// Index of the fastest of `candidates`: each run once to warm up (first touch of buffers, oneDNN
// primitive creation, weight packing), then timed round-robin, best of kTimedRounds each, with
// `before_each` run (untimed) before every timed run.
// WHY round-robin: this VM's speed drifts; timing one candidate after another let a slow moment
// decide a layer's kernel for the life of the process (whole-model times moved by up to 8%).
constexpr int kTimedRounds = 3;

size_t fastest(const std::vector<std::function<void()>>& candidates, const std::function<void()>& before_each) {
  for (const auto& run : candidates) {
    run();
  }
  std::vector<double> best(candidates.size(), 1e30);
  for (int round = 0; round < kTimedRounds; ++round) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      before_each();
      const auto start = std::chrono::steady_clock::now();
      candidates[i]();
      best[i] = std::min(best[i], std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
  }
  return static_cast<size_t>(std::min_element(best.begin(), best.end()) - best.begin());
}

// Weight re-laid out once per weight for our kernels (weight_cache.h), keyed by the kernel.
WeightCache& own_kernel_weights() {
  static auto* cache = new WeightCache();  // never destroyed, like onednn_weights()
  return *cache;
}

// Writes back and drops `t`'s storage (all of it, whatever part `t` views) from every cache level.
void evict_from_caches(const at::Tensor& t) {
#if RF_HAVE_X86
  if (!t.has_storage() || t.storage().data() == nullptr) {
    return;
  }
  const char* begin = static_cast<const char*>(t.storage().data());
  const char* end = begin + t.storage().nbytes();
  for (const char* line = begin; line < end; line += 64) {
    _mm_clflush(line);
  }
  _mm_mfence();
#else
  (void)t;  // elsewhere the timing runs with whatever the caches hold
#endif
}

// The weight and every copy derived from it, evicted before each timed run: in a model, a layer's
// weight was last read a whole forward pass ago and a ResNet's weights (47 MB for resnet18, 100 MB
// for resnet50, more with Winograd's copies) exceed the last-level cache, so every conv reads its
// weight from DRAM. Timed hot (the call repeated), kernels that re-read a large weight looked
// fast: at batch 1, 14x14 and 7x7 maps, where the weight outweighs the activations, the timed
// choices ran 5-50% slower in the model than when timed. The input stays cached, as in a model,
// where the previous layer has just written it.
void evict_weight(const at::Tensor& weight) {
  evict_from_caches(weight);
  for (WeightCache* cache : {&onednn_weights(), &own_kernel_weights()}) {
    for (const at::Tensor& value : cache->values(weight)) {
      evict_from_caches(value);
    }
  }
}

at::Tensor packed_weight(const at::Tensor& weight, Kernel kernel) {
  const int64_t key[] = {static_cast<int64_t>(kernel)};
  switch (kernel) {
    case Kernel::kWinograd2:
      return own_kernel_weights().get(weight, key, [](const at::Tensor& w) { return winograd::transform_weight(w, 2); });
    case Kernel::kWinograd4:
      return own_kernel_weights().get(weight, key, [](const at::Tensor& w) { return winograd::transform_weight(w, 4); });
    case Kernel::kImplicitGemmBf16:
      return own_kernel_weights().get(weight, key, implicit_gemm::pack_weight_bf16);
    case Kernel::kImplicitGemmAmx:
      return own_kernel_weights().get(weight, key, implicit_gemm::pack_weight_amx);
    case Kernel::kWinograd2Bf16:
      return own_kernel_weights().get(weight, key, winograd::transform_weight_bf16);
    default:
      return own_kernel_weights().get(weight, key, implicit_gemm::pack_weight);
  }
}

// A bf16 / fp16 call computed in fp32: `compute` gets fp32 copies of x, bias and residual, and its
// fp32 result is rounded once to x's dtype (after bias, residual and ReLU, as eager rounds its
// conv's fp32 sums). The activation copies come from the output pool: fresh ones page-faulted
// (resnet50 bf16 batch 8: 12.5k faults per forward; output_pool.h).
template <typename Compute>
at::Tensor computed_in_fp32(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, Compute&& compute) {
  const auto widened = [](const at::Tensor& t) {
    return pooled_empty_channels_last(t.sizes(), t.options().dtype(at::kFloat)).copy_(t);
  };
  std::optional<at::Tensor> bias32, residual32;
  if (bias.has_value()) {
    bias32 = bias->to(at::kFloat);
  }
  if (residual.has_value()) {
    residual32 = widened(*residual);
  }
  return compute(widened(x), bias32, residual32).to(x.scalar_type());
}

// Also the profiler's name for a call of the kernel (conv_own), under resnet_fused::conv_bias_act.
const char* kernel_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::kWinograd2:
      return "winograd_f2x2";
    case Kernel::kWinograd4:
      return "winograd_f4x4";
    case Kernel::kImplicitGemm:
      return "implicit_gemm";
    case Kernel::kImplicitGemmBf16:
      return "implicit_gemm_bf16";
    case Kernel::kImplicitGemmAmx:
      return "implicit_gemm_amx";
    case Kernel::kWinograd2Bf16:
      return "winograd_f2x2_bf16";
    default:
      return "direct";
  }
}

// Whether `choice`'s kernel can write its output over the residual: each output element is stored
// once, after its residual element is read, by the thread that read it. True of the AMX tiles and
// the AVX-512 cores (the whole reduction in registers, the epilogue in the store); not of the AVX2
// core (partial sums parked in the output), brgemm (raw sums stored before the epilogue), Winograd
// (a call redone by the implicit GEMM where a NaN reached the outputs), nor of low-precision inputs
// on fp32 kernels (computed in a converted copy).
bool stores_after_reading_residual(const Choice& choice, IsaCap cap, const at::Tensor& x) {
  switch (choice.kernel) {
    case Kernel::kImplicitGemmAmx:
    case Kernel::kImplicitGemmBf16:
      return true;
    case Kernel::kImplicitGemm:
      return !is_low_precision(x) && fp32_core(choice, cap) == Fp32Core::kAvx512;
    default:
      return false;
  }
}

// The profiler's name for a call of `kernel` (one of stores_after_reading_residual's) writing over
// its residual.
const char* over_residual_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::kImplicitGemmAmx:
      return "implicit_gemm_amx_over_residual";
    case Kernel::kImplicitGemmBf16:
      return "implicit_gemm_bf16_over_residual";
    default:
      return "implicit_gemm_over_residual";
  }
}

at::Tensor conv_own(
    const Choice& choice,
    IsaCap cap,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const std::optional<at::Tensor>& residual,
    bool relu,
    const std::array<int64_t, 4>& out_sizes,
    bool over_residual = false) {
  constexpr auto cl = c10::MemoryFormat::ChannelsLast;
  if (is_low_precision(x) && !on_bf16_core(choice.kernel)) {  // fp32 kernels; the weight packed to fp32 once, cached
    return computed_in_fp32(x, bias, residual, [&](const at::Tensor& x32, const std::optional<at::Tensor>& bias32,
                                                   const std::optional<at::Tensor>& residual32) {
      return conv_own(choice, cap, x32, weight, bias32, stride, padding, residual32, relu, out_sizes);
    });
  }
  // Recorded here, once per kernel run (the converted call above recurses).
  RECORD_FUNCTION(over_residual ? over_residual_name(choice.kernel) : kernel_name(choice.kernel),
                  std::vector<c10::IValue>());
  const at::Tensor packed = packed_weight(weight, choice.kernel);
  // over_residual: the output written over the residual (see shortcut_is_dead).
  TORCH_INTERNAL_ASSERT(!over_residual || stores_after_reading_residual(choice, cap, x));
  at::Tensor out = over_residual ? *residual : pooled_empty_channels_last(out_sizes, x.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::zeros({out_sizes[1]}, x.options());
  std::optional<at::Tensor> r;
  if (residual.has_value()) {
    r = residual->contiguous(cl);
  }
  const Fp32Core core = fp32_core(choice, cap);
  if (choice.kernel == Kernel::kImplicitGemmAmx) {
    implicit_gemm::conv_amx(x.contiguous(cl), packed, weight.sizes().slice(2), b, r, relu, stride, padding, out,
                            choice.block, choice.split_channels);
  } else if (is_implicit_gemm(choice.kernel)) {
    implicit_gemm::conv(x.contiguous(cl), packed, weight.sizes().slice(2), b, r, relu, stride, padding, out,
                        choice.block, choice.split_channels, core);
  } else if (!winograd::conv(x.contiguous(cl), packed, b, r, relu, out, choice.block, core)) {
    // An Inf or NaN reached the outputs, where Winograd's NaNs are not the convolution's (winograd.h):
    // the call is redone by the implicit GEMM (on the same core), whose sums give eager's. Only
    // corrupted inputs pay.
    const Kernel igemm = on_bf16_core(choice.kernel) ? Kernel::kImplicitGemmBf16 : Kernel::kImplicitGemm;
    return conv_own(Choice{igemm, default_block(packed_weight(weight, igemm))}, cap, x, weight, bias, stride,
                    padding, residual, relu, out_sizes);
  }
  return out;
}

// The direct convolution's path for x's dtype: oneDNN's, oneDNN's fp32 one on widened bf16 / fp16
// (where this CPU has no oneDNN kernels for them, but has fp32 ones), or ATen's.
enum class DirectPath { kOneDnn, kOneDnnInFp32, kAten };

DirectPath direct_path(const at::Tensor& x) {
  if (use_onednn(x.scalar_type())) {
    return DirectPath::kOneDnn;
  }
  return is_low_precision(x) && use_onednn(at::kFloat) ? DirectPath::kOneDnnInFp32 : DirectPath::kAten;
}

// Key of the fp32 copy of a bf16 / fp16 weight in own_kernel_weights() (the others are Kernel values).
constexpr int64_t kFp32WeightKey = -1;

at::Tensor conv_direct(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    int64_t groups,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format) {
  const DirectPath path = x.numel() > 0 ? direct_path(x) : DirectPath::kAten;
  if (path == DirectPath::kOneDnn) {
    return conv_onednn(x, weight, bias, stride, padding, groups, residual, relu, format);
  }
  if (path == DirectPath::kOneDnnInFp32) {
    // WHY: without AVX512-BF16 / AMX / AVX512-FP16 ATen's bf16 and fp16 convolutions are a slow
    // generic path (a whole bf16 resnet18: 235 ms against 25 ms in fp32); the convs our kernels
    // do not take (grouped, output channels not a multiple of 16, or ours switched off) go to
    // oneDNN's fp32 one instead. The fp32 weight is made once per weight and cached.
    const int64_t key[] = {kFp32WeightKey};
    const at::Tensor weight32 = own_kernel_weights().get(weight, key, [](const at::Tensor& w) { return w.to(at::kFloat); });
    return computed_in_fp32(x, bias, residual, [&](const at::Tensor& x32, const std::optional<at::Tensor>& bias32,
                                                   const std::optional<at::Tensor>& residual32) {
      return conv_onednn(x32, weight32, bias32, stride, padding, groups, residual32, relu, format);
    });
  }
  // The bias goes into the convolution: ATen's CPU convolutions add it while accumulating, at no
  // cost and before the output is rounded to a low-precision dtype (as eager does).
  at::Tensor out = at::convolution(x, weight, bias, stride, padding, {1, 1}, false, {0, 0}, groups).contiguous(format);
  conv_epilogue_with(epilogue_cpu, out, std::nullopt, residual, relu, format);
  return out;
}

// The choices made by timing, per shape, for the life of the process, and those loaded from a
// tuning file (cpu_conv_load_choices), which are checked against the call's candidates on first
// use: a file made on another CPU or by another version may name a kernel this call cannot run.
struct TimedChoice {
  Choice choice;
  bool checked = true;
};

struct TimedChoices {
  std::mutex mutex;
  std::unordered_map<ShapeKey, TimedChoice, ShapeKeyHash> choices;
};

TimedChoices& timed_choices() {
  static auto* timed = new TimedChoices();  // never destroyed, like the weight caches
  return *timed;
}

// Whether the direct convolution is one of the candidates for x's dtype. For bf16/fp16 only where
// oneDNN runs that dtype: elsewhere it is ATen's slow fallback or oneDNN's fp32 conv with the
// conversions ours pays too, plus an fp32 copy of the weight (conv_direct) kept for the process.
// ATen's fallback took a whole bf16 resnet18 235 ms against 25 ms on ours (AVX2 EPYC, 2 threads),
// and its timed runs took a bf16 resnet50's first batch-8 call from 6 to 15 s.
bool direct_is_candidate(const at::Tensor& x) {
  return !is_low_precision(x) || use_onednn(x.scalar_type());
}

// Whether `choice` is one that timing could have made for this call: a loaded one may not be.
bool is_candidate(const Choice& choice, const std::vector<Kernel>& kernels, const at::Tensor& x,
                  const at::Tensor& weight) {
  if (choice.kernel == Kernel::kDirect) {
    return direct_is_candidate(x);
  }
  return std::find(kernels.begin(), kernels.end(), choice.kernel) != kernels.end() && choice.block >= 1 &&
         !(choice.brgemm && on_bf16_core(choice.kernel)) &&
         !(choice.split_channels &&
           !(is_implicit_gemm(choice.kernel) &&
             implicit_gemm::can_split_channels(weight.size(0), at::get_num_threads())));
}

// The kernel and block for this call: forced by the environment (`mode` from env_switch), else
// timed once per shape.
Choice choose(
    int mode,
    IsaCap cap,
    const std::vector<Kernel>& kernels,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format,
    const std::array<int64_t, 4>& out_sizes) {
  const GemmCore core = gemm_core_setting();
  const ThreadSplit split = thread_split_setting();
  if (mode >= 0) {
    if (mode == 0) {
      return Choice{};
    }
    const Kernel kernel = kernels.front();
    return Choice{kernel, default_block(packed_weight(weight, kernel)), on_brgemm(core, kernel),
                  is_implicit_gemm(kernel) && split == ThreadSplit::kChannels};
  }
  TimedChoices& timed = timed_choices();
  const ShapeKey key{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3),
                     stride[0], stride[1], padding[0], padding[1], at::get_num_threads(),
                     kernels.size() == 1 ? static_cast<int64_t>(kernels.front()) : -1, static_cast<int64_t>(core),
                     static_cast<int64_t>(split), static_cast<int64_t>(cap),
                     static_cast<int64_t>(x.scalar_type()), residual.has_value()};
  {
    std::lock_guard<std::mutex> lock(timed.mutex);
    auto it = timed.choices.find(key);
    if (it != timed.choices.end()) {
      if (it->second.checked || is_candidate(it->second.choice, kernels, x, weight)) {
        it->second.checked = true;
        return it->second.choice;
      }
      timed.choices.erase(it);  // a loaded choice this call cannot run: timed instead
    }
  }
  // The direct convolution (where it is a candidate), then each of our kernels at each block size.
  std::vector<Choice> options;
  std::vector<std::function<void()>> candidates;
  if (direct_is_candidate(x)) {
    options.push_back(Choice{});
    candidates.push_back([&] { conv_direct(x, weight, bias, stride, padding, 1, residual, relu, format); });
  }
  auto run = [&](Choice c) {
    return [&, c] {
      conv_own(c, cap, x, weight, bias, stride, padding, residual, relu, out_sizes).contiguous(format);
    };
  };
  for (Kernel kernel : kernels) {
    const bool igemm = is_implicit_gemm(kernel);
    const bool by_pixels = !igemm || split != ThreadSplit::kChannels;
    const int64_t threads = at::get_num_threads();
    const bool channels_worth_timing =
        kernel != Kernel::kImplicitGemm || out_sizes[0] * out_sizes[2] * out_sizes[3] < kSplitChannelsBelowPixels * threads;
    const bool by_channels = igemm && (split == ThreadSplit::kChannels ||
                                       (split == ThreadSplit::kAuto && channels_worth_timing &&
                                        implicit_gemm::can_split_channels(weight.size(0), threads)));
    if (by_pixels) {
      for (int64_t block : kBlockCandidates) {
        options.push_back(Choice{kernel, block, on_brgemm(core, kernel)});
        candidates.push_back(run(options.back()));
      }
    }
    if (by_channels) {
      // Channels split between the threads: each reads its share of the weight once. Small
      // blocks would re-read that share once per block.
      for (int64_t block : kSplitChannelsBlockCandidates) {
        options.push_back(Choice{kernel, block, on_brgemm(core, kernel), true});
        candidates.push_back(run(options.back()));
      }
    }
  }
  const auto evict = [&] { evict_weight(weight); };
  Choice best = options[fastest(candidates, evict)];
  if (core == GemmCore::kAuto && times_gemm_core(best.kernel)) {
    // The GEMM core is timed for the chosen kernel and block only: the two cores compute the same
    // GEMMs, so what favours one kernel or block favours it on either core.
    Choice with_brgemm = best;
    with_brgemm.brgemm = true;
    if (fastest({run(best), run(with_brgemm)}, evict) == 1) {
      best = with_brgemm;
    }
  }
  // The losers' packed weights are dropped: an F(4x4) copy of a 3x3 weight is 4x its size.
  for (Kernel kernel : kernels) {
    if (kernel != best.kernel) {
      const int64_t packed_key[] = {static_cast<int64_t>(kernel)};
      own_kernel_weights().erase(weight, packed_key);
    }
  }
  std::lock_guard<std::mutex> lock(timed.mutex);
  timed.choices.insert_or_assign(key, TimedChoice{best});
  return best;
}

at::Tensor conv_bias_act_cpu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    int64_t groups,
    const std::optional<at::Tensor>& residual,
    bool relu) {
  const auto out_sizes = check_conv_args(x, weight, bias, stride, padding, groups, residual);
  const auto format = conv_output_format(x, weight);
  // Taken at once, so that no conv this one runs (timing candidates) sees it.
  const bool shortcut_dead = std::exchange(shortcut_is_dead(), false);
  const IsaCap cap = own_isa_cap();  // read (and checked) once per call, whatever the dtype
  const std::vector<Kernel> kernels = own_kernels(x, weight, stride, padding, groups, cap);
  const int mode = kernels.empty() ? 0 : env_switch(kAvx2ConvEnv);  // read once per call
  if (x.numel() > 0 && mode != 0) {
    const Choice choice =
        choose(mode, cap, kernels, x, weight, bias, stride, padding, residual, relu, format, out_sizes);
    if (choice.kernel != Kernel::kDirect) {
      const bool over_residual = shortcut_dead && stores_after_reading_residual(choice, cap, x) &&
                                 residual->is_contiguous(c10::MemoryFormat::ChannelsLast) &&
                                 !residual->is_alias_of(x);
      return conv_own(choice, cap, x, weight, bias, stride, padding, residual, relu, out_sizes, over_residual)
          .contiguous(format);
    }
  }
  return conv_direct(x, weight, bias, stride, padding, groups, residual, relu, format);
}

// What the pooling kernels of ours take: a non-empty dense channels_last x of float, bf16 or fp16.
bool pooled_by_own_kernel(const at::Tensor& x) {
  return x.numel() > 0 && x.scalar_type() != at::kDouble && x.is_contiguous(c10::MemoryFormat::ChannelsLast) &&
         x.suggest_memory_format() == c10::MemoryFormat::ChannelsLast;
}

at::Tensor max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding) {
  const auto out_sizes = check_pool_args(x, kernel_size, stride, padding);
  if (!pooled_by_own_kernel(x) || !can_max_pool2d_channels_last()) {
    return at::max_pool2d(x, kernel_size, stride, padding);  // ATen's, for what ours does not take
  }
  at::Tensor out = pooled_empty_channels_last(out_sizes, x.options());
  max_pool2d_channels_last(x, kernel_size, stride, padding, out);
  return out;
}

at::Tensor global_avg_pool_cpu(const at::Tensor& x) {
  check_global_pool_args(x);
  if (!pooled_by_own_kernel(x) || !can_run_head_kernels()) {
    return global_avg_pool_aten(x);  // NCHW planes: ATen's reduction reads them contiguously
  }
  at::Tensor out = at::empty({x.size(0), x.size(1), 1, 1}, x.options());
  global_avg_pool_channels_last(x, out);
  return out;
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_args(x, weight, bias);
  if (x.size(0) == 0 || x.size(0) > linear_rows_limit(x.scalar_type()) || x.scalar_type() == at::kDouble ||
      !can_run_head_kernels() || !weight.is_contiguous()) {
    return at::linear(x, weight, bias);
  }
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  linear_rows(x.contiguous(), weight, bias.has_value() ? bias->contiguous() : at::Tensor(), out);
  return out;
}

at::Tensor bias_act_cpu(const at::Tensor& x, const at::Tensor& bias, bool relu) {
  return bias_act_with(epilogue_cpu, x, bias, relu);
}

at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual) {
  return add_relu_with(epilogue_cpu, x, residual);
}

}  // namespace

namespace {

// The keys of the choices made or loaded so far, in order (the caller holds timed.mutex).
std::vector<ShapeKey> sorted_keys(const TimedChoices& timed) {
  std::vector<ShapeKey> keys;
  for (const auto& entry : timed.choices) {
    keys.push_back(entry.first);
  }
  std::sort(keys.begin(), keys.end());
  return keys;
}

}  // namespace

std::vector<std::string> cpu_conv_choices() {
  TimedChoices& timed = timed_choices();
  std::lock_guard<std::mutex> lock(timed.mutex);
  std::vector<std::string> lines;
  for (const ShapeKey& v : sorted_keys(timed)) {
    const Choice& choice = timed.choices.at(v).choice;
    std::ostringstream line;
    line << "x " << v[kBatch] << "x" << v[kInChannels] << "x" << v[kHeight] << "x" << v[kWidth] << ", weight "
         << v[kOutChannels] << "x" << v[kInChannels] << "x" << v[kKernelH] << "x" << v[kKernelW] << ", stride "
         << v[kStrideH] << ", padding " << v[kPaddingH] << (v[kResidual] ? ", residual" : "") << ", "
         << c10::toString(static_cast<at::ScalarType>(v[kDtype])) << ", " << v[kThreads]
         << " threads: " << kernel_name(choice.kernel);
    if (choice.kernel != Kernel::kDirect) {
      line << " block " << choice.block << (choice.brgemm ? " brgemm" : "")
           << (choice.split_channels ? " split channels" : "");
    }
    lines.push_back(line.str());
  }
  return lines;
}

std::vector<std::string> cpu_conv_choice_fields() {
  std::vector<std::string> fields(std::begin(kKeyFields), std::end(kKeyFields));
  fields.insert(fields.end(), std::begin(kChoiceFields), std::end(kChoiceFields));
  return fields;
}

std::vector<int64_t> cpu_conv_choice_table() {
  TimedChoices& timed = timed_choices();
  std::lock_guard<std::mutex> lock(timed.mutex);
  std::vector<int64_t> table;
  for (const ShapeKey& key : sorted_keys(timed)) {
    const Choice& c = timed.choices.at(key).choice;
    table.insert(table.end(), key.begin(), key.end());
    table.insert(table.end(), {static_cast<int64_t>(c.kernel), c.block, c.brgemm, c.split_channels});
  }
  return table;
}

namespace {

// Row `row`'s field `field` checked to lie in [low, high] (a corrupted or hand-edited file).
int64_t table_value(const std::vector<int64_t>& table, size_t row, size_t field, int64_t low, int64_t high) {
  const int64_t value = table[row * kRowSize + field];
  const char* name = field < kKeySize ? kKeyFields[field] : kChoiceFields[field - kKeySize];
  TORCH_CHECK(value >= low && value <= high, "resnet_fused: conv choice ", row, ": ", name, " must be in [", low, ", ",
              high, "], got ", value);
  return value;
}

}  // namespace

int64_t cpu_conv_load_choices(const std::vector<int64_t>& table, bool replace) {
  TORCH_CHECK(table.size() % kRowSize == 0, "resnet_fused: a conv choice table holds rows of ", kRowSize,
              " values (cpu_conv_choice_fields()), got ", table.size(), " values");
  constexpr int64_t kBig = int64_t{1} << 40;
  const size_t rows = table.size() / kRowSize;
  std::vector<std::pair<ShapeKey, Choice>> loaded;
  for (size_t row = 0; row < rows; ++row) {  // all checked before any is loaded
    ShapeKey key;
    for (size_t field = 0; field < kKeySize; ++field) {
      int64_t low = 1, high = kBig;
      switch (field) {
        case kPaddingH: case kPaddingW: low = 0; break;
        case kOnlyKernel: low = -1; high = static_cast<int64_t>(kLastKernel); break;
        case kGemmCoreSetting: case kThreadSplitSetting: low = 0; high = 2; break;
        case kIsaCap: low = 0; high = static_cast<int64_t>(IsaCap::kAvx512); break;
        case kResidual: low = 0; high = 1; break;
        default: break;
      }
      key[field] = table_value(table, row, field, low, high);
    }
    const auto dtype = static_cast<at::ScalarType>(key[kDtype]);
    TORCH_CHECK(key[kDtype] < static_cast<int64_t>(at::ScalarType::NumOptions) &&
                    (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf),
                "resnet_fused: conv choice ", row, ": dtype must be Float, BFloat16 or Half (c10::ScalarType ",
                static_cast<int>(at::kFloat), ", ", static_cast<int>(at::kBFloat16), " or ",
                static_cast<int>(at::kHalf), "), got ", key[kDtype]);
    Choice choice;
    choice.kernel = static_cast<Kernel>(table_value(table, row, kKeySize, 0, static_cast<int64_t>(kLastKernel)));
    choice.block = table_value(table, row, kKeySize + 1, choice.kernel == Kernel::kDirect ? 0 : 1, kBig);
    choice.brgemm = table_value(table, row, kKeySize + 2, 0, 1) != 0;
    choice.split_channels = table_value(table, row, kKeySize + 3, 0, 1) != 0;
    loaded.emplace_back(key, choice);
  }
  TimedChoices& timed = timed_choices();
  std::lock_guard<std::mutex> lock(timed.mutex);
  if (replace) {
    timed.choices.clear();
  }
  for (const auto& [key, choice] : loaded) {
    timed.choices.insert_or_assign(key, TimedChoice{choice, false});
  }
  return static_cast<int64_t>(rows);
}

void cpu_conv_clear_choices() {
  TimedChoices& timed = timed_choices();
  std::lock_guard<std::mutex> lock(timed.mutex);
  timed.choices.clear();
}

int64_t cpu_items_taken_over() {
  return items_taken_over().load();
}

int64_t cpu_weight_cache_size() {
  return static_cast<int64_t>(onednn_weights().size() + own_kernel_weights().size());
}
}  // namespace resnet_fused

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bias_act", &resnet_fused::conv_bias_act_cpu);
  m.impl("bias_act", &resnet_fused::bias_act_cpu);
  m.impl("add_relu", &resnet_fused::add_relu_cpu);
  m.impl("max_pool2d", &resnet_fused::max_pool2d_cpu);
  m.impl("global_avg_pool", &resnet_fused::global_avg_pool_cpu);
  m.impl("linear", &resnet_fused::linear_cpu);
}
