// Exact K nearest neighbours on the CPU (fastlddmm/ops/nearest/cpu.py is the launcher): a k-d tree over
// each batch item's reference cloud y, built per call (median splits on the widest side of the cell,
// leaves of 16..32 points stored as structure of arrays), queried with OpenMP by blocks of query points
// taken in the order of the leaves they fall in (so that consecutive queries reuse the same part of the
// tree in cache), with the incremental distance from the query to each cell (Arya & Mount) to prune.
// Median splits keep the tree balanced whatever the distribution (points on a surface, very uneven
// densities): a query costs O(log M) in the usual cases; no grid resolution to tune.
//
// Args (C-contiguous, one dtype T):
//   x (B, N, D) queries, y (B, M, D) references; x_lengths, y_lengths (B,) int64 or null (all N / M)
//   k >= 1; norm 2 (squared Euclidean) or 1 (L1)
// Returns: index (B, N, k) int64, written where i < x_lengths[b] and k' < min(k, y_lengths[b]) (the caller
//   zero-fills it): neighbours sorted by increasing distance (ties in any order).
// The result of a query does not depend on the thread count or on the order queries are processed in.
#pragma once

#include <cstdint>

namespace fastlddmm {

template <typename T>
void knn_cpu(const T* x, const T* y, const int64_t* x_lengths, const int64_t* y_lengths, int64_t batch, int64_t n,
             int64_t m, int dim, int k, int norm, int num_threads, int64_t* index);

}  // namespace fastlddmm
