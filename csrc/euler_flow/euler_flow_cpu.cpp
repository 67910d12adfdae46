// CPU (OpenMP) forward and backward of the fused Euler flow. See euler_flow.h for the contract.
//
// Layout of the work: points are cut into tiles of `tile` points; one thread runs a whole tile through
// all L layers (forward) or back through them (backward), so the weights of every layer are reused from
// cache for each tile, and only tile-sized hidden activations (H x tile) ever exist.
// Inside a tile the arrays are stored point-innermost ("transposed": [row][point]) so every inner loop
// runs over contiguous points and vectorises whatever D and H are.
#include "euler_flow.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "common/simd.h"
#include "common/threads.h"

namespace fastlddmm {

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "softplus") return Activation::kSoftplus;
  throw std::invalid_argument("activation must be 'relu', 'tanh' or 'softplus', got '" + name + "'");
}

namespace {

// rho(z). softplus follows torch.nn.functional.softplus(beta=1, threshold=20): linear above 20.
template <typename T, Activation A>
inline T act_value(T z) {
  if constexpr (A == Activation::kRelu) {
    return z > T(0) ? z : T(0);
  } else if constexpr (A == Activation::kTanh) {
    return std::tanh(z);
  } else {
    return z > T(20) ? z : std::log1p(std::exp(z));
  }
}

// rho'(z), given h = rho(z). Same conventions as torch's backward formulas (relu'(0) = 0,
// tanh' = 1 - h^2, softplus' = sigmoid(z) below the threshold and exactly 1 above it).
template <typename T, Activation A>
inline T act_grad(T z, T h) {
  if constexpr (A == Activation::kRelu) {
    return z > T(0) ? T(1) : T(0);
  } else if constexpr (A == Activation::kTanh) {
    return T(1) - h * h;
  } else {
    return z > T(20) ? T(1) : T(1) / (T(1) + std::exp(-z));
  }
}

// Points per tile: the three H x tile hidden arrays of the backward pass should fit in ~96 KiB (L2).
template <typename T>
int64_t tile_size(int64_t width) {
  int64_t tile = 64;
  while (tile > 8 && 3 * width * tile * static_cast<int64_t>(sizeof(T)) > 96 * 1024) tile /= 2;
  return tile;
}

// Tiles per chunk of the weight-gradient reduction: a function of the number of tiles only (never of the
// threads), so the chunks' partial sums, added in chunk order, are the same whatever the thread count;
// at most ~512 chunks, so the partials stay small next to the points.
inline int64_t chunk_size(int64_t ntiles) { return std::max<int64_t>(32, (ntiles + 511) / 512); }

// Sum of a[0..n) (or of a[i] * b[i]); the simd reduction lets the compiler vectorise it.
template <typename T>
inline T sum(const T* a, int64_t n) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = T(0);
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Copies n points (rows of D values) of `src` into the transposed tile dst[d * stride + i], and back.
template <typename T>
void load_tile(const T* src, int64_t n, int64_t dim, int64_t stride, T* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; ++d) dst[d * stride + i] = src[i * dim + d];
}

template <typename T>
void store_tile(const T* src, int64_t n, int64_t dim, int64_t stride, T* dst) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t d = 0; d < dim; ++d) dst[i * dim + d] = src[d * stride + i];
}

// One block on a tile of n points: z = W1 x + b1, h = rho(z), v = W2 h + b2 (all [row][point]).
template <typename T, Activation A>
void block_forward(const T* w1, const T* b1, const T* w2, const T* b2, int64_t dim, int64_t width, int64_t n,
                   int64_t stride, const T* xt, T* zt, T* ht, T* vt) {
  for (int64_t k = 0; k < width; ++k) {
    T* zk = zt + k * stride;
    const T bk = b1[k];
    for (int64_t i = 0; i < n; ++i) zk[i] = bk;
    for (int64_t d = 0; d < dim; ++d) {
      const T w = w1[k * dim + d];
      const T* xd = xt + d * stride;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) zk[i] += w * xd[i];
    }
    T* hk = ht + k * stride;
    for (int64_t i = 0; i < n; ++i) hk[i] = act_value<T, A>(zk[i]);
  }
  for (int64_t d = 0; d < dim; ++d) {
    T* vd = vt + d * stride;
    const T bd = b2[d];
    for (int64_t i = 0; i < n; ++i) vd[i] = bd;
    for (int64_t k = 0; k < width; ++k) {
      const T w = w2[d * width + k];
      const T* hk = ht + k * stride;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) vd[i] += w * hk[i];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The fast path, D in {2, 3} (a template parameter): a tile of kVecs vectors of points (64 floats or 32
// doubles) lives in registers as structure of arrays; each layer runs over the hidden units one at a
// time (z_k = W1_k x + b1_k, h_k = rho(z_k), v += W2_:k h_k), so z and h are never stored. The weight
// gradients are accumulated lane-wise per chunk of tiles in a thread-local buffer (vectors), reduced to
// double per chunk, and the chunks added in chunk order: the same sums whatever the thread count.
// ---------------------------------------------------------------------------------------------------

constexpr int kVecs = 4;  // vectors of points per tile

template <typename T>
using Vf = simd::vec<T>;

// rho and rho' on vectors. relu: one max / one compare; tanh and softplus lane by lane (libm; slower).
template <typename T, Activation A>
inline Vf<T> vact(Vf<T> z) {
  if constexpr (A == Activation::kRelu) {
    return simd::vmax<T>(z, simd::splat<T>(T(0)));
  } else {
    Vf<T> h;
    for (int l = 0; l < simd::Lanes<T>::W; ++l) h[l] = act_value<T, A>(z[l]);
    return h;
  }
}

template <typename T, Activation A>
inline Vf<T> vact_grad(Vf<T> z, Vf<T> h) {
  if constexpr (A == Activation::kRelu) {
    (void)h;
    return z > T(0) ? simd::splat<T>(T(1)) : simd::splat<T>(T(0));
  } else if constexpr (A == Activation::kTanh) {
    (void)z;
    return T(1) - h * h;
  } else {
    Vf<T> g;
    for (int l = 0; l < simd::Lanes<T>::W; ++l) g[l] = act_grad<T, A>(z[l], h[l]);
    return g;
  }
}

// AoS (n, D) points [p0, p0 + n) <-> SoA tile (zero-padded).
template <typename T, int D>
inline void tile_in(const T* src, int64_t n, Vf<T> (&x)[D][kVecs]) {
  constexpr int W = simd::Lanes<T>::W;
  alignas(64) T buf[D][kVecs * W] = {};
  for (int64_t i = 0; i < n; ++i)
    for (int d = 0; d < D; ++d) buf[d][i] = src[i * D + d];
  for (int d = 0; d < D; ++d)
    for (int p = 0; p < kVecs; ++p) x[d][p] = simd::load(buf[d] + p * W);
}

template <typename T, int D>
inline void tile_out(const Vf<T> (&x)[D][kVecs], int64_t n, T* dst) {
  constexpr int W = simd::Lanes<T>::W;
  alignas(64) T buf[D][kVecs * W];
  for (int d = 0; d < D; ++d)
    for (int p = 0; p < kVecs; ++p) simd::store(buf[d] + p * W, x[d][p]);
  for (int64_t i = 0; i < n; ++i)
    for (int d = 0; d < D; ++d) dst[i * D + d] = buf[d][i];
}

// v = W2 rho(W1 x + b1) + b2 for one layer on a tile. w2t: (H, D) (W2 transposed).
template <typename T, int D, Activation A>
inline void layer_velocity(const T* w1, const T* b1, const T* w2t, const T* b2, int64_t H, const Vf<T> (&x)[D][kVecs],
                           Vf<T> (&v)[D][kVecs]) {
  for (int d = 0; d < D; ++d)
    for (int p = 0; p < kVecs; ++p) v[d][p] = simd::splat<T>(b2[d]);
  for (int64_t k = 0; k < H; ++k) {
    Vf<T> z[kVecs];
    for (int p = 0; p < kVecs; ++p) {
      z[p] = simd::splat<T>(b1[k]);
      for (int d = 0; d < D; ++d) z[p] += w1[k * D + d] * x[d][p];
      z[p] = vact<T, A>(z[p]);
    }
    for (int d = 0; d < D; ++d) {
      const T w = w2t[k * D + d];
      for (int p = 0; p < kVecs; ++p) v[d][p] += w * z[p];
    }
  }
}

template <typename T>
std::vector<T> transpose_w2(const T* weight2, int64_t L, int64_t D, int64_t H) {  // (L, D, H) -> (L, H, D)
  std::vector<T> t(static_cast<size_t>(L * H * D));
  for (int64_t l = 0; l < L; ++l)
    for (int64_t d = 0; d < D; ++d)
      for (int64_t k = 0; k < H; ++k) t[(l * H + k) * D + d] = weight2[(l * D + d) * H + k];
  return t;
}

template <typename T, int D, Activation A>
void fast_forward(const T* x, const T* weight1, const T* bias1, const T* weight2, const T* bias2, T dt, FlowSizes s,
                  int num_threads, T* x_final, double* kinetic_sum) {
  constexpr int W = simd::Lanes<T>::W;
  constexpr int64_t tile = kVecs * W;
  const int64_t N = s.n, H = s.width, L = s.layers;
  const int64_t ntiles = (N + tile - 1) / tile;
  const std::vector<T> w2t = transpose_w2(weight2, L, D, H);
  std::vector<double> tile_energy(static_cast<size_t>(ntiles), 0.0);  // summed in tile order below
  parallel_tasks(ntiles, threads_for(resolve_threads(num_threads), double(N) * L * H, 65536.0), [&](int64_t t) {
    const int64_t p0 = t * tile, n = std::min(tile, N - p0);
    Vf<T> xv[D][kVecs], v[D][kVecs];
    tile_in<T, D>(x + p0 * D, n, xv);
    Vf<T> mask[kVecs];  // 1 on the tile's points, 0 on its padding (kept out of the energy)
    for (int p = 0; p < kVecs; ++p)
      for (int l = 0; l < W; ++l) mask[p][l] = p * W + l < n ? T(1) : T(0);
    double energy = 0.0;
    for (int64_t l = 0; l < L; ++l) {
      layer_velocity<T, D, A>(weight1 + l * H * D, bias1 + l * H, w2t.data() + l * H * D, bias2 + l * D, H, xv, v);
      Vf<T> e = simd::splat<T>(T(0));
      for (int d = 0; d < D; ++d)
        for (int p = 0; p < kVecs; ++p) {
          e += mask[p] * v[d][p] * v[d][p];
          xv[d][p] += dt * v[d][p];
        }
      for (int ll = 0; ll < W; ++ll) energy += static_cast<double>(e[ll]);
    }
    tile_out<T, D>(xv, n, x_final + p0 * D);
    tile_energy[static_cast<size_t>(t)] = energy;
  });
  double total = 0.0;
  for (double en : tile_energy) total += en;
  kinetic_sum[0] = total;
}

// Vectors of points per pass over the hidden units in the backward: the pass keeps g, x and dLoss/dv of its
// points in registers (3 D vectors each), which for the whole tile (kVecs) would need more than the 32
// registers AVX-512 has (the compiler spilled); two passes of kGroup vectors fit.
constexpr int kGroup = kVecs / 2;

// One layer's backward through its hidden units, for the tile's vectors [P0, P0 + kGroup):
//   gz_k = rho'(z_k) (W2^T gv)_k,   g += W1^T gz,   lane-wise accumulators: gb1 += gz, gw1 += gz x^T, gw2 += gv h^T.
// z = W1 x + b1 is computed again here: keeping the recompute's z (L x H x tile values per thread, in L2)
// measured no faster at H = 64, L = 10.
template <typename T, int D, Activation A, int P0>
inline void hidden_backward(const T* w1, const T* b1, const T* w2t, int64_t H,
                            const Vf<T> (&xv)[D][kVecs], const Vf<T> (&gv)[D][kVecs], Vf<T> (&g)[D][kVecs],
                            Vf<T>* agw1, Vf<T>* agb1, Vf<T>* agw2t) {
  for (int64_t k = 0; k < H; ++k) {
    Vf<T> h[kGroup], gz[kGroup];
    for (int q = 0; q < kGroup; ++q) {
      const int p = P0 + q;
      Vf<T> z = simd::splat<T>(b1[k]);
      for (int d = 0; d < D; ++d) z += w1[k * D + d] * xv[d][p];
      h[q] = vact<T, A>(z);
      Vf<T> gh = w2t[k * D] * gv[0][p];
      for (int d = 1; d < D; ++d) gh += w2t[k * D + d] * gv[d][p];
      if constexpr (A == Activation::kRelu)
        gz[q] = z > T(0) ? gh : simd::splat<T>(T(0));  // relu'(0) = 0, as torch
      else
        gz[q] = gh * vact_grad<T, A>(z, h[q]);
    }
    Vf<T> sgz = agb1[k];
    for (int q = 0; q < kGroup; ++q) sgz += gz[q];
    agb1[k] = sgz;
    for (int d = 0; d < D; ++d) {
      Vf<T> a1 = agw1[k * D + d], a2 = agw2t[k * D + d];
      for (int q = 0; q < kGroup; ++q) {
        a1 += gz[q] * xv[d][P0 + q];
        a2 += gv[d][P0 + q] * h[q];
      }
      agw1[k * D + d] = a1;
      agw2t[k * D + d] = a2;
      const T w = w1[k * D + d];
      for (int q = 0; q < kGroup; ++q) g[d][P0 + q] += w * gz[q];
    }
  }
}

template <typename T, int D, Activation A>
void fast_backward(const T* grad_x_final, T grad_kinetic_sum, const T* x, const T* weight1, const T* bias1,
                   const T* weight2, const T* bias2, T dt, FlowSizes s, int num_threads, T* grad_x, T* grad_weight1,
                   T* grad_bias1, T* grad_weight2, T* grad_bias2) {
  constexpr int W = simd::Lanes<T>::W;
  constexpr int64_t tile = kVecs * W;
  const int64_t N = s.n, H = s.width, L = s.layers;
  const int64_t ntiles = (N + tile - 1) / tile;
  const int64_t chunk_tiles = chunk_size(ntiles), nchunks = (ntiles + chunk_tiles - 1) / chunk_tiles;
  const std::vector<T> w2t = transpose_w2(weight2, L, D, H);
  const int threads = threads_for(resolve_threads(num_threads), double(N) * L * H, 16384.0);
  // Lane-wise accumulators of one chunk: [gw1 (L,H,D) | gb1 (L,H) | gw2t (L,H,D) | gb2 (L,D)] vectors.
  const int64_t o_gb1 = L * H * D, o_gw2 = o_gb1 + L * H, o_gb2 = o_gw2 + L * H * D, psize = o_gb2 + L * D;
  std::vector<double> partial(static_cast<size_t>(nchunks * psize), 0.0);
  const T ce = static_cast<T>(2.0 * static_cast<double>(grad_kinetic_sum));  // dLoss/dv from S: 2 dLoss/dS v
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    simd::FlushDenormals ftz;
    std::vector<Vf<T>> acc(static_cast<size_t>(psize));
    // The tile's trajectory, recomputed from x: every layer's input and velocity. It lives in this thread's
    // cache (L x 2 x D x tile values), so the op stores no (L, N, D) states.
    std::vector<Vf<T>> xs(static_cast<size_t>(L * D * kVecs)), vs(static_cast<size_t>(L * D * kVecs));
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t c = 0; c < nchunks; ++c) {
      std::fill(acc.begin(), acc.end(), simd::splat<T>(T(0)));
      for (int64_t t = c * chunk_tiles; t < std::min(ntiles, (c + 1) * chunk_tiles); ++t) {
        const int64_t p0 = t * tile, n = std::min(tile, N - p0);
        Vf<T> g[D][kVecs], xv[D][kVecs], gv[D][kVecs];
        // Forward again, the same arithmetic as fast_forward: x^l and v_l of every layer.
        tile_in<T, D>(x + p0 * D, n, xv);
        for (int64_t l = 0; l < L; ++l) {
          Vf<T>* xl = xs.data() + l * D * kVecs;
          Vf<T>* vl = vs.data() + l * D * kVecs;
          for (int d = 0; d < D; ++d)
            for (int p = 0; p < kVecs; ++p) xl[d * kVecs + p] = xv[d][p];
          layer_velocity<T, D, A>(weight1 + l * H * D, bias1 + l * H, w2t.data() + l * H * D, bias2 + l * D, H, xv,
                                  gv);
          for (int d = 0; d < D; ++d)
            for (int p = 0; p < kVecs; ++p) {
              vl[d * kVecs + p] = gv[d][p];
              xv[d][p] += dt * gv[d][p];
            }
        }
        tile_in<T, D>(grad_x_final + p0 * D, n, g);
        Vf<T> mask[kVecs];
        for (int p = 0; p < kVecs; ++p)
          for (int l = 0; l < W; ++l) mask[p][l] = p * W + l < n ? T(1) : T(0);
        for (int64_t l = L - 1; l >= 0; --l) {
          const T* w1 = weight1 + l * H * D;
          const T* b1 = bias1 + l * H;
          const T* w2 = w2t.data() + l * H * D;
          const Vf<T>* xl = xs.data() + l * D * kVecs;
          const Vf<T>* vl = vs.data() + l * D * kVecs;
          for (int d = 0; d < D; ++d) {
            Vf<T> sb = simd::splat<T>(T(0));
            for (int p = 0; p < kVecs; ++p) {
              xv[d][p] = xl[d * kVecs + p];
              gv[d][p] = mask[p] * (dt * g[d][p] + ce * vl[d * kVecs + p]);  // dLoss/dv (0 on the padding)
              sb += gv[d][p];
            }
            acc[o_gb2 + l * D + d] += sb;
          }
          Vf<T>* agw1 = acc.data() + l * H * D;
          Vf<T>* agb1 = acc.data() + o_gb1 + l * H;
          Vf<T>* agw2 = acc.data() + o_gw2 + l * H * D;
          hidden_backward<T, D, A, 0>(w1, b1, w2, H, xv, gv, g, agw1, agb1, agw2);
          hidden_backward<T, D, A, kGroup>(w1, b1, w2, H, xv, gv, g, agw1, agb1, agw2);
        }
        tile_out<T, D>(g, n, grad_x + p0 * D);
      }
      double* part = partial.data() + c * psize;
      for (int64_t j = 0; j < psize; ++j) {
        double a = 0.0;
        for (int l = 0; l < W; ++l) a += static_cast<double>(acc[j][l]);
        part[j] = a;
      }
    }
  }
  // Chunks added in chunk order (deterministic); gw2 back from (L, H, D) to (L, D, H).
  parallel_tasks(L, threads, [&](int64_t l) {
    auto total = [&](int64_t j) {
      double a = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) a += partial[static_cast<size_t>(c * psize + j)];
      return static_cast<T>(a);
    };
    for (int64_t k = 0; k < H; ++k) {
      grad_bias1[l * H + k] = total(o_gb1 + l * H + k);
      for (int64_t d = 0; d < D; ++d) {
        grad_weight1[(l * H + k) * D + d] = total((l * H + k) * D + d);
        grad_weight2[(l * D + d) * H + k] = total(o_gw2 + (l * H + k) * D + d);
      }
    }
    for (int64_t d = 0; d < D; ++d) grad_bias2[l * D + d] = total(o_gb2 + l * D + d);
  });
}

template <typename T, Activation A>
void forward_impl(const T* x, const T* weight1, const T* bias1, const T* weight2, const T* bias2, T dt,
                  FlowSizes s, int num_threads, T* x_final, double* kinetic_sum) {
  if (s.dim == 3)
    return fast_forward<T, 3, A>(x, weight1, bias1, weight2, bias2, dt, s, num_threads, x_final, kinetic_sum);
  if (s.dim == 2)
    return fast_forward<T, 2, A>(x, weight1, bias1, weight2, bias2, dt, s, num_threads, x_final, kinetic_sum);
  const int64_t N = s.n, D = s.dim, H = s.width, L = s.layers;
  const int64_t tile = tile_size<T>(H);
  const int64_t ntiles = (N + tile - 1) / tile;
  // One partial energy per tile, summed in tile order afterwards: the result does not depend on
  // how tiles were shared between threads.
  std::vector<double> tile_energy(static_cast<size_t>(ntiles), 0.0);
  const int threads = resolve_threads(num_threads);

#pragma omp parallel num_threads(threads)
  {
    std::vector<T> xt(D * tile), zt(H * tile), ht(H * tile), vt(D * tile);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t p0 = t * tile, n = std::min(tile, N - p0);
      load_tile(x + p0 * D, n, D, tile, xt.data());
      double e = 0.0;
      for (int64_t l = 0; l < L; ++l) {
        block_forward<T, A>(weight1 + l * H * D, bias1 + l * H, weight2 + l * D * H, bias2 + l * D, D, H, n,
                            tile, xt.data(), zt.data(), ht.data(), vt.data());
        for (int64_t d = 0; d < D; ++d) {
          T* xd = xt.data() + d * tile;
          const T* vd = vt.data() + d * tile;
          e += static_cast<double>(dot(vd, vd, n));
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) xd[i] += dt * vd[i];
        }
      }
      store_tile(xt.data(), n, D, tile, x_final + p0 * D);
      tile_energy[static_cast<size_t>(t)] = e;
    }
  }
  double total = 0.0;
  for (double e : tile_energy) total += e;
  kinetic_sum[0] = total;
}

template <typename T, Activation A>
void backward_impl(const T* grad_x_final, T grad_kinetic_sum, const T* x, const T* weight1, const T* bias1,
                   const T* weight2, const T* bias2, T dt, FlowSizes s, int num_threads, T* grad_x,
                   T* grad_weight1, T* grad_bias1, T* grad_weight2, T* grad_bias2) {
  if (s.dim == 3 || s.dim == 2) {
    auto fast = s.dim == 3 ? fast_backward<T, 3, A> : fast_backward<T, 2, A>;
    return fast(grad_x_final, grad_kinetic_sum, x, weight1, bias1, weight2, bias2, dt, s, num_threads, grad_x,
                grad_weight1, grad_bias1, grad_weight2, grad_bias2);
  }
  const int64_t N = s.n, D = s.dim, H = s.width, L = s.layers;
  const int64_t tile = tile_size<T>(H);
  const int64_t ntiles = (N + tile - 1) / tile;
  const int threads = resolve_threads(num_threads);
  // Partial sums of the parameter gradients per chunk of tiles (a fixed cut of the points, whatever the
  // threads), in double, laid out as [gw1 (L,H,D) | gb1 (L,H) | gw2 (L,D,H) | gb2 (L,D)].
  const int64_t o_gb1 = L * H * D, o_gw2 = o_gb1 + L * H, o_gb2 = o_gw2 + L * D * H;
  const int64_t psize = o_gb2 + L * D;
  const int64_t chunk_tiles = chunk_size(ntiles), nchunks = (ntiles + chunk_tiles - 1) / chunk_tiles;
  std::vector<double> partial(static_cast<size_t>(nchunks * psize), 0.0);
  // dLoss/dv_i from the kinetic term S = sum_l sum_i |v_l(x_i)|^2: 2 * dLoss/dS * v_i.
  const T ce = static_cast<T>(2.0 * static_cast<double>(grad_kinetic_sum));

#pragma omp parallel num_threads(threads)
  {
    std::vector<T> xt(D * tile), zt(H * tile), ht(H * tile), vt(D * tile), gt(D * tile), gvt(D * tile),
        gzt(H * tile);
    std::vector<T> xs(L * D * tile);  // the tile's layer inputs, recomputed from x (no (L, N, D) states stored)
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t t = c * chunk_tiles; t < std::min(ntiles, (c + 1) * chunk_tiles); ++t) {
      double* acc = partial.data() + c * psize;
      const int64_t p0 = t * tile, n = std::min(tile, N - p0);
      load_tile(x + p0 * D, n, D, tile, xt.data());
      for (int64_t l = 0; l < L; ++l) {  // forward again, as forward_impl: x^l of every layer
        std::copy(xt.begin(), xt.end(), xs.begin() + l * D * tile);
        block_forward<T, A>(weight1 + l * H * D, bias1 + l * H, weight2 + l * D * H, bias2 + l * D, D, H, n, tile,
                            xt.data(), zt.data(), ht.data(), vt.data());
        for (int64_t d = 0; d < D; ++d) {
          T* xd = xt.data() + d * tile;
          const T* vd = vt.data() + d * tile;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) xd[i] += dt * vd[i];
        }
      }
      load_tile(grad_x_final + p0 * D, n, D, tile, gt.data());  // g = dLoss/dx^{l+1}
      for (int64_t l = L - 1; l >= 0; --l) {
        const T* w1 = weight1 + l * H * D;
        const T* w2 = weight2 + l * D * H;
        const T* xl = xs.data() + l * D * tile;
        block_forward<T, A>(w1, bias1 + l * H, w2, bias2 + l * D, D, H, n, tile, xl, zt.data(), ht.data(),
                            vt.data());
        // gv = dt g + ce v;  grad_W2 += gv h^T;  grad_b2 += gv
        for (int64_t d = 0; d < D; ++d) {
          T* gvd = gvt.data() + d * tile;
          const T* gd = gt.data() + d * tile;
          const T* vd = vt.data() + d * tile;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) gvd[i] = dt * gd[i] + ce * vd[i];
          acc[o_gb2 + l * D + d] += static_cast<double>(sum(gvd, n));
          double* agw2 = acc + o_gw2 + (l * D + d) * H;
          for (int64_t k = 0; k < H; ++k) agw2[k] += static_cast<double>(dot(gvd, ht.data() + k * tile, n));
        }
        // gz = (W2^T gv) * rho'(z);  grad_W1 += gz x^T;  grad_b1 += gz
        for (int64_t k = 0; k < H; ++k) {
          T* gzk = gzt.data() + k * tile;
          for (int64_t i = 0; i < n; ++i) gzk[i] = T(0);
          for (int64_t d = 0; d < D; ++d) {
            const T w = w2[d * H + k];
            const T* gvd = gvt.data() + d * tile;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) gzk[i] += w * gvd[i];
          }
          const T* zk = zt.data() + k * tile;
          const T* hk = ht.data() + k * tile;
          for (int64_t i = 0; i < n; ++i) gzk[i] *= act_grad<T, A>(zk[i], hk[i]);
          acc[o_gb1 + l * H + k] += static_cast<double>(sum(gzk, n));
          double* agw1 = acc + (l * H + k) * D;
          for (int64_t d = 0; d < D; ++d) agw1[d] += static_cast<double>(dot(gzk, xl + d * tile, n));
        }
        // g <- g + W1^T gz  (now dLoss/dx^l)
        for (int64_t k = 0; k < H; ++k) {
          const T* gzk = gzt.data() + k * tile;
          for (int64_t d = 0; d < D; ++d) {
            const T w = w1[k * D + d];
            T* gd = gt.data() + d * tile;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) gd[i] += w * gzk[i];
          }
        }
      }
      store_tile(gt.data(), n, D, tile, grad_x + p0 * D);
    }
  }

  // Reduce the chunks' partials in chunk order: the same sums whatever the thread count.
  T* outs[4] = {grad_weight1, grad_bias1, grad_weight2, grad_bias2};
  const int64_t starts[5] = {0, o_gb1, o_gw2, o_gb2, psize};
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < psize; ++j) {
    double total = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) total += partial[static_cast<size_t>(c * psize + j)];
    int which = 0;
    while (j >= starts[which + 1]) ++which;
    outs[which][j - starts[which]] = static_cast<T>(total);
  }
}

}  // namespace

template <typename scalar_t>
void euler_flow_forward_cpu(const scalar_t* x, const scalar_t* weight1, const scalar_t* bias1,
                            const scalar_t* weight2, const scalar_t* bias2, scalar_t dt, Activation act,
                            FlowSizes sizes, int num_threads, scalar_t* x_final, double* kinetic_sum) {
  switch (act) {
    case Activation::kRelu:
      return forward_impl<scalar_t, Activation::kRelu>(x, weight1, bias1, weight2, bias2, dt, sizes, num_threads,
                                                       x_final, kinetic_sum);
    case Activation::kTanh:
      return forward_impl<scalar_t, Activation::kTanh>(x, weight1, bias1, weight2, bias2, dt, sizes, num_threads,
                                                       x_final, kinetic_sum);
    case Activation::kSoftplus:
      return forward_impl<scalar_t, Activation::kSoftplus>(x, weight1, bias1, weight2, bias2, dt, sizes,
                                                           num_threads, x_final, kinetic_sum);
  }
  throw std::invalid_argument("unknown activation");
}

template <typename scalar_t>
void euler_flow_backward_cpu(const scalar_t* grad_x_final, scalar_t grad_kinetic_sum, const scalar_t* x,
                             const scalar_t* weight1, const scalar_t* bias1, const scalar_t* weight2,
                             const scalar_t* bias2, scalar_t dt, Activation act, FlowSizes sizes,
                             int num_threads, scalar_t* grad_x, scalar_t* grad_weight1, scalar_t* grad_bias1,
                             scalar_t* grad_weight2, scalar_t* grad_bias2) {
  switch (act) {
    case Activation::kRelu:
      return backward_impl<scalar_t, Activation::kRelu>(grad_x_final, grad_kinetic_sum, x, weight1, bias1, weight2,
                                                        bias2, dt, sizes, num_threads, grad_x, grad_weight1,
                                                        grad_bias1, grad_weight2, grad_bias2);
    case Activation::kTanh:
      return backward_impl<scalar_t, Activation::kTanh>(grad_x_final, grad_kinetic_sum, x, weight1, bias1, weight2,
                                                        bias2, dt, sizes, num_threads, grad_x, grad_weight1,
                                                        grad_bias1, grad_weight2, grad_bias2);
    case Activation::kSoftplus:
      return backward_impl<scalar_t, Activation::kSoftplus>(grad_x_final, grad_kinetic_sum, x, weight1, bias1,
                                                            weight2, bias2, dt, sizes, num_threads, grad_x,
                                                            grad_weight1, grad_bias1, grad_weight2, grad_bias2);
  }
  throw std::invalid_argument("unknown activation");
}

template void euler_flow_forward_cpu<float>(const float*, const float*, const float*, const float*, const float*,
                                            float, Activation, FlowSizes, int, float*, double*);
template void euler_flow_forward_cpu<double>(const double*, const double*, const double*, const double*,
                                             const double*, double, Activation, FlowSizes, int, double*, double*);
template void euler_flow_backward_cpu<float>(const float*, float, const float*, const float*, const float*,
                                             const float*, const float*, float, Activation, FlowSizes, int, float*,
                                             float*, float*, float*, float*);
template void euler_flow_backward_cpu<double>(const double*, double, const double*, const double*, const double*,
                                              const double*, const double*, double, Activation, FlowSizes, int,
                                              double*, double*, double*, double*, double*);

}  // namespace fastlddmm
