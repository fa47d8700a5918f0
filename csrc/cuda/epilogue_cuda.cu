// The fused epilogue on the GPU: relu?(x + bias[c] + residual) in one pass over memory.
//
// Two walks, one per layout, each with a 16-byte vector path and a scalar path:
// - channels_last: the channel is the fastest dimension, so a vector holds consecutive channels
//   of one pixel and the bias is loaded as a vector too. Needs C % vec == 0.
// - NCHW: each block walks whole channel planes, so the bias is one scalar per plane and no
//   division is needed per element. Needs H*W % vec == 0.
// The vector path also needs every pointer it vectorizes 16-byte aligned (views with an odd
// storage offset are not); both conditions are checked per call, the scalar path covers the rest.
// Only the layout and the vector width are template parameters: bias, residual and ReLU are
// uniform run-time branches, which keeps the number of instantiations (and the build) small.
//
// This file sees raw pointers only: ATen's tensor headers cost nvcc far more time than the
// kernels, so the tensor-level checks and the dtype dispatch live in ops_cuda.cpp.

#include "epilogue_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

namespace resnet_fused {
namespace {

// Arithmetic type: half and bfloat16 compute in float and round once.
template <typename T>
struct Acc {
  using type = T;
};
template <>
struct Acc<c10::Half> {
  using type = float;
};
template <>
struct Acc<c10::BFloat16> {
  using type = float;
};
template <typename T>
using acc_type = typename Acc<T>::type;

constexpr int kThreads = 256;
constexpr int kVectorBytes = 16;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Copying a Pack of c10::Half or c10::BFloat16 copies element by element (their copy constructors
// are user-provided): nvcc then emits one 2-byte load per element instead of one 16-byte load.
// Moving the bytes as a built-in vector type keeps every access one instruction.
template <int Bytes>
struct RawVector;
template <>
struct RawVector<16> {
  using type = uint4;
};
template <>
struct RawVector<8> {
  using type = uint2;
};
template <>
struct RawVector<4> {
  using type = unsigned int;
};
template <>
struct RawVector<2> {
  using type = unsigned short;
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* base, int64_t index) {
  using Raw = typename RawVector<sizeof(Pack<T, N>)>::type;
  const Raw raw = reinterpret_cast<const Raw*>(base)[index];
  Pack<T, N> pack;
  memcpy(&pack, &raw, sizeof(raw));
  return pack;
}

template <typename T, int N>
__device__ __forceinline__ void store(T* base, int64_t index, const Pack<T, N>& pack) {
  using Raw = typename RawVector<sizeof(Pack<T, N>)>::type;
  Raw raw;
  memcpy(&raw, &pack, sizeof(raw));
  reinterpret_cast<Raw*>(base)[index] = raw;
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> apply(
    const Pack<T, N>& x,
    const T* residual,
    int64_t residual_index,
    const acc_type<T> (&bias)[N],
    bool relu) {
  using acc_t = acc_type<T>;
  Pack<T, N> r;
  if (residual != nullptr) {
    r = load<T, N>(residual, residual_index);
  }
  Pack<T, N> y;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    acc_t a = static_cast<acc_t>(x.v[k]) + bias[k];
    if (residual != nullptr) {
      a += static_cast<acc_t>(r.v[k]);
    }
    // Written so that NaN passes through, as torch.relu does.
    y.v[k] = static_cast<T>((relu && a < acc_t(0)) ? acc_t(0) : a);
  }
  return y;
}

// Index v counts vectors of N elements; cv is v's vector of channels within its pixel, advanced
// by the grid stride modulo C/N with a compare instead of a 64-bit division per iteration.
template <typename T, int N>
__global__ void epilogue_nhwc_kernel(
    T* out,
    const T* in,
    const T* bias,
    const T* residual,
    int64_t channel_vecs,
    int64_t n_vecs,
    bool relu) {
  using acc_t = acc_type<T>;
  using P = Pack<T, N>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t cv = v % channel_vecs;
  const int64_t cv_step = step % channel_vecs;
  for (; v < n_vecs; v += step) {
    acc_t b[N];
    if (bias != nullptr) {
      const P bp = load<T, N>(bias, cv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        b[k] = static_cast<acc_t>(bp.v[k]);
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        b[k] = acc_t(0);
      }
    }
    store<T, N>(out, v, apply<T, N>(load<T, N>(in, v), residual, v, b, relu));
    cv += cv_step;
    if (cv >= channel_vecs) {
      cv -= channel_vecs;
    }
  }
}

// blockIdx.y walks the N*C planes, blockIdx.x and the threads the plane's H*W/N vectors.
template <typename T, int N>
__global__ void epilogue_nchw_kernel(
    T* out,
    const T* in,
    const T* bias,
    const T* residual,
    int64_t channels,
    int64_t planes,
    int64_t plane_vecs,
    bool relu) {
  using acc_t = acc_type<T>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = blockIdx.y; p < planes; p += gridDim.y) {
    acc_t b[N];
    const acc_t plane_bias = bias != nullptr ? static_cast<acc_t>(bias[p % channels]) : acc_t(0);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      b[k] = plane_bias;
    }
    const int64_t base = p * plane_vecs;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane_vecs; i += step) {
      const int64_t v = base + i;
      store<T, N>(out, v, apply<T, N>(load<T, N>(in, v), residual, v, b, relu));
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename T, int N>
void launch(const EpilogueArgs<T>& a, cudaStream_t stream) {
  // Enough resident blocks to fill every SM several times over; the grid-stride loops do the rest.
  int device = 0;
  int sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t max_blocks = static_cast<int64_t>(sm_count) * 8;
  if (a.channels_last) {
    const int64_t n_vecs = a.batch * a.plane * a.channels / N;
    const auto blocks = static_cast<unsigned>(std::min(ceil_div(n_vecs, kThreads), max_blocks));
    epilogue_nhwc_kernel<T, N>
        <<<blocks, kThreads, 0, stream>>>(a.out, a.in, a.bias, a.residual, a.channels / N, n_vecs, a.relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t plane_vecs = a.plane / N;
    const int64_t planes = a.batch * a.channels;
    // Small planes (7x7 = 49 elements) get small blocks rather than mostly idle threads.
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(plane_vecs, 32) * 32));
    const dim3 grid(
        static_cast<unsigned>(std::min<int64_t>(ceil_div(plane_vecs, threads), 32)),
        static_cast<unsigned>(std::min<int64_t>(planes, 65535)));
    epilogue_nchw_kernel<T, N>
        <<<grid, threads, 0, stream>>>(a.out, a.in, a.bias, a.residual, a.channels, planes, plane_vecs, a.relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

bool aligned(const void* p) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % kVectorBytes == 0;
}

}  // namespace

template <typename T>
void launch_epilogue(const EpilogueArgs<T>& a, cudaStream_t stream) {
  constexpr int kVec = kVectorBytes / sizeof(T);
  const bool vectorizable = aligned(a.out) && aligned(a.in) && aligned(a.residual) &&
      (a.channels_last ? (a.channels % kVec == 0 && aligned(a.bias)) : a.plane % kVec == 0);
  if (vectorizable) {
    launch<T, kVec>(a, stream);
  } else {
    launch<T, 1>(a, stream);
  }
}

template void launch_epilogue<float>(const EpilogueArgs<float>&, cudaStream_t);
template void launch_epilogue<double>(const EpilogueArgs<double>&, cudaStream_t);
template void launch_epilogue<c10::Half>(const EpilogueArgs<c10::Half>&, cudaStream_t);
template void launch_epilogue<c10::BFloat16>(const EpilogueArgs<c10::BFloat16>&, cudaStream_t);

std::string cuda_build_info() {
  std::string out = "\"cuda\": \"" + std::to_string(CUDART_VERSION / 1000) + "." +
      std::to_string((CUDART_VERSION % 1000) / 10) + "\"";
  const std::string& graph = cudnn_graph_unavailable();
  if (graph.empty()) {
    out += ", \"cudnn_graph\": true";
  } else {
    out += ", \"cudnn_graph\": false, \"cudnn_graph_reason\": \"";
    for (const char c : graph) {
      if (c == '"' || c == '\\') {
        out += '\\';
      }
      out += c;
    }
    out += "\"";
  }
#ifdef __CUDA_ARCH_LIST__
#define RESNET_FUSED_STR2(...) #__VA_ARGS__
#define RESNET_FUSED_STR(...) RESNET_FUSED_STR2(__VA_ARGS__)
  // nvcc's list of the targets compiled for, e.g. "800,900".
  out += ", \"cuda_archs\": \"" RESNET_FUSED_STR(__CUDA_ARCH_LIST__) "\"";
#endif
  return out;
}

}  // namespace resnet_fused
