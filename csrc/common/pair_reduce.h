// The streaming log-sum-exp over point pairs that the soft-min and the barycentric projection are made of
// (csrc/softmin/softmin_cpu.cpp, csrc/projection/projection_cpu.cpp). Never an N x M matrix: each query
// row is reduced over the reference points with an online (running-max) log-sum-exp, SIMD over the
// reference points, OpenMP over blocks of query rows.
//
// In log2 units (one exp2 per pair, the constants folded as FlashSinkhorn does), with x' = x - c and
// y' = y - c centred on one point c (C is translation invariant; centring keeps the expansion below
// accurate for clouds far from the origin):
//   p = 2:  (h_j - |x_i - y_j|^2 / 2eps) log2 e = oq_i + t_ij,  t_ij = a_j + q_i . r_j,
//           q_i = x'_i log2e / eps, r_j = y'_j, a_j = h_j log2e - |y'_j|^2 log2e / 2eps, oq_i = -|x'_i|^2 log2e / 2eps
//   p = 1:  (h_j - C_ij / eps) log2 e = t_ij = a_j - k sqrt(max(|q_i - r_j|^2, 1e-8)),  q = x', r = y',
//           a_j = h_j log2e, k = log2e / eps  (from coordinate differences: the square root would magnify
//           the rounding of an expansion near d = 0)
// The reference side is stored as structure of arrays padded to a multiple of the vector width W with
// a_j = -1e30 (padded lanes then weigh exactly nothing).
//
// Determinism: each query row is reduced over j in one fixed order, lane l taking j = l mod W, and the W
// lanes are combined in lane order in double: the result of a row depends neither on the thread count
// nor on which thread ran it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/simd.h"
#include "common/threads.h"

namespace fastlddmm {
namespace pairs {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kP1Floor = 1e-8;  // GeomLoss's floor on d^2 under the p = 1 square root
constexpr double kPadOffset = -1e30;

// The reference side of one reduction (one batch item), structure of arrays, padded to mp (a multiple
// of W). coord[d][j], offset[j], and nv value arrays val[k][j] (what the reduction averages).
template <typename T>
struct RefSet {
  int64_t m = 0, mp = 0;
  int dim = 0, nv = 0;
  const T* coord = nullptr;   // (dim, mp)
  const T* offset = nullptr;  // (mp,)
  const T* val = nullptr;     // (nv, mp)
};

// Owns the buffer of a RefSet.
template <typename T>
struct RefBuffer {
  std::vector<T> buf;
  RefSet<T> set;
  void allocate(int64_t m, int dim, int nv) {
    constexpr int W = simd::Lanes<T>::W;
    const int64_t mp = (m + W - 1) / W * W;
    buf.assign(static_cast<size_t>(mp * (dim + 1 + nv)), T(0));
    set.m = m;
    set.mp = mp;
    set.dim = dim;
    set.nv = nv;
    set.coord = buf.data();
    set.offset = buf.data() + dim * mp;
    set.val = buf.data() + (dim + 1) * mp;
    for (int64_t j = m; j < mp; ++j) offset()[j] = static_cast<T>(kPadOffset);
  }
  T* coord(int d) { return buf.data() + d * set.mp; }
  T* offset() { return buf.data() + set.dim * set.mp; }
  T* val(int k) { return buf.data() + (set.dim + 1 + k) * set.mp; }
};

// What a row reduction leaves: lse2 = log2 sum_j 2^{t_ij} (+ nothing else), and the weighted means
// mean[k] = sum_j 2^{t_ij} w_ij val[k][j] / sum_j 2^{t_ij}, where w_ij = 1, or 1 / C_ij (0 where d^2 is
// floored: the derivative of the floor) when INVC; and wmean = sum_j 2^{t_ij} w_ij / sum_j 2^{t_ij} (INVC).
struct RowOut {
  double* lse2;   // (rows,)
  double* mean;   // (rows, nv) or null
  double* wmean;  // (rows,) or null (INVC only)
};

template <typename T>
using V = simd::vec<T>;

template <typename T>
inline V<T> vsqrt(V<T> a) {
#if FASTLDDMM_SIMD_AVX512
  if constexpr (sizeof(T) == 4) {
    return reinterpret_cast<V<T>>(_mm512_sqrt_ps(reinterpret_cast<__m512>(a)));
  } else {
    return reinterpret_cast<V<T>>(_mm512_sqrt_pd(reinterpret_cast<__m512d>(a)));
  }
#else
  V<T> r;
  for (int l = 0; l < simd::Lanes<T>::W; ++l) r[l] = std::sqrt(a[l]);
  return r;
#endif
}

// Lanes -> one row: the running maxima m[l] and sums s[l] (and acc[k][l], accw[l]) combined in lane
// order in double.
template <typename T>
inline void finish_row(const V<T>& m, const V<T>& s, const V<T>* acc, int nv, const V<T>* accw, double oq,
                       int64_t row, const RowOut& out) {
  constexpr int W = simd::Lanes<T>::W;
  double mx = -INFINITY;
  for (int l = 0; l < W; ++l) mx = std::max(mx, static_cast<double>(m[l]));
  double scale[W];
  double total = 0.0;
  for (int l = 0; l < W; ++l) {
    scale[l] = std::exp2(static_cast<double>(m[l]) - mx);
    total += static_cast<double>(s[l]) * scale[l];
  }
  out.lse2[row] = oq + mx + std::log2(total);
  for (int k = 0; k < nv; ++k) {
    double a = 0.0;
    for (int l = 0; l < W; ++l) a += static_cast<double>(acc[k][l]) * scale[l];
    out.mean[row * nv + k] = a / total;
  }
  if (accw != nullptr) {
    double a = 0.0;
    for (int l = 0; l < W; ++l) a += static_cast<double>((*accw)[l]) * scale[l];
    out.wmean[row] = a / total;
  }
}

// R query rows against the whole reference set, D and NV known at compile time (the fast path).
// q: R pointers to the rows' query coordinates (scaled as in the file comment).
template <typename T, int P, int D, int NV, bool INVC, int R>
inline void rows_fixed(const RefSet<T>& ref, const T* const* q, const double* oq, const int64_t* rows, T k,
                       const RowOut& out) {
  constexpr int W = simd::Lanes<T>::W;
  constexpr int NA = NV > 0 ? NV : 1;
  const V<T> floor = simd::splat<T>(static_cast<T>(kP1Floor));
  const V<T> kv = simd::splat<T>(k);
  V<T> qv[R][D];
  V<T> m[R], s[R], acc[R][NA], accw[R];
  for (int r = 0; r < R; ++r) {
    for (int d = 0; d < D; ++d) qv[r][d] = simd::splat<T>(q[r][d]);
    m[r] = simd::splat<T>(-3e38f);  // below any real t, finite (exp2 of m - t stays a number)
    s[r] = simd::splat<T>(T(0));
    accw[r] = s[r];
    for (int v = 0; v < NA; ++v) acc[r][v] = s[r];
  }
  for (int64_t j = 0; j < ref.mp; j += W) {
    V<T> rc[D];
    for (int d = 0; d < D; ++d) rc[d] = simd::load(ref.coord + d * ref.mp + j);
    const V<T> a = simd::load(ref.offset + j);
    V<T> t[R], ic[R];
    for (int r = 0; r < R; ++r) {
      if constexpr (P == 2) {
        V<T> tt = a;
        for (int d = 0; d < D; ++d) tt += qv[r][d] * rc[d];
        t[r] = tt;
      } else {
        V<T> d2 = simd::splat<T>(T(0));
        for (int d = 0; d < D; ++d) {
          const V<T> df = qv[r][d] - rc[d];
          d2 += df * df;
        }
        const V<T> c = vsqrt<T>(simd::vmax<T>(d2, floor));
        t[r] = a - kv * c;
        if constexpr (INVC) ic[r] = d2 >= floor ? T(1) / c : simd::splat<T>(T(0));
      }
    }
    bool up = false;
    for (int r = 0; r < R; ++r) up |= simd::any_greater<T>(t[r], m[r]);
    if (__builtin_expect(up, 0)) {
      for (int r = 0; r < R; ++r) {
        const V<T> mn = simd::vmax<T>(m[r], t[r]);
        const V<T> sc = simd::exp2<T>(m[r] - mn);
        s[r] *= sc;
        if constexpr (NV > 0)
          for (int v = 0; v < NV; ++v) acc[r][v] *= sc;
        if constexpr (INVC) accw[r] *= sc;
        m[r] = mn;
      }
    }
    V<T> vals[NA];
    if constexpr (NV > 0)
      for (int v = 0; v < NV; ++v) vals[v] = simd::load(ref.val + v * ref.mp + j);
    for (int r = 0; r < R; ++r) {
      const V<T> e = simd::exp2<T>(t[r] - m[r]);
      s[r] += e;
      if constexpr (NV > 0 || INVC) {
        V<T> w = e;
        if constexpr (INVC) {
          w = e * ic[r];
          accw[r] += w;
        }
        if constexpr (NV > 0)
          for (int v = 0; v < NV; ++v) acc[r][v] += w * vals[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    finish_row<T>(m[r], s[r], acc[r], NV, INVC ? &accw[r] : nullptr, oq[r], rows[r], out);
}

// One query row, any D and number of values (accumulators in memory): the generic path.
template <typename T, int P, bool INVC>
inline void row_generic(const RefSet<T>& ref, const T* q, double oq, int64_t row, T k, const RowOut& out,
                        std::vector<V<T>>& acc) {
  constexpr int W = simd::Lanes<T>::W;
  const int D = ref.dim, nv = ref.nv;
  const V<T> floor = simd::splat<T>(static_cast<T>(kP1Floor));
  const V<T> kv = simd::splat<T>(k);
  acc.assign(static_cast<size_t>(std::max(nv, 1)), simd::splat<T>(T(0)));
  V<T> m = simd::splat<T>(-3e38f), s = simd::splat<T>(T(0)), accw = s;
  for (int64_t j = 0; j < ref.mp; j += W) {
    V<T> t, ic;
    if constexpr (P == 2) {
      t = simd::load(ref.offset + j);
      for (int d = 0; d < D; ++d) t += q[d] * simd::load(ref.coord + d * ref.mp + j);
    } else {
      V<T> d2 = simd::splat<T>(T(0));
      for (int d = 0; d < D; ++d) {
        const V<T> df = q[d] - simd::load(ref.coord + d * ref.mp + j);
        d2 += df * df;
      }
      const V<T> c = vsqrt<T>(simd::vmax<T>(d2, floor));
      t = simd::load(ref.offset + j) - kv * c;
      if constexpr (INVC) ic = d2 >= floor ? T(1) / c : simd::splat<T>(T(0));
    }
    if (simd::any_greater<T>(t, m)) {
      const V<T> mn = simd::vmax<T>(m, t);
      const V<T> sc = simd::exp2<T>(m - mn);
      s *= sc;
      accw *= sc;
      for (int v = 0; v < nv; ++v) acc[v] *= sc;
      m = mn;
    }
    const V<T> e = simd::exp2<T>(t - m);
    s += e;
    V<T> w = e;
    if constexpr (INVC) {
      w = e * ic;
      accw += w;
    }
    for (int v = 0; v < nv; ++v) acc[v] += w * simd::load(ref.val + v * ref.mp + j);
  }
  finish_row<T>(m, s, acc.data(), nv, INVC ? &accw : nullptr, oq, row, out);
}

// Rows [0, n) of queries q (n, ref.dim) against ref, in blocks of R rows on the calling thread.
template <typename T, int P, int D, int NV, bool INVC, int R>
void rows_range_fixed(const RefSet<T>& ref, const T* q, const double* oq, int64_t begin, int64_t end, T k,
                      const RowOut& out) {
  for (int64_t i = begin; i < end; i += R) {
    const T* qp[R];
    double o[R];
    int64_t rows[R];
    for (int r = 0; r < R; ++r) {
      const int64_t ii = std::min(i + r, end - 1);  // a short last block repeats its last row
      qp[r] = q + ii * D;
      o[r] = oq[ii];
      rows[r] = ii;
    }
    rows_fixed<T, P, D, NV, INVC, R>(ref, qp, o, rows, k, out);
  }
}

template <typename T, int P, bool INVC>
void rows_range_generic(const RefSet<T>& ref, const T* q, const double* oq, int64_t begin, int64_t end, T k,
                        const RowOut& out) {
  std::vector<V<T>> acc;
  for (int64_t i = begin; i < end; ++i) row_generic<T, P, INVC>(ref, q + i * ref.dim, oq[i], i, k, out, acc);
}

// Dispatch on (D, NV) to the compiled fast paths: D in {2, 3} with NV in {0, D, D + 1}; else generic.
template <typename T, int P, bool INVC>
void rows_range(const RefSet<T>& ref, const T* q, const double* oq, int64_t begin, int64_t end, T k,
                const RowOut& out) {
  const int D = ref.dim, nv = ref.nv;
#define FASTLDDMM_ROWS(DD, NN, RR)                                                     \
  if (D == DD && nv == NN) {                                                           \
    rows_range_fixed<T, P, DD, NN, INVC, RR>(ref, q, oq, begin, end, k, out);          \
    return;                                                                            \
  }
  FASTLDDMM_ROWS(3, 0, 4)
  FASTLDDMM_ROWS(3, 3, 2)
  FASTLDDMM_ROWS(3, 4, 2)
  FASTLDDMM_ROWS(2, 0, 4)
  FASTLDDMM_ROWS(2, 2, 2)
  FASTLDDMM_ROWS(2, 3, 2)
#undef FASTLDDMM_ROWS
  rows_range_generic<T, P, INVC>(ref, q, oq, begin, end, k, out);
}


// One batch item's reduction "queries x <- references y" in the form of the file comment: fills the
// reference set (coord, offset; nv value arrays left for the caller), the scaled queries q (n, dim) and
// their offsets oq (n,), and returns the centre c (dim,) used (the mean of y, in double).
template <typename T>
void prepare(const T* x, const T* y, const T* h, int64_t n, int64_t m, int dim, double eps, int p, int nv,
             RefBuffer<T>& ref, std::vector<T>& q, std::vector<double>& oq, std::vector<double>& centre) {
  centre.assign(static_cast<size_t>(dim), 0.0);
  for (int64_t j = 0; j < m; ++j)
    for (int d = 0; d < dim; ++d) centre[d] += static_cast<double>(y[j * dim + d]);
  for (int d = 0; d < dim; ++d) centre[d] /= static_cast<double>(std::max<int64_t>(m, 1));
  ref.allocate(m, dim, nv);
  const double qscale = p == 2 ? kLog2e / eps : 1.0;
  const double half = kLog2e / (2.0 * eps);
  T* off = ref.offset();
  for (int64_t j = 0; j < m; ++j) {
    double r2 = 0.0;
    for (int d = 0; d < dim; ++d) {
      const double r = static_cast<double>(y[j * dim + d]) - centre[d];
      ref.coord(d)[j] = static_cast<T>(r);
      r2 += r * r;
    }
    const double hl = static_cast<double>(h[j]) * kLog2e;
    off[j] = static_cast<T>(p == 2 ? hl - r2 * half : hl);
  }
  q.resize(static_cast<size_t>(n * dim));
  oq.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double x2 = 0.0;
    for (int d = 0; d < dim; ++d) {
      const double r = static_cast<double>(x[i * dim + d]) - centre[d];
      q[i * dim + d] = static_cast<T>(r * qscale);
      x2 += r * r;
    }
    oq[i] = p == 2 ? -x2 * half : 0.0;
  }
}

// rows_range for p known at run time.
template <typename T, bool INVC>
void rows_range_p(int p, const RefSet<T>& ref, const T* q, const double* oq, int64_t begin, int64_t end, T k,
                  const RowOut& out) {
  if (p == 2) {
    if constexpr (!INVC) rows_range<T, 2, false>(ref, q, oq, begin, end, k, out);  // INVC: p = 1 only
  } else {
    rows_range<T, 1, INVC>(ref, q, oq, begin, end, k, out);
  }
}


// The backward row pass of a weighted sum T_i = sum_j P_ij v_j (the projection): with the row's log2
// normaliser folded into its offset (oq_i - lse2_i, so 2^{t_ij} = P_ij), accumulates
//   sw_i = sum_j P_ij u_ij w_ij,  swr_i[d] = sum_j P_ij u_ij w_ij r_j[d],  u_ij = g_i . v_j - c_i,
// with w = 1 (p = 2) or 1 / C_ij (p = 1, 0 where the floor is active). ref.val holds v (dim arrays).
// g: (n, dim) row weights, c: (n,), off: (n,) log2 offsets. Output sw (n,), swr (n, dim) in double.
template <typename T, int P, int D>
void weighted_rows(const RefSet<T>& ref, const T* q, const T* g, const double* c, const double* off, int64_t begin,
                   int64_t end, T k, double* sw, double* swr) {
  constexpr int W = simd::Lanes<T>::W;
  const int dim = D > 0 ? D : ref.dim;
  const V<T> floor = simd::splat<T>(static_cast<T>(kP1Floor));
  const V<T> kv = simd::splat<T>(k);
  std::vector<V<T>> accr(static_cast<size_t>(dim));
  for (int64_t i = begin; i < end; ++i) {
    const T* qi = q + i * dim;
    const T* gi = g + i * dim;
    const V<T> o = simd::splat<T>(static_cast<T>(off[i]));
    const V<T> ci = simd::splat<T>(static_cast<T>(c[i]));
    V<T> accw = simd::splat<T>(T(0));
    for (int d = 0; d < dim; ++d) accr[d] = accw;
    for (int64_t j = 0; j < ref.mp; j += W) {
      V<T> t, ic;
      const V<T> a = simd::load(ref.offset + j) + o;
      if constexpr (P == 2) {
        t = a;
        for (int d = 0; d < dim; ++d) t += qi[d] * simd::load(ref.coord + d * ref.mp + j);
      } else {
        V<T> d2 = simd::splat<T>(T(0));
        for (int d = 0; d < dim; ++d) {
          const V<T> df = qi[d] - simd::load(ref.coord + d * ref.mp + j);
          d2 += df * df;
        }
        const V<T> cc = vsqrt<T>(simd::vmax<T>(d2, floor));
        t = a - kv * cc;
        ic = d2 >= floor ? T(1) / cc : simd::splat<T>(T(0));
      }
      V<T> u = -ci;
      for (int d = 0; d < dim; ++d) u += gi[d] * simd::load(ref.val + d * ref.mp + j);
      V<T> w = simd::exp2<T>(t) * u;
      if constexpr (P == 1) w *= ic;
      accw += w;
      for (int d = 0; d < dim; ++d) accr[d] += w * simd::load(ref.coord + d * ref.mp + j);
    }
    double a = 0.0;
    for (int l = 0; l < W; ++l) a += static_cast<double>(accw[l]);
    sw[i] = a;
    for (int d = 0; d < dim; ++d) {
      double b = 0.0;
      for (int l = 0; l < W; ++l) b += static_cast<double>(accr[d][l]);
      swr[i * dim + d] = b;
    }
  }
}

template <typename T>
void weighted_rows_p(int p, const RefSet<T>& ref, const T* q, const T* g, const double* c, const double* off,
                     int64_t begin, int64_t end, T k, double* sw, double* swr) {
  if (p == 2) {
    if (ref.dim == 3) return weighted_rows<T, 2, 3>(ref, q, g, c, off, begin, end, k, sw, swr);
    if (ref.dim == 2) return weighted_rows<T, 2, 2>(ref, q, g, c, off, begin, end, k, sw, swr);
    return weighted_rows<T, 2, 0>(ref, q, g, c, off, begin, end, k, sw, swr);
  }
  if (ref.dim == 3) return weighted_rows<T, 1, 3>(ref, q, g, c, off, begin, end, k, sw, swr);
  if (ref.dim == 2) return weighted_rows<T, 1, 2>(ref, q, g, c, off, begin, end, k, sw, swr);
  return weighted_rows<T, 1, 0>(ref, q, g, c, off, begin, end, k, sw, swr);
}

// Rows per parallel task: a task is the unit threads share; its rows are reduced independently.
constexpr int64_t kRowsPerTask = 32;

}  // namespace pairs
}  // namespace fastlddmm
