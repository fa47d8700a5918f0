#pragma once
// Shared by the CPU and CUDA backends so that both refuse the same inputs with the same messages,
// and agree with the Python fake kernels (resnet_fused/backends/extension.py) on output layouts.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <optional>

namespace resnet_fused {

// out = relu?(in + bias[channel] + residual). out, in and residual are dense in `format` with
// equal sizes; out may be in itself.
using EpilogueFn = void (*)(
    const at::Tensor& out,
    const at::Tensor& in,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format);

// The conv's output layout: channels_last when the input or the weight has channels_last strides,
// which is what cuDNN and oneDNN produce on their own, so enforcing it costs no copy.
inline c10::MemoryFormat conv_output_format(const at::Tensor& x, const at::Tensor& weight) {
  const bool channels_last = x.suggest_memory_format() == c10::MemoryFormat::ChannelsLast ||
      weight.suggest_memory_format() == c10::MemoryFormat::ChannelsLast;
  return channels_last ? c10::MemoryFormat::ChannelsLast : c10::MemoryFormat::Contiguous;
}

inline void check_floating_4d(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "resnet_fused: ", name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()),
      "resnet_fused: ", name, " must have a floating dtype, got ", t.scalar_type());
  TORCH_CHECK(t.layout() == c10::kStrided, "resnet_fused: ", name, " must be a strided (dense) tensor");
}

inline void check_like_x(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(
      t.device() == x.device(),
      "resnet_fused: ", name, " is on ", t.device(), " but x is on ", x.device(),
      "; all tensors must be on one device");
  TORCH_CHECK(
      t.scalar_type() == x.scalar_type(),
      "resnet_fused: ", name, " has dtype ", t.scalar_type(), " but x has ", x.scalar_type(),
      "; all tensors must share one dtype");
}

inline void check_bias(const at::Tensor& bias, const at::Tensor& x, int64_t channels) {
  check_like_x("bias", bias, x);
  TORCH_CHECK(
      bias.dim() == 1 && bias.size(0) == channels,
      "resnet_fused: bias must have shape (", channels, ",), got ", bias.sizes());
}

// Returns the (N, K, P, Q) output sizes.
inline std::array<int64_t, 4> check_conv_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    int64_t groups,
    const std::optional<at::Tensor>& residual) {
  check_floating_4d("x", x);
  check_floating_4d("weight", weight);
  check_like_x("weight", weight, x);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1,
              "resnet_fused: stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "resnet_fused: padding must be two non-negative ints, got ", padding);
  TORCH_CHECK(groups >= 1, "resnet_fused: groups must be positive, got ", groups);
  const int64_t k = weight.size(0);
  TORCH_CHECK(k % groups == 0,
              "resnet_fused: weight has ", k, " output channels, not divisible by groups=", groups);
  TORCH_CHECK(x.size(1) == weight.size(1) * groups,
              "resnet_fused: x has ", x.size(1), " channels but weight ", weight.sizes(), " with groups=",
              groups, " expects ", weight.size(1) * groups);
  if (bias.has_value()) {
    check_bias(*bias, x, k);
  }
  const int64_t p = (x.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
  const int64_t q = (x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  TORCH_CHECK(p >= 1 && q >= 1,
              "resnet_fused: x of spatial size ", x.sizes().slice(2), " is too small for a ",
              weight.size(2), "x", weight.size(3), " kernel with padding ", padding);
  const std::array<int64_t, 4> out{x.size(0), k, p, q};
  if (residual.has_value()) {
    check_floating_4d("residual", *residual);
    check_like_x("residual", *residual, x);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out),
                "resnet_fused: residual must have the output's shape ", at::IntArrayRef(out), ", got ",
                residual->sizes());
  }
  return out;
}

// max_pool2d's arguments (torch's rules: padding at most half the kernel, so every window holds
// an input pixel); returns the (N, C, P, Q) output sizes.
inline std::array<int64_t, 4> check_pool_args(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding) {
  check_floating_4d("x", x);
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1,
              "resnet_fused: kernel_size must be two positive ints, got ", kernel_size);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1,
              "resnet_fused: stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0 && 2 * padding[0] <= kernel_size[0] &&
                  2 * padding[1] <= kernel_size[1],
              "resnet_fused: padding must be non-negative and at most half of kernel_size ", kernel_size, ", got ",
              padding);
  const int64_t p = (x.size(2) + 2 * padding[0] - kernel_size[0]) / stride[0] + 1;
  const int64_t q = (x.size(3) + 2 * padding[1] - kernel_size[1]) / stride[1] + 1;
  TORCH_CHECK(p >= 1 && q >= 1, "resnet_fused: x of spatial size ", x.sizes().slice(2), " is too small for a ",
              kernel_size[0], "x", kernel_size[1], " window with padding ", padding);
  return {x.size(0), x.size(1), p, q};
}

// global_avg_pool's argument: a 4-D x with at least one pixel per channel.
inline void check_global_pool_args(const at::Tensor& x) {
  check_floating_4d("x", x);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "resnet_fused: global_avg_pool needs at least one pixel, got x of "
              "spatial size ", x.sizes().slice(2));
}

// ATen's global average pool, shaped like ours: (N, C, 1, 1), contiguous whatever x's layout.
inline at::Tensor global_avg_pool_aten(const at::Tensor& x) {
  return at::mean(x, {2, 3}).contiguous().view({x.size(0), x.size(1), 1, 1});
}

// linear's arguments: x (N, K), weight (J, K), bias (J,) or none, one device and dtype.
inline void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "resnet_fused: x must be 2-D (N, in_features), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "resnet_fused: x must have a floating dtype, got ", x.scalar_type());
  TORCH_CHECK(x.layout() == c10::kStrided && weight.layout() == c10::kStrided,
              "resnet_fused: x and weight must be strided (dense) tensors");
  check_like_x("weight", weight, x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "resnet_fused: weight must have shape (out_features, ",
              x.size(1), ") to match x of shape ", x.sizes(), ", got ", weight.sizes());
  if (bias.has_value()) {
    check_bias(*bias, x, weight.size(0));
  }
}

// Set by residual_blocks (one RAII scope, ShortcutIsDead) around a block's last conv when the
// shortcut it passes as the residual is a tensor the op made itself and reads no more: a
// projection's output or the previous block's. The CPU conv may then write its output over that
// residual where its kernel stores each output element after reading its residual element
// (conv_bias_act_cpu, stores_after_reading_residual).
// WHY: a 1x1 conv with residual at batch 8 reads the residual and fetches the lines of a fresh
// output before writing them; over the residual, its lines are fetched once, and a forward's
// activations take one tensor less of the L3 (oneDNN's sum post-op, which OpenVINO runs, does the
// same). Intel Xeon with AMX, 2 threads, bf16 models alternating in one process with and without:
// resnet50 batch 8 1.029x, batch 1 1.017x, resnet18 batch 8 1.022x, batch 1 1.025x; on the
// AVX-512 cores, resnet50 fp32 batch 8 1.026x, batch 1 1.012x, bf16 (AMX off) batch 8 1.035x. Never
// set for the stage's input, which belongs to the caller, nor where the shortcut is also the conv's
// input.
inline bool& shortcut_is_dead() {
  thread_local bool dead = false;
  return dead;
}

struct ShortcutIsDead {
  ShortcutIsDead() { shortcut_is_dead() = true; }
  ~ShortcutIsDead() { shortcut_is_dead() = false; }
  ShortcutIsDead(const ShortcutIsDead&) = delete;
  ShortcutIsDead& operator=(const ShortcutIsDead&) = delete;
};

// Reads an on/off switch from the environment on every call, so a benchmark can flip it between
// runs in one process. Returns -1 when unset or "auto" (the op decides), else 0 or 1.
inline int env_switch(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || value[0] == '\0' || std::strcmp(value, "auto") == 0) {
    return -1;
  }
  TORCH_CHECK(std::strcmp(value, "0") == 0 || std::strcmp(value, "1") == 0,
              "resnet_fused: ", name, " must be 0, 1 or auto, got '", value, "'");
  return value[0] == '1' ? 1 : 0;
}

// Out-of-place epilogues write a fresh tensor in the input's layout; inputs in any other layout
// (sliced or permuted views) are first copied dense, since the kernels walk dense memory.
inline at::Tensor bias_act_with(EpilogueFn epilogue, const at::Tensor& x, const at::Tensor& bias, bool relu) {
  check_floating_4d("x", x);
  check_bias(bias, x, x.size(1));
  const auto format = x.suggest_memory_format();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() > 0) {
    epilogue(out, x.contiguous(format), bias.contiguous(), std::nullopt, relu, format);
  }
  return out;
}

inline at::Tensor add_relu_with(EpilogueFn epilogue, const at::Tensor& x, const at::Tensor& residual) {
  check_floating_4d("x", x);
  check_floating_4d("residual", residual);
  check_like_x("residual", residual, x);
  TORCH_CHECK(residual.sizes() == x.sizes(),
              "resnet_fused: residual must have x's shape ", x.sizes(), ", got ", residual.sizes());
  const auto format = x.suggest_memory_format();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  if (out.numel() > 0) {
    epilogue(out, x.contiguous(format), std::nullopt, residual.contiguous(format), true, format);
  }
  return out;
}

// The conv's own epilogue, in place on the conv output `out` (already dense in `format`).
inline void conv_epilogue_with(
    EpilogueFn epilogue,
    const at::Tensor& out,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    bool relu,
    c10::MemoryFormat format) {
  if (out.numel() == 0 || (!bias.has_value() && !residual.has_value() && !relu)) {
    return;
  }
  std::optional<at::Tensor> bias_dense;
  if (bias.has_value()) {
    bias_dense = bias->contiguous();
  }
  std::optional<at::Tensor> residual_dense;
  if (residual.has_value()) {
    residual_dense = residual->contiguous(format);
  }
  epilogue(out, out, bias_dense, residual_dense, relu, format);
}

}  // namespace resnet_fused
