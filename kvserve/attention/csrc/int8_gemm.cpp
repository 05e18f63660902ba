// x @ W^T for int8 weights with one scale per output channel (the LM head of an fp32 int4 model) at
// any number of rows, in integer arithmetic, on CPU without native bf16 math:
//     y[r, o] = Σ_s (scale[o] · e[r, s]) · Σ_{j in s} w[o, j] · a[r, j]
// Activations are rounded to int16 per row and segment s of kSegment inputs (e = max|x| / 32767,
// a = round(x / e)): a step of 1/65,534 of the segment's largest value, against the int8 weights' own
// step of 1/254 of their row's, so the product is the fp32 one of the int8 weights to within a
// small fraction of their rounding. vpmaddwd takes 8 outputs × 2 inputs of int16 per instruction
// (16 multiply-adds, against 8 for an FMA) into int32 sums, which hold a segment exactly
// (kSegment/2 · 2 · 32767 · 127 < 2^31), and one conversion per segment puts them into fp32.
// No VNNI: this is the AVX2 + FMA machine's path (Zen 3); AVX2 is all it uses.
//
// Packed layout (pack_int8_gemm in quant.py), for n outputs and k inputs (k even):
//   w  int8 [⌈n/8⌉, k/2, 8 outputs, 2]    (block b, pair p, output o, i) = W[8b + o, 2p + i]
// (the weights' own bytes, reordered; a last block past n padded with zeros).
// The portable loop over the same layout is the spec of the AVX2 path (kvserve::isa_level() picks).

#include "tensor.h"
#include <ATen/Parallel.h>

#include "isa.h"
#include "q8.h"

#if defined(__AVX2__) && defined(__FMA__)
#define KVSERVE_I8GEMM_AVX2 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kSegment = 256;     // inputs per activation scale (and per exact int32 sum)
constexpr int64_t kOut = 8;           // outputs per block
constexpr float kLimit = 32767.f;

struct Q16Rows {
  std::vector<int16_t> a;     // [rows, k]
  std::vector<float> e;       // [rows, segments]
};

void quantize_segment(const float* x, int16_t* a, float* e, int64_t len) {
  float amax = 0.f;
  for (int64_t i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0.f ? kLimit / amax : 0.f;
  for (int64_t i = 0; i < len; ++i) a[i] = static_cast<int16_t>(std::nearbyint(kvserve::clamp_to(x[i] * inv, kLimit)));
  *e = amax / kLimit;
}

#if defined(KVSERVE_I8GEMM_AVX2)
// The same bytes as quantize_segment (the same fp32 operations, 8 lanes at a time); len % 8 == 0.
void quantize_segment_avx2(const float* x, int16_t* a, float* e, int64_t len) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 peak = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; i += 8) peak = _mm256_max_ps(peak, _mm256_and_ps(_mm256_loadu_ps(x + i), magnitude));
  const float amax = kvserve::max8(peak);
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? kLimit / amax : 0.f);
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 scaled = _mm256_max_ps(_mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), inv), _mm256_set1_ps(kLimit)),
                                        _mm256_set1_ps(-kLimit));                                                     // clamp_to
    const __m256i v = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m128i packed = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a + i), packed);
  }
  *e = amax / kLimit;
}
#endif

Q16Rows quantize_rows(const float* x, int64_t rows, int64_t k, int level) {
  const int64_t segments = (k + kSegment - 1) / kSegment;
  Q16Rows q{std::vector<int16_t>(rows * k), std::vector<float>(rows * segments)};
  auto quantize = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t s = 0; s < segments; ++s) {
        const int64_t at = r * k + s * kSegment, len = std::min(kSegment, k - s * kSegment);
#if defined(KVSERVE_I8GEMM_AVX2)
        if (level >= kvserve::kAvx2 && len % 8 == 0) {
          quantize_segment_avx2(x + at, q.a.data() + at, &q.e[r * segments + s], len);
          continue;
        }
#endif
        (void)level;
        quantize_segment(x + at, q.a.data() + at, &q.e[r * segments + s], len);
      }
  };
  kvserve::quantize_rows_split(rows, quantize);
  return q;
}

struct Packed {
  const int8_t* w;
  const float* scale;       // [blocks · 8]: zeros past n
  int64_t n, k, segments;
};

void blocks_portable(const Q16Rows& q, const Packed& p, float* y, int64_t rows, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t o = 0; o < kOut && b * kOut + o < p.n; ++o) {
        float total = 0.f;
        for (int64_t s = 0; s < p.segments; ++s) {
          int32_t dot = 0;
          for (int64_t j = s * kSegment; j < std::min(p.k, (s + 1) * kSegment); ++j)
            dot += static_cast<int32_t>(p.w[(b * (p.k / 2) + j / 2) * 2 * kOut + o * 2 + j % 2]) * q.a[r * p.k + j];
          total += p.scale[b * kOut + o] * q.e[r * p.segments + s] * static_cast<float>(dot);
        }
        y[r * p.n + b * kOut + o] = total;
      }
}

#if defined(KVSERVE_I8GEMM_AVX2)
// R rows (r0 ..) × B blocks (b0 ..), all inputs. Only a segment's int32 sums live in registers (R·B
// of them, with B weight vectors and a broadcast: within AVX2's 16); each segment's fp32 result is
// added into the tile's running totals on the stack, and y is written once, its last block of an n
// that is not a multiple of 8 cut short (as fast as keeping the totals in y, and simpler).
template <int R, int B>
inline void tile_avx2(const Q16Rows& q, const Packed& p, float* y, int64_t r0, int64_t b0) {
  const int64_t pairs = p.k / 2;
  alignas(32) float total[R][B][kOut];
  for (int64_t s = 0; s < p.segments; ++s) {
    __m256i sum[R][B];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < B; ++j) sum[r][j] = _mm256_setzero_si256();
    const int64_t first = s * kSegment / 2, last = std::min(pairs, (s + 1) * kSegment / 2);
    for (int64_t pair = first; pair < last; ++pair) {
      __m256i w[B];
      for (int j = 0; j < B; ++j)
        w[j] = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w + ((b0 + j) * pairs + pair) * 2 * kOut)));
      for (int r = 0; r < R; ++r) {
        int32_t two;
        std::memcpy(&two, q.a.data() + (r0 + r) * p.k + 2 * pair, 4);
        const __m256i a = _mm256_set1_epi32(two);
        for (int j = 0; j < B; ++j) sum[r][j] = _mm256_add_epi32(sum[r][j], _mm256_madd_epi16(w[j], a));
      }
    }
    for (int j = 0; j < B; ++j) {
      const __m256 scale = _mm256_loadu_ps(p.scale + (b0 + j) * kOut);
      for (int r = 0; r < R; ++r) {
        const __m256 f = _mm256_mul_ps(scale, _mm256_set1_ps(q.e[(r0 + r) * p.segments + s]));
        const __m256 before = s == 0 ? _mm256_setzero_ps() : _mm256_load_ps(total[r][j]);
        _mm256_store_ps(total[r][j], _mm256_fmadd_ps(f, _mm256_cvtepi32_ps(sum[r][j]), before));
      }
    }
  }
  for (int j = 0; j < B; ++j) {
    const int64_t at = (b0 + j) * kOut, valid = std::min(kOut, p.n - at);   // fewer in an n's last block
    for (int r = 0; r < R; ++r) std::memcpy(y + (r0 + r) * p.n + at, total[r][j], valid * sizeof(float));
  }
}

// rows per tile: 8 int32 sums, 2 weight vectors and a broadcast. 6 rows (12 sums) fit AVX2's 16
// registers on paper, but GCC hoists the broadcasts and spills 9 sums a step: 32 rows of the head
// 12.1 ms against 10.0 with 4 (and 3), in a build without AVX-512's extra registers.
constexpr int kRows = 4;
constexpr int kBlocks = 2;

template <int B>
void rows_avx2(const Q16Rows& q, const Packed& p, float* y, int64_t rows, int64_t b) {
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) tile_avx2<kRows, B>(q, p, y, r, b);
  if (r < rows)
    kvserve::by_rows(rows - r, [&](auto n) {
      if constexpr (decltype(n)::value < kRows) tile_avx2<decltype(n)::value, B>(q, p, y, r, b);
    });
}
#endif

}  // namespace

// x [rows, k] fp32 (or bf16, widened), w from pack_int8_gemm (quant.py), scale [n] fp32 -> [rows, n] fp32.
torch::Tensor int8_gemm_run(torch::Tensor x, torch::Tensor w, torch::Tensor scale, bool portable) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be [rows, k] float32 or bfloat16");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.size(2) == kOut && w.size(3) == 2 && w.is_contiguous(),
              "w must be contiguous int8 [n/8, k/2, 8, 2] (pack_int8_gemm)");
  const int64_t blocks = w.size(0), n = scale.numel(), k = 2 * w.size(1);
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " inputs; the weights take ", k);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.is_contiguous() &&
                  (n + kOut - 1) / kOut == blocks,
              "scale must be contiguous float32 [n], n outputs in the weights' ", blocks, " blocks of 8");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t rows = xf.size(0);
  auto y = torch::empty({rows, n}, xf.options());
  if (rows == 0 || n == 0) return y;
  const int level = portable ? kvserve::kPortable : kvserve::isa_level();   // read once for the whole call
  const Q16Rows q = quantize_rows(xf.data_ptr<float>(), rows, k, level);
  // The tiles read whole blocks of 8 scales: only an n past the last whole block needs a padded copy.
  std::vector<float> padded;
  const float* scales = scale.data_ptr<float>();
  if (n % kOut != 0) {
    padded.assign(blocks * kOut, 0.f);
    std::memcpy(padded.data(), scales, n * sizeof(float));
    scales = padded.data();
  }
  const Packed p{w.data_ptr<int8_t>(), scales, n, k, (k + kSegment - 1) / kSegment};
  float* yp = y.data_ptr<float>();
  // Threads split the output blocks, in pairs (the AVX2 tile's width); each pair's weights stay in
  // L1 while every row tile passes over them.
  at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    const int64_t b0 = 2 * begin, b1 = std::min(blocks, 2 * end);
#if defined(KVSERVE_I8GEMM_AVX2)
    if (level >= kvserve::kAvx2) {
      int64_t b = b0;
      for (; b + kBlocks <= b1; b += kBlocks) rows_avx2<kBlocks>(q, p, yp, rows, b);
      for (; b < b1; ++b) rows_avx2<1>(q, p, yp, rows, b);
      return;
    }
#endif
    blocks_portable(q, p, yp, rows, b0, b1);
  });
  return y;
}

torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  return int8_gemm_run(x, w, scale, false);
}

torch::Tensor int8_gemm_portable(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  return int8_gemm_run(x, w, scale, true);
}
