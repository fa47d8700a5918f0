#pragma once
// Values derived from a weight once and reused by every later call: oneDNN's blocked layout for
// conv_onednn, and whatever else a kernel wants precomputed (Winograd-transformed panels). At
// batch 1, deriving them costs as much as the convolution itself.
//
// A cached value stands for one state of one weight tensor, so an entry is checked against:
// - the weight's TensorImpl, held through a weak pointer. A weak pointer keeps the impl's memory
//   (not its data) allocated, so no other tensor can be created at that address while the entry
//   exists: a freed weight followed by a new one at the same address is a miss, never a stale hit.
// - its version counter, which in-place updates bump (add_, copy_, load_state_dict).
// - its storage (also pinned by a weak pointer), offset, sizes, strides and dtype: `p.data = t`,
//   which Module.to(), .half() and .to(memory_format=...) do to parameters, replaces the data of
//   the same TensorImpl without bumping its version.
// - the caller's key, for values that depend on more than the weight (oneDNN's layout depends on
//   the input shape). Each weight keeps at most a few keys, least recently used dropped first: a
//   server sees a handful of batch sizes, and a caller feeding ever-new shapes must not grow it.
//
// Inference tensors (created under torch.inference_mode) have no version counter, so an in-place
// change could not be seen: their value is derived on every call, never cached. Writes through
// `p.data` (a tensor with a version counter of its own) go unseen, as they do by autograd.

#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/DimVector.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace resnet_fused {

class WeightCache {
 public:
  static constexpr size_t kDefaultKeysPerWeight = 8;

  explicit WeightCache(size_t keys_per_weight = kDefaultKeysPerWeight)
      : keys_per_weight_(keys_per_weight < 1 ? 1 : keys_per_weight) {}

  WeightCache(const WeightCache&) = delete;
  WeightCache& operator=(const WeightCache&) = delete;

  // The value `make(weight)` for `weight` in its current state and `key`, made on a miss.
  // `make` is any callable `at::Tensor(const at::Tensor&)`. It runs without the lock held (two
  // threads missing at once may both make it; one result is kept), so it may take long and use
  // intra-op threads; it must not call back into this cache.
  template <typename Make>
  at::Tensor get(const at::Tensor& weight, c10::IntArrayRef key, Make&& make) {
    if (!cacheable(weight)) {
      return make_value(weight, make);
    }
    c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
    // Read before making: if the weight changes while `make` runs, the value is filed under the
    // older version and the next call misses, rather than the reverse.
    const State state = State::of(weight);
    {
      Dropped dropped;
      std::lock_guard<std::mutex> lock(mutex_);
      maybe_sweep(dropped);
      auto it = entries_.find(impl);
      if (it != entries_.end() && it->second.state == state && !it->second.owner.expired()) {
        auto& values = it->second.values;
        for (auto v = values.begin(); v != values.end(); ++v) {
          if (key.equals(v->first)) {
            values.splice(values.begin(), values, v);  // most recently used first
            return v->second;
          }
        }
      }
    }
    at::Tensor value = make_value(weight, make);
    Dropped dropped;
    std::lock_guard<std::mutex> lock(mutex_);
    sweep(dropped);
    auto it = entries_.find(impl);
    if (it == entries_.end()) {
      it = entries_.emplace(impl, Entry{WeakImpl(weight.getIntrusivePtr()), state, {}}).first;
    } else if (!(it->second.state == state) || it->second.owner.expired()) {
      // A changed weight's old values can never hit again: replaced, not kept alongside.
      dropped.entries.push_back(std::exchange(it->second, Entry{WeakImpl(weight.getIntrusivePtr()), state, {}}));
    }
    auto& values = it->second.values;
    for (auto v = values.begin(); v != values.end(); ++v) {
      if (key.equals(v->first)) {
        dropped.values.splice(dropped.values.end(), values, v);  // another thread made it meanwhile
        break;
      }
    }
    values.emplace_front(key.vec(), value);
    if (values.size() > keys_per_weight_) {
      dropped.values.splice(dropped.values.end(), values, std::prev(values.end()));
    }
    return value;
  }

  // Drops the value for `weight` and `key`, if held: for values a caller knows it will not use again.
  void erase(const at::Tensor& weight, c10::IntArrayRef key) {
    Dropped dropped;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(weight.unsafeGetTensorImpl());
    if (it == entries_.end()) {
      return;
    }
    auto& values = it->second.values;
    for (auto v = values.begin(); v != values.end(); ++v) {
      if (key.equals(v->first)) {
        dropped.values.splice(dropped.values.end(), values, v);
        return;
      }
    }
  }

  // The values held for `weight` in its current state, under any key.
  std::vector<at::Tensor> values(const at::Tensor& weight) {
    std::vector<at::Tensor> found;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(weight.unsafeGetTensorImpl());
    if (it != entries_.end() && it->second.state == State::of(weight) && !it->second.owner.expired()) {
      for (const auto& value : it->second.values) {
        found.push_back(value.second);
      }
    }
    return found;
  }

  // Whether get() would cache for this weight (else it makes the value on every call).
  static bool cacheable(const at::Tensor& weight) {
    return weight.defined() && !weight.is_inference() && weight.has_storage();
  }

  // Values held, after dropping those of freed or changed weights (for tests and diagnostics).
  size_t size() {
    Dropped dropped;
    std::lock_guard<std::mutex> lock(mutex_);
    sweep(dropped);
    size_t n = 0;
    for (const auto& [impl, entry] : entries_) {
      n += entry.values.size();
    }
    return n;
  }

  void clear() {
    Dropped dropped;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [impl, entry] : entries_) {
      dropped.entries.push_back(std::move(entry));
    }
    entries_.clear();
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

  // What a cached value was derived from, beyond the TensorImpl's identity.
  struct State {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage_ref;  // pins `storage`'s address
    const c10::StorageImpl* storage = nullptr;
    uint32_t version = 0;
    int64_t offset = 0;
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    c10::DimVector sizes;
    c10::DimVector strides;

    static State of(const at::Tensor& t) {
      return of(*t.unsafeGetTensorImpl());
    }
    static State of(const c10::TensorImpl& t) {
      const c10::Storage& s = t.storage();
      return State{s.getWeakStorageImpl(), s.unsafeGetStorageImpl(), t.version_counter().current_version(),
                   t.storage_offset(), c10::typeMetaToScalarType(t.dtype()), c10::DimVector(t.sizes()),
                   c10::DimVector(t.strides())};
    }
    bool operator==(const State& o) const {
      return storage == o.storage && version == o.version && offset == o.offset && dtype == o.dtype &&
          sizes == o.sizes && strides == o.strides;
    }
  };

  using Values = std::list<std::pair<std::vector<int64_t>, at::Tensor>>;

  struct Entry {
    WeakImpl owner;
    State state;
    Values values;  // most recently used first
  };

  // What a call removes, released after the lock: the last reference to a tensor can run arbitrary
  // code (a Python object's deallocation, which takes the GIL) that must not wait behind the lock.
  // Declared before the lock_guard, so destroyed after it.
  struct Dropped {
    std::vector<Entry> entries;
    Values values;
    std::vector<c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> owners;
  };

  template <typename Make>
  static at::Tensor make_value(const at::Tensor& weight, Make& make) {
    // A value with an autograd graph back to the weight would keep the weight alive, and with it
    // the entry, for as long as the cache lives.
    c10::AutoGradMode no_grad(false);
    return make(weight);
  }

  // Freed weights: their values would never hit again. Changed weights: they would be replaced at
  // their next call, but a weight updated and then never run again would hold them for good.
  void sweep(Dropped& dropped) {
    calls_since_sweep_ = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      auto owner = it->second.owner.lock();
      const bool live = owner.defined() && State::of(*owner) == it->second.state;
      dropped.owners.push_back(std::move(owner));
      if (live) {
        ++it;
      } else {
        dropped.entries.push_back(std::move(it->second));
        it = entries_.erase(it);
      }
    }
  }

  // Also sweeps while every call hits, so that a freed model's values go within a few calls of
  // whatever keeps running; once per `entries` calls keeps the cost per call constant.
  void maybe_sweep(Dropped& dropped) {
    if (++calls_since_sweep_ >= entries_.size() + 64) {
      sweep(dropped);
    }
  }

  const size_t keys_per_weight_;
  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
  size_t calls_since_sweep_ = 0;
};

}  // namespace resnet_fused
