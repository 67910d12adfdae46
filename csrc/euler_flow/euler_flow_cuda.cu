// CUDA forward and backward of the fused Euler flow. See euler_flow.h for the contract.
//
// Dimensions: D = 1..4 are compile-time (the loops over coordinates unroll, no guards); 5 <= D <= 16 share
// one MAXD = 16 build with runtime guards. Every point stays in registers through all layers.
//
// Forward: one thread per point; the hidden units are visited one at a time (z_k, h_k recomputed, never
// stored).
//
// Backward: one warp per tile of kGroups * R points. A warp's 32 lanes are kGroups = 4 point groups x
// kLanesH = 8 hidden lanes: lane (g, j) holds the R points of group g in registers and visits the hidden
// units k = j, j + 8, ... So, per hidden unit, the sums over the tile's points (grad W1, b1, W2) are R
// in-thread FMAs followed by 2 shuffle rounds across the 4 point groups (the former kernel reduced each of
// the 2D + 1 sums over all 32 lanes: 5 rounds per value and hidden unit); the sums over the hidden units
// (v, and W1^T gz for grad x) stay elementwise in each lane and are reduced over the 8 hidden lanes once
// per layer (3 rounds). Where the per-hidden-unit sums go is a template parameter (kSharedAcc), chosen once
// per launch: a per-warp slice of the block's shared memory (plain adds, one writer per entry; the slices
// are summed and added to global memory with atomics once per block and layer) when the 8 slices of a
// layer fit in the device's opt-in shared memory, else global memory directly (global atomics). Every
// access is thus a plain shared or global one, not a generic-address atomic.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "euler_flow.h"

namespace fastlddmm {

bool cuda_compiled() { return true; }

namespace {

constexpr int kThreads = 256;                  // forward block
constexpr int kWarpsBwd = 8;                   // backward block: 8 warps = 8 tiles
constexpr int kLanesH = 8;                     // backward: hidden lanes per warp
constexpr int kGroups = 32 / kLanesH;          // backward: point groups per warp
constexpr size_t kMaxSharedBytes = 48 * 1024;  // dynamic shared memory without the opt-in attribute
constexpr int kGenericMaxDim = 16;             // the runtime-D build (5 <= D <= 16)
static_assert(kGenericMaxDim == kCudaMaxDim, "euler_flow.h's kCudaMaxDim is the generic build's bound");

template <typename T, Activation A>
__device__ __forceinline__ T act_value(T z) {
  if constexpr (A == Activation::kRelu) {
    return z > T(0) ? z : T(0);
  } else if constexpr (A == Activation::kTanh) {
    return tanh(z);
  } else {
    return z > T(20) ? z : log1p(exp(z));  // torch softplus, beta=1, threshold=20
  }
}

template <typename T, Activation A>
__device__ __forceinline__ T act_grad(T z, T h) {
  if constexpr (A == Activation::kRelu) {
    return z > T(0) ? T(1) : T(0);
  } else if constexpr (A == Activation::kTanh) {
    return T(1) - h * h;
  } else {
    return z > T(20) ? T(1) : T(1) / (T(1) + exp(-z));
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// Xor butterfly over the lane offsets kFirst, 2 kFirst, ..., kLast: every lane ends with the sum over the
// lanes that differ from it only in those bits. `mask`: the lanes taking part (all of them run this call).
template <int kFirst, int kLast, typename T>
__device__ __forceinline__ T butterfly(T value, unsigned mask) {
#pragma unroll
  for (int offset = kFirst; offset <= kLast; offset *= 2) value += __shfl_xor_sync(mask, value, offset);
  return value;
}

// Points per backward lane: enough to amortise the per-hidden-unit shuffles, few enough for the registers.
// (Checked with -Xptxas -v: no spills at any instantiation, sm_80 and sm_90; .ci/build_cuda.sh enforces it.)
template <typename T, int MAXD>
__host__ __device__ constexpr int points_per_lane() {
  return MAXD <= (sizeof(T) == 8 ? 2 : 3) ? 8 : (MAXD <= 4 ? 4 : 1);
}

// v = W2 rho(W1 p + b1) + b2 for one point p (layer pointers already offset).
template <typename T, Activation A, int MAXD>
__device__ __forceinline__ void velocity(const T* __restrict__ w1, const T* __restrict__ b1,
                                         const T* __restrict__ w2, const T* __restrict__ b2, int D, int H,
                                         const T (&p)[MAXD], T (&v)[MAXD]) {
#pragma unroll
  for (int d = 0; d < MAXD; ++d) v[d] = d < D ? __ldg(b2 + d) : T(0);
  for (int k = 0; k < H; ++k) {
    T z = __ldg(b1 + k);
#pragma unroll
    for (int d = 0; d < MAXD; ++d)
      if (d < D) z += __ldg(w1 + k * D + d) * p[d];
    const T h = act_value<T, A>(z);
#pragma unroll
    for (int d = 0; d < MAXD; ++d)
      if (d < D) v[d] += __ldg(w2 + d * H + k) * h;
  }
}

template <typename T, Activation A, int MAXD>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ weight1, const T* __restrict__ bias1,
                               const T* __restrict__ weight2, const T* __restrict__ bias2, T dt, int64_t N, int D,
                               int H, int L, T* __restrict__ x_final, T* __restrict__ states,
                               double* __restrict__ kinetic_sum) {
  if constexpr (MAXD <= 4) D = MAXD;  // compile-time dimension: the guards below fold away
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < N;
  T p[MAXD], v[MAXD];
#pragma unroll
  for (int d = 0; d < MAXD; ++d) p[d] = (active && d < D) ? x[i * D + d] : T(0);
  double e = 0.0;
  for (int l = 0; l < L; ++l) {
    if (active && states != nullptr) {
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        if (d < D) states[(l * N + i) * D + d] = p[d];
    }
    velocity<T, A, MAXD>(weight1 + static_cast<int64_t>(l) * H * D, bias1 + static_cast<int64_t>(l) * H,
                         weight2 + static_cast<int64_t>(l) * D * H, bias2 + static_cast<int64_t>(l) * D, D, H, p, v);
#pragma unroll
    for (int d = 0; d < MAXD; ++d) {
      if (d < D) {
        e += static_cast<double>(v[d]) * static_cast<double>(v[d]);
        p[d] += dt * v[d];
      }
    }
  }
  if (active) {
#pragma unroll
    for (int d = 0; d < MAXD; ++d)
      if (d < D) x_final[i * D + d] = p[d];
  }
  // Inactive lanes contribute e = 0 (their padded point is never read back).
  if (!active) e = 0.0;
  e = warp_sum(e);
  if ((threadIdx.x & 31) == 0) atomicAdd(kinetic_sum, e);
}

template <typename T, Activation A, int MAXD, bool kSharedAcc>
__global__ void __launch_bounds__(kWarpsBwd * 32, 1)
    backward_kernel(const T* __restrict__ grad_x_final, const T* __restrict__ grad_kinetic_sum,
                    const T* __restrict__ states, const T* __restrict__ weight1, const T* __restrict__ bias1,
                    const T* __restrict__ weight2, const T* __restrict__ bias2, T dt, int64_t N, int D, int H, int L,
                    T* __restrict__ grad_x, T* __restrict__ grad_weight1, T* __restrict__ grad_bias1,
                    T* __restrict__ grad_weight2, T* __restrict__ grad_bias2) {
  constexpr int R = points_per_lane<T, MAXD>();
  if constexpr (MAXD <= 4) D = MAXD;
  extern __shared__ unsigned char smem_raw[];
  // kSharedAcc: one slice per warp of one layer's gradients [gw1 (H, D) | gb1 (H) | gw2 (D, H) | gb2 (D)]. Within
  // a warp each entry has one writer (lane (0, j) for hidden unit k = j mod 8), so plain adds: shared memory
  // has no native float atomics (they would be compare-and-swap loops).
  const int o_gb1 = H * D, o_gw2 = o_gb1 + H, o_gb2 = o_gw2 + D * H, psize = o_gb2 + D;
  const int warp = threadIdx.x >> 5;
  T* slice = reinterpret_cast<T*>(smem_raw) + static_cast<size_t>(warp) * psize;

  const int lane = threadIdx.x & 31;
  const int hl = lane % kLanesH;  // hidden lane
  const int pg = lane / kLanesH;  // point group
  const unsigned group_mask = 0x01010101u << hl;  // the 4 lanes of this hidden lane (lane bits 3 and 4 vary)
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsBwd + warp;
  const int64_t first = (tile * kGroups + pg) * R;  // this lane's R points: first .. first + R - 1
  const T ce = T(2) * grad_kinetic_sum[0];  // dLoss/dv = 2 dLoss/dS v, S = sum_l sum_i |v|^2

  bool active[R];
  T g[R][MAXD], p[R][MAXD], gv[R][MAXD], acc[R][MAXD];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    active[r] = first + r < N;
#pragma unroll
    for (int d = 0; d < MAXD; ++d) g[r][d] = (active[r] && d < D) ? grad_x_final[(first + r) * D + d] : T(0);
  }

  for (int l = L - 1; l >= 0; --l) {
    const T* w1 = weight1 + static_cast<int64_t>(l) * H * D;
    const T* b1 = bias1 + static_cast<int64_t>(l) * H;
    const T* w2 = weight2 + static_cast<int64_t>(l) * D * H;
    const T* b2 = bias2 + static_cast<int64_t>(l) * D;
    // Where a hidden unit's sums over the tile go: this warp's shared slice, or this layer's global slice.
    T* a_gw1 = kSharedAcc ? slice : grad_weight1 + static_cast<int64_t>(l) * H * D;
    T* a_gb1 = kSharedAcc ? slice + o_gb1 : grad_bias1 + static_cast<int64_t>(l) * H;
    T* a_gw2 = kSharedAcc ? slice + o_gw2 : grad_weight2 + static_cast<int64_t>(l) * D * H;
    T* a_gb2 = kSharedAcc ? slice + o_gb2 : grad_bias2 + static_cast<int64_t>(l) * D;
    if constexpr (kSharedAcc) {
      for (int j = lane; j < psize; j += 32) slice[j] = T(0);
      __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        p[r][d] = (active[r] && d < D) ? states[(static_cast<int64_t>(l) * N + first + r) * D + d] : T(0);

    // v, elementwise over this lane's hidden units, then summed over the 8 hidden lanes.
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int d = 0; d < MAXD; ++d) acc[r][d] = T(0);
    for (int k = hl; k < H; k += kLanesH) {
      T w1k[MAXD], w2k[MAXD];
#pragma unroll
      for (int d = 0; d < MAXD; ++d) {
        w1k[d] = d < D ? __ldg(w1 + k * D + d) : T(0);
        w2k[d] = d < D ? __ldg(w2 + d * H + k) : T(0);
      }
      const T b1k = __ldg(b1 + k);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        T z = b1k;
#pragma unroll
        for (int d = 0; d < MAXD; ++d)
          if (d < D) z += w1k[d] * p[r][d];
        const T h = act_value<T, A>(z);
#pragma unroll
        for (int d = 0; d < MAXD; ++d)
          if (d < D) acc[r][d] += w2k[d] * h;
      }
    }
    __syncwarp();  // the hidden lanes ran different trip counts: reconverge before the full-warp shuffles
#pragma unroll
    for (int d = 0; d < MAXD; ++d) {
      if (d >= D) continue;
      const T b2d = __ldg(b2 + d);
      T s = T(0);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const T v = butterfly<1, kLanesH / 2>(acc[r][d], 0xffffffffu) + b2d;
        gv[r][d] = active[r] ? dt * g[r][d] + ce * v : T(0);  // zero on padding: adds nothing below
        s += gv[r][d];
      }
      s = butterfly<kLanesH, 16>(s, 0xffffffffu);  // over the point groups
      if (lane == 0) {
        if constexpr (kSharedAcc) a_gb2[d] += s;
        else atomicAdd(a_gb2 + d, s);
      }
    }

    // Gradients: per hidden unit, sums over the tile's points (in-thread, then the 4 point groups).
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int d = 0; d < MAXD; ++d) acc[r][d] = T(0);
    for (int k = hl; k < H; k += kLanesH) {
      T w1k[MAXD], w2k[MAXD], s_w1[MAXD], s_w2[MAXD];
#pragma unroll
      for (int d = 0; d < MAXD; ++d) {
        w1k[d] = d < D ? __ldg(w1 + k * D + d) : T(0);
        w2k[d] = d < D ? __ldg(w2 + d * H + k) : T(0);
        s_w1[d] = T(0);
        s_w2[d] = T(0);
      }
      const T b1k = __ldg(b1 + k);
      T s_b1 = T(0);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        T z = b1k, a = T(0);
#pragma unroll
        for (int d = 0; d < MAXD; ++d) {
          if (d < D) {
            z += w1k[d] * p[r][d];
            a += w2k[d] * gv[r][d];
          }
        }
        const T h = act_value<T, A>(z);
        const T gz = a * act_grad<T, A>(z, h);
        s_b1 += gz;
#pragma unroll
        for (int d = 0; d < MAXD; ++d) {
          if (d < D) {
            acc[r][d] += w1k[d] * gz;  // (W1^T gz)_d, summed over the hidden lanes after the loop
            s_w1[d] += gz * p[r][d];
            s_w2[d] += gv[r][d] * h;
          }
        }
      }
      s_b1 = butterfly<kLanesH, 16>(s_b1, group_mask);
#pragma unroll
      for (int d = 0; d < MAXD; ++d) {
        if (d < D) {
          s_w1[d] = butterfly<kLanesH, 16>(s_w1[d], group_mask);
          s_w2[d] = butterfly<kLanesH, 16>(s_w2[d], group_mask);
        }
      }
      if (pg == 0) {
        if constexpr (kSharedAcc) {
          a_gb1[k] += s_b1;
#pragma unroll
          for (int d = 0; d < MAXD; ++d) {
            if (d < D) {
              a_gw1[k * D + d] += s_w1[d];
              a_gw2[d * H + k] += s_w2[d];
            }
          }
        } else {
          atomicAdd(a_gb1 + k, s_b1);
#pragma unroll
          for (int d = 0; d < MAXD; ++d) {
            if (d < D) {
              atomicAdd(a_gw1 + k * D + d, s_w1[d]);
              atomicAdd(a_gw2 + d * H + k, s_w2[d]);
            }
          }
        }
      }
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        if (d < D) g[r][d] += butterfly<1, kLanesH / 2>(acc[r][d], 0xffffffffu);

    if constexpr (kSharedAcc) {
      __syncthreads();  // every warp's slice complete
      const T* slices = reinterpret_cast<const T*>(smem_raw);
      for (int j = threadIdx.x; j < psize; j += blockDim.x) {
        T total = T(0);
#pragma unroll
        for (int w = 0; w < kWarpsBwd; ++w) total += slices[static_cast<size_t>(w) * psize + j];
        T* dst;
        if (j < o_gb1) dst = grad_weight1 + static_cast<int64_t>(l) * H * D + j;
        else if (j < o_gw2) dst = grad_bias1 + static_cast<int64_t>(l) * H + (j - o_gb1);
        else if (j < o_gb2) dst = grad_weight2 + static_cast<int64_t>(l) * D * H + (j - o_gw2);
        else dst = grad_bias2 + static_cast<int64_t>(l) * D + (j - o_gb2);
        atomicAdd(dst, total);
      }
      __syncthreads();  // the slices are zeroed again by the next layer
    }
  }
  if (hl == 0) {  // every hidden lane holds the same g
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int d = 0; d < MAXD; ++d)
        if (active[r] && d < D) grad_x[(first + r) * D + d] = g[r][d];
  }
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

void check_sizes(const FlowSizes& s) {
  if (s.dim > kCudaMaxDim)
    throw std::invalid_argument("the CUDA euler_flow supports points of dimension D <= " +
                                std::to_string(kCudaMaxDim) + ", got " + std::to_string(s.dim) +
                                " (use backend='triton' or 'reference')");
  if (s.width > (1 << 30) || s.layers > (1 << 30)) throw std::invalid_argument("euler_flow: sizes too large");
}

// Calls f(std::integral_constant<Activation, A>, std::integral_constant<int, MAXD>) for the runtime
// activation: MAXD = D for D <= 4 (compile-time dimension), else the generic 16.
template <typename F>
void dispatch(Activation act, int64_t dim, F&& f) {
  auto with_dim = [&](auto a) {
    switch (dim) {
      case 1: return f(a, std::integral_constant<int, 1>{});
      case 2: return f(a, std::integral_constant<int, 2>{});
      case 3: return f(a, std::integral_constant<int, 3>{});
      case 4: return f(a, std::integral_constant<int, 4>{});
      default: return f(a, std::integral_constant<int, kGenericMaxDim>{});
    }
  };
  switch (act) {
    case Activation::kRelu: return with_dim(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kTanh: return with_dim(std::integral_constant<Activation, Activation::kTanh>{});
    case Activation::kSoftplus: return with_dim(std::integral_constant<Activation, Activation::kSoftplus>{});
  }
  throw std::invalid_argument("unknown activation");
}

}  // namespace

template <typename scalar_t>
void euler_flow_forward_cuda(const scalar_t* x, const scalar_t* weight1, const scalar_t* bias1,
                             const scalar_t* weight2, const scalar_t* bias2, scalar_t dt, Activation act,
                             FlowSizes sizes, scalar_t* x_final, scalar_t* states, double* kinetic_sum,
                             std::uintptr_t stream) {
  check_sizes(sizes);
  const auto cu_stream = reinterpret_cast<cudaStream_t>(stream);
  const int64_t blocks = (sizes.n + kThreads - 1) / kThreads;
  dispatch(act, sizes.dim, [&](auto a, auto maxd) {
    forward_kernel<scalar_t, decltype(a)::value, decltype(maxd)::value>
        <<<static_cast<unsigned>(blocks), kThreads, 0, cu_stream>>>(
            x, weight1, bias1, weight2, bias2, dt, sizes.n, static_cast<int>(sizes.dim),
            static_cast<int>(sizes.width), static_cast<int>(sizes.layers), x_final, states, kinetic_sum);
  });
  check_launch("euler_flow forward kernel");
}

template <typename scalar_t>
void euler_flow_backward_cuda(const scalar_t* grad_x_final, const scalar_t* grad_kinetic_sum, const scalar_t* states,
                              const scalar_t* weight1, const scalar_t* bias1, const scalar_t* weight2,
                              const scalar_t* bias2, scalar_t dt, Activation act, FlowSizes sizes,
                              scalar_t* grad_x, scalar_t* grad_weight1, scalar_t* grad_bias1,
                              scalar_t* grad_weight2, scalar_t* grad_bias2, std::uintptr_t stream) {
  check_sizes(sizes);
  const auto cu_stream = reinterpret_cast<cudaStream_t>(stream);
  const size_t layer_bytes =
      static_cast<size_t>(2 * sizes.width * sizes.dim + sizes.width + sizes.dim) * sizeof(scalar_t);
  const size_t smem_bytes = layer_bytes * kWarpsBwd;  // one slice per warp
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess)
    optin = static_cast<int>(kMaxSharedBytes);
  const bool use_shared = smem_bytes <= static_cast<size_t>(optin);
  dispatch(act, sizes.dim, [&](auto a, auto maxd) {
    constexpr int kMaxD = decltype(maxd)::value;
    constexpr int64_t kTile = static_cast<int64_t>(kWarpsBwd) * kGroups * points_per_lane<scalar_t, kMaxD>();
    const int64_t blocks = (sizes.n + kTile - 1) / kTile;
    auto launch = [&](auto kernel, size_t smem) {
      if (smem > kMaxSharedBytes)
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      kernel<<<static_cast<unsigned>(blocks), kWarpsBwd * 32, smem, cu_stream>>>(
          grad_x_final, grad_kinetic_sum, states, weight1, bias1, weight2, bias2, dt, sizes.n,
          static_cast<int>(sizes.dim), static_cast<int>(sizes.width), static_cast<int>(sizes.layers), grad_x,
          grad_weight1, grad_bias1, grad_weight2, grad_bias2);
    };
    if (use_shared)
      launch(backward_kernel<scalar_t, decltype(a)::value, kMaxD, true>, smem_bytes);
    else
      launch(backward_kernel<scalar_t, decltype(a)::value, kMaxD, false>, 0);
  });
  check_launch("euler_flow backward kernel");
}

template void euler_flow_forward_cuda<float>(const float*, const float*, const float*, const float*, const float*,
                                             float, Activation, FlowSizes, float*, float*, double*, std::uintptr_t);
template void euler_flow_forward_cuda<double>(const double*, const double*, const double*, const double*,
                                              const double*, double, Activation, FlowSizes, double*, double*,
                                              double*, std::uintptr_t);
template void euler_flow_backward_cuda<float>(const float*, const float*, const float*, const float*, const float*,
                                              const float*, const float*, float, Activation, FlowSizes, float*,
                                              float*, float*, float*, float*, std::uintptr_t);
template void euler_flow_backward_cuda<double>(const double*, const double*, const double*, const double*,
                                               const double*, const double*, const double*, double, Activation,
                                               FlowSizes, double*, double*, double*, double*, double*,
                                               std::uintptr_t);

}  // namespace fastlddmm
