// The reduction of the Sinkhorn barycentric projection on the CPU (fastlddmm/ops/projection/cpu.py):
//
//   T_i = sum_j P_ij v_j,   P_ij = softmax_j(h_j - C(x_i, y_j) / eps),   C = |x - y|^p / p (as the soft-min)
//
// forward beside backward, both streaming (csrc/common/pair_reduce.h), memory O(B (N + M) D).
// Buffers C-contiguous, one dtype T: x (B, N, D), y (B, M, D), h (B, M), v (B, M, D).
#pragma once

#include <cstdint>

namespace fastlddmm {

// out (B, N, D) = T; lse2 (B, N) double: log2 sum_j 2^{(h_j - C_ij / eps) log2 e}, kept for the backward.
template <typename T>
void projection_forward_cpu(const T* x, const T* y, const T* h, const T* v, int64_t batch, int64_t n, int64_t m,
                            int dim, double eps, int p, int num_threads, T* out, double* lse2);

// Given grad_out (B, N, D) = dL/dT and the forward's out and lse2: grad_x (B, N, D) (null: not wanted; one
// pass over the pairs by rows), grad_h (B, M) and grad_v (B, M, D) (null: not wanted; one pass by columns).
//   dL/dlogit_ij = P_ij u_ij, u_ij = grad_out_i . (v_j - T_i)
//   grad_h_j = sum_i P_ij u_ij,  grad_v_j = sum_i P_ij grad_out_i,  grad_x_i = -1/eps sum_j P_ij u_ij dC_ij/dx_i
template <typename T>
void projection_backward_cpu(const T* x, const T* y, const T* h, const T* v, const T* out, const double* lse2,
                             const T* grad_out, int64_t batch, int64_t n, int64_t m, int dim, double eps, int p,
                             int num_threads, T* grad_x, T* grad_h, T* grad_v);

}  // namespace fastlddmm
