// The instruction-set level the kernels may use, set once from Python (kvserve/cpu_features.py:
// the CPU's best, or KVSERVE_CPU_ISA when it asks for less). The build has every path the CPU can
// run (-march=native); this picks among them at run time, so that an AVX-512 machine also runs,
// tests and measures the AVX2 and portable paths.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <limits>
#include <type_traits>

namespace kvserve {

// The attention kernels' score for a masked-out key, and their running maximum before the first
// key: the lowest finite float rather than -inf, since the kernels are built with -ffast-math, which
// lets the compiler assume there are no infinities. A real score less it stays finite and far below
// exp's range, so exp gives 0 there on every path (exp8 included), as it would for -inf.
constexpr float kNoScore = -std::numeric_limits<float>::max();

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline int& isa_level() {
  static int level = kAvx512;   // capped by what was compiled in: each path is also guarded by #if
  return level;
}

#if defined(__AVX2__) && defined(__FMA__)
// The sum of the 8 lanes (the AVX2 paths' reduction).
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The largest of the 8 lanes.
inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// e^x in 8 lanes, for x <= 0 (scores less their maximum): x = n ln2 + r, |r| <= ln2 / 2, e^x = 2^n p(r)
// with Cephes' degree-6 polynomial for e^r (about 1 ulp); x below -87.3 (e^x < 2^-126, -inf
// included) gives 0.
inline __m256 exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.33654f);
  const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);        // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

// The sum of the 4 lanes.
inline float hsum4(__m128 v) {
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}
#endif

// run(std::integral_constant<int, R>) for R = rows (1..8): a row count known at compile time, for
// the few-row matmul kernels (int8_matmul.cpp, int4_matmul.cpp).
template <typename Run>
void by_rows(int64_t rows, Run run) {
  switch (rows) {
    case 1: return run(std::integral_constant<int, 1>{});
    case 2: return run(std::integral_constant<int, 2>{});
    case 3: return run(std::integral_constant<int, 3>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 5: return run(std::integral_constant<int, 5>{});
    case 6: return run(std::integral_constant<int, 6>{});
    case 7: return run(std::integral_constant<int, 7>{});
    default: return run(std::integral_constant<int, 8>{});
  }
}

}  // namespace kvserve
