// Threads of the CPU kernels: every entry point takes num_threads from the caller (the Python launchers
// pass torch.get_num_threads(), so torch.set_num_threads, OMP_NUM_THREADS and `batch --cpus-per-pair`
// mean what they say). Work is cut into tasks whose results do not depend on which thread ran them.
#pragma once

#include <cstdint>

#include "common/simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastlddmm {

inline int resolve_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// The threads worth starting for `work` units when one thread should get at least `grain` of them: small
// problems run on the calling thread (an OpenMP team costs microseconds to wake, and far more when the
// machine is oversubscribed: 32 ms instead of 0.04 ms for a 300-point search at load 9 on 2 cores).
inline int threads_for(int threads, double work, double grain) {
  const double useful = work / grain;
  if (useful < 2.0) return 1;
  return useful < threads ? static_cast<int>(useful) : threads;
}

// fn(task) for task in [0, ntasks), dynamically shared between `threads` threads (one: inline), with
// denormals flushed (see simd.h).
template <typename F>
void parallel_tasks(int64_t ntasks, int threads, F&& fn) {
  if (threads <= 1 || ntasks <= 1) {
    simd::FlushDenormals ftz;
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    simd::FlushDenormals ftz;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
  }
#else
  simd::FlushDenormals ftz;
  for (int64_t t = 0; t < ntasks; ++t) fn(t);
#endif
}

}  // namespace fastlddmm
