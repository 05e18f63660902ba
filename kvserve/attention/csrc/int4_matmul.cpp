// x @ W^T for 4-bit weights in llama.cpp's Q4_1 layout, for a few rows of x (decode), on CPU.
//
// Weights: groups of 32 consecutive inputs of an output row share a scale d and a minimum m (fp16,
// as in the GGUF), w = d·q + m with q in 0..15. `qs` [n, k/2] holds each group's 32 q in 16 bytes:
// byte j has q[j] in its low nibble and q[j + 16] in its high one (Q4_1's order). `dm` [n, k/32, 2]
// holds (d, m). A one-stream decode step reads every weight once, so it is bound by the bytes
// read: 20 bytes per 32 weights, a quarter of bf16's, an eighth of fp32's.
//
// Activations are quantized per row to int8 in groups of 32 (scale e = max|x| / 127, a = round(x / e),
// and s = e·Σa), as llama.cpp's Q8_1 is, so that each group's dot product is an integer one:
//     y[r, o] = Σ_g  d·e·Σ_i q_i a_i  +  m·s
// which is exactly (dequantized weights) · (dequantized activations). Integer dot products take
// 32 weights in two AVX2 instructions (maddubs + madd) or 64 in one AVX512-VNNI one, where widening
// 4-bit weights to fp32 for FMAs costs several instructions per 8 or 16 weights. The portable loop
// is the spec of the AVX2 and AVX-512 paths (kvserve::isa_level() picks); all three quantize the
// activations with the same scalar code, so they differ only in the order of fp32 sums.

#include "tensor.h"
#include <ATen/Parallel.h>

#include "isa.h"
#include "q8.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVSERVE_INT4_AVX2 1
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(KVSERVE_INT4_AVX2)
#define KVSERVE_INT4_AVX512 1
#endif

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kGroup = 32;

// Row o's (d, m) as fp32: d into `d`, m into `m`.
inline void row_scales(const c10::Half* dm, int64_t groups, float* d, float* m) {
  for (int64_t g = 0; g < groups; ++g) {
    d[g] = static_cast<float>(dm[2 * g]);
    m[g] = static_cast<float>(dm[2 * g + 1]);
  }
}

// Σ_g m[g]·s[g]: the minimums' share of a row's dot product.
inline float min_term(const float* m, const float* s, int64_t groups) {
  float total = 0.f;
  for (int64_t g = 0; g < groups; ++g) total += m[g] * s[g];
  return total;
}

void int4_rows_portable(const kvserve::Q8Rows& q, const uint8_t* qs, const c10::Half* dm, float* y, int64_t rows, int64_t n,
                        int64_t k, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  std::vector<float> d(groups), m(groups);
  for (int64_t o = begin; o < end; ++o) {
    row_scales(dm + o * groups * 2, groups, d.data(), m.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* a = q.a.data() + r * k;
      const float* e = q.e.data() + r * groups;
      float total = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* b = qs + o * (k / 2) + g * 16;
        const int8_t* ag = a + g * kGroup;
        int dot = 0;
        for (int j = 0; j < 16; ++j) dot += (b[j] & 15) * ag[j] + (b[j] >> 4) * ag[j + 16];
        total += d[g] * e[g] * static_cast<float>(dot);
      }
      y[r * n + o] = total + min_term(m.data(), q.s.data() + r * groups, groups);
    }
  }
}

#if defined(KVSERVE_INT4_AVX2)
// The activations rearranged once per call for the vector paths, per pair of groups (g, g+1):
//   lo  [a_g[0..15],  a_g+1[0..15]]    the inputs that meet the low nibbles of the pair's 32 bytes
//   hi  [a_g[16..31], a_g+1[16..31]]   ... and the high nibbles
//   e   [e_g ×4, e_g+1 ×4]             each int32 lane of the dot product belongs to one group
//   s   [0, s_g, 0, s_g+1]             against the pair's (d, m, d, m): the minimums' share
// Two consecutive pairs are the AVX-512 path's block of four groups, in the same layout.
struct Prepared {
  int64_t pairs;
  std::vector<int8_t> lo, hi;   // [rows, pairs, 32]
  std::vector<float> e, s;      // [rows, pairs, 8], [rows, pairs, 4]
};

Prepared prepare(const kvserve::Q8Rows& q, int64_t rows, int64_t k) {
  const int64_t groups = k / kGroup, pairs = groups / 2;
  Prepared p{pairs, std::vector<int8_t>(rows * pairs * 32), std::vector<int8_t>(rows * pairs * 32),
             std::vector<float>(rows * pairs * 8), std::vector<float>(rows * pairs * 4)};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t pr = 0; pr < pairs; ++pr)
      for (int h = 0; h < 2; ++h) {
        const int64_t g = 2 * pr + h, at = (r * pairs + pr);
        const int8_t* a = q.a.data() + r * k + g * kGroup;
        for (int j = 0; j < 16; ++j) {
          p.lo[at * 32 + 16 * h + j] = a[j];
          p.hi[at * 32 + 16 * h + j] = a[16 + j];
        }
        for (int j = 0; j < 4; ++j) p.e[at * 8 + 4 * h + j] = q.e[r * groups + g];
        p.s[at * 4 + 2 * h] = 0.f;
        p.s[at * 4 + 2 * h + 1] = q.s[r * groups + g];
      }
  return p;
}

// Row o + kAhead's weights and scales, requested now: one row's dot products take about as long as
// its bytes take to arrive from memory, so without this the two add up instead of overlapping.
constexpr int64_t kAhead = 8;

inline void prefetch_row(const uint8_t* row, const c10::Half* dmo, int64_t k) {
  const char* next = reinterpret_cast<const char*>(row + kAhead * (k / 2));
  for (int64_t at = 0; at < k / 2; at += 64) _mm_prefetch(next + at, _MM_HINT_T0);
  const char* scales = reinterpret_cast<const char*>(dmo + kAhead * (k / kGroup) * 2);
  for (int64_t at = 0; at < (k / kGroup) * 4; at += 64) _mm_prefetch(scales + at, _MM_HINT_T0);
}

inline float half_to_float(const c10::Half* h) {
  return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(h));
}

// The last group of an odd number of groups, which no pair takes, for row r of x: d·e·Σ q·a + m·s
// (0 when the number is even).
inline float odd_group(const kvserve::Q8Rows& q, const uint8_t* row, const c10::Half* dmo, int64_t r, int64_t k) {
  const int64_t groups = k / kGroup;
  if (!(groups & 1)) return 0.f;
  const int64_t g = groups - 1;
  const uint8_t* b = row + 16 * g;
  const c10::Half* dm = dmo + 2 * g;
  const int8_t* a = q.a.data() + r * k + g * kGroup;
  const float e = q.e[r * groups + g], s = q.s[r * groups + g];
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i low = _mm_set1_epi8(15);
  const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
  const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, av), _mm256_set1_epi16(1));
  return half_to_float(dm) * e * kvserve::hsum8(_mm256_cvtepi32_ps(dot)) + half_to_float(dm + 1) * s;
}

// Pairs [begin, end) of output row o for R rows of x, into acc (int products scaled) and macc (minimums).
// u8 × s8 pairs into int16 (15·127·2), the low and high halves added (≤ 7,620), then into int32.
template <int R>
inline void pairs_avx2(const Prepared& p, const uint8_t* row, const c10::Half* dmo, int64_t begin, int64_t end,
                       __m256* acc, __m128* macc) {
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  for (int64_t pr = begin; pr < end; ++pr) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * pr));
    const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
    const __m128 dmv = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(dmo + 4 * pr)));   // d m d m
    const __m256 dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dmv), spread);
    for (int r = 0; r < R; ++r) {
      const int64_t at = r * p.pairs + pr;
      const __m256i sum16 = _mm256_add_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.lo.data() + at * 32))),
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.hi.data() + at * 32))));
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum16, ones));
      acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(dw, _mm256_loadu_ps(p.e.data() + at * 8)), acc[r]);
      macc[r] = _mm_fmadd_ps(dmv, _mm_loadu_ps(p.s.data() + at * 4), macc[r]);
    }
  }
}

template <int R>
void int4_rows_avx2(const kvserve::Q8Rows& q, const Prepared& p, const uint8_t* qs, const c10::Half* dm, float* y, int64_t n,
                    int64_t k, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup;
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = qs + o * (k / 2);
    const c10::Half* dmo = dm + o * groups * 2;
    if (o + kAhead < n) prefetch_row(row, dmo, k);
    __m256 acc[R];
    __m128 macc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), macc[r] = _mm_setzero_ps();
    pairs_avx2<R>(p, row, dmo, 0, p.pairs, acc, macc);
    for (int r = 0; r < R; ++r) {
      y[r * n + o] = kvserve::hsum8(acc[r]) + kvserve::hsum4(macc[r]) + odd_group(q, row, dmo, r, k);
    }
  }
}
#endif

#if defined(KVSERVE_INT4_AVX512)
// Blocks of four groups (128 weights, 64 bytes): one load, two masks, and two dot products per row
// (AVX512-VNNI: 64 u8·s8 products in one instruction); each int32 lane belongs to one group.
template <int R>
void int4_rows_avx512(const kvserve::Q8Rows& q, const Prepared& p, const uint8_t* qs, const c10::Half* dm, float* y, int64_t n,
                      int64_t k, int64_t begin, int64_t end) {
  const int64_t groups = k / kGroup, blocks = p.pairs / 2;
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  for (int64_t o = begin; o < end; ++o) {
    const uint8_t* row = qs + o * (k / 2);
    const c10::Half* dmo = dm + o * groups * 2;
    if (o + kAhead < n) prefetch_row(row, dmo, k);
    __m512 acc[R];
    __m256 macc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps(), macc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m512i raw = _mm512_loadu_si512(row + 64 * b);
      const __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
      const __m256 dmv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dmo + 8 * b)));
      const __m512 dw = _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(dmv));
      for (int r = 0; r < R; ++r) {
        const int64_t at = r * p.pairs + 2 * b;
        const __m512i al = _mm512_loadu_si512(p.lo.data() + at * 32), ah = _mm512_loadu_si512(p.hi.data() + at * 32);
#if defined(__AVX512VNNI__)
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, al), hi, ah);
#else
        const __m512i dot = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, al), _mm512_maddubs_epi16(hi, ah)),
                                              _mm512_set1_epi16(1));
#endif
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_loadu_ps(p.e.data() + at * 8)), acc[r]);
        macc[r] = _mm256_fmadd_ps(dmv, _mm256_loadu_ps(p.s.data() + at * 4), macc[r]);
      }
    }
    __m256 acc2[R];
    __m128 macc2[R];
    for (int r = 0; r < R; ++r) acc2[r] = _mm256_setzero_ps(), macc2[r] = _mm_setzero_ps();
    pairs_avx2<R>(p, row, dmo, 2 * blocks, p.pairs, acc2, macc2);     // a pair left over
    for (int r = 0; r < R; ++r) {
      y[r * n + o] = _mm512_reduce_add_ps(acc[r]) + kvserve::hsum8(_mm256_add_ps(macc[r], acc2[r])) +
                     kvserve::hsum4(macc2[r]) + odd_group(q, row, dmo, r, k);
    }
  }
}
#endif

void check(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& dm) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "x must be [rows, k] bfloat16 or float32");
  TORCH_CHECK(x.size(0) <= kMaxRows, "at most 8 rows");
  TORCH_CHECK(x.size(1) % kGroup == 0, "k must be a multiple of 32");
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.dim() == 2 && qs.size(1) * 2 == x.size(1) && qs.is_contiguous(),
              "qs must be contiguous uint8 [n, k/2]");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.dim() == 3 && dm.size(0) == qs.size(0) &&
                  dm.size(1) * kGroup == x.size(1) && dm.size(2) == 2 && dm.is_contiguous(),
              "dm must be contiguous float16 [n, k/32, 2]");
}

torch::Tensor run(torch::Tensor x, torch::Tensor qs, torch::Tensor dm, bool portable) {
  check(x, qs, dm);
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t rows = xf.size(0), k = xf.size(1), n = qs.size(0);
  auto y = torch::empty({rows, n}, xf.options());
  if (rows == 0 || n == 0) return y.to(x.scalar_type());
  const int level = portable ? kvserve::kPortable : kvserve::isa_level();   // read once for the whole call
  const kvserve::Q8Rows q = kvserve::quantize_rows(xf.data_ptr<float>(), rows, k, level);
#if defined(KVSERVE_INT4_AVX2)
  const Prepared p = level < kvserve::kAvx2 ? Prepared{} : prepare(q, rows, k);
#endif
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const c10::Half* dp = dm.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    {
#if defined(KVSERVE_INT4_AVX512)
      if (level >= kvserve::kAvx512)
        return kvserve::by_rows(rows, [&](auto r) { int4_rows_avx512<decltype(r)::value>(q, p, qp, dp, yp, n, k, begin, end); });
#endif
#if defined(KVSERVE_INT4_AVX2)
      if (level >= kvserve::kAvx2)
        return kvserve::by_rows(rows, [&](auto r) { int4_rows_avx2<decltype(r)::value>(q, p, qp, dp, yp, n, k, begin, end); });
#endif
    }
    int4_rows_portable(q, qp, dp, yp, rows, n, k, begin, end);
  });
  return y.to(x.scalar_type());
}

}  // namespace

// x [rows <= 8, k] bf16/fp32, qs [n, k/2] uint8, dm [n, k/32, 2] fp16 -> [rows, n] in x's dtype.
torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor qs, torch::Tensor dm) { return run(x, qs, dm, false); }

torch::Tensor int4_matmul_portable(torch::Tensor x, torch::Tensor qs, torch::Tensor dm) { return run(x, qs, dm, true); }
