// The FMA issue bound of one core, measured: 12 independent chains of 512-bit float32 FMAs (enough to cover
// the FMA latency on two ports), 32 flops each. What benchmarks/results/cpu_kernels.md holds the flow kernel
// against. AVX-512 machines only (x86-64 with avx512f):
//   g++ -O2 -march=native benchmarks/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
#include <immintrin.h>

#include <chrono>
#include <cstdio>

int main() {
  __m512 acc[12];
  const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const long iters = 200000000;
  const auto t0 = std::chrono::steady_clock::now();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sum = 0.0f;  // keeps the chains alive
  for (int i = 0; i < 12; ++i) sum += acc[i][0];
  std::printf("%.1f GFLOP/s per core, %.2f G FMA instructions/s (%.3f s; checksum %g)\n",
              iters * 12.0 * 32 / s / 1e9, iters * 12.0 / s / 1e9, s, static_cast<double>(sum));
}
