// Work sharing between the calling thread and XLA's intra-op thread pool, for the native kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace resnext_jax {

// Items handed out one at a time; tasks that start after the work is gone return at once, and the caller
// only waits for items in progress, so a busy pool cannot stall it.
struct Work {
  int64_t items;
  std::function<void(int64_t)> run_item;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  void Run() {
    for (int64_t item; (item = next.fetch_add(1)) < items;) {
      run_item(item);
      done.fetch_add(1);
    }
  }
};

inline void RunInParallel(xla::ffi::ThreadPool& pool, int64_t items, std::function<void(int64_t)> run_item) {
  auto work = std::make_shared<Work>();
  work->items = items;
  work->run_item = std::move(run_item);
  // The calling thread works too: one helper fewer than the pool has threads (it may be one of them).
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load() < items) std::this_thread::yield();
}

// A sum over `items` work items, each adding into its own zeroed float32 partial of `size` floats
// (`run_item(item, partial)`), the partials added into `total` in double in item order: the result does not
// depend on which thread ran an item. Items run in waves of about 4 MiB of partials, so the memory stays
// bounded for any batch.
inline void SumInWaves(xla::ffi::ThreadPool& pool, int64_t items, int64_t size,
                       const std::function<void(int64_t, float*)>& run_item, std::vector<double>& total) {
  total.assign(static_cast<size_t>(size), 0.0);
  const int64_t wave = std::max<int64_t>(1, std::min<int64_t>(items, (int64_t{1} << 20) / std::max<int64_t>(size, 1)));
  std::vector<float> partial(static_cast<size_t>(wave * size));
  float* pp = partial.data();
  for (int64_t start = 0; start < items; start += wave) {
    const int64_t count = std::min(wave, items - start);
    std::fill(partial.begin(), partial.begin() + count * size, 0.0f);
    RunInParallel(pool, count, [&run_item, pp, start, size](int64_t k) { run_item(start + k, pp + k * size); });
    for (int64_t k = 0; k < count; ++k)
      for (int64_t i = 0; i < size; ++i) total[i] += pp[k * size + i];
  }
}

}  // namespace resnext_jax
