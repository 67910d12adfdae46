// CPU exact K nearest neighbours by a k-d tree (see nearest_cpu.h).
#include "nearest/nearest_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "common/simd.h"
#include "common/threads.h"

namespace fastlddmm {

namespace {

constexpr int64_t kLeafMax = 32;        // leaves hold kLeafMax / 2 .. kLeafMax points
constexpr int64_t kQueriesPerTask = 256;

// The tree: an implicit, balanced binary tree over positions [0, m) of the points in tree order; node
// `i` (heap numbering, root 0) covers [b, e) and splits it at mid = (b + e) / 2, on dimension sdim[i]
// at value split[i]: points before mid have coordinate <= split[i], points from mid on >= split[i].
template <typename T>
struct Tree {
  int dim = 0, depth = 0;
  int64_t m = 0;
  std::vector<T> coord;         // (dim, m + W) in tree order, padded
  std::vector<int64_t> index;   // tree position -> original index
  std::vector<T> split;         // (2^depth - 1,)
  std::vector<uint8_t> sdim;
  const T* c(int d) const { return coord.data() + d * (m + simd::Lanes<T>::W); }
};

template <typename T>
void build_node(Tree<T>& tr, const T* y, std::vector<int64_t>& perm, int64_t node, int64_t b, int64_t e, int level,
                int parallel_levels, int threads) {
  if (level == tr.depth) return;
  const int dim = tr.dim;
  // Widest side of the points' bounding box.
  int best = 0;
  T width = -1;
  for (int d = 0; d < dim; ++d) {
    T lo = std::numeric_limits<T>::infinity(), hi = -lo;
    for (int64_t i = b; i < e; ++i) {
      const T v = y[perm[i] * dim + d];
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    if (hi - lo > width) {
      width = hi - lo;
      best = d;
    }
  }
  const int64_t mid = (b + e) / 2;
  std::nth_element(perm.begin() + b, perm.begin() + mid, perm.begin() + e, [&](int64_t u, int64_t v) {
    const T cu = y[u * dim + best], cv = y[v * dim + best];
    return cu < cv || (cu == cv && u < v);  // a total order: the tree does not depend on the library's ties
  });
  tr.split[node] = y[perm[mid] * dim + best];
  tr.sdim[node] = static_cast<uint8_t>(best);
  if (level < parallel_levels) {
#ifdef _OPENMP
#pragma omp task default(shared)
#endif
    build_node(tr, y, perm, 2 * node + 1, b, mid, level + 1, parallel_levels, threads);
#ifdef _OPENMP
#pragma omp task default(shared)
#endif
    build_node(tr, y, perm, 2 * node + 2, mid, e, level + 1, parallel_levels, threads);
#ifdef _OPENMP
#pragma omp taskwait
#endif
  } else {
    build_node(tr, y, perm, 2 * node + 1, b, mid, level + 1, parallel_levels, threads);
    build_node(tr, y, perm, 2 * node + 2, mid, e, level + 1, parallel_levels, threads);
  }
}

// Fixed D: the points themselves are moved (records of D coordinates + index), so that every pass of
// the build reads contiguous memory (3x faster than moving a permutation at 10^6 points).
template <typename T, int D>
struct Rec {
  T c[D];
  int64_t id;
};

template <typename T, int D>
void build_node_fixed(Tree<T>& tr, Rec<T, D>* r, int64_t node, int64_t b, int64_t e, int level, int parallel_levels) {
  if (level == tr.depth) return;
  T lo[D], hi[D];
  for (int d = 0; d < D; ++d) lo[d] = hi[d] = r[b].c[d];
  for (int64_t i = b + 1; i < e; ++i)
    for (int d = 0; d < D; ++d) {
      lo[d] = std::min(lo[d], r[i].c[d]);
      hi[d] = std::max(hi[d], r[i].c[d]);
    }
  int best = 0;
  for (int d = 1; d < D; ++d)
    if (hi[d] - lo[d] > hi[best] - lo[best]) best = d;
  const int64_t mid = (b + e) / 2;
  std::nth_element(r + b, r + mid, r + e, [best](const Rec<T, D>& u, const Rec<T, D>& v) {
    return u.c[best] < v.c[best] || (u.c[best] == v.c[best] && u.id < v.id);  // total order
  });
  tr.split[node] = r[mid].c[best];
  tr.sdim[node] = static_cast<uint8_t>(best);
  if (level < parallel_levels) {
#ifdef _OPENMP
#pragma omp task default(shared)
#endif
    build_node_fixed<T, D>(tr, r, 2 * node + 1, b, mid, level + 1, parallel_levels);
#ifdef _OPENMP
#pragma omp task default(shared)
#endif
    build_node_fixed<T, D>(tr, r, 2 * node + 2, mid, e, level + 1, parallel_levels);
#ifdef _OPENMP
#pragma omp taskwait
#endif
  } else {
    build_node_fixed<T, D>(tr, r, 2 * node + 1, b, mid, level + 1, parallel_levels);
    build_node_fixed<T, D>(tr, r, 2 * node + 2, mid, e, level + 1, parallel_levels);
  }
}

template <typename T, int D>
void build_fixed(Tree<T>& tr, const T* y, int64_t m, int parallel_levels, int threads) {
  constexpr int W = simd::Lanes<T>::W;
  std::vector<Rec<T, D>> r(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    for (int d = 0; d < D; ++d) r[i].c[d] = y[i * D + d];
    r[i].id = i;
  }
  if (parallel_levels > 0) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#pragma omp single
#endif
    build_node_fixed<T, D>(tr, r.data(), 0, 0, m, 0, parallel_levels);
  } else {
    build_node_fixed<T, D>(tr, r.data(), 0, 0, m, 0, 0);
  }
  tr.coord.assign(static_cast<size_t>(D * (m + W)), T(0));
  tr.index.resize(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    for (int d = 0; d < D; ++d) tr.coord[d * (m + W) + i] = r[i].c[d];
    tr.index[i] = r[i].id;
  }
}

template <typename T>
void build(Tree<T>& tr, const T* y, int64_t m, int dim, int threads) {
  constexpr int W = simd::Lanes<T>::W;
  tr.dim = dim;
  tr.m = m;
  tr.depth = 0;
  while ((m >> tr.depth) > kLeafMax) ++tr.depth;  // leaves: ceil/floor halvings of m, <= kLeafMax + 1 points
  if (dim > 255) throw std::invalid_argument("nearest: the cpu k-d tree supports D <= 255");
  const int64_t internal = (int64_t(1) << tr.depth) - 1;
  tr.split.assign(static_cast<size_t>(internal), T(0));
  tr.sdim.assign(static_cast<size_t>(internal), 0);
  int parallel_levels = 0;
  while (threads > 1 && m > 20000 && (int64_t(1) << parallel_levels) < 4 * threads && parallel_levels < tr.depth)
    ++parallel_levels;
  if (dim == 3) return build_fixed<T, 3>(tr, y, m, parallel_levels, threads);
  if (dim == 2) return build_fixed<T, 2>(tr, y, m, parallel_levels, threads);
  std::vector<int64_t> perm(static_cast<size_t>(m));
  std::iota(perm.begin(), perm.end(), int64_t(0));
  if (parallel_levels > 0) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#pragma omp single
#endif
    build_node(tr, y, perm, 0, 0, m, 0, parallel_levels, threads);
  } else {
    build_node(tr, y, perm, 0, 0, m, 0, 0, threads);
  }
  tr.coord.assign(static_cast<size_t>(dim * (m + W)), T(0));
  for (int64_t i = 0; i < m; ++i)
    for (int d = 0; d < dim; ++d) tr.coord[d * (m + W) + i] = y[perm[i] * dim + d];
  tr.index = std::move(perm);
}

// The K best so far of one query, sorted by (distance, tree position).
template <typename T>
struct Best {
  int k;
  T* dist;       // (k,)
  int64_t* pos;  // (k,)
  T worst() const { return dist[k - 1]; }
  void offer(T d, int64_t p) {
    if (!(d < dist[k - 1] || (d == dist[k - 1] && p < pos[k - 1]))) return;
    int i = k - 1;
    while (i > 0 && (d < dist[i - 1] || (d == dist[i - 1] && p < pos[i - 1]))) {
      dist[i] = dist[i - 1];
      pos[i] = pos[i - 1];
      --i;
    }
    dist[i] = d;
    pos[i] = p;
  }
};

template <typename T, int D, int NORM>
struct Searcher {
  using V = simd::vec<T>;
  static constexpr int W = simd::Lanes<T>::W;
  const Tree<T>& tr;
  int dim;
  const T* q;
  Best<T> best;
  T off[D > 0 ? D : 64];  // per-dimension offset of q from the current cell (dim <= 64 on this path)

  T leaf_distance_lanes(int64_t b, int64_t len, V& dv) const {
    V acc = simd::splat<T>(T(0));
    const int nd = D > 0 ? D : dim;
    for (int d = 0; d < nd; ++d) {
      const V df = simd::load(tr.c(d) + b) - q[d];
      if constexpr (NORM == 2) {
        acc += df * df;
      } else {
        acc += simd::vmax<T>(df, -df);
      }
    }
    // Lanes past the leaf weigh +inf.
    V lane;
    for (int l = 0; l < W; ++l) lane[l] = static_cast<T>(l);
    dv = lane < static_cast<T>(len) ? acc : simd::splat<T>(std::numeric_limits<T>::infinity());
    return simd::hmin<T>(dv);
  }

  void leaf(int64_t b, int64_t e) {
    for (int64_t s = b; s < e; s += W) {
      V dv;
      const T mn = leaf_distance_lanes(s, std::min<int64_t>(W, e - s), dv);
      if (mn > best.worst()) continue;
      if (best.k == 1) {  // the first lane holding the minimum (the smallest tree position among ties)
        int l = 0;
        while (dv[l] != mn) ++l;
        best.offer(mn, s + l);
        continue;
      }
      for (int l = 0; l < W && s + l < e; ++l)
        if (dv[l] <= best.worst()) best.offer(dv[l], s + l);
    }
  }

  // rd: distance (norm^NORM) from q to the cell of `node` (incremental, Arya & Mount).
  void search(int64_t node, int64_t b, int64_t e, int level, T rd) {
    if (level == tr.depth) {
      leaf(b, e);
      return;
    }
    const int sd = tr.sdim[node];
    const T diff = q[sd] - tr.split[node];
    const int64_t mid = (b + e) / 2;
    const bool left_first = diff <= T(0);
    if (left_first)
      search(2 * node + 1, b, mid, level + 1, rd);
    else
      search(2 * node + 2, mid, e, level + 1, rd);
    const T old = off[sd];
    T far_rd;
    if constexpr (NORM == 2) {
      far_rd = rd - old * old + diff * diff;
    } else {
      far_rd = rd - std::abs(old) + std::abs(diff);
    }
    if (far_rd < best.worst()) {  // strict: equidistant cells are not searched (duplicates stay O(log M))
      off[sd] = diff;
      if (left_first)
        search(2 * node + 2, mid, e, level + 1, far_rd);
      else
        search(2 * node + 1, b, mid, level + 1, far_rd);
      off[sd] = old;
    }
  }
};

// The leaf a point falls in (for the query order).
template <typename T>
int64_t leaf_of(const Tree<T>& tr, const T* q) {
  int64_t node = 0;
  for (int level = 0; level < tr.depth; ++level)  // branch-free: the direction is data, not a jump
    node = 2 * node + 1 + static_cast<int64_t>(q[tr.sdim[node]] > tr.split[node]);
  return node - ((int64_t(1) << tr.depth) - 1);
}

template <typename T, int D, int NORM>
void query_all(const Tree<T>& tr, const T* x, int64_t n, int dim, int k, int threads, int64_t* out /* (n, kout) */,
               int kout) {
  // Queries in the order of their leaves (counting sort): neighbouring queries share the tree's cache lines.
  const int64_t leaves = int64_t(1) << tr.depth;
  std::vector<int64_t> leaf(static_cast<size_t>(n)), start(static_cast<size_t>(leaves + 1), 0), order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    leaf[i] = leaf_of(tr, x + i * dim);
    ++start[leaf[i] + 1];
  }
  for (int64_t l = 0; l < leaves; ++l) start[l + 1] += start[l];
  for (int64_t i = 0; i < n; ++i) order[start[leaf[i]]++] = i;
  // The queries copied in that order: the search then reads them sequentially (a gather loop overlaps the
  // cache misses that reading x in a random order would take one by one inside the search).
  std::vector<T> xs(static_cast<size_t>(n * dim));
  for (int64_t t = 0; t < n; ++t)
    for (int d = 0; d < dim; ++d) xs[t * dim + d] = x[order[t] * dim + d];
  const int64_t ntasks = (n + kQueriesPerTask - 1) / kQueriesPerTask;
  parallel_tasks(ntasks, threads, [&](int64_t task) {
    std::vector<T> dist(static_cast<size_t>(k));
    std::vector<int64_t> pos(static_cast<size_t>(k));
    Searcher<T, D, NORM> s{tr, dim, nullptr, Best<T>{k, dist.data(), pos.data()}, {}};
    const int64_t i1 = std::min(n, (task + 1) * kQueriesPerTask);
    for (int64_t t = task * kQueriesPerTask; t < i1; ++t) {
      const int64_t i = order[t];
      s.q = xs.data() + t * dim;
      std::fill(dist.begin(), dist.end(), std::numeric_limits<T>::infinity());
      std::fill(pos.begin(), pos.end(), std::numeric_limits<int64_t>::max());
      for (int d = 0; d < dim; ++d) s.off[d] = T(0);
      s.search(0, 0, tr.m, 0, T(0));
      for (int j = 0; j < k; ++j) out[i * kout + j] = tr.index[pos[j]];
    }
  });
}

template <typename T, int NORM>
void query_dim(const Tree<T>& tr, const T* x, int64_t n, int dim, int k, int threads, int64_t* out, int kout) {
  if (dim == 3) return query_all<T, 3, NORM>(tr, x, n, dim, k, threads, out, kout);
  if (dim == 2) return query_all<T, 2, NORM>(tr, x, n, dim, k, threads, out, kout);
  if (dim > 64) throw std::invalid_argument("nearest: the cpu k-d tree supports D <= 64");
  return query_all<T, 0, NORM>(tr, x, n, dim, k, threads, out, kout);
}

}  // namespace

template <typename T>
void knn_cpu(const T* x, const T* y, const int64_t* x_lengths, const int64_t* y_lengths, int64_t batch, int64_t n,
             int64_t m, int dim, int k, int norm, int num_threads, int64_t* index) {
  if (k < 1) throw std::invalid_argument("nearest: k must be >= 1");
  if (norm != 1 && norm != 2) throw std::invalid_argument("nearest: norm must be 1 or 2");
  if (dim < 1 || dim > 64) throw std::invalid_argument("nearest: the cpu k-d tree supports 1 <= D <= 64");
  const int max_threads = resolve_threads(num_threads);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t nb = x_lengths ? std::min<int64_t>(std::max<int64_t>(x_lengths[b], 0), n) : n;
    const int64_t mb = y_lengths ? std::min<int64_t>(std::max<int64_t>(y_lengths[b], 0), m) : m;
    const int kk = static_cast<int>(std::min<int64_t>(k, mb));
    if (nb == 0 || kk == 0) continue;
    // ~4096 queries at least per thread (a query costs ~0.3 us).
    const int threads = threads_for(max_threads, static_cast<double>(std::max(nb, mb)), 4096.0);
    Tree<T> tr;
    {
      simd::FlushDenormals ftz;
      build(tr, y + b * m * dim, mb, dim, threads);
    }
    int64_t* out = index + b * n * k;
    if (norm == 2)
      query_dim<T, 2>(tr, x + b * n * dim, nb, dim, kk, threads, out, k);
    else
      query_dim<T, 1>(tr, x + b * n * dim, nb, dim, kk, threads, out, k);
  }
}

template void knn_cpu<float>(const float*, const float*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int,
                             int, int, int, int64_t*);
template void knn_cpu<double>(const double*, const double*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t,
                              int, int, int, int, int64_t*);

}  // namespace fastlddmm
