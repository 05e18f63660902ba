// The instruction-set level the kernels may use, set once from Python (kvserve/cpu_features.py:
// the CPU's best, or KVSERVE_CPU_ISA when it asks for less). The build has every path the CPU can
// run (-march=native); this picks among them at run time, so that an AVX-512 machine also runs,
// tests and measures the AVX2 and portable paths.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <type_traits>

namespace kvserve {

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
