// CUDA forward and backward of the fused Euler flow. See euler_flow.h for the contract.
//
// One thread per point runs it through all layers with the point (D <= kCudaMaxDim values) in
// registers; the hidden units are visited one at a time (z_k, h_k recomputed, never stored).
// Backward: the parameter gradients of one layer are reduced per warp (shuffles), then per block in
// shared memory, then added to global memory with atomics once per block and layer. Where a layer's
// gradients do not fit in shared memory, the warp sums go straight to global atomics.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "euler_flow.h"

namespace fastlddmm {

bool cuda_compiled() { return true; }

namespace {

constexpr int kThreads = 256;
constexpr size_t kMaxSharedBytes = 48 * 1024;

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

// Adds the warp's sum of `value` into *dst (shared or global memory) from lane 0.
template <typename T>
__device__ __forceinline__ void warp_add(T* dst, T value) {
  value = warp_sum(value);
  if ((threadIdx.x & 31) == 0) atomicAdd(dst, value);
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

template <typename T, Activation A, int MAXD>
__global__ void backward_kernel(const T* __restrict__ grad_x_final, const T* __restrict__ grad_kinetic_sum,
                                const T* __restrict__ states, const T* __restrict__ weight1,
                                const T* __restrict__ bias1, const T* __restrict__ weight2,
                                const T* __restrict__ bias2, T dt, int64_t N, int D, int H, int L,
                                T* __restrict__ grad_x, T* __restrict__ grad_weight1, T* __restrict__ grad_bias1,
                                T* __restrict__ grad_weight2, T* __restrict__ grad_bias2, bool use_shared) {
  extern __shared__ unsigned char smem_raw[];
  // One layer's partial gradients: [gw1 (H, D) | gb1 (H) | gw2 (D, H) | gb2 (D)].
  T* sacc = reinterpret_cast<T*>(smem_raw);
  const int o_gb1 = H * D, o_gw2 = o_gb1 + H, o_gb2 = o_gw2 + D * H, psize = o_gb2 + D;

  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < N;
  const T ce = T(2) * grad_kinetic_sum[0];  // dLoss/dv = 2 dLoss/dS v, S = sum_l sum_i |v|^2
  T g[MAXD], p[MAXD], v[MAXD], gv[MAXD];
#pragma unroll
  for (int d = 0; d < MAXD; ++d) g[d] = (active && d < D) ? grad_x_final[i * D + d] : T(0);

  for (int l = L - 1; l >= 0; --l) {
    const T* w1 = weight1 + static_cast<int64_t>(l) * H * D;
    const T* b1 = bias1 + static_cast<int64_t>(l) * H;
    const T* w2 = weight2 + static_cast<int64_t>(l) * D * H;
    const T* b2 = bias2 + static_cast<int64_t>(l) * D;
    // Where the partial sums go: shared memory (flushed below) or this layer's slice of global memory.
    T* a_gw1 = use_shared ? sacc : grad_weight1 + static_cast<int64_t>(l) * H * D;
    T* a_gb1 = use_shared ? sacc + o_gb1 : grad_bias1 + static_cast<int64_t>(l) * H;
    T* a_gw2 = use_shared ? sacc + o_gw2 : grad_weight2 + static_cast<int64_t>(l) * D * H;
    T* a_gb2 = use_shared ? sacc + o_gb2 : grad_bias2 + static_cast<int64_t>(l) * D;
    if (use_shared) {
      for (int j = threadIdx.x; j < psize; j += blockDim.x) sacc[j] = T(0);
      __syncthreads();
    }
#pragma unroll
    for (int d = 0; d < MAXD; ++d) p[d] = (active && d < D) ? states[(l * N + i) * D + d] : T(0);
    velocity<T, A, MAXD>(w1, b1, w2, b2, D, H, p, v);
    // gv = dt g + ce v (zero on padding lanes, so they add nothing below)
#pragma unroll
    for (int d = 0; d < MAXD; ++d) {
      gv[d] = (active && d < D) ? dt * g[d] + ce * v[d] : T(0);
      if (d < D) warp_add(a_gb2 + d, gv[d]);
    }
    for (int k = 0; k < H; ++k) {
      T z = __ldg(b1 + k);
      T gz = T(0);
#pragma unroll
      for (int d = 0; d < MAXD; ++d) {
        if (d < D) {
          z += __ldg(w1 + k * D + d) * p[d];
          gz += __ldg(w2 + d * H + k) * gv[d];
        }
      }
      const T h = act_value<T, A>(z);
      gz *= act_grad<T, A>(z, h);
      warp_add(a_gb1 + k, gz);
#pragma unroll
      for (int d = 0; d < MAXD; ++d) {
        if (d < D) {
          warp_add(a_gw2 + d * H + k, gv[d] * h);
          warp_add(a_gw1 + k * D + d, gz * p[d]);
          g[d] += __ldg(w1 + k * D + d) * gz;  // g <- g + W1^T gz (gv already used g)
        }
      }
    }
    if (use_shared) {
      __syncthreads();
      for (int j = threadIdx.x; j < psize; j += blockDim.x) {
        T* dst;
        if (j < o_gb1) dst = grad_weight1 + static_cast<int64_t>(l) * H * D + j;
        else if (j < o_gw2) dst = grad_bias1 + static_cast<int64_t>(l) * H + (j - o_gb1);
        else if (j < o_gb2) dst = grad_weight2 + static_cast<int64_t>(l) * D * H + (j - o_gw2);
        else dst = grad_bias2 + static_cast<int64_t>(l) * D + (j - o_gb2);
        atomicAdd(dst, sacc[j]);
      }
      __syncthreads();  // sacc is zeroed again by the next layer
    }
  }
  if (active) {
#pragma unroll
    for (int d = 0; d < MAXD; ++d)
      if (d < D) grad_x[i * D + d] = g[d];
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
// activation and the smallest register bucket that holds D.
template <typename F>
void dispatch(Activation act, int64_t dim, F&& f) {
  auto with_dim = [&](auto a) {
    if (dim <= 4) f(a, std::integral_constant<int, 4>{});
    else if (dim <= 16) f(a, std::integral_constant<int, 16>{});
    else f(a, std::integral_constant<int, 64>{});
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
  const int64_t blocks = (sizes.n + kThreads - 1) / kThreads;
  const size_t layer_bytes =
      static_cast<size_t>(2 * sizes.width * sizes.dim + sizes.width + sizes.dim) * sizeof(scalar_t);
  const bool use_shared = layer_bytes <= kMaxSharedBytes;
  const size_t smem = use_shared ? layer_bytes : 0;
  dispatch(act, sizes.dim, [&](auto a, auto maxd) {
    backward_kernel<scalar_t, decltype(a)::value, decltype(maxd)::value>
        <<<static_cast<unsigned>(blocks), kThreads, smem, cu_stream>>>(
            grad_x_final, grad_kinetic_sum, states, weight1, bias1, weight2, bias2, dt, sizes.n,
            static_cast<int>(sizes.dim), static_cast<int>(sizes.width), static_cast<int>(sizes.layers), grad_x,
            grad_weight1, grad_bias1, grad_weight2, grad_bias2, use_shared);
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
