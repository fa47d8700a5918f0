#pragma once
// The interface between the host code (ops_cuda.cpp) and the kernels (epilogue_cuda.cu): raw
// pointers only, so that nvcc never parses ATen's tensor headers.

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace resnet_fused {

// out = relu?(in + bias[channel] + residual) over dense (batch, channels, plane) memory, laid out
// channels-last or channels-first. bias and residual may be null; out may equal in.
template <typename T>
struct EpilogueArgs {
  T* out;
  const T* in;
  const T* bias;
  const T* residual;
  int64_t batch;
  int64_t channels;
  int64_t plane;  // H * W
  bool channels_last;
  bool relu;
};

// Defined for float, double, c10::Half and c10::BFloat16.
template <typename T>
void launch_epilogue(const EpilogueArgs<T>& args, cudaStream_t stream);

// The JSON fields build_info() adds for a CUDA build.
std::string cuda_build_info();

// Why this build or process cannot run our fused cuDNN graphs (fused_conv_graph.cpp: built without
// cuDNN's headers, or the cuDNN library torch uses is not loaded), or empty when it can.
const std::string& cudnn_graph_unavailable();

}  // namespace resnet_fused
