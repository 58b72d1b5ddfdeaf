// Work sharing between the calling thread and XLA's intra-op thread pool, for the native kernels.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

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

}  // namespace resnext_jax
