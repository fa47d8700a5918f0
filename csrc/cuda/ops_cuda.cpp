// CUDA kernels: conv_bias_act through cuDNN (one fused cuDNN call, or cuDNN's convolution + our
// epilogue kernel, chosen per conv signature), and the epilogue ops. Host code only, so nvcc
// compiles just the kernels.

#include "../common.h"
#include "fused_conv_graph.h"
#include "epilogue_cuda.h"
#include "timing_cuda.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/cudnn_convolution_add_relu.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/max_pool2d.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/hash.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace resnet_fused {
namespace {

void epilogue_cuda(
    const at::Tensor& out,
    const at::Tensor& in,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous(format) && in.is_contiguous(format));
  TORCH_INTERNAL_ASSERT(!residual.has_value() || residual->is_contiguous(format));
  TORCH_INTERNAL_ASSERT(!bias.has_value() || bias->is_contiguous());
  if (out.numel() == 0) {
    return;  // an empty grid is a launch error
  }
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "resnet_fused_epilogue_cuda", [&] {
    const EpilogueArgs<scalar_t> args{
        out.data_ptr<scalar_t>(),
        in.const_data_ptr<scalar_t>(),
        bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
        residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr,
        out.size(0),
        out.size(1),
        out.size(2) * out.size(3),
        format == c10::MemoryFormat::ChannelsLast,
        relu};
    launch_epilogue(args, stream);
  });
}

constexpr const char* kCudnnFusedEnv = "RESNET_FUSED_CUDNN_FUSED";

bool allow_tf32_conv() {
  // Asked for conv alone: the query without an op raises once a user has set conv's and RNN's
  // fp32 precision differently (torch.backends.cudnn.conv.fp32_precision).
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
}

// Whether one cuDNN call can compute this conv. With our own graph (fused_conv_graph.cpp) that is any
// conv with an epilogue; without it only at::cudnn_convolution_add_relu remains, which needs the
// residual and the ReLU (its sibling at::cudnn_convolution_relu is never used: it adds its own
// uninitialised output scaled by 0, and 0 * NaN left in recycled memory is NaN). Never for
// float64, and never overriding the user's cuDNN or determinism settings (the fused engines may
// be non-deterministic).
bool cudnn_fused_applies(const at::Tensor& x, bool has_bias, bool has_residual, bool relu) {
  const auto& ctx = at::globalContext();
  if (x.numel() == 0 || x.scalar_type() == at::kDouble || !at::detail::getCUDAHooks().compiledWithCuDNN() ||
      !ctx.userEnabledCuDNN() || ctx.deterministicCuDNN() || ctx.deterministicAlgorithms()) {
    return false;
  }
  return cudnn_graph_unavailable().empty() ? (has_bias || has_residual || relu) : (has_residual && relu);
}

// The guess used only where the choice cannot be timed (first seen during CUDA graph capture,
// where synchronising is illegal): cuDNN's runtime-fusion engines are tensor-core kernels made
// for NHWC half/bfloat16 with channel counts that are multiples of 8 (every ResNet conv but the
// stem).
bool cudnn_fused_preferred(const at::Tensor& x, const at::Tensor& weight, int64_t groups, c10::MemoryFormat format) {
  const auto dtype = x.scalar_type();
  return (dtype == at::kHalf || dtype == at::kBFloat16) && format == c10::MemoryFormat::ChannelsLast &&
      groups == 1 && x.size(1) % 8 == 0 && weight.size(0) % 8 == 0;
}

// What is known about the fused path for one conv signature: nothing yet, timed faster or slower
// than convolution + epilogue, or failed (cuDNN has no engine for it: never retried).
enum class Fused : int8_t { kUnknown, kFaster, kSlower, kFailed };

using ChoiceKey = std::vector<int64_t>;

struct ChoiceKeyHash {
  size_t operator()(const ChoiceKey& key) const {
    return c10::get_hash(key);
  }
};

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Alignment is part of the signature: cuDNN may have an engine for aligned data only, and a
// misaligned view must not make the aligned calls of the same shape give up the fused path.
ChoiceKey choice_key(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    int64_t groups,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format) {
  const bool all_aligned = aligned16(x) && aligned16(weight) && (!bias.has_value() || aligned16(*bias)) &&
      (!residual.has_value() || aligned16(*residual));
  ChoiceKey key{x.get_device(), static_cast<int64_t>(x.scalar_type()), static_cast<int64_t>(format), groups,
                bias.has_value(), residual.has_value(), relu, x.scalar_type() == at::kFloat && allow_tf32_conv(),
                all_aligned};
  key.insert(key.end(), x.sizes().begin(), x.sizes().end());
  key.insert(key.end(), weight.sizes().begin(), weight.sizes().end());
  key.insert(key.end(), stride.begin(), stride.end());
  key.insert(key.end(), padding.begin(), padding.end());
  return key;
}

// Shared by every thread: a key that failed in one thread is not retried in another.
class FusedChoices {
 public:
  Fused get(const ChoiceKey& key) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = choices_.find(key);
    return found == choices_.end() ? Fused::kUnknown : found->second;
  }
  void set(const ChoiceKey& key, Fused choice) {
    const std::lock_guard<std::mutex> lock(mutex_);
    choices_[key] = choice;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<ChoiceKey, Fused, ChoiceKeyHash> choices_;
};

FusedChoices& fused_choices() {
  static auto* choices = new FusedChoices();  // never destroyed: ops may run during exit
  return *choices;
}

// A timing event (ATen's CUDAEvent header needs the cuSPARSE/cuBLAS headers, which a minimal CUDA
// toolkit lacks).
at::Tensor conv_then_epilogue(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    int64_t groups,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format) {
  // The bias rides in the epilogue rather than in at::convolution, whose cuDNN path adds it in a
  // separate pass over the output: here it shares the pass that residual and ReLU need anyway.
  at::Tensor out =
      at::convolution(x, weight, std::nullopt, stride, padding, {1, 1}, false, {0, 0}, groups).contiguous(format);
  conv_epilogue_with(epilogue_cuda, out, bias, residual, relu, format);
  return out;
}

at::Tensor cudnn_fused(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    int64_t groups,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format,
    int64_t max_plans) {
  if (cudnn_graph_unavailable().empty()) {
    return cudnn_conv_bias_act_graph(x, weight, bias, stride, padding, residual, relu, allow_tf32_conv(), format,
                                     max_plans);
  }
  return at::cudnn_convolution_add_relu(x, weight, *residual, at::Scalar(1.0), bias, stride, padding, {1, 1}, groups)
      .contiguous(format);
}

// RESNET_FUSED_CUDNN_FUSED=1 takes the fused call wherever it applies, =0 never; unset or "auto"
// times it against convolution + epilogue on the first call of each conv signature (shape, dtype,
// layout, bias, residual, ReLU) and keeps the faster. A signature whose fused call fails (cuDNN has
// no engine for it) is remembered and goes straight to convolution + epilogue from then on.
at::Tensor conv_bias_act_cuda(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    int64_t groups,
    const std::optional<at::Tensor>& residual,
    bool relu) {
  check_conv_args(x, weight, bias, stride, padding, groups, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto format = conv_output_format(x, weight);
  auto unfused = [&] { return conv_then_epilogue(x, weight, bias, stride, padding, groups, residual, relu, format); };
  const int fused_switch = env_switch(kCudnnFusedEnv);
  if (fused_switch == 0 || !cudnn_fused_applies(x, bias.has_value(), residual.has_value(), relu)) {
    return unfused();
  }
  const int64_t max_plans = cudnn_plans_setting();  // outside the try below: a bad value raises
  auto fused = [&] { return cudnn_fused(x, weight, bias, stride, padding, groups, residual, relu, format, max_plans); };
  const ChoiceKey key = choice_key(x, weight, bias, stride, padding, groups, residual, relu, format);
  const Fused known = fused_choices().get(key);
  if (known == Fused::kFailed) {
    return unfused();
  }
  bool take_fused = fused_switch == 1 || known == Fused::kFaster;
  try {
    if (fused_switch != 1 && known == Fused::kUnknown) {
      if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
        take_fused = cudnn_fused_preferred(x, weight, groups, format);  // untimed, not remembered
      } else {
        const std::vector<float> ms = time_each({[&] { fused(); }, [&] { unfused(); }});
        take_fused = ms[0] <= ms[1];
        fused_choices().set(key, take_fused ? Fused::kFaster : Fused::kSlower);
      }
    }
    if (take_fused) {
      return fused();
    }
  } catch (const c10::OutOfMemoryError&) {
    throw;  // says nothing about the fused path
  } catch (const std::exception& e) {
    // cuDNN has no engine for some fused graphs (it depends on the cuDNN version and the GPU), and
    // reports it as c10::Error from ATen or as a std::runtime_error from its graph API.
    fused_choices().set(key, Fused::kFailed);
    TORCH_WARN_ONCE(
        "resnet_fused: cuDNN's fused conv failed, using convolution + epilogue for this and every later call of "
        "the same signature: ",
        e.what());
  }
  return unfused();
}

at::Tensor bias_act_cuda(const at::Tensor& x, const at::Tensor& bias, bool relu) {
  return bias_act_with(epilogue_cuda, x, bias, relu);
}

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& residual) {
  return add_relu_with(epilogue_cuda, x, residual);
}

// cuDNN's pool (through ATen) is already without the indices a backward would need.
at::Tensor max_pool2d_cuda(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding) {
  check_pool_args(x, kernel_size, stride, padding);
  return at::max_pool2d(x, kernel_size, stride, padding);
}

// The head is a sliver of a GPU forward: ATen's kernels.
at::Tensor global_avg_pool_cuda(const at::Tensor& x) {
  check_global_pool_args(x);
  return global_avg_pool_aten(x);
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_args(x, weight, bias);
  return at::linear(x, weight, bias);
}

}  // namespace
}  // namespace resnet_fused

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_act", &resnet_fused::conv_bias_act_cuda);
  m.impl("bias_act", &resnet_fused::bias_act_cuda);
  m.impl("add_relu", &resnet_fused::add_relu_cuda);
  m.impl("max_pool2d", &resnet_fused::max_pool2d_cuda);
  m.impl("global_avg_pool", &resnet_fused::global_avg_pool_cuda);
  m.impl("linear", &resnet_fused::linear_cuda);
}
