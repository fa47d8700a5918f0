// residual_blocks: a stage of residual blocks (a ResNet's layer1..layer4) as one op. Each block is
// a chain of conv_bias_act calls with ReLU, the last one taking the shortcut as its residual; the
// shortcut is the block's input or one projection conv (conv + folded BN, no ReLU) of it.
//
// WHY one op for many convs: at batch 1 on a CPU, the Python and op-call machinery between two
// conv kernels took 25-60 us (resnet50 bf16 on a 2-core Zen 4 EPYC: 2.7 ms of a 27 ms forward,
// with the second thread idle all that time). Here the convs are called through the dispatcher
// from C++, so each one runs exactly the kernel, checks and per-shape choice a conv_bias_act call
// from Python would, on whatever device the tensors are on.
//
// Registered for CompositeImplicitAutograd: under fake tensors, torch.compile or a meta device it
// decomposes into conv_bias_act calls, whose fake kernels describe the result.

#include "common.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <optional>

namespace resnet_fused {
namespace {

using ConvBiasAct = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                               at::IntArrayRef, int64_t, const std::optional<at::Tensor>&, bool);

at::Tensor residual_blocks(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                           at::IntArrayRef strides, at::IntArrayRef paddings, at::IntArrayRef groups,
                           at::IntArrayRef chain_lengths, const c10::List<bool>& projections) {
  const size_t convs = weights.size();
  TORCH_CHECK(biases.size() == convs && groups.size() == convs && strides.size() == 2 * convs &&
                  paddings.size() == 2 * convs,
              "residual_blocks: one bias and groups, and two strides and paddings, per weight: got ", convs,
              " weights, ", biases.size(), " biases, ", groups.size(), " groups, ", strides.size(), " strides, ",
              paddings.size(), " paddings");
  TORCH_CHECK(chain_lengths.size() == projections.size(),
              "residual_blocks: one chain length and one projection flag per block: got ", chain_lengths.size(),
              " and ", projections.size());
  size_t expected = 0;
  for (const auto i : c10::irange(chain_lengths.size())) {
    TORCH_CHECK(chain_lengths[i] >= 1, "residual_blocks: block ", i, " has a chain of ", chain_lengths[i], " convs");
    expected += chain_lengths[i] + (projections.get(i) ? 1 : 0);
  }
  TORCH_CHECK(expected == convs, "residual_blocks: the blocks take ", expected, " convs, got ", convs, " weights");

  static const auto conv_bias_act = c10::Dispatcher::singleton()
                                        .findSchemaOrThrow("resnet_fused::conv_bias_act", "")
                                        .typed<ConvBiasAct>();
  size_t next = 0;
  const auto conv = [&](const at::Tensor& input, const std::optional<at::Tensor>& residual, bool relu) {
    const size_t i = next++;
    // channels_last, as the fused modules hand every conv its input (a no-op on our convs' outputs).
    return conv_bias_act.call(input.contiguous(at::MemoryFormat::ChannelsLast), weights[i], biases.get(i),
                              strides.slice(2 * i, 2), paddings.slice(2 * i, 2), groups[i], residual, relu);
  };
  // Under a Python dispatch mode (opcheck's schema check, a logging mode) or with a tensor subclass,
  // Python sees each conv's arguments and result, and an output over its residual breaks the schema
  // (residual is not an output's alias): the shortcuts are then never written over.
  const bool python_sees_convs =
      c10::impl::TorchDispatchModeTLS::stack_len() > 0 || x.key_set().has(c10::DispatchKey::Python);
  at::Tensor out = x;
  for (const auto b : c10::irange(chain_lengths.size())) {
    // The projection comes first in the weights: the order the fused modules run them in.
    const bool projection = projections.get(b);
    const at::Tensor shortcut = projection ? conv(out, std::nullopt, false) : out;
    at::Tensor y = out;
    for (int64_t j = 0; j + 1 < chain_lengths[b]; ++j) {
      y = conv(y, std::nullopt, true);
    }
    std::optional<ShortcutIsDead> dead;
    if ((projection || b > 0) && !y.is_same(shortcut) && !python_sees_convs) {  // this op's own, read here only
      dead.emplace();
    }
    out = conv(y, shortcut, true);
  }
  return out;
}

}  // namespace
}  // namespace resnet_fused

TORCH_LIBRARY_IMPL(resnet_fused, CompositeImplicitAutograd, m) {
  m.impl("residual_blocks", &resnet_fused::residual_blocks);
}
