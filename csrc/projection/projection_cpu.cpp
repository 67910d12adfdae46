// CPU barycentric-projection reduction (see projection_cpu.h). The forward is the soft-min's row
// reduction averaging v; the backward is one more pass by rows (grad_x) and one by columns (grad_h,
// grad_v: the same row reduction with the roles of x and y swapped), so that no thread ever adds into
// another's output and every result is reduced in one fixed order (deterministic whatever the threads).
#include "projection/projection_cpu.h"

#include <cmath>
#include <stdexcept>
#include <vector>

#include "common/pair_reduce.h"

namespace fastlddmm {

namespace {

template <typename T>
struct Item {  // one batch item prepared as in the forward pass
  pairs::RefBuffer<T> ref;
  std::vector<T> q;
  std::vector<double> oq, centre;
};

template <typename T>
void prepare_items(std::vector<Item<T>>& items, const T* x, const T* y, const T* h, const T* v, int64_t n, int64_t m,
                   int dim, double eps, int p, int threads) {
  parallel_tasks(static_cast<int64_t>(items.size()), threads, [&](int64_t b) {
    Item<T>& it = items[b];
    pairs::prepare<T>(x + b * n * dim, y + b * m * dim, h + b * m, n, m, dim, eps, p, dim, it.ref, it.q, it.oq,
                      it.centre);
    const T* vb = v + b * m * dim;
    for (int64_t j = 0; j < m; ++j)
      for (int d = 0; d < dim; ++d) it.ref.val(d)[j] = vb[j * dim + d];
  });
}

void check(int64_t m, int p) {
  if (p != 1 && p != 2) throw std::invalid_argument("projection: p must be 1 or 2");
  if (m < 1) throw std::invalid_argument("projection: the reference cloud is empty");
}

}  // namespace

template <typename T>
void projection_forward_cpu(const T* x, const T* y, const T* h, const T* v, int64_t batch, int64_t n, int64_t m,
                            int dim, double eps, int p, int num_threads, T* out, double* lse2) {
  using namespace pairs;
  check(m, p);
  if (n == 0 || batch == 0) return;
  const int threads = threads_for(resolve_threads(num_threads), double(batch) * n * m, 131072.0);
  std::vector<Item<T>> items(static_cast<size_t>(batch));
  prepare_items(items, x, y, h, v, n, m, dim, eps, p, threads);
  std::vector<double> mean(static_cast<size_t>(batch * n * dim));
  const int64_t per_item = (n + kRowsPerTask - 1) / kRowsPerTask;
  const T k = static_cast<T>(kLog2e / eps);
  parallel_tasks(batch * per_item, threads, [&](int64_t task) {
    const int64_t b = task / per_item, i0 = (task % per_item) * kRowsPerTask, i1 = std::min(n, i0 + kRowsPerTask);
    const RowOut ro{lse2 + b * n, mean.data() + b * n * dim, nullptr};
    rows_range_p<T, false>(p, items[b].ref.set, items[b].q.data(), items[b].oq.data(), i0, i1, k, ro);
    for (int64_t i = b * n * dim + i0 * dim; i < b * n * dim + i1 * dim; ++i) out[i] = static_cast<T>(mean[i]);
  });
}

template <typename T>
void projection_backward_cpu(const T* x, const T* y, const T* h, const T* v, const T* out, const double* lse2,
                             const T* grad_out, int64_t batch, int64_t n, int64_t m, int dim, double eps, int p,
                             int num_threads, T* grad_x, T* grad_h, T* grad_v) {
  using namespace pairs;
  check(m, p);
  if (batch == 0) return;
  const int threads = threads_for(resolve_threads(num_threads), double(batch) * n * m, 131072.0);
  if (n == 0) {  // nothing reduced: zero gradients
    if (grad_h) std::fill(grad_h, grad_h + batch * m, T(0));
    if (grad_v) std::fill(grad_v, grad_v + batch * m * dim, T(0));
    return;
  }
  std::vector<Item<T>> items(static_cast<size_t>(batch));
  prepare_items(items, x, y, h, v, n, m, dim, eps, p, threads);
  // c_i = grad_out_i . T_i and the rows' offsets oq_i - lse2_i (2^{t_ij} is then P_ij).
  std::vector<double> c(static_cast<size_t>(batch * n)), off(static_cast<size_t>(batch * n));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = b * n + i;
      double s = 0.0;
      for (int d = 0; d < dim; ++d) s += static_cast<double>(grad_out[row * dim + d]) * out[row * dim + d];
      c[row] = s;
      off[row] = items[b].oq[i] - lse2[row];
    }
  const T k = static_cast<T>(kLog2e / eps);
  const int64_t per_item = (n + kRowsPerTask - 1) / kRowsPerTask;
  if (grad_x != nullptr) {
    std::vector<double> sw(static_cast<size_t>(batch * n)), swr(static_cast<size_t>(batch * n * dim));
    parallel_tasks(batch * per_item, threads, [&](int64_t task) {
      const int64_t b = task / per_item, i0 = (task % per_item) * kRowsPerTask, i1 = std::min(n, i0 + kRowsPerTask);
      const Item<T>& it = items[b];
      weighted_rows_p<T>(p, it.ref.set, it.q.data(), grad_out + b * n * dim, c.data() + b * n, off.data() + b * n, i0,
                         i1, k, sw.data() + b * n, swr.data() + b * n * dim);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t row = b * n + i;
        for (int d = 0; d < dim; ++d) {
          const double xc = static_cast<double>(x[row * dim + d]) - it.centre[d];
          grad_x[row * dim + d] = static_cast<T>(-(xc * sw[row] - swr[row * dim + d]) / eps);
        }
      }
    });
  }
  if (grad_h == nullptr && grad_v == nullptr) return;
  // Columns: the same reduction with x as the reference set, averaging (grad_out, c) over i.
  const int nv = dim + 1;
  std::vector<RefBuffer<T>> cols(static_cast<size_t>(batch));
  std::vector<std::vector<T>> qy(static_cast<size_t>(batch));
  std::vector<std::vector<double>> oqy(static_cast<size_t>(batch));
  const double qscale = p == 2 ? kLog2e / eps : 1.0;
  parallel_tasks(batch, threads, [&](int64_t b) {
    const Item<T>& it = items[b];
    RefBuffer<T>& rb = cols[b];
    rb.allocate(n, dim, nv);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = b * n + i;
      for (int d = 0; d < dim; ++d) {
        rb.coord(d)[i] = static_cast<T>(static_cast<double>(x[row * dim + d]) - it.centre[d]);
        rb.val(d)[i] = grad_out[row * dim + d];
      }
      rb.val(dim)[i] = static_cast<T>(c[row]);
      rb.offset()[i] = static_cast<T>(p == 2 ? off[row] : -lse2[row]);
    }
    qy[b].resize(static_cast<size_t>(m * dim));
    oqy[b].resize(static_cast<size_t>(m));
    for (int64_t j = 0; j < m; ++j) {
      for (int d = 0; d < dim; ++d) qy[b][j * dim + d] = static_cast<T>(it.ref.set.coord[d * it.ref.set.mp + j] * qscale);
      oqy[b][j] = static_cast<double>(it.ref.set.offset[j]);
    }
  });
  std::vector<double> lse2c(static_cast<size_t>(batch * m)), meanc(static_cast<size_t>(batch * m * nv));
  const int64_t per_col = (m + kRowsPerTask - 1) / kRowsPerTask;
  parallel_tasks(batch * per_col, threads, [&](int64_t task) {
    const int64_t b = task / per_col, j0 = (task % per_col) * kRowsPerTask, j1 = std::min(m, j0 + kRowsPerTask);
    const RowOut ro{lse2c.data() + b * m, meanc.data() + b * m * nv, nullptr};
    rows_range_p<T, false>(p, cols[b].set, qy[b].data(), oqy[b].data(), j0, j1, k, ro);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t col = b * m + j;
      const double total = std::exp2(lse2c[col]);  // sum_i P_ij
      double gh = 0.0;
      for (int d = 0; d < dim; ++d) {
        const double gv = total * meanc[col * nv + d];
        if (grad_v) grad_v[col * dim + d] = static_cast<T>(gv);
        gh += gv * static_cast<double>(v[col * dim + d]);
      }
      if (grad_h) grad_h[col] = static_cast<T>(gh - total * meanc[col * nv + dim]);
    }
  });
}

template void projection_forward_cpu<float>(const float*, const float*, const float*, const float*, int64_t, int64_t,
                                            int64_t, int, double, int, int, float*, double*);
template void projection_forward_cpu<double>(const double*, const double*, const double*, const double*, int64_t,
                                             int64_t, int64_t, int, double, int, int, double*, double*);
template void projection_backward_cpu<float>(const float*, const float*, const float*, const float*, const float*,
                                             const double*, const float*, int64_t, int64_t, int64_t, int, double, int,
                                             int, float*, float*, float*);
template void projection_backward_cpu<double>(const double*, const double*, const double*, const double*,
                                              const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                              int, double, int, int, double*, double*, double*);

}  // namespace fastlddmm
