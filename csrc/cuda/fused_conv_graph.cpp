// conv (+ bias) (+ residual) (+ ReLU) as one cuDNN operation graph, through cuDNN's backend API.
//
// Why our own graph rather than an ATen op: ATen has cudnn_convolution_add_relu, which needs a
// residual, and cudnn_convolution_relu, which passes its own uninitialised output as the addend
// scaled by 0 (NaN left in recycled memory times 0 is NaN); neither does conv + bias alone. Here the
// graph holds exactly the pointwise ops the call needs.
//
// The cuDNN entry points are looked up in the libcudnn torch itself loaded (dlopen with
// RTLD_NOLOAD), so the extension needs cuDNN's headers to build but never links or loads a cuDNN
// of its own. Built without the headers (setup.py adds them when it finds them), every call
// reports the graph unavailable and the caller takes convolution + epilogue.

#include "fused_conv_graph.h"
#include "timing_cuda.h"

#include <cstdlib>

#if __has_include(<cudnn.h>)
#define RESNET_FUSED_HAS_CUDNN 1
#endif

#ifdef RESNET_FUSED_HAS_CUDNN

#include <ATen/cudnn/Handle.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/util/hash.h>

#include <dlfcn.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>

namespace resnet_fused {
namespace {

struct CudnnApi {
  decltype(&cudnnBackendCreateDescriptor) create = nullptr;
  decltype(&cudnnBackendDestroyDescriptor) destroy = nullptr;
  decltype(&cudnnBackendSetAttribute) set = nullptr;
  decltype(&cudnnBackendGetAttribute) get = nullptr;
  decltype(&cudnnBackendFinalize) finalize = nullptr;
  decltype(&cudnnBackendExecute) execute = nullptr;
  decltype(&cudnnGetErrorString) error_string = nullptr;
  std::string unavailable;
};

const CudnnApi& api() {
  static const CudnnApi loaded = [] {
    CudnnApi a;
    const std::string soname = "libcudnn.so." + std::to_string(CUDNN_MAJOR);
    void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) {
      a.unavailable = "torch has not loaded " + soname + " (the cuDNN major version these headers are for)";
      return a;
    }
    auto find = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (fn == nullptr && a.unavailable.empty()) {
        a.unavailable = std::string(name) + " is missing from " + soname;
      }
    };
    find(a.create, "cudnnBackendCreateDescriptor");
    find(a.destroy, "cudnnBackendDestroyDescriptor");
    find(a.set, "cudnnBackendSetAttribute");
    find(a.get, "cudnnBackendGetAttribute");
    find(a.finalize, "cudnnBackendFinalize");
    find(a.execute, "cudnnBackendExecute");
    find(a.error_string, "cudnnGetErrorString");
    return a;
  }();
  return loaded;
}

void check(cudnnStatus_t status, const std::string& what) {
  if (status != CUDNN_STATUS_SUCCESS) {
    throw CudnnGraphError("cuDNN graph: " + what + ": " + api().error_string(status));
  }
}

class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) {
    check(api().create(type, &desc_), "create descriptor");
  }
  ~Desc() {
    api().destroy(desc_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  template <typename T>
  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const T* values, int64_t count = 1) {
    check(api().set(desc_, name, type, count, values), "set attribute " + std::to_string(name));
    return *this;
  }
  Desc& set_desc(cudnnBackendAttributeName_t name, const Desc& value) {
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, &value.desc_);
  }
  void finalize(const char* what) {
    check(api().finalize(desc_), what);
  }
  cudnnBackendDescriptor_t get() const {
    return desc_;
  }

 private:
  cudnnBackendDescriptor_t desc_ = nullptr;
};

using DescPtr = std::unique_ptr<Desc>;

// The handle attributes are deprecated since cuDNN 9.x made them optional, but the cuDNN 9
// releases before that require them.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
constexpr auto kGraphHandle = CUDNN_ATTR_OPERATIONGRAPH_HANDLE;
constexpr auto kPlanHandle = CUDNN_ATTR_EXECUTION_PLAN_HANDLE;
#pragma GCC diagnostic pop

enum Uid : int64_t { kX = 1, kW, kBias, kResidual, kY, kConvOut, kAfterBias, kAfterResidual };

int64_t alignment(const at::Tensor& t) {
  const auto address = reinterpret_cast<std::uintptr_t>(t.const_data_ptr());
  int64_t align = 1;
  while (align < 16 && address % (2 * align) == 0) {
    align *= 2;
  }
  return align;
}

cudnnDataType_t data_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return CUDNN_DATA_FLOAT;
    case at::kHalf:
      return CUDNN_DATA_HALF;
    case at::kBFloat16:
      return CUDNN_DATA_BFLOAT16;
    default:
      throw CudnnGraphError(std::string("cuDNN graph: no graph for dtype ") + c10::toString(dtype));
  }
}

DescPtr tensor(int64_t uid, cudnnDataType_t type, at::IntArrayRef sizes, at::IntArrayRef strides, int64_t align,
               bool is_virtual) {
  auto t = std::make_unique<Desc>(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
  t->set(CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, &type)
      .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, sizes.data(), static_cast<int64_t>(sizes.size()))
      .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides.data(), static_cast<int64_t>(strides.size()))
      .set(CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, &uid)
      .set(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, &align)
      .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, &is_virtual);
  t->finalize("tensor descriptor");
  return t;
}

// The strides of a dense (N, C, H, W) tensor in `format`. Tensors here are dense in `format`, but
// torch may give a size-1 dimension any stride (a 1x1 weight reads as contiguous and
// channels_last at once); cuDNN infers the layout from the strides, so they are spelled out.
std::array<int64_t, 4> dense_strides(at::IntArrayRef sizes, c10::MemoryFormat format) {
  const int64_t c = sizes[1], h = sizes[2], w = sizes[3];
  if (format == c10::MemoryFormat::ChannelsLast) {
    return {h * w * c, 1, w * c, c};
  }
  return {c * h * w, h * w, w, 1};
}

DescPtr tensor_of(int64_t uid, const at::Tensor& t, c10::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous(format));
  return tensor(uid, data_type(t.scalar_type()), t.sizes(), dense_strides(t.sizes(), format), alignment(t), false);
}

std::vector<cudnnBackendNumericalNote_t> numerical_notes(const Desc& config) {
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
  int64_t count = 0;
  auto raw_engine = engine.get();
  check(api().get(config.get(), CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &count, &raw_engine),
        "engine of a config");
  std::vector<cudnnBackendNumericalNote_t> notes(CUDNN_NUMERICAL_NOTE_TYPE_COUNT);
  check(api().get(engine.get(), CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                  static_cast<int64_t>(notes.size()), &count, notes.data()),
        "numerical notes");
  notes.resize(static_cast<size_t>(count));
  return notes;
}

// Engines whose arithmetic is below what the caller asked for: fp16 accumulation (eager torch
// accumulates in fp32), and TF32 tensor cores for fp32 when TF32 is off.
bool acceptable(const Desc& config, at::ScalarType dtype, bool allow_tf32) {
  for (const auto note : numerical_notes(config)) {
    if (note == CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION) {
      return false;
    }
    if (dtype == at::kFloat && !allow_tf32 &&
        (note == CUDNN_NUMERICAL_NOTE_TENSOR_CORE || note == CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS)) {
      return false;
    }
  }
  return true;
}

// The execution plans built for one graph, in cuDNN's heuristic order, with their workspace sizes,
// and every descriptor they were built from (a plan refers to its graph's). `chosen` is the one
// run: the first until the candidates are timed (never during CUDA graph capture).
struct Plan {
  std::vector<DescPtr> keep;
  std::vector<std::pair<Desc*, int64_t>> candidates;
  size_t chosen = 0;
  bool timed = false;
};

std::unique_ptr<Plan> build_plan(
    cudnnHandle_t handle,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const std::optional<at::Tensor>& residual,
    bool relu,
    bool allow_tf32,
    const at::Tensor& out,
    c10::MemoryFormat format,
    int64_t max_plans) {
  auto plan = std::make_unique<Plan>();
  auto keep = [&](DescPtr d) -> Desc& {
    plan->keep.push_back(std::move(d));
    return *plan->keep.back();
  };
  const int64_t channels = out.size(1);
  // Intermediates stay in fp32 (the accumulator type), laid out like the output.
  const auto out_strides = dense_strides(out.sizes(), format);
  auto intermediate = [&](int64_t uid) -> Desc& {
    return keep(tensor(uid, CUDNN_DATA_FLOAT, out.sizes(), out_strides, 16, true));
  };

  Desc& x_desc = keep(tensor_of(kX, x, format));
  Desc& w_desc = keep(tensor_of(kW, weight, format));
  Desc& y_desc = keep(tensor_of(kY, out, format));

  const cudnnDataType_t compute = CUDNN_DATA_FLOAT;
  const cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
  const int64_t spatial = 2;
  const int64_t dilation[2] = {1, 1};
  Desc& conv = keep(std::make_unique<Desc>(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR));
  conv.set(CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, &compute)
      .set(CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, &mode)
      .set(CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, &spatial)
      .set(CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64, dilation, 2)
      .set(CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64, stride.data(), 2)
      .set(CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64, padding.data(), 2)
      .set(CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64, padding.data(), 2);
  conv.finalize("convolution descriptor");

  std::vector<const Desc*> ops;
  Desc* current = &intermediate(kConvOut);
  const float alpha = 1.0f;
  const float beta = 0.0f;
  Desc& conv_op = keep(std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR));
  conv_op.set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, x_desc)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, w_desc)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, *current)
      .set_desc(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, conv)
      .set(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, CUDNN_TYPE_FLOAT, &alpha)
      .set(CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, CUDNN_TYPE_FLOAT, &beta);
  conv_op.finalize("convolution operation");
  ops.push_back(&conv_op);

  // Appends `current = mode(current[, operand])`, written to `result`.
  auto pointwise = [&](cudnnPointwiseMode_t pw_mode, const Desc* operand, Desc& result) {
    Desc& pw = keep(std::make_unique<Desc>(CUDNN_BACKEND_POINTWISE_DESCRIPTOR));
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, &pw_mode)
        .set(CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, &compute);
    pw.finalize("pointwise descriptor");
    Desc& op = keep(std::make_unique<Desc>(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR));
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, *current)
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, result);
    if (operand != nullptr) {
      op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *operand);
    }
    op.finalize("pointwise operation");
    ops.push_back(&op);
    current = &result;
  };
  // The last op writes y; the others write fp32 intermediates.
  int remaining = int(bias.has_value()) + int(residual.has_value()) + int(relu);
  auto next_output = [&](int64_t uid) -> Desc& {
    return --remaining == 0 ? y_desc : intermediate(uid);
  };
  if (bias.has_value()) {
    // (1, K, 1, 1), broadcast over the batch and the plane.
    const std::array<int64_t, 4> sizes{1, channels, 1, 1};
    Desc& b = keep(tensor(kBias, data_type(bias->scalar_type()), sizes, dense_strides(sizes, format),
                          alignment(*bias), false));
    pointwise(CUDNN_POINTWISE_ADD, &b, next_output(kAfterBias));
  }
  if (residual.has_value()) {
    Desc& z = keep(tensor_of(kResidual, *residual, format));
    pointwise(CUDNN_POINTWISE_ADD, &z, next_output(kAfterResidual));
  }
  if (relu) {
    pointwise(CUDNN_POINTWISE_RELU_FWD, nullptr, next_output(0));
  }
  TORCH_INTERNAL_ASSERT(current == &y_desc, "a graph without pointwise ops was asked for");

  std::vector<cudnnBackendDescriptor_t> raw_ops;
  for (const Desc* op : ops) {
    raw_ops.push_back(op->get());
  }
  Desc& graph = keep(std::make_unique<Desc>(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR));
  graph.set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, raw_ops.data(),
            static_cast<int64_t>(raw_ops.size()))
      .set(kGraphHandle, CUDNN_TYPE_HANDLE, &handle);
  graph.finalize("operation graph");

  // Heuristic mode A first (cuDNN's ranking), then, only if that gave none, the fallback list; the
  // first `max_plans` acceptable engine configs that finalize into a plan are kept.
  std::string last_error;
  for (const cudnnBackendHeurMode_t heur_mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    if (!plan->candidates.empty()) {
      break;
    }
    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph)
        .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, &heur_mode);
    try {
      heur.finalize("engine heuristics");
    } catch (const CudnnGraphError& e) {
      last_error = e.what();
      continue;
    }
    int64_t count = 0;
    check(api().get(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
          "count of engine configs");
    std::vector<DescPtr> configs;
    std::vector<cudnnBackendDescriptor_t> raw_configs;
    for (int64_t i = 0; i < count; ++i) {
      configs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      raw_configs.push_back(configs.back()->get());
    }
    check(api().get(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &count,
                    raw_configs.data()),
          "engine configs");
    if (count == 0 && last_error.empty()) {
      last_error = "cuDNN's heuristics offered no engine";
    }
    for (int64_t i = 0; i < count && static_cast<int64_t>(plan->candidates.size()) < max_plans; ++i) {
      try {
        if (!acceptable(*configs[i], x.scalar_type(), allow_tf32)) {
          if (last_error.empty()) {
            last_error = "engines offered were refused (fp16 accumulation, or TF32 with TF32 off)";
          }
          continue;
        }
        auto candidate = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
        candidate->set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, *configs[i])
            .set(kPlanHandle, CUDNN_TYPE_HANDLE, &handle);
        candidate->finalize("execution plan");
        int64_t got = 0;
        int64_t workspace = 0;
        check(api().get(candidate->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &got,
                        &workspace),
              "workspace size");
        plan->candidates.emplace_back(&keep(std::move(candidate)), workspace);
        plan->keep.push_back(std::move(configs[i]));
      } catch (const CudnnGraphError& e) {
        last_error = e.what();
      }
    }
  }
  if (!plan->candidates.empty()) {
    return plan;
  }
  throw CudnnGraphError("cuDNN graph: no engine runs conv" + std::string(bias ? " + bias" : "") +
                        (residual ? " + residual" : "") + (relu ? " + ReLU" : "") + " for x " +
                        c10::str(x.sizes()) + " " + c10::toString(x.scalar_type()) + " (" + last_error + ")");
}

// Plans are per thread, as torch's cuDNN handles are: a plan is finalized against one handle.
using PlanKey = std::vector<int64_t>;

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    return c10::get_hash(key);
  }
};

PlanKey plan_key(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const std::optional<at::Tensor>& residual,
    bool relu,
    bool allow_tf32,
    const at::Tensor& out,
    c10::MemoryFormat format) {
  PlanKey key{x.get_device(), static_cast<int64_t>(x.scalar_type()), static_cast<int64_t>(format), relu,
              allow_tf32, alignment(x), alignment(weight), alignment(out)};
  key.insert(key.end(), x.sizes().begin(), x.sizes().end());
  key.insert(key.end(), weight.sizes().begin(), weight.sizes().end());
  key.insert(key.end(), stride.begin(), stride.end());
  key.insert(key.end(), padding.begin(), padding.end());
  key.push_back(bias.has_value() ? alignment(*bias) : 0);
  key.push_back(residual.has_value() ? alignment(*residual) : 0);
  return key;
}

}  // namespace

const std::string& cudnn_graph_unavailable() {
  return api().unavailable;
}

at::Tensor cudnn_conv_bias_act_graph(
    const at::Tensor& x_in,
    const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const std::optional<at::Tensor>& residual_in,
    bool relu,
    bool allow_tf32,
    c10::MemoryFormat format,
    int64_t max_plans) {
  if (!api().unavailable.empty()) {
    throw CudnnGraphError("cuDNN graph unavailable: " + api().unavailable);
  }
  // Named in profiles, so tests and users can see which path ran.
  RECORD_FUNCTION("resnet_fused::cudnn_conv_bias_act_graph", std::vector<c10::IValue>());
  const at::Tensor x = x_in.contiguous(format);
  const at::Tensor weight = weight_in.contiguous(format);
  std::optional<at::Tensor> bias;
  if (bias_in.has_value()) {
    bias = bias_in->contiguous();
  }
  std::optional<at::Tensor> residual;
  if (residual_in.has_value()) {
    residual = residual_in->contiguous(format);
  }
  const int64_t p = (x.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
  const int64_t q = (x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  at::Tensor out = at::empty({x.size(0), weight.size(0), p, q}, x.options().memory_format(format));

  const cudnnHandle_t handle = at::native::getCudnnHandle();  // bound to the current stream
  // Never destroyed: destroying cuDNN descriptors at process exit can run after CUDA's teardown.
  thread_local auto* plans = new std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash>();
  // The number of plans asked for is part of the key: a changed setting builds (and times) anew.
  PlanKey key = plan_key(x, weight, bias, stride, padding, residual, relu, allow_tf32, out, format);
  key.push_back(max_plans);
  auto found = plans->find(key);
  if (found == plans->end()) {
    found = plans->emplace(key, build_plan(handle, x, weight, bias, stride, padding, residual, relu, allow_tf32, out,
                                          format, max_plans))
                .first;
  }
  Plan& plan = *found->second;

  std::vector<int64_t> uids{kX, kW, kY};
  std::vector<void*> pointers{const_cast<void*>(x.const_data_ptr()), const_cast<void*>(weight.const_data_ptr()),
                              out.data_ptr()};
  if (bias.has_value()) {
    uids.push_back(kBias);
    pointers.push_back(const_cast<void*>(bias->const_data_ptr()));
  }
  if (residual.has_value()) {
    uids.push_back(kResidual);
    pointers.push_back(const_cast<void*>(residual->const_data_ptr()));
  }
  auto run = [&](size_t candidate, const at::Tensor& workspace) {
    void* workspace_ptr = plan.candidates[candidate].second > 0 ? workspace.data_ptr() : nullptr;
    Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids.data(), static_cast<int64_t>(uids.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, pointers.data(),
             static_cast<int64_t>(pointers.size()))
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, &workspace_ptr);
    pack.finalize("variant pack");
    check(api().execute(handle, plan.candidates[candidate].first->get(), pack.get()), "execute");
  };
  if (!plan.timed && plan.candidates.size() > 1 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    int64_t most = 0;
    for (const auto& candidate : plan.candidates) {
      most = std::max(most, candidate.second);
    }
    const at::Tensor workspace = at::empty({most}, x.options().dtype(at::kByte));
    // A plan that finalized can still fail to run; the others are timed without it.
    std::vector<size_t> runnable;
    std::string failure;
    for (size_t i = 0; i < plan.candidates.size(); ++i) {
      try {
        run(i, workspace);
        runnable.push_back(i);
      } catch (const CudnnGraphError& e) {
        failure = e.what();
      }
    }
    if (runnable.empty()) {
      throw CudnnGraphError(failure);
    }
    std::vector<std::function<void()>> fns;
    for (const size_t i : runnable) {
      fns.emplace_back([&, i] { run(i, workspace); });
    }
    const std::vector<float> ms = time_each(fns);
    plan.chosen = runnable[static_cast<size_t>(std::min_element(ms.begin(), ms.end()) - ms.begin())];
    plan.timed = true;
  }
  run(plan.chosen, at::empty({plan.candidates[plan.chosen].second}, x.options().dtype(at::kByte)));
  return out;
}

}  // namespace resnet_fused

#else  // no cuDNN headers

namespace resnet_fused {

const std::string& cudnn_graph_unavailable() {
  static const std::string reason =
      "resnet_fused._C was built without cuDNN's headers (setup.py looks in CUDNN_HOME, CUDA_HOME and the "
      "nvidia-cudnn wheel)";
  return reason;
}

at::Tensor cudnn_conv_bias_act_graph(
    const at::Tensor&,
    const at::Tensor&,
    const std::optional<at::Tensor>&,
    at::IntArrayRef,
    at::IntArrayRef,
    const std::optional<at::Tensor>&,
    bool,
    bool,
    c10::MemoryFormat,
    int64_t) {
  throw CudnnGraphError("cuDNN graph unavailable: " + cudnn_graph_unavailable());
}

}  // namespace resnet_fused

#endif

// Read where the graph is used and where it is not built alike, so a bad value fails the same way.
namespace resnet_fused {

int64_t cudnn_plans_setting() {
  constexpr const char* kEnv = "RESNET_FUSED_CUDNN_PLANS";
  const char* value = std::getenv(kEnv);
  if (value == nullptr || value[0] == '\0') {
    return 1;
  }
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  TORCH_CHECK(*end == '\0' && parsed >= 1 && parsed <= 64, "resnet_fused: ", kEnv,
              " must be a whole number from 1 to 64, got '", value, "'");
  return parsed;
}

}  // namespace resnet_fused
