// Activations quantized to int8 per group of 32 inputs, as llama.cpp's Q8_1 is: the int4 kernels'
// other operand (int4_matmul.cpp for a few rows, int4_gemm.cpp for many). For each row and group:
// scale e = max|x| / 127, a = round(x · 127 / max|x|) (to nearest even, |a| <= 127) and s = e·Σa.
// The scalar loop is the spec (quantize_q8_rows in kvserve/model/quant.py is its torch twin); the
// AVX2 loop gives the same bytes and scales (the same fp32 operations, 8 lanes at a time).
#pragma once

#include <ATen/Parallel.h>

#include "isa.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace kvserve {

constexpr int64_t kQ8Group = 32;

struct Q8Rows {
  std::vector<int8_t> a;      // [rows, k]
  std::vector<float> e, s;    // [rows, k/32]
};

// v clamped to [-limit, limit] as the vector min/max instructions do (a NaN, from a group holding
// inf or NaN or one so small that limit/max|x| overflows, becomes limit): the same integers on every
// path and never an out-of-range conversion. Also int8_gemm.cpp's int16 rounding (limit 32767).
inline float clamp_to(float v, float limit) {
  v = v < limit ? v : limit;
  return v > -limit ? v : -limit;
}

// quantize(begin, end) over rows: serial for a few (a decode step: not worth waking the threads),
// split across threads for many (a prefill chunk). Both activation quantizers use it.
template <typename F>
inline void quantize_rows_split(int64_t rows, const F& quantize) {
  if (rows <= 8) quantize(0, rows);
  else at::parallel_for(0, rows, 16, quantize);
}

inline void quantize_group(const float* xg, int8_t* ag, float* e, float* s) {
  float amax = 0.f;
  for (int i = 0; i < kQ8Group; ++i) amax = std::max(amax, std::fabs(xg[i]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int sum = 0;
  for (int i = 0; i < kQ8Group; ++i) {
    const int v = static_cast<int>(std::nearbyint(clamp_to(xg[i] * inv, 127.f)));
    ag[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *e = amax / 127.f;
  *s = *e * static_cast<float>(sum);
}

#if defined(__AVX2__) && defined(__FMA__)
inline void quantize_group_avx2(const float* xg, int8_t* ag, float* e, float* s) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4];
  __m256 peak = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xg + 8 * i);
    peak = _mm256_max_ps(peak, _mm256_and_ps(v[i], magnitude));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i q[4];
  __m256i sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256 scaled = _mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(v[i], inv), _mm256_set1_ps(127.f)),
                                        _mm256_set1_ps(-127.f));                       // clamp_to
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum = _mm256_add_epi32(sum, q[i]);
  }
  // int32 → int8 in order: the packs interleave 128-bit lanes, the permute undoes it
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ag),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  *e = amax / 127.f;
  *s = *e * static_cast<float>(_mm_cvtsi128_si32(t));
}
#endif

// x [rows, k] fp32 (k a multiple of 32), at kernel level `level`; rows split across threads when
// there are many (a prefill chunk), serial for a few (not worth waking them).
inline Q8Rows quantize_rows(const float* x, int64_t rows, int64_t k, int level) {
  (void)level;
  const int64_t groups = k / kQ8Group;
  Q8Rows q{std::vector<int8_t>(rows * k), std::vector<float>(rows * groups), std::vector<float>(rows * groups)};
  auto quantize = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = r * k + g * kQ8Group, j = r * groups + g;
#if defined(__AVX2__) && defined(__FMA__)
        if (level >= kAvx2) {
          quantize_group_avx2(x + at, q.a.data() + at, &q.e[j], &q.s[j]);
          continue;
        }
#endif
        quantize_group(x + at, q.a.data() + at, &q.e[j], &q.s[j]);
      }
  };
  quantize_rows_split(rows, quantize);
  return q;
}

}  // namespace kvserve
