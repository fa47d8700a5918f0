// See output_pool.h for why the CPU convolutions' outputs are pooled.

#include "output_pool.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <limits>
#include <list>
#include <mutex>
#include <string>

namespace resnet_fused {
namespace {

constexpr const char* kPoolEnv = "RESNET_FUSED_CPU_POOL_MB";
constexpr int64_t kDefaultBudgetMb = 1024;
constexpr size_t kMaxOversize = 4;

// Read per call, as the other switches are, so a server can change it without a restart.
int64_t budget_bytes() {
  const char* value = std::getenv(kPoolEnv);
  if (value == nullptr || *value == '\0') {
    return kDefaultBudgetMb << 20;
  }
  char* end = nullptr;
  const long long mb = std::strtoll(value, &end, 10);
  TORCH_CHECK(
      end != value && *end == '\0' && mb >= 0, kPoolEnv, " must be a non-negative whole number of MiB, got '",
      value, "'");
  return static_cast<int64_t>(mb) << 20;
}

struct Pool {
  std::mutex mutex;
  std::list<c10::Storage> blocks;  // most recently handed out first: its memory is the warmest
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: tensors may outlive static destruction
  return *instance;
}

bool is_free(const c10::Storage& block) {
  return block.use_count() == 1;
}

// Drops free blocks, least recently used first, until the free ones fit the budget.
void trim(Pool& p, int64_t budget) {
  int64_t free_bytes = 0;
  for (const auto& block : p.blocks) {
    free_bytes += is_free(block) ? static_cast<int64_t>(block.nbytes()) : 0;
  }
  for (auto it = p.blocks.end(); free_bytes > budget && it != p.blocks.begin();) {
    --it;
    if (is_free(*it)) {
      free_bytes -= static_cast<int64_t>(it->nbytes());
      it = p.blocks.erase(it);
    }
  }
}

}  // namespace

at::Tensor pooled_empty_channels_last(c10::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto format = c10::MemoryFormat::ChannelsLast;
  const int64_t budget = budget_bytes();
  Pool& p = pool();
  if (budget == 0) {
    std::lock_guard<std::mutex> lock(p.mutex);
    trim(p, 0);
    return at::empty(sizes, options.memory_format(format));
  }
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    numel *= s;
  }
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    // The smallest free block that holds the request (the most recently used of equal ones), not
    // only one of the same size, and none over kMaxOversize times as large: see output_pool.h.
    auto fit = p.blocks.end();
    for (auto it = p.blocks.begin(); it != p.blocks.end(); ++it) {
      const size_t size = it->nbytes();
      if (is_free(*it) && size >= nbytes && size <= kMaxOversize * nbytes &&
          (fit == p.blocks.end() || size < fit->nbytes())) {
        fit = it;
      }
    }
    if (fit != p.blocks.end()) {
      p.blocks.splice(p.blocks.begin(), p.blocks, fit);
      // The tensor made around the block directly, as at::empty makes its own: at::empty({0})
      // and set_ are two dispatcher calls, 3 us a conv when profiled cold in a forward.
      at::Tensor out = at::detail::make_tensor<c10::TensorImpl>(
          c10::Storage(p.blocks.front()), c10::DispatchKeySet(c10::DispatchKey::CPU), options.dtype());
      out.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, c10::get_channels_last_strides_2d(sizes));
      // As at::empty does: deterministic mode asks for uninitialised memory to read as NaN, which
      // is how the tests see an output element that a kernel never wrote.
      const auto& context = at::globalContext();
      if (context.deterministicAlgorithms() && context.deterministicFillUninitializedMemory()) {
        out.fill_(std::numeric_limits<double>::quiet_NaN());
      }
      return out;
    }
  }
  at::Tensor out = at::empty(sizes, options.memory_format(format));
  std::lock_guard<std::mutex> lock(p.mutex);
  p.blocks.push_front(out.storage());
  trim(p, budget);
  return out;
}

int64_t cpu_output_pool_bytes(bool in_use) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  int64_t bytes = 0;
  for (const auto& block : p.blocks) {
    bytes += is_free(block) != in_use ? static_cast<int64_t>(block.nbytes()) : 0;
  }
  return bytes;
}

}  // namespace resnet_fused
