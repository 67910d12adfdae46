// The soft-min of Sinkhorn's loop on the CPU (fastlddmm/ops/softmin/cpu.py is the launcher):
//
//   f_i = -eps log sum_j exp(h_j - C(x_i, y_j) / eps),   C(x, y) = |x - y|^p / p,  p in {1, 2}
//   (p = 1: |x - y| = sqrt(max(|x - y|^2, 1e-8)), GeomLoss's convention)
//
// and, when asked, its gradient in the query points, G_i = df_i / dx_i = sum_j P_ij dC_ij/dx_i with
// P_ij = softmax_j(h_j - C_ij / eps) (p = 2: x_i - sum_j P_ij y_j; p = 1: sum_j P_ij (x_i - y_j) / C_ij,
// 0 where the floor is active), computed in the same pass (a few FMAs per pair more), so that the
// backward pass is grad_x = grad_f * G. Streaming (csrc/common/pair_reduce.h): memory O(B (N + M) D).
//
// Buffers are C-contiguous, one dtype T (float or double):
//   x (B, N, D) queries, y (B, M, D) references, h (B, M) log-weights + potentials / eps
//   f (B, N) out; grad (B, N, D) out, or null (no gradient wanted)
// Deterministic whatever num_threads (each row is reduced in one fixed order).
#pragma once

#include <cstdint>

namespace fastlddmm {

template <typename T>
void softmin_cpu(const T* x, const T* y, const T* h, int64_t batch, int64_t n, int64_t m, int dim, double eps,
                 int p, int num_threads, T* f, T* grad);

}  // namespace fastlddmm
