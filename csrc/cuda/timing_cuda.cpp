#include "timing_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

namespace resnet_fused {
namespace {

class TimingEvent {
 public:
  TimingEvent() {
    C10_CUDA_CHECK(cudaEventCreate(&event_));
  }
  ~TimingEvent() {
    cudaEventDestroy(event_);
  }
  TimingEvent(const TimingEvent&) = delete;
  TimingEvent& operator=(const TimingEvent&) = delete;
  void record(cudaStream_t stream) {
    C10_CUDA_CHECK(cudaEventRecord(event_, stream));
  }
  float ms_since(const TimingEvent& start) const {
    C10_CUDA_CHECK(cudaEventSynchronize(event_));
    float ms = 0;
    C10_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, event_));
    return ms;
  }

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace

std::vector<float> time_each(const std::vector<std::function<void()>>& fns) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto time_once = [&](const std::function<void()>& fn) {
    constexpr int kCalls = 2;
    TimingEvent start;
    TimingEvent end;
    start.record(stream);
    for (int i = 0; i < kCalls; ++i) {
      fn();
    }
    end.record(stream);
    return end.ms_since(start) / kCalls;
  };
  for (const auto& fn : fns) {
    fn();
  }
  std::vector<float> best(fns.size(), std::numeric_limits<float>::infinity());
  for (int round = 0; round < 5; ++round) {
    for (size_t i = 0; i < fns.size(); ++i) {
      best[i] = std::min(best[i], time_once(fns[i]));
    }
  }
  return best;
}

}  // namespace resnet_fused
