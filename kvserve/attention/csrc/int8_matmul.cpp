// x @ W^T for int8 weights with one scale per output channel, for the rows of a decode step, on CPU:
//     y[r, o] = scale[o] · sum_j x[r, j] · w[o, j]
// Weights are widened to fp32 in registers (no activation quantization: the same math as the
// dequantized weights, in fp32), each weight row read once for up to 8 rows of x (more rows: in
// chunks of 8). Memory-bound at one row: torch's int8 kernel reads these bytes at about half the
// speed on the project's CPU; at 8 rows close to the FMA peak (the LM head of an fp32 model takes
// it up to 16 rows, where it beats MKL's fp32 matmul of the widened weights).
// The portable loop is the spec of the AVX-512 and AVX2 ones (kvserve::isa_level() picks).

#include "tensor.h"
#include <ATen/Parallel.h>

#include "isa.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kMaxRows = 8;     // rows per pass over the weights

#if defined(__AVX2__) && defined(__FMA__)
// Row o + 8's weights, every cache line of it, requested now, so that reading a row overlaps the
// arithmetic on the rows before it (one line per row left ~40% of the memory bandwidth unused).
inline void prefetch_row(const int8_t* row, int64_t k) {
  const char* next = reinterpret_cast<const char*>(row + 8 * k);
  for (int64_t at = 0; at < k; at += 64) _mm_prefetch(next + at, _MM_HINT_T0);
}
#endif

void int8_rows_portable(const float* x, const int8_t* w, const float* scale, float* y, int64_t rows, int64_t n,
                        int64_t k, int64_t begin, int64_t end) {
  for (int64_t o = begin; o < end; ++o)
    for (int64_t r = 0; r < rows; ++r) {
      float total = 0.f;
      for (int64_t j = 0; j < k; ++j) total += x[r * k + j] * static_cast<float>(w[o * k + j]);
      y[r * n + o] = total * scale[o];
    }
}

#if defined(__AVX512F__)
template <int R>
void int8_rows_avx512(const float* x, const int8_t* w, const float* scale, float* y, int64_t n, int64_t k,
                      int64_t begin, int64_t end) {
  constexpr int U = R == 1 ? 2 : 1;   // two FMA chains for one row: the latency, not the loads, bounded one
  const int64_t wide = k / (16 * U) * (16 * U), full = k / 16 * 16;
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* wo = w + o * k;
    if (o + 8 < n) prefetch_row(wo, k);
    __m512 acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
    for (int64_t j = 0; j < wide; j += 16 * U)
      for (int u = 0; u < U; ++u) {
        const __m512 wv = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wo + j + 16 * u))));
        for (int r = 0; r < R; ++r) acc[r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + j + 16 * u), wv, acc[r][u]);
      }
    for (int64_t j = wide; j < full; j += 16) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wo + j))));
      for (int r = 0; r < R; ++r) acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + j), wv, acc[r][0]);
    }
    for (int r = 0; r < R; ++r) {
      __m512 sum = acc[r][0];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[r][u]);
      float total = _mm512_reduce_add_ps(sum);
      for (int64_t j = full; j < k; ++j) total += x[r * k + j] * static_cast<float>(wo[j]);
      y[r * n + o] = total * scale[o];
    }
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// The AVX2 + FMA path: the AVX-512 one at 8 lanes (8 int8 weights widened to fp32 per FMA).
template <int R>
void int8_rows_avx2(const float* x, const int8_t* w, const float* scale, float* y, int64_t n, int64_t k,
                    int64_t begin, int64_t end) {
  // U independent accumulators per row: with few rows, one FMA chain per row would wait on the FMA
  // latency (4 cycles) instead of the loads.
  constexpr int U = R == 1 ? 4 : (R <= 3 ? 2 : 1);
  const int64_t wide = k / (8 * U) * (8 * U), full = k / 8 * 8;
  for (int64_t o = begin; o < end; ++o) {
    const int8_t* wo = w + o * k;
    if (o + 8 < n) prefetch_row(wo, k);
    __m256 acc[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < wide; j += 8 * U)
      for (int u = 0; u < U; ++u) {
        const __m256 wv = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wo + j + 8 * u))));
        for (int r = 0; r < R; ++r) acc[r][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + j + 8 * u), wv, acc[r][u]);
      }
    for (int64_t j = wide; j < full; j += 8) {
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wo + j))));
      for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + j), wv, acc[r][0]);
    }
    for (int r = 0; r < R; ++r) {
      __m256 sum = acc[r][0];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[r][u]);
      float total = kvserve::hsum8(sum);
      for (int64_t j = full; j < k; ++j) total += x[r * k + j] * static_cast<float>(wo[j]);
      y[r * n + o] = total * scale[o];
    }
  }
}
#endif

void check(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be [rows, k] bfloat16 or float32");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2 && w.size(1) == x.size(1) && w.is_contiguous(),
              "w must be contiguous int8 [n, k]");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == w.size(0), "scale must be [n]");
}

}  // namespace

// x [rows, k] bf16/fp32, w [n, k] int8, scale [n] -> [rows, n] in x's dtype.
torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  check(x, w, scale);
  auto xf = x.to(at::kFloat).contiguous();
  auto sf = scale.to(at::kFloat).contiguous();
  const int64_t rows = xf.size(0), k = xf.size(1), n = w.size(0);
  auto y = torch::empty({rows, n}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (rows > 0) {
    const int level = kvserve::isa_level();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int64_t chunk = std::min(kMaxRows, rows - r0);
        const float* xc = xp + r0 * k;
        float* yc = yp + r0 * n;
#if defined(__AVX512F__)
        if (level >= kvserve::kAvx512) {
          kvserve::by_rows(chunk, [&](auto r) { int8_rows_avx512<decltype(r)::value>(xc, wp, sp, yc, n, k, begin, end); });
          continue;
        }
#endif
#if defined(__AVX2__) && defined(__FMA__)
        if (level >= kvserve::kAvx2) {
          kvserve::by_rows(chunk, [&](auto r) { int8_rows_avx2<decltype(r)::value>(xc, wp, sp, yc, n, k, begin, end); });
          continue;
        }
#endif
        int8_rows_portable(xc, wp, sp, yc, chunk, n, k, begin, end);
      }
    });
  }
  return y.to(x.scalar_type());
}

torch::Tensor int8_matmul_portable(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  check(x, w, scale);
  auto xf = x.to(at::kFloat).contiguous();
  auto sf = scale.to(at::kFloat).contiguous();
  auto y = torch::empty({xf.size(0), w.size(0)}, xf.options());
  int8_rows_portable(xf.data_ptr<float>(), w.data_ptr<int8_t>(), sf.data_ptr<float>(), y.data_ptr<float>(), xf.size(0),
                     w.size(0), xf.size(1), 0, w.size(0));
  return y.to(x.scalar_type());
}
