// The op schemas, defined once for every backend, the build description, and the Python module
// entry point: `import resnet_fused._C` loads this library, whose static initialisers register the
// schemas here and the kernels in csrc/cpu and csrc/cuda with the dispatcher.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <torch/version.h>

#include <sstream>
#include <string>
#include <vector>

#ifdef RESNET_FUSED_WITH_CUDA
#include "cuda/epilogue_cuda.h"
#endif

namespace resnet_fused {

#define RESNET_FUSED_STR2(x) #x
#define RESNET_FUSED_STR(x) RESNET_FUSED_STR2(x)
// The torch this library was compiled against, e.g. "2.11.0".
constexpr const char* kBuiltForTorch =
    RESNET_FUSED_STR(TORCH_VERSION_MAJOR) "." RESNET_FUSED_STR(TORCH_VERSION_MINOR) "." RESNET_FUSED_STR(TORCH_VERSION_PATCH);

// Values in the CPU path's caches of prepacked weights (csrc/cpu/ops_cpu.cpp), for tests
// that check entries of freed or changed weights are dropped.
int64_t cpu_weight_cache_size();
int64_t cpu_output_pool_bytes(bool in_use);
// How many work items of our CPU kernels a thread took from another's share (parallel_items.h).
int64_t cpu_items_taken_over();
// The kernel the CPU path's per-shape timing chose for each conv shape seen, one line each; the
// same choices, in the same order, as a table of int rows (columns named by
// cpu_conv_choice_fields()), which cpu_conv_load_choices() takes back (joining or, with `replace`,
// replacing the choices made: a saved tuning, resnet_fused/tuning.py); and forgetting them all.
std::vector<std::string> cpu_conv_choices();
std::vector<std::string> cpu_conv_choice_fields();
std::vector<int64_t> cpu_conv_choice_table();
int64_t cpu_conv_load_choices(const std::vector<int64_t>& table, bool replace);
void cpu_conv_clear_choices();

// JSON, parsed by resnet_fused.backends.extension.build_info().
std::string build_info() {
  std::ostringstream out;
  out << "{\"torch\": \"" << kBuiltForTorch << "\", ";
#ifdef RESNET_FUSED_WITH_CUDA
  out << "\"with_cuda\": true, " << cuda_build_info();
#else
  out << "\"with_cuda\": false";
#endif
  out << "}";
  return out.str();
}

}  // namespace resnet_fused

TORCH_LIBRARY(resnet_fused, m) {
  // The fake kernels live in Python; this tells torch where to find them when a fake tensor
  // reaches an op before that module was imported.
  m.set_python_module("resnet_fused.backends.extension");
  m.def(
      "conv_bias_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int groups, "
      "Tensor? residual, bool relu) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // A stage of residual blocks, each a chain of conv_bias_act calls (csrc/residual_blocks.cpp): per
  // conv, in the order they run (a block's projection shortcut first), a weight, a bias, groups and
  // a (H, W) pair each of stride and padding; per block, its chain's length and whether its
  // shortcut is a projection conv.
  m.def(
      "residual_blocks(Tensor x, Tensor[] weights, Tensor?[] biases, int[] strides, int[] paddings, int[] groups, "
      "int[] chain_lengths, bool[] projections) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def("bias_act(Tensor x, Tensor bias, bool relu) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("global_avg_pool(Tensor x) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("build_info() -> str", &resnet_fused::build_info);
  m.def("cpu_weight_cache_size() -> int", &resnet_fused::cpu_weight_cache_size);
  m.def("cpu_output_pool_bytes(bool in_use) -> int", &resnet_fused::cpu_output_pool_bytes);
  m.def("cpu_items_taken_over() -> int", &resnet_fused::cpu_items_taken_over);
  m.def("cpu_conv_choices() -> str[]", &resnet_fused::cpu_conv_choices);
  m.def("cpu_conv_choice_fields() -> str[]", &resnet_fused::cpu_conv_choice_fields);
  m.def("cpu_conv_choice_table() -> int[]", &resnet_fused::cpu_conv_choice_table);
  m.def("cpu_conv_load_choices(int[] table, bool replace) -> int", &resnet_fused::cpu_conv_load_choices);
  m.def("cpu_conv_clear_choices() -> ()", &resnet_fused::cpu_conv_clear_choices);
}

// Importing the module is the way to load the library with Python's own loader. Its one attribute,
// torch_version, is the build fact a caller checks before calling any op (an op of a library built
// for another torch may crash instead of failing).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && PyModule_AddStringConstant(m, "torch_version", resnet_fused::kBuiltForTorch) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
