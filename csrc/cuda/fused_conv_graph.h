#pragma once
// conv (+ bias) (+ residual) (+ ReLU) as one cuDNN operation graph, built with cuDNN's backend API
// (csrc/cuda/fused_conv_graph.cpp). The graph has no addend for a missing residual, so, unlike
// at::cudnn_convolution_relu (which feeds its own uninitialised output back in scaled by 0), no
// uninitialised memory is ever read.

#include "epilogue_cuda.h"  // cudnn_graph_unavailable()

#include <ATen/core/Tensor.h>

#include <optional>
#include <stdexcept>
#include <string>

namespace resnet_fused {

// cuDNN could not build or run the graph (no engine for it, an unsupported layout, or the cuDNN
// library is not reachable): the caller falls back to convolution + epilogue.
class CudnnGraphError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// RESNET_FUSED_CUDNN_PLANS (read on every call; a bad value raises): how many of cuDNN's engine
// configs for a graph are built and timed on its first call. 1, the default, runs the first
// acceptable config of heuristic mode A untimed.
int64_t cudnn_plans_setting();

// relu?(conv(x, weight) + bias + residual) in `format`; at least one of bias, residual and relu is
// present. x, weight and residual are made dense in `format` first. Plans are built once per
// shape, dtype, layout, alignment and `max_plans` and kept; with `max_plans` > 1 the plans built
// are timed on the first call outside CUDA graph capture and the fastest is kept. The cuDNN handle
// and the stream are torch's current ones, so the call is capturable once its plan exists.
at::Tensor cudnn_conv_bias_act_graph(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const std::optional<at::Tensor>& residual,
    bool relu,
    bool allow_tf32,
    c10::MemoryFormat format,
    int64_t max_plans);

}  // namespace resnet_fused
