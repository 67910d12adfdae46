// The fused ResNet-LDDMM Euler flow: L residual blocks x^{l+1} = x^l + dt * v_l(x^l),
// v_l(x) = W2_l rho(W1_l x + b1_l) + b2_l, and the kinetic sum S = sum_l sum_i |v_l(x_i^l)|^2.
// The op (fastlddmm/ops/flow/__init__.py) turns S into the energy 1/2 * dt * S / N, once for every
// backend; the kernels never scale it. The ground truth is fastlddmm/ops/flow/reference.py; the Python
// launchers are fastlddmm/ops/flow/cpu.py and cuda.py.
//
// Every function works on raw, C-contiguous buffers of one dtype (float or double) allocated by the
// caller (Python/torch): no torch headers here, so the compiled module is not tied to a torch C++ ABI.
// Parameters are stacked over layers:
//   weight1 (L, H, D)   bias1 (L, H)   weight2 (L, D, H)   bias2 (L, D)
#pragma once

#include <cstdint>
#include <string>

namespace fastlddmm {

// Pointwise nonlinearity rho, spelled as in Python ("relu", "tanh", "softplus").
enum class Activation : int { kRelu = 0, kTanh = 1, kSoftplus = 2 };

// Parses "relu" / "tanh" / "softplus"; throws std::invalid_argument otherwise.
Activation parse_activation(const std::string& name);

// Sizes of one call: N points of dimension D, L layers of hidden width H.
struct FlowSizes {
  int64_t n;       // N >= 1
  int64_t dim;     // D >= 1
  int64_t width;   // H >= 1
  int64_t layers;  // L >= 0
};

// ---------------------------------------------------------------------------------------------
// CPU (csrc/euler_flow/euler_flow_cpu.cpp): OpenMP over tiles of points, all layers per tile
// (the weights of all layers stay in cache). D = 2 and 3 (template parameter): a tile of 64 floats / 32
// doubles held in registers as structure of arrays, one hidden unit at a time (z and h never stored);
// other D: [row][point] tiles in memory. The forward stores nothing but its output; the backward runs each
// tile forward again from x, keeping that tile's trajectory (x^l and v_l, 2 x L x D x tile values) in the
// thread's cache, then goes back through the layers. Extra memory: per chunk of tiles a partial sum of the
// parameter gradients (at most ~512 chunks); no (L, N, D) states.
// Threads: num_threads (the launcher passes torch.get_num_threads()).
// ---------------------------------------------------------------------------------------------

// Forward pass.
// Args:
//   x:        (N, D)    the input points
//   weight1:  (L, H, D), bias1: (L, H), weight2: (L, D, H), bias2: (L, D)
//   dt:       the Euler step
//   act:      the activation
//   num_threads: OpenMP threads (<= 0: the OpenMP default)
// Returns (written into caller buffers):
//   x_final:  (N, D)    the points after L steps
//   kinetic_sum: (1,) double  S = sum_l sum_i |v_l(x_i^l)|^2 (summed per tile in double, tiles in order:
//                       deterministic whatever the thread count)
template <typename scalar_t>
void euler_flow_forward_cpu(const scalar_t* x, const scalar_t* weight1, const scalar_t* bias1,
                            const scalar_t* weight2, const scalar_t* bias2, scalar_t dt, Activation act,
                            FlowSizes sizes, int num_threads, scalar_t* x_final, double* kinetic_sum);

// Backward pass (recomputes x^l, z, h, v of each layer from x, tile by tile; never stores N*L*D values).
// Args:
//   grad_x_final: (N, D)  dLoss/dx_final
//   grad_kinetic_sum: scalar  dLoss/dS (the op passes dLoss/denergy * dt / (2N))
//   x:            (N, D)  the forward pass's input points
//   weight1 .. bias2, dt, act, num_threads as in the forward pass
// Returns (written into caller buffers, every one fully overwritten):
//   grad_x:       (N, D)
//   grad_weight1: (L, H, D), grad_bias1: (L, H), grad_weight2: (L, D, H), grad_bias2: (L, D)
//                 summed per chunk of tiles (a fixed cut of the points: 32 tiles, more for very large N),
//                 the chunks added in chunk order in double: bitwise the same whatever num_threads.
template <typename scalar_t>
void euler_flow_backward_cpu(const scalar_t* grad_x_final, scalar_t grad_kinetic_sum, const scalar_t* x,
                             const scalar_t* weight1, const scalar_t* bias1, const scalar_t* weight2,
                             const scalar_t* bias2, scalar_t dt, Activation act, FlowSizes sizes,
                             int num_threads, scalar_t* grad_x, scalar_t* grad_weight1, scalar_t* grad_bias1,
                             scalar_t* grad_weight2, scalar_t* grad_bias2);

// ---------------------------------------------------------------------------------------------
// CUDA (csrc/euler_flow/euler_flow_cuda.cu), compiled only when CMake found a CUDA compiler
// (FASTLDDMM_WITH_CUDA). Same arguments as the CPU functions, but every pointer is a device
// pointer and the kernels run on `stream` (a cudaStream_t passed as an integer; 0 = legacy default).
// Forward: one thread per point, all layers per thread. Backward: one warp per tile of points (4 point
// groups x 8 hidden lanes); weight gradients are summed over a tile's points in registers and 2 shuffle
// rounds, then added with atomics into the block's shared memory (flushed to global memory with atomics
// once per block and layer) or, when a layer's gradients do not fit in 48 KiB, straight into global memory:
// not bitwise deterministic.
// Supports D <= kCudaMaxDim (the point stays in registers; D <= 4 are compile-time, 5..16 one generic build).
// Extra argument of the forward pass:
//   kinetic_sum: (1,) double, zeroed by the caller; receives S = sum_l sum_i |v|^2 (accumulated with atomics)
// The backward pass reads grad_kinetic_sum (dLoss/dS) from a device pointer (1,) (no host sync), and its gradient
// buffers for the weights and biases must be zeroed by the caller (they are accumulated).
// Errors (launch failures, D too large) throw std::runtime_error.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kCudaMaxDim = 16;

bool cuda_compiled();

template <typename scalar_t>
void euler_flow_forward_cuda(const scalar_t* x, const scalar_t* weight1, const scalar_t* bias1,
                             const scalar_t* weight2, const scalar_t* bias2, scalar_t dt, Activation act,
                             FlowSizes sizes, scalar_t* x_final, scalar_t* states, double* kinetic_sum,
                             std::uintptr_t stream);

template <typename scalar_t>
void euler_flow_backward_cuda(const scalar_t* grad_x_final, const scalar_t* grad_kinetic_sum, const scalar_t* states,
                              const scalar_t* weight1, const scalar_t* bias1, const scalar_t* weight2,
                              const scalar_t* bias2, scalar_t dt, Activation act, FlowSizes sizes,
                              scalar_t* grad_x, scalar_t* grad_weight1, scalar_t* grad_bias1,
                              scalar_t* grad_weight2, scalar_t* grad_bias2, std::uintptr_t stream);

}  // namespace fastlddmm
