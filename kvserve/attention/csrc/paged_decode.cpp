// Decode attention read straight from the paged KV cache, on CPU.
//
// One query token per sequence. Each work item is (sequence, KV head): it reads that head's keys
// and values once, block by block through the block table, and serves the G = heads / kv_heads
// query heads that share them (grouped-query attention). Math in fp32 whatever the cache dtype.
// The torch reference (kvserve/attention/torch_ref.py) is the spec this must match.

#include "tensor.h"
#include <ATen/Parallel.h>

#include "elem.h"
#include "isa.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <vector>

namespace {

inline void to_float(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void to_float(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = static_cast<uint32_t>(bits[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[i] = f;
  }
}

// The portable path: any head_dim, two passes (scores, then softmax, then values).
template <typename T>
void decode_scalar(const float* query, const T* k_cache, const T* v_cache, const int64_t* block_table,
                   const int64_t* seq_lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                   int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t token_stride = num_kv_heads * head_dim;        // between tokens of one block
  const int64_t block_stride = block_size * token_stride;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row(head_dim), acc(group * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = seq_lens[seq];
      const float* q = query + (seq * num_heads + kv_head * group) * head_dim;   // `group` heads in a row
      const int64_t* blocks = block_table + seq * max_blocks;
      scores.resize(group * len);
      // scores[g * len + t] = q_g . k_t * scale
      for (int64_t t = 0; t < len; ++t) {
        const T* k = k_cache + blocks[t / block_size] * block_stride + (t % block_size) * token_stride
                     + kv_head * head_dim;
        to_float(k, row.data(), head_dim);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q + g * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * row[d];
          scores[g * len + t] = dot * scale;
        }
      }
      // softmax per head
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float peak = std::numeric_limits<float>::lowest();
        for (int64_t t = 0; t < len; ++t) peak = std::max(peak, s[t]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - peak);
          total += s[t];
        }
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      // out_g = sum_t p_g[t] v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = v_cache + blocks[t / block_size] * block_stride + (t % block_size) * token_stride
                     + kv_head * head_dim;
        to_float(v, row.data(), head_dim);
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* a = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * row[d];
        }
      }
      std::memcpy(out + (seq * num_heads + kv_head * group) * head_dim, acc.data(), group * head_dim * sizeof(float));
    }
  });
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr int64_t kAhead = 1;      // blocks

// Prefetch (into L2) one KV head's rows of the block kAhead blocks past the one that token t0 opens
// (called once per block, when t0 is its first token): the block table scatters blocks, which
// defeats the hardware prefetcher, and decode attention is bound by memory (both vector paths).
template <typename T>
__attribute__((always_inline)) inline void prefetch_ahead(const T* k_cache, const T* v_cache, const int64_t* blocks, int64_t t0, int64_t len,
                           int64_t block_size, int64_t block_stride, int64_t token_stride, int64_t kv_head,
                           int64_t head_dim) {
  const int64_t ahead = t0 / block_size + kAhead;
  if (t0 % block_size != 0 || ahead * block_size >= len) return;
  const int64_t rows = std::min(block_size, len - ahead * block_size);
  const int64_t at = blocks[ahead] * block_stride + kv_head * head_dim;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t b = 0; b < head_dim * (int64_t)sizeof(T); b += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(k_cache + at + t * token_stride) + b, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(v_cache + at + t * token_stride) + b, _MM_HINT_T1);
    }
}
#endif

#if defined(__AVX512F__)
// The AVX-512 path, head_dim a multiple of 16 (64 and 128 in practice). One pass over the context in
// tiles of at most kTile tokens, with the running maximum and sum of an online softmax, so each tile's
// keys and values are read once, while in cache. Dots are vectorised over head_dim; each
// token's key is converted to fp32 once and serves the `group` query heads that share it.
constexpr int64_t kTile = 16;
constexpr int64_t kMaxGroup = 16;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// Lane t of the result = the sum of the 16 lanes of v[t]: sixteen horizontal sums in 15 adds and
// 30 shuffles (a transpose-and-add tree) instead of 16 separate reductions.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 pair[8], quad[4], oct[2];
  for (int i = 0; i < 8; ++i)        // 128-bit lane holds [a, b, a, b] partial sums
    pair[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)        // 128-bit lane holds [a, b, c, d]
    quad[i] = _mm512_add_ps(_mm512_shuffle_ps(pair[2 * i], pair[2 * i + 1], 0x44),
                            _mm512_shuffle_ps(pair[2 * i], pair[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)        // lanes 0,1: tokens 4i..4i+3 of one group; 2,3: of the next
    oct[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2 * i], quad[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(quad[2 * i], quad[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(oct[0], oct[1], 0x88), _mm512_shuffle_f32x4(oct[0], oct[1], 0xDD));
}
inline __m512 load16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// DC = head_dim / 16 and G = heads per KV head when known at compile time (then the query and the
// accumulators live in registers); 0 = read at run time.
template <typename T, int DC, int G>
void decode_avx512(const float* query, const T* k_cache, const T* v_cache, const int64_t* block_table,
                   const int64_t* seq_lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                   int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
  constexpr int AG = G > 0 ? G : kMaxGroup;
  constexpr int AC = DC > 0 ? DC : 16;
  const int64_t group = G > 0 ? G : num_heads / num_kv_heads;
  const int64_t chunks = DC > 0 ? DC : head_dim / 16;
  const int64_t token_stride = num_kv_heads * head_dim;
  const int64_t block_stride = block_size * token_stride;
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512 lowest = _mm512_set1_ps(kvserve::kNoScore);
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    __m512 qv[AG][AC], acc[AG][AC], dots[AG][kTile];
    alignas(64) float probs[AG][kTile];
    float peak[AG], total[AG];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = seq_lens[seq];
      const float* q = query + (seq * num_heads + kv_head * group) * head_dim;   // `group` heads in a row
      const int64_t* blocks = block_table + seq * max_blocks;
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t c = 0; c < chunks; ++c) qv[g][c] = _mm512_loadu_ps(q + g * head_dim + 16 * c), acc[g][c] = _mm512_setzero_ps();
        peak[g] = kvserve::kNoScore, total[g] = 0.f;
      }
      for (int64_t t0 = 0; t0 < len;) {
        // a tile: tokens t0 .. t0 + n - 1, all in one block
        const int64_t in_block = t0 % block_size;
        const int64_t n = std::min({kTile, len - t0, block_size - in_block});
        const int64_t base = blocks[t0 / block_size] * block_stride + in_block * token_stride + kv_head * head_dim;
        const T* k = k_cache + base;
        const T* v = v_cache + base;
        prefetch_ahead(k_cache, v_cache, blocks, t0, len, block_size, block_stride, token_stride, kv_head, head_dim);
        // scores: one key read per token serves the group's query heads
        for (int64_t t = 0; t < kTile; ++t) {
          if (t >= n) {
            for (int64_t g = 0; g < group; ++g) dots[g][t] = _mm512_setzero_ps();
            continue;
          }
          const T* kt = k + t * token_stride;
          __m512 kv[AC];
          for (int64_t c = 0; c < chunks; ++c) kv[c] = load16(kt + 16 * c);
          for (int64_t g = 0; g < group; ++g) {
            __m512 sum = _mm512_mul_ps(qv[g][0], kv[0]);
            for (int64_t c = 1; c < chunks; ++c) sum = _mm512_fmadd_ps(qv[g][c], kv[c], sum);
            dots[g][t] = sum;
          }
        }
        // online softmax: probabilities against the running maximum; rescale what was accumulated
        const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1);
        for (int64_t g = 0; g < group; ++g) {
          const __m512 scores = _mm512_mask_blend_ps(valid, lowest, _mm512_mul_ps(sum_lanes16(dots[g]), scale_v));
          const float tile_peak = std::max(peak[g], _mm512_reduce_max_ps(scores));
          _mm512_store_ps(probs[g], _mm512_sub_ps(scores, _mm512_set1_ps(tile_peak)));
          float* p = probs[g];
#pragma omp simd
          for (int64_t t = 0; t < kTile; ++t) p[t] = std::exp(p[t]);       // exp(kNoScore - peak) = 0 past n
          const float alpha = std::exp(peak[g] - tile_peak);                // 0 on the first tile
          total[g] = total[g] * alpha + _mm512_reduce_add_ps(_mm512_load_ps(p));
          peak[g] = tile_peak;
          if (alpha != 1.f) {
            const __m512 a = _mm512_set1_ps(alpha);
            for (int64_t c = 0; c < chunks; ++c) acc[g][c] = _mm512_mul_ps(a, acc[g][c]);
          }
        }
        // values: one read per token serves the group
        for (int64_t t = 0; t < n; ++t) {
          const T* vt = v + t * token_stride;
          __m512 vv[AC];
          for (int64_t c = 0; c < chunks; ++c) vv[c] = load16(vt + 16 * c);
          for (int64_t g = 0; g < group; ++g) {
            const __m512 p = _mm512_set1_ps(probs[g][t]);
            for (int64_t c = 0; c < chunks; ++c) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
          }
        }
        t0 += n;
      }
      float* o = out + (seq * num_heads + kv_head * group) * head_dim;
      for (int64_t g = 0; g < group; ++g) {
        const __m512 inv = _mm512_set1_ps(1.f / total[g]);
        for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(o + g * head_dim + 16 * c, _mm512_mul_ps(acc[g][c], inv));
      }
    }
  });
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// The AVX2 + FMA path (Zen 3, and any AVX-512 machine told KVSERVE_CPU_ISA=avx2), head_dim a multiple
// of 8 up to 256: the AVX-512 path's one pass with an online softmax, 8 lanes wide. Tiles of 8
// tokens within a block; each token's key is widened to fp32 once and serves the group's heads; a
// tile's 8 dots per head are reduced into one vector of scores (a transpose-and-add), exponentiated
// 8 at a time (exp8, isa.h), and the next blocks are prefetched as on AVX-512.
constexpr int64_t kTile2 = 8;
constexpr int64_t kMaxGroup2 = 16;
constexpr int64_t kMaxChunks2 = 32;   // head_dim / 8

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// Lane t of the result = the sum of the 8 lanes of v[t].
inline __m256 sum_lanes8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));  // tokens 0-3, per half
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));  // tokens 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Chunks of head_dim per pass of the value loop with G heads known at compile time: G·S running sums,
// S value vectors and a broadcast probability fit in the 16 registers, so a pass adds its tile of
// values without a load or store of the sums per token.
constexpr int value_slice(int G, int DC) {
  int slice = 1;
  for (int s = 2; s <= DC; s *= 2)
    if (DC % s == 0 && G * s + s + 1 <= 15) slice = s;
  return slice;
}

// DC = head_dim / 8 and G = the group when known at compile time (0: read at run time).
template <typename T, int DC, int G = 0>
void decode_avx2(const float* query, const T* k_cache, const T* v_cache, const int64_t* block_table,
                 const int64_t* seq_lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
  constexpr int AC = DC > 0 ? DC : kMaxChunks2;
  const int64_t group = G > 0 ? G : num_heads / num_kv_heads;
  const int64_t chunks = DC > 0 ? DC : head_dim / 8;
  const int64_t token_stride = num_kv_heads * head_dim;
  const int64_t block_stride = block_size * token_stride;
  const __m256 scale_v = _mm256_set1_ps(scale);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 no_score = _mm256_set1_ps(kvserve::kNoScore);
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m256> qv(kMaxGroup2 * AC), acc(kMaxGroup2 * AC), dots(kMaxGroup2 * kTile2);
    alignas(32) float probs[kMaxGroup2][kTile2];
    float peak[kMaxGroup2], total[kMaxGroup2];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kv_head = item % num_kv_heads;
      const int64_t len = seq_lens[seq];
      const float* q = query + (seq * num_heads + kv_head * group) * head_dim;
      const int64_t* blocks = block_table + seq * max_blocks;
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t c = 0; c < chunks; ++c) qv[g * AC + c] = load8(q + g * head_dim + 8 * c), acc[g * AC + c] = _mm256_setzero_ps();
        peak[g] = kvserve::kNoScore, total[g] = 0.f;
      }
      for (int64_t t0 = 0; t0 < len;) {
        const int64_t in_block = t0 % block_size;
        const int64_t n = std::min({kTile2, len - t0, block_size - in_block});
        const int64_t base = blocks[t0 / block_size] * block_stride + in_block * token_stride + kv_head * head_dim;
        const T* k = k_cache + base;
        const T* v = v_cache + base;
        prefetch_ahead(k_cache, v_cache, blocks, t0, len, block_size, block_stride, token_stride, kv_head, head_dim);
        // scores: one key read per token serves the group's query heads
        for (int64_t t = 0; t < kTile2; ++t) {
          if (t >= n) {
            for (int64_t g = 0; g < group; ++g) dots[g * kTile2 + t] = _mm256_setzero_ps();
            continue;
          }
          const T* kt = k + t * token_stride;
          __m256 kv[AC];
          for (int64_t c = 0; c < chunks; ++c) kv[c] = load8(kt + 8 * c);
          for (int64_t g = 0; g < group; ++g) {
            const __m256* qg = qv.data() + g * AC;
            __m256 sum = _mm256_mul_ps(qg[0], kv[0]);
            for (int64_t c = 1; c < chunks; ++c) sum = _mm256_fmadd_ps(qg[c], kv[c], sum);
            dots[g * kTile2 + t] = sum;
          }
        }
        // online softmax: probabilities against the running maximum; rescale what was accumulated
        const __m256 valid = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n)), _CMP_LT_OQ);
        for (int64_t g = 0; g < group; ++g) {
          const __m256 scores = _mm256_blendv_ps(no_score, _mm256_mul_ps(sum_lanes8(dots.data() + g * kTile2), scale_v), valid);
          const float tile_peak = std::max(peak[g], kvserve::max8(scores));
          const __m256 p = kvserve::exp8(_mm256_sub_ps(scores, _mm256_set1_ps(tile_peak)));     // 0 past n
          _mm256_store_ps(probs[g], p);
          const float alpha = std::exp(peak[g] - tile_peak);   // 0 on the first tile
          total[g] = total[g] * alpha + kvserve::hsum8(p);
          peak[g] = tile_peak;
          if (alpha != 1.f) {
            const __m256 a = _mm256_set1_ps(alpha);
            for (int64_t c = 0; c < chunks; ++c) acc[g * AC + c] = _mm256_mul_ps(a, acc[g * AC + c]);
          }
        }
        // values: one read per token serves the group
        if constexpr (G > 0 && DC > 0) {
          constexpr int S = value_slice(G, DC);
          for (int c0 = 0; c0 < DC; c0 += S) {
            __m256 a[G][S];
            for (int g = 0; g < G; ++g)
              for (int c = 0; c < S; ++c) a[g][c] = acc[g * AC + c0 + c];
            for (int64_t t = 0; t < n; ++t) {
              const T* vt = v + t * token_stride + 8 * c0;
              __m256 vv[S];
              for (int c = 0; c < S; ++c) vv[c] = load8(vt + 8 * c);
              for (int g = 0; g < G; ++g) {
                const __m256 p = _mm256_broadcast_ss(&probs[g][t]);
                for (int c = 0; c < S; ++c) a[g][c] = _mm256_fmadd_ps(p, vv[c], a[g][c]);
              }
            }
            for (int g = 0; g < G; ++g)
              for (int c = 0; c < S; ++c) acc[g * AC + c0 + c] = a[g][c];
          }
        } else {
          for (int64_t t = 0; t < n; ++t) {
            const T* vt = v + t * token_stride;
            __m256 vv[AC];
            for (int64_t c = 0; c < chunks; ++c) vv[c] = load8(vt + 8 * c);
            for (int64_t g = 0; g < group; ++g) {
              const __m256 p = _mm256_set1_ps(probs[g][t]);
              for (int64_t c = 0; c < chunks; ++c) acc[g * AC + c] = _mm256_fmadd_ps(p, vv[c], acc[g * AC + c]);
            }
          }
        }
        t0 += n;
      }
      float* o = out + (seq * num_heads + kv_head * group) * head_dim;
      for (int64_t g = 0; g < group; ++g) {
        const __m256 inv = _mm256_set1_ps(1.f / total[g]);
        for (int64_t c = 0; c < chunks; ++c) _mm256_storeu_ps(o + g * head_dim + 8 * c, _mm256_mul_ps(acc[g * AC + c], inv));
      }
    }
  });
}
#endif

template <typename T>
void decode(const float* query, const T* k_cache, const T* v_cache, const int64_t* block_table,
            const int64_t* seq_lens, float* out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
            int64_t head_dim, int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t group = num_heads / num_kv_heads;
#if defined(__AVX512F__)
  if (kvserve::isa_level() >= kvserve::kAvx512 && head_dim % 16 == 0 && head_dim <= 256 && group <= kMaxGroup) {
    using Kernel = void (*)(const float*, const T*, const T*, const int64_t*, const int64_t*, float*, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float);
    Kernel run = decode_avx512<T, 0, 0>;
    if (head_dim == 64 && group == 1) run = decode_avx512<T, 4, 1>;
    if (head_dim == 64 && group == 2) run = decode_avx512<T, 4, 2>;
    if (head_dim == 64 && group == 3) run = decode_avx512<T, 4, 3>;
    if (head_dim == 64 && group == 4) run = decode_avx512<T, 4, 4>;
    if (head_dim == 128 && group == 1) run = decode_avx512<T, 8, 1>;
    if (head_dim == 128 && group == 2) run = decode_avx512<T, 8, 2>;
    if (head_dim == 128 && group == 4) run = decode_avx512<T, 8, 4>;
    run(query, k_cache, v_cache, block_table, seq_lens, out, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
        max_blocks, scale);
    return;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (kvserve::isa_level() >= kvserve::kAvx2 && head_dim % 8 == 0 && head_dim <= 8 * kMaxChunks2 &&
      group <= kMaxGroup2) {
    using Kernel = void (*)(const float*, const T*, const T*, const int64_t*, const int64_t*, float*, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float);
    Kernel run = nullptr;
    if (head_dim == 64) {
      constexpr Kernel by_group[] = {decode_avx2<T, 8>,    decode_avx2<T, 8, 1>, decode_avx2<T, 8, 2>,
                                     decode_avx2<T, 8, 3>, decode_avx2<T, 8, 4>, decode_avx2<T, 8, 5>,
                                     decode_avx2<T, 8, 6>, decode_avx2<T, 8, 7>, decode_avx2<T, 8, 8>};
      run = group <= 8 ? by_group[group] : by_group[0];
    } else if (head_dim == 128) {
      constexpr Kernel by_group[] = {decode_avx2<T, 16>,    decode_avx2<T, 16, 1>, decode_avx2<T, 16, 2>,
                                     decode_avx2<T, 16, 3>, decode_avx2<T, 16, 4>, decode_avx2<T, 16, 5>,
                                     decode_avx2<T, 16, 6>, decode_avx2<T, 16, 7>, decode_avx2<T, 16, 8>};
      run = group <= 8 ? by_group[group] : by_group[0];
    }
    if (run != nullptr)
      return run(query, k_cache, v_cache, block_table, seq_lens, out, num_seqs, num_heads, num_kv_heads, head_dim,
                 block_size, max_blocks, scale);
    return decode_avx2<T, 0>(query, k_cache, v_cache, block_table, seq_lens, out, num_seqs, num_heads, num_kv_heads,
                             head_dim, block_size, max_blocks, scale);
  }
#endif
  (void)group;
  decode_scalar(query, k_cache, v_cache, block_table, seq_lens, out, num_seqs, num_heads, num_kv_heads, head_dim,
                block_size, max_blocks, scale);
}

}  // namespace

// query [n, heads, head_dim] fp32; caches [blocks, block_size, kv_heads, head_dim] fp32 or bf16;
// block_table [n, max_blocks] int64; seq_lens [n] int64 (each >= 1). Returns [n, heads, head_dim] fp32.
torch::Tensor paged_decode(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_table, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat, "query must be [n, heads, head_dim] float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "caches must be [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(k_cache.size(2) > 0 && query.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(query.size(2) == k_cache.size(3), "head_dim of query and cache differ");
  query = query.contiguous();
  block_table = block_table.contiguous();
  seq_lens = seq_lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto out = torch::empty_like(query);
  const int64_t n = query.size(0);
  if (n == 0) return out;
  const auto* lens = seq_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= block_table.size(1) * k_cache.size(1), "seq_len out of the block table's range");
  const auto* table = block_table.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < (lens[i] + k_cache.size(1) - 1) / k_cache.size(1); ++j)
      TORCH_CHECK(table[i * block_table.size(1) + j] >= 0 && table[i * block_table.size(1) + j] < k_cache.size(0),
                  "block id out of the cache's range");
  const float s = static_cast<float>(scale);
  if (k_cache.scalar_type() == at::kBFloat16) {
    decode(query.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
           block_table.data_ptr<int64_t>(), lens, out.data_ptr<float>(), n, query.size(1), k_cache.size(2),
           query.size(2), k_cache.size(1), block_table.size(1), s);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "caches must be float32 or bfloat16");
    decode(query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
           block_table.data_ptr<int64_t>(), lens, out.data_ptr<float>(), n, query.size(1), k_cache.size(2),
           query.size(2), k_cache.size(1), block_table.size(1), s);
  }
  return out;
}

// The slot of each of n tokens, checked against the cache (contiguous int64 copy kept alive by `keep`).
const int64_t* checked_slots(const torch::Tensor& slot_mapping, int64_t n, const torch::Tensor& k_cache, torch::Tensor& keep) {
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.size(0) == n,
              "one slot per token");
  keep = slot_mapping.contiguous();
  const auto* slot = keep.data_ptr<int64_t>();
  const int64_t slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(slot[i] >= 0 && slot[i] < slots, "slot out of the cache's range");
  return slot;
}

// A step in which every sequence decodes one token: store this step's keys and values in their
// cache slots, then attend (paged_decode). One call per layer instead of the eight or so torch ops
// of the Python path. query [n, heads, d], key/value [n, kv_heads, d] (rows may be strided, as
// slices of the qkv projection) in the cache's dtype; returns [n, heads, d] in the query's dtype.
torch::Tensor decode_step(torch::Tensor query, torch::Tensor key, torch::Tensor value, torch::Tensor k_cache,
                          torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_table,
                          torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type(),
              "keys and values must be in the cache's dtype");
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3 && key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3) &&
              value.sizes() == key.sizes(), "keys and values must be [n, kv_heads, head_dim] of the cache");
  TORCH_CHECK(key.stride(2) == 1 && key.stride(1) == key.size(2) && value.stride(2) == 1 && value.stride(1) == value.size(2),
              "keys and values need contiguous heads");
  TORCH_CHECK(query.size(0) == key.size(0), "one slot per token");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t n = key.size(0), row = key.size(1) * key.size(2);
  torch::Tensor slot_keep;
  const int64_t* slot = checked_slots(slot_mapping, n, k_cache, slot_keep);
  const int64_t bytes = row * key.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* ks = static_cast<const char*>(key.data_ptr());
  const auto* vs = static_cast<const char*>(value.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(kc + slot[i] * bytes, ks + i * key.stride(0) * key.element_size(), bytes);
    std::memcpy(vc + slot[i] * bytes, vs + i * value.stride(0) * value.element_size(), bytes);
  }
  auto out = paged_decode(query.to(at::kFloat).contiguous(), k_cache, v_cache, block_table, seq_lens, scale);
  return out.to(query.scalar_type());
}

// decode_qkv's first half, for qkv elements E and cache elements C: each token's queries rotated
// into q (fp32), its keys rotated and its values stored in its cache slot. The rotation rounds where
// torch's ops do in E (elem.h); a key or value rounds once more when C is narrower than E.
template <typename E, typename C>
void rotate_and_store(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                      torch::Tensor& k_cache, torch::Tensor& v_cache, const int64_t* slot, float* q, int64_t num_heads,
                      int64_t num_kv_heads) {
  const int64_t n = qkv.size(0), d = k_cache.size(3), half = d / 2;
  const int64_t row = (num_heads + 2 * num_kv_heads) * d, kv_row = num_kv_heads * d;
  const auto* x = E::data(qkv);
  const auto* cs = E::data(cos);
  const auto* sn = E::data(sin);
  auto* kc = C::data_mut(k_cache);
  auto* vc = C::data_mut(v_cache);
  for (int64_t i = 0; i < n; ++i) {
    const auto* xi = x + i * row;
    const auto* c = cs + i * d;
    const auto* s = sn + i * d;
    for (int64_t h = 0; h < num_heads; ++h)
      for (int64_t j = 0; j < d; ++j) q[(i * num_heads + h) * d + j] = kvserve::rotary_value<E>(xi + h * d, c, s, j, half);
    auto* k_slot = kc + slot[i] * kv_row;
    auto* v_slot = vc + slot[i] * kv_row;
    for (int64_t h = 0; h < num_kv_heads; ++h)
      for (int64_t j = 0; j < d; ++j)
        k_slot[h * d + j] = C::store(kvserve::rotary_value<E>(xi + (num_heads + h) * d, c, s, j, half));
    const auto* value = xi + (num_heads + num_kv_heads) * d;
    for (int64_t j = 0; j < kv_row; ++j) v_slot[j] = C::store(E::load(value[j]));
  }
}

// decode_step with the rotary embedding folded in, straight from the fused qkv projection:
// qkv [n, (heads + 2 kv_heads) * head_dim], cos/sin [n, 1, head_dim], all bf16 or all fp32 (an fp32
// qkv may have a bf16 cache). Rotates queries and keys (rounding as the torch ops do), stores keys
// and values in their slots, attends; returns [n, heads * head_dim] in qkv's dtype, ready for the
// output projection. One call instead of ~8 tensor ops.
torch::Tensor decode_qkv(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                         torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_table,
                         torch::Tensor seq_lens, double scale, int64_t num_heads, int64_t num_kv_heads) {
  const auto dtype = qkv.scalar_type();
  // fp32 activations may keep a bf16 cache (half the bytes to read; a quantized fp32 model's default).
  const bool bf16_cache = k_cache.scalar_type() == at::kBFloat16;
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && (k_cache.scalar_type() == dtype || bf16_cache) &&
                  v_cache.scalar_type() == k_cache.scalar_type() && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype,
              "decode_qkv is for bfloat16 or float32 tensors, all of one dtype (a float32 qkv may have a bfloat16 "
              "cache)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "caches must be contiguous [blocks, block_size, kv_heads, head_dim]");
  const int64_t d = k_cache.size(3);
  TORCH_CHECK(num_kv_heads == k_cache.size(2) && num_heads % num_kv_heads == 0 && d % 2 == 0, "head counts do not fit the cache");
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (num_heads + 2 * num_kv_heads) * d,
              "qkv must be contiguous [n, (heads + 2 kv_heads) * head_dim]");
  const int64_t n = qkv.size(0);
  cos = cos.reshape({n, d}).contiguous();
  sin = sin.reshape({n, d}).contiguous();
  torch::Tensor slot_keep;
  const int64_t* slot = checked_slots(slot_mapping, n, k_cache, slot_keep);
  auto query = torch::empty({n, num_heads, d}, qkv.options().dtype(at::kFloat));
  float* q = query.data_ptr<float>();
  if (dtype == at::kFloat && bf16_cache)
    rotate_and_store<kvserve::F32, kvserve::Bf16>(qkv, cos, sin, k_cache, v_cache, slot, q, num_heads, num_kv_heads);
  else
    kvserve::by_dtype(qkv, [&](auto e) {
      using E = decltype(e);
      rotate_and_store<E, E>(qkv, cos, sin, k_cache, v_cache, slot, q, num_heads, num_kv_heads);
    });
  return paged_decode(query, k_cache, v_cache, block_table, seq_lens, scale).to(dtype).view({n, num_heads * d});
}
