#pragma once
// Work items [0, n) shared between the threads the way at::parallel_for shares them (each thread a
// run of consecutive items, in order, so that what it wrote in one conv it reads in the next), but
// a thread that has finished its own run takes the items left at the end of the others' runs.
// WHY: with a static split the layer ends when the slower thread does. On the 2-core VMs here one
// thread often runs a few percent behind the other for a whole forward (resnet50 bf16 batch 1,
// Zen 4 EPYC: 0.5 ms of 20 spent with one thread waiting at the end of a conv).

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace resnet_fused {

namespace parallel_items_detail {

// One thread's run: the next item it takes in the low 32 bits, the end (exclusive) in the high
// 32, so that the owner taking from the front and a helper taking from the back never both get
// the last item. Each on its own cache line.
struct alignas(64) Run {
  std::atomic<uint64_t> range{0};
};

inline uint64_t pack(int64_t front, int64_t end) {
  return static_cast<uint64_t>(front) | (static_cast<uint64_t>(end) << 32);
}

inline bool take(Run& run, bool from_front, int64_t& item) {
  uint64_t range = run.range.load(std::memory_order_relaxed);
  while (true) {
    const int64_t front = static_cast<int64_t>(range & 0xFFFFFFFFu), end = static_cast<int64_t>(range >> 32);
    if (front >= end) {
      return false;
    }
    const uint64_t taken = from_front ? pack(front + 1, end) : pack(front, end - 1);
    if (run.range.compare_exchange_weak(range, taken, std::memory_order_relaxed)) {
      item = from_front ? front : end - 1;
      return true;
    }
  }
}

}  // namespace parallel_items_detail

// How many items a thread has taken from another's run, in this process (for tests).
inline std::atomic<int64_t>& items_taken_over() {
  static std::atomic<int64_t> count{0};
  return count;
}

// Runs `body(claim)` once on each thread; `claim(item)` sets `item` to the next item for this
// thread and returns false once none is left. Every item is claimed exactly once; which thread
// runs it may differ from call to call, so an item's result must not depend on the thread.
template <typename Body>
void parallel_items(int64_t n, const Body& body) {
  using namespace parallel_items_detail;
  TORCH_INTERNAL_ASSERT(n >= 0 && n < (int64_t{1} << 31));
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    int64_t next = 0;
    body([&](int64_t& item) {
      item = next;
      return next++ < n;
    });
    return;
  }
  const int64_t per = (n + threads - 1) / threads;
  const std::unique_ptr<Run[]> runs(new Run[threads]);
  for (int64_t t = 0; t < threads; ++t) {
    runs[t].range.store(pack(std::min(n, t * per), std::min(n, (t + 1) * per)), std::memory_order_relaxed);
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    // One run per thread, unless fewer threads came than asked for: then a thread drains several.
    for (int64_t t = begin; t < end; ++t) {
      body([&](int64_t& item) {
        if (take(runs[t], true, item)) {
          return true;
        }
        for (int64_t k = 1; k < threads; ++k) {
          if (take(runs[(t + k) % threads], false, item)) {
            items_taken_over().fetch_add(1, std::memory_order_relaxed);
            return true;
          }
        }
        return false;
      });
    }
  });
}

}  // namespace resnet_fused
