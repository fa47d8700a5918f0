#pragma once
// Weights re-laid out once (oneDNN's blocked layout, Winograd's transformed panels) and reused for
// every later call: at batch 1 the conversion costs as much as the convolution itself.
//
// An entry belongs to one weight tensor, recognised by its TensorImpl through a weak pointer (a
// freed weight whose address is reused by a new one is a miss, not a stale hit) and invalidated by
// its version counter (an in-place update). Each weight keeps a few variants, keyed by the caller
// (oneDNN's layout depends on the input shape): a server sees a handful of batch sizes.

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace resnet_fused {

class WeightCache {
 public:
  using Key = std::vector<int64_t>;

  // The variant `key` of `weight`, built by `make(weight)` on a miss. Inference tensors carry no
  // version counter, so an in-place change could not be seen: they are converted on every call.
  at::Tensor get(const at::Tensor& weight, const Key& key, const std::function<at::Tensor(const at::Tensor&)>& make) {
    if (weight.is_inference()) {
      return make(weight);
    }
    c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
    const uint32_t version = weight._version();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = entries_.find(impl);
      if (it != entries_.end() && it->second.owner.lock().get() == impl && it->second.version == version) {
        for (const auto& [variant_key, value] : it->second.variants) {
          if (variant_key == key) {
            return value;
          }
        }
      }
    }
    // Built outside the lock: conversions can take milliseconds and run their own threads.
    at::Tensor value = make(weight);
    std::lock_guard<std::mutex> lock(mutex_);
    drop_dead_entries();
    Entry& entry = entries_[impl];
    if (entry.owner.lock().get() != impl || entry.version != version) {
      entry = Entry{WeakImpl(weight.getIntrusivePtr()), version, {}};
    }
    entry.variants.emplace_front(key, value);
    if (entry.variants.size() > kVariantsPerWeight) {
      entry.variants.pop_back();
    }
    return value;
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    drop_dead_entries();
    size_t n = 0;
    for (const auto& [impl, entry] : entries_) {
      n += entry.variants.size();
    }
    return n;
  }

 private:
  static constexpr size_t kVariantsPerWeight = 8;
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

  struct Entry {
    WeakImpl owner{c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>()};
    uint32_t version = 0;
    std::list<std::pair<Key, at::Tensor>> variants;  // most recent first
  };

  // Freed weights release their converted copies at the next insertion, which is when memory grows.
  void drop_dead_entries() {
    for (auto it = entries_.begin(); it != entries_.end();) {
      it = it->second.owner.expired() ? entries_.erase(it) : std::next(it);
    }
  }

  std::mutex mutex_;
  std::unordered_map<c10::TensorImpl*, Entry> entries_;
};

}  // namespace resnet_fused
