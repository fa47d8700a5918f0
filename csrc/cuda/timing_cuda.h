#pragma once
// Timing of alternatives on the current CUDA stream, for the choices made on the first call of a
// signature (csrc/cuda/ops_cuda.cpp, csrc/cuda/fused_conv_graph.cpp). It synchronises: never call
// it while the stream is being captured into a CUDA graph.

#include <functional>
#include <vector>

namespace resnet_fused {

// Milliseconds per call of each function, the best of a few rounds that alternate between them so
// that a clock change hits all; each is called once first, untimed (plan building, warm-up).
std::vector<float> time_each(const std::vector<std::function<void()>>& fns);

}  // namespace resnet_fused
