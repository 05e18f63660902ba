// x @ W^T for many rows of x (prefill chunks, decode batches past int4_matmul's 8 rows) with an int4
// layer's Q4_1 weights, in integer arithmetic, on CPU without native bf16 math (fp32 activations).
//
// The same product as int4_matmul.cpp (its spec is int4_matmul_reference in quant.py): activations
// quantized to int8 per group of 32 (q8.h), per group an integer dot product with the 4-bit q, then
//     y[r, o] = Σ_g  d·e·Σ_i q_i a_i  +  m·s.
// What differs is the blocking, for a product bound by arithmetic rather than by memory: the
// weights are repacked once (pack_q4_gemm in quant.py) so that one 256-bit vector holds 4
// consecutive q of 8 outputs (one byte each once a nibble is masked out), and each 4 activation
// bytes are broadcast against it. vpmaddubsw then
// gives 16 int16 pair sums (8 outputs × 2), and a group's 8 such products are added in int16 (at
// most 8 · 2 · 15 · 127 = 30,480, no overflow) before one vpmaddwd widens them: about 2 integer
// instructions per 32 multiply-adds, against 4 FMAs in fp32, and no weight widening. A tile of
// kRows rows × 16 outputs keeps its int16 sums in registers through a group.
//
// Packed layout, for n outputs (n % 8 == 0) and k inputs (G = k / 32 groups):
//   w  uint8 [n/8, G, 4 pairs, 8 outputs, 4]   byte i of (pair p, output o): the q (0..15) of input
//                                              32g + 8p + i in its low nibble, of 32g + 8p + 4 + i
//                                              in its high one (quads 2p and 2p + 1)
//   d  fp16  [n/8, G, 8]                       each output's group scale
//   m  fp16  [n/8, G, 8]                       and minimum
// (as many bytes as Q4_1's own).
// The portable loop over the same layout is the spec of the AVX2 path (kvserve::isa_level() picks).

#include "tensor.h"
#include <ATen/Parallel.h>

#include "isa.h"
#include "q8.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KVSERVE_GEMM_AVX2 1
#include <immintrin.h>
#endif

#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

using kvserve::kQ8Group;
constexpr int64_t kQuads = kQ8Group / 4;
constexpr int64_t kOut = 8;                        // outputs per block (one vector of int32/fp32)
constexpr int64_t kBlockBytes = kQuads * kOut * 2;  // one block's q for one group (nibbles)
constexpr int64_t kRowChunk = 64;                   // rows whose activations stay in cache across blocks

struct Packed {
  const uint8_t* w;
  const c10::Half* d;
  const c10::Half* m;
  int64_t n, k, groups;
};

// Outputs of blocks [b0, b1) for rows [r0, r1), plain loops.
void blocks_portable(const kvserve::Q8Rows& q, const Packed& p, float* y, int64_t r0, int64_t r1, int64_t b0,
                     int64_t b1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t o = 0; o < kOut; ++o) {
        float total = 0.f;
        for (int64_t g = 0; g < p.groups; ++g) {
          const uint8_t* w = p.w + (b * p.groups + g) * kBlockBytes;
          const int8_t* a = q.a.data() + r * p.k + g * kQ8Group;
          int dot = 0;
          for (int64_t quad = 0; quad < kQuads; ++quad)
            for (int i = 0; i < 4; ++i)
              dot += ((w[((quad / 2) * kOut + o) * 4 + i] >> (4 * (quad % 2))) & 15) * a[quad * 4 + i];
          const int64_t at = (b * p.groups + g) * kOut + o;
          const int64_t rg = r * p.groups + g;
          total += static_cast<float>(p.d[at]) * q.e[rg] * static_cast<float>(dot) + static_cast<float>(p.m[at]) * q.s[rg];
        }
        y[r * p.n + b * kOut + o] = total;
      }
}

#if defined(KVSERVE_GEMM_AVX2)
// An empty asm that takes v and gives it back in a register: the sums are then built pair after
// pair, as written. Without it GCC, free to reassociate integer adds, computed a group's 64
// products first and summed them as a tree, spilling most of them to the stack: 25-40% slower.
inline void keep_in_register(__m256i& v) { asm("" : "+x"(v)); }

// R rows (r0 ..) × B blocks (b0 ..), all groups.
template <int R, int B>
inline void tile_avx2(const kvserve::Q8Rows& q, const Packed& p, float* y, int64_t r0, int64_t b0) {
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
  __m256 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < B; ++j) acc[r][j] = _mm256_setzero_ps();
  const int8_t* a0 = q.a.data() + r0 * p.k;
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256i sum[R][B];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < B; ++j) sum[r][j] = _mm256_setzero_si256();
    const uint8_t* wg = p.w + ((b0 * p.groups) + g) * kBlockBytes;
    for (int64_t pair = 0; pair < kQuads / 2; ++pair) {
      __m256i lo[B], hi[B];
      for (int j = 0; j < B; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * p.groups * kBlockBytes + pair * 32));
        lo[j] = _mm256_and_si256(raw, low);
        hi[j] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        int32_t four[2];
        std::memcpy(four, a0 + r * p.k + g * kQ8Group + 8 * pair, 8);
        const __m256i a_lo = _mm256_set1_epi32(four[0]), a_hi = _mm256_set1_epi32(four[1]);
        for (int j = 0; j < B; ++j) {
          sum[r][j] = _mm256_add_epi16(sum[r][j], _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], a_lo),
                                                                    _mm256_maddubs_epi16(hi[j], a_hi)));
          keep_in_register(sum[r][j]);
        }
      }
    }
    for (int j = 0; j < B; ++j) {
      const int64_t at = ((b0 + j) * p.groups + g) * kOut;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.d + at)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.m + at)));
      for (int r = 0; r < R; ++r) {
        const int64_t rg = (r0 + r) * p.groups + g;
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[r][j], ones));
        acc[r][j] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, _mm256_set1_ps(q.e[rg])), acc[r][j]);
        acc[r][j] = _mm256_fmadd_ps(m, _mm256_set1_ps(q.s[rg]), acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < B; ++j) _mm256_storeu_ps(y + (r0 + r) * p.n + (b0 + j) * kOut, acc[r][j]);
}

constexpr int kRows = 4;      // rows per tile: 8 sums, 4 weight and 2 activation vectors and a mask in 16 registers
constexpr int kBlocks = 2;    // blocks (of 8 outputs) per tile

// The rows of a chunk in tiles of kRows, the last (fewer) in one tile of their own count, so that
// each weight vector loaded serves every row it can.
template <int B>
void rows_avx2(const kvserve::Q8Rows& q, const Packed& p, float* y, int64_t r0, int64_t r1, int64_t b) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) tile_avx2<kRows, B>(q, p, y, r, b);
  if (r < r1)
    kvserve::by_rows(r1 - r, [&](auto rows) {
      if constexpr (decltype(rows)::value < kRows) tile_avx2<decltype(rows)::value, B>(q, p, y, r, b);
    });
}

void blocks_avx2(const kvserve::Q8Rows& q, const Packed& p, float* y, int64_t r0, int64_t r1, int64_t b0, int64_t b1) {
  int64_t b = b0;
  for (; b + kBlocks <= b1; b += kBlocks) rows_avx2<kBlocks>(q, p, y, r0, r1, b);
  for (; b < b1; ++b) rows_avx2<1>(q, p, y, r0, r1, b);
}
#endif

}  // namespace

// x [rows, k] fp32 (or bf16, widened), w/d/m from pack_q4_gemm (quant.py) -> [rows, n] fp32.
torch::Tensor int4_gemm_run(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor m, bool portable) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be [rows, k] float32 or bfloat16");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 5 && w.size(2) == kQuads / 2 && w.size(3) == kOut &&
                  w.size(4) == 4 && w.is_contiguous(),
              "w must be contiguous uint8 [n/8, k/32, 4, 8, 4] (pack_q4_gemm)");
  const int64_t blocks = w.size(0), groups = w.size(1), n = blocks * kOut, k = groups * kQ8Group;
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " inputs; the weights take ", k);
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && d.is_contiguous() &&
                  m.is_contiguous() && d.numel() == blocks * groups * kOut && m.numel() == d.numel(),
              "d and m must be contiguous float16 [n/8, k/32, 8]");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t rows = xf.size(0);
  auto y = torch::empty({rows, n}, xf.options());
  if (rows == 0 || n == 0) return y;
  const int level = portable ? kvserve::kPortable : kvserve::isa_level();   // read once for the whole call
  const kvserve::Q8Rows q = kvserve::quantize_rows(xf.data_ptr<float>(), rows, k, level);
  const Packed p{w.data_ptr<uint8_t>(), d.data_ptr<c10::Half>(), m.data_ptr<c10::Half>(), n, k, groups};
  float* yp = y.data_ptr<float>();
  // Threads split the output blocks; each walks the rows a chunk at a time, so that a chunk's
  // activations are reused from cache across all its blocks.
  at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    const int64_t b0 = 2 * begin, b1 = std::min(blocks, 2 * end);      // whole pairs: the AVX2 tile's width
    for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
      const int64_t r1 = std::min(rows, r0 + kRowChunk);
#if defined(KVSERVE_GEMM_AVX2)
      if (level >= kvserve::kAvx2) {
        blocks_avx2(q, p, yp, r0, r1, b0, b1);
        continue;
      }
#endif
      blocks_portable(q, p, yp, r0, r1, b0, b1);
    }
  });
  return y;
}

torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor m) {
  return int4_gemm_run(x, w, d, m, false);
}

torch::Tensor int4_gemm_portable(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor m) {
  return int4_gemm_run(x, w, d, m, true);
}
