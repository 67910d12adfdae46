// Portable SIMD for the CPU kernels: GCC/Clang vector extensions (64-byte vectors: 16 floats or 8
// doubles), which every x86-64 and ARM64 compiler of the project lowers to what the target has
// (AVX-512: one register; AVX2: two; SSE2 / NEON: four). No system package, no intrinsics needed; where
// the build targets AVX-512 (FASTLDDMM_NATIVE on such a machine) three primitives use its instructions.
//
// The lane structure (W lanes, which element goes to which lane, the order lanes are combined in) is
// fixed by this file, not by the ISA or the thread count: a kernel that reduces per lane and then over
// lanes in a fixed order gives the same sums whatever the threads (FMA contraction may still differ
// between ISAs, so results are compared bitwise only within one build).
//
// exp2: 2^d = 2^n · 2^f, n = round(d), f = d - n in [-1/2, 1/2], 2^f by a polynomial fitted to 2^f on
// [-1/2, 1/2] (Chebyshev fit in 50-digit arithmetic, coefficients rounded to the type):
//   float:  degree 6,  max relative error of the rounded polynomial 1.9e-8 (0.3 ulp) before the Horner
//           evaluation's own rounding (a few ulp in all, measured < 3e-7 relative over [-125, 0]);
//   double: degree 11, max relative error 2.0e-17 (0.2 ulp) before rounding (measured < 5e-16).
// Denormal numbers cost x86 cores a microcode assist of ~100 cycles each (it made the first version of the
// soft-min 35x slower): exp2 clamps its input at -100 (float) / -1000 (double), so smaller inputs give
// 2^-100 / 2^-1000 instead of less, and every kernel also runs under FlushDenormals (flush-to-zero,
// denormals-are-zero) for the products of such tiny terms (at most M * 2^-100 relative to a sum >= 1, which is how the kernels use it:
// invisible). Inputs must be <= 1 (the kernels subtract a running max).
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#define FASTLDDMM_SIMD_AVX512 1
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace fastlddmm {
namespace simd {

constexpr int kVectorBytes = 64;

template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(kVectorBytes)));
  typedef int32_t I __attribute__((vector_size(kVectorBytes)));
  static constexpr int W = 16;
};

template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(kVectorBytes)));
  typedef int64_t I __attribute__((vector_size(kVectorBytes)));
  static constexpr int W = 8;
};

template <typename T>
using vec = typename Lanes<T>::V;

template <typename T>
inline vec<T> load(const T* p) {
  vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename T, std::size_t... I>
inline vec<T> splat_lanes(T s, std::index_sequence<I...>) {
  return vec<T>{((void)I, s)...};
}

template <typename T>
inline vec<T> splat(T s) {
  // {s, s, ..., s}, not `vec<T>{} + s`: 0 + s is not s for s = -0 under IEEE rules, so the compiler kept an
  // add and a register broadcast (two FMA-port instructions) where one broadcast load does.
  return splat_lanes<T>(s, std::make_index_sequence<Lanes<T>::W>{});
}

template <typename T>
inline vec<T> vmax(vec<T> a, vec<T> b) {
#if FASTLDDMM_SIMD_AVX512
  // One vmaxps; GCC lowers the select below to a compare + a masked move (two instructions).
  if constexpr (sizeof(T) == 4) {
    return reinterpret_cast<vec<T>>(_mm512_max_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b)));
  } else {
    return reinterpret_cast<vec<T>>(_mm512_max_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b)));
  }
#else
  return a > b ? a : b;
#endif
}

template <typename T>
inline vec<T> vmin(vec<T> a, vec<T> b) {
  return a < b ? a : b;
}

// True when a[l] > b[l] in some lane.
template <typename T>
inline bool any_greater(vec<T> a, vec<T> b) {
#if FASTLDDMM_SIMD_AVX512
  if constexpr (sizeof(T) == 4) {
    return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), _CMP_GT_OQ) != 0;
  } else {
    return _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b), _CMP_GT_OQ) != 0;
  }
#else
  auto m = a > b;  // -1 / 0 per lane
  typename Lanes<T>::I acc = reinterpret_cast<typename Lanes<T>::I>(m);
  // OR-fold the halves (log2 W steps); the compiler turns these into shuffles.
  int64_t r = 0;
  for (int l = 0; l < Lanes<T>::W; ++l) r |= static_cast<int64_t>(acc[l]);
  return r != 0;
#endif
}

template <typename T>
inline vec<T> exp2_poly(vec<T> f) {  // 2^f for f in [-1/2, 1/2]
  if constexpr (sizeof(T) == 4) {
    vec<T> p = splat<T>(0x1.444p-13f);
    p = p * f + 0x1.5f48cp-10f;
    p = p * f + 0x1.3b2a1cp-7f;
    p = p * f + 0x1.c6aeccp-5f;
    p = p * f + 0x1.ebfbep-3f;
    p = p * f + 0x1.62e43p-1f;
    p = p * f + 1.0f;
    return p;
  } else {
    vec<T> p = splat<T>(0x1.e9ec1fcb69a7fp-32);
    p = p * f + 0x1.e6228acd1c6e5p-28;
    p = p * f + 0x1.b524ebd13a55fp-24;
    p = p * f + 0x1.62bfc2c86d700p-20;
    p = p * f + 0x1.ffcbfc6da6ed1p-17;
    p = p * f + 0x1.430913112c61bp-13;
    p = p * f + 0x1.5d87fe78a3f9cp-10;
    p = p * f + 0x1.3b2ab6fb9f1a5p-7;
    p = p * f + 0x1.c6b08d704a0c6p-5;
    p = p * f + 0x1.ebfbdff82c5aep-3;
    p = p * f + 0x1.62e42fefa39efp-1;
    p = p * f + 1.0;
    return p;
  }
}

// 2^d, d <= 1 (see the file comment for the error).
template <typename T>
inline vec<T> exp2(vec<T> d) {
#if FASTLDDMM_SIMD_AVX512
  // The clamp is needed here too: without it (vscalef alone, under FlushDenormals) the soft-min ran 3.6x
  // slower on a Xeon (Sapphire Rapids class) at eps = 0.01: underflowing vscalef results still take a slow path.
  if constexpr (sizeof(T) == 4) {
    d = vmax<T>(d, splat<T>(-100.0f));
    const __m512 x = reinterpret_cast<__m512>(d);
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vec<T> p = exp2_poly<T>(d - reinterpret_cast<vec<T>>(n));
    return reinterpret_cast<vec<T>>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), n));
  } else {
    d = vmax<T>(d, splat<T>(-1000.0));
    const __m512d x = reinterpret_cast<__m512d>(d);
    const __m512d n = _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vec<T> p = exp2_poly<T>(d - reinterpret_cast<vec<T>>(n));
    return reinterpret_cast<vec<T>>(_mm512_scalef_pd(reinterpret_cast<__m512d>(p), n));
  }
#else
  using I = typename Lanes<T>::I;
  if constexpr (sizeof(T) == 4) {
    d = vmax<T>(d, splat<T>(-100.0f));
    const vec<T> magic = splat<T>(0x1.8p23f);  // adding it rounds to an integer, kept in the low bits
    const vec<T> u = d + magic;
    const vec<T> p = exp2_poly<T>(d - (u - magic));
    return reinterpret_cast<vec<T>>(reinterpret_cast<I>(p) + (reinterpret_cast<I>(u) << 23));
  } else {
    d = vmax<T>(d, splat<T>(-1000.0));
    const vec<T> magic = splat<T>(0x1.8p52);
    const vec<T> u = d + magic;
    const vec<T> p = exp2_poly<T>(d - (u - magic));
    return reinterpret_cast<vec<T>>(reinterpret_cast<I>(p) + (reinterpret_cast<I>(u) << 52));
  }
#endif
}

// The smallest lane.
template <typename T>
inline T hmin(vec<T> a) {
#if FASTLDDMM_SIMD_AVX512
  if constexpr (sizeof(T) == 4) {
    return _mm512_reduce_min_ps(reinterpret_cast<__m512>(a));
  } else {
    return _mm512_reduce_min_pd(reinterpret_cast<__m512d>(a));
  }
#else
  T m = a[0];
  for (int l = 1; l < Lanes<T>::W; ++l) m = a[l] < m ? a[l] : m;
  return m;
#endif
}

// Flush-to-zero and denormals-are-zero on this thread while in scope (x86: MXCSR bits 15 and 6).
struct FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

}  // namespace simd
}  // namespace fastlddmm
