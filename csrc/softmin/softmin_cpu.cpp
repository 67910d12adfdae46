// CPU soft-min (see softmin_cpu.h): prepare each batch item's reference set once, then OpenMP over
// tasks of kRowsPerTask query rows, each row reduced by csrc/common/pair_reduce.h.
#include "softmin/softmin_cpu.h"

#include <stdexcept>
#include <vector>

#include "common/pair_reduce.h"

namespace fastlddmm {

template <typename T>
void softmin_cpu(const T* x, const T* y, const T* h, int64_t batch, int64_t n, int64_t m, int dim, double eps,
                 int p, int num_threads, T* f, T* grad) {
  using namespace pairs;
  if (p != 1 && p != 2) throw std::invalid_argument("softmin: p must be 1 or 2");
  if (n == 0 || batch == 0) return;
  if (m < 1) throw std::invalid_argument("softmin: the reference cloud is empty");
  // ~2^17 pairs (tens of microseconds) at least per thread.
  const int threads = threads_for(resolve_threads(num_threads), double(batch) * n * m, 131072.0);
  const bool want_grad = grad != nullptr;
  const int nv = want_grad ? dim : 0;  // the gradient averages the reference coordinates
  std::vector<RefBuffer<T>> refs(static_cast<size_t>(batch));
  std::vector<std::vector<T>> qs(static_cast<size_t>(batch));
  std::vector<std::vector<double>> oqs(static_cast<size_t>(batch)), centres(static_cast<size_t>(batch));
  parallel_tasks(batch, threads, [&](int64_t b) {
    prepare<T>(x + b * n * dim, y + b * m * dim, h + b * m, n, m, dim, eps, p, 0, refs[b], qs[b], oqs[b], centres[b]);
    refs[b].set.nv = nv;
    refs[b].set.val = refs[b].set.coord;  // values = the (centred) reference coordinates themselves
  });
  std::vector<double> lse2(static_cast<size_t>(batch * n)), mean(static_cast<size_t>(batch * n * nv)),
      wmean(static_cast<size_t>(want_grad && p == 1 ? batch * n : 0));
  const int64_t per_item = (n + kRowsPerTask - 1) / kRowsPerTask;
  const T k = static_cast<T>(kLog2e / eps);
  parallel_tasks(batch * per_item, threads, [&](int64_t task) {
    const int64_t b = task / per_item, i0 = (task % per_item) * kRowsPerTask;
    const int64_t i1 = std::min(n, i0 + kRowsPerTask);
    const RowOut out{lse2.data() + b * n, nv ? mean.data() + b * n * nv : nullptr,
                     wmean.empty() ? nullptr : wmean.data() + b * n};
    if (want_grad && p == 1)
      rows_range_p<T, true>(p, refs[b].set, qs[b].data(), oqs[b].data(), i0, i1, k, out);
    else
      rows_range_p<T, false>(p, refs[b].set, qs[b].data(), oqs[b].data(), i0, i1, k, out);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = b * n + i;
      f[row] = static_cast<T>(-eps * kLn2 * lse2[row]);
      if (!want_grad) continue;
      for (int d = 0; d < dim; ++d) {
        const double xc = static_cast<double>(x[row * dim + d]) - centres[b][d];
        const double g = p == 2 ? xc - mean[row * dim + d] : xc * wmean[row] - mean[row * dim + d];
        grad[row * dim + d] = static_cast<T>(g);
      }
    }
  });
}

template void softmin_cpu<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t, int, double,
                                 int, int, float*, float*);
template void softmin_cpu<double>(const double*, const double*, const double*, int64_t, int64_t, int64_t, int,
                                  double, int, int, double*, double*);

}  // namespace fastlddmm
