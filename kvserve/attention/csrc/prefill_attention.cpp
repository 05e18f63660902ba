// Attention of prefill chunks (many query tokens of one sequence) read straight from the paged KV
// cache, on CPU: the chunk's own keys already written there, the cached context before them, a
// causal mask offset by that context. Replaces the reference path's per-sequence gather (a copy of
// the whole context, widened to fp32) and SDPA call (grouped-query heads expanded) for each layer.
//
// A work item is (chunk, KV head, tile of up to kQueries query tokens): the G = heads / kv_heads
// query heads sharing that KV head, for those tokens, are G·kQueries rows that read each key and
// value tile once. One pass over the keys in tiles of kKeys tokens (within one block) with an online
// softmax, so nothing the size of the context is materialised:
//   - the tile's keys are transposed into [head_dim][kKeys] fp32, so that a query row's kKeys scores
//     are FMAs over head_dim with no horizontal sums (4 rows at a time: 8 independent chains);
//   - the probabilities times the tile's values accumulate into the row's output in fp32.
// Tiles past a query tile's last position are skipped (causal), so later query tiles cost more;
// items are handed out longest first from a shared counter, which keeps both cores busy to the end.
// Math in fp32 whatever the cache dtype. The portable loop is the spec of the AVX2 path
// (kvserve::isa_level() picks); the torch reference (torch_ref.py) is the spec of both.

#include "tensor.h"
#include <ATen/Parallel.h>

#include "isa.h"

#if defined(__AVX2__) && defined(__FMA__)
#define KVSERVE_PREFILL_AVX2 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kQueries = 32;    // query tokens per item
constexpr int64_t kKeys = 16;       // key tokens per tile
constexpr int64_t kMaxDim = 256;

struct Chunk {
  int64_t table_row, start, end, seq_len;   // block-table row, query rows [start, end), context after it
};

struct Item {
  int64_t chunk, kv_head, q0, q1;           // query tokens [q0, q1) of the chunk (0 = its first)
  int64_t cost;                             // keys it reads
};

struct Geometry {
  int64_t heads, kv_heads, group, dim, block_size, token_stride, block_stride, max_blocks;
};

// Rows of one item: row (j, g) = query token q0 + j, head kv_head·G + g; its position in the sequence
// is seq_len - (end - start) + q0 + j, and it sees keys 0..position.
template <typename T>
void item_portable(const float* query, const T* k_cache, const T* v_cache, const int64_t* table, const Chunk& c,
                   const Item& it, const Geometry& g, float scale, float* out) {
  const int64_t first = c.seq_len - (c.end - c.start);
  const int64_t* blocks = table + c.table_row * g.max_blocks;
  std::vector<float> acc(g.dim);
  for (int64_t j = it.q0; j < it.q1; ++j)
    for (int64_t h = 0; h < g.group; ++h) {
      const int64_t head = it.kv_head * g.group + h;
      const float* q = query + ((c.start + j) * g.heads + head) * g.dim;
      const int64_t last = first + j;
      float peak = kvserve::kNoScore, total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t <= last; ++t) {
        const int64_t at = blocks[t / g.block_size] * g.block_stride + (t % g.block_size) * g.token_stride +
                           it.kv_head * g.dim;
        float s = 0.f;
        for (int64_t d = 0; d < g.dim; ++d) s += q[d] * static_cast<float>(k_cache[at + d]);
        s *= scale;
        const float top = std::max(peak, s);
        const float alpha = std::exp(peak - top), p = std::exp(s - top);
        for (int64_t d = 0; d < g.dim; ++d) acc[d] = acc[d] * alpha + p * static_cast<float>(v_cache[at + d]);
        total = total * alpha + p;
        peak = top;
      }
      float* o = out + ((c.start + j) * g.heads + head) * g.dim;
      for (int64_t d = 0; d < g.dim; ++d) o[d] = acc[d] / total;
    }
}

#if defined(KVSERVE_PREFILL_AVX2)
// DC = head_dim / 8 (compile time: the output row lives in registers through a tile).
template <typename T, int DC>
void item_avx2(const float* query, const T* k_cache, const T* v_cache, const int64_t* table, const Chunk& c,
               const Item& it, const Geometry& g, float scale, float* out) {
  constexpr int64_t D = DC * 8;
  const int64_t first = c.seq_len - (c.end - c.start);
  const int64_t* blocks = table + c.table_row * g.max_blocks;
  const int64_t rows = (it.q1 - it.q0) * g.group;
  const int64_t padded = (rows + 3) / 4 * 4;         // scores are taken 4 rows at a time
  // the item's query rows, scaled (zero past `rows`), and their running state
  std::vector<float> q(padded * D, 0.f), o(rows * D, 0.f), peak(rows, kvserve::kNoScore),
      total(rows, 0.f);
  std::vector<int64_t> last(rows);
  for (int64_t j = it.q0; j < it.q1; ++j)
    for (int64_t h = 0; h < g.group; ++h) {
      const int64_t r = (j - it.q0) * g.group + h;
      const float* src = query + ((c.start + j) * g.heads + it.kv_head * g.group + h) * D;
      for (int64_t d = 0; d < D; ++d) q[r * D + d] = src[d] * scale;
      last[r] = first + j;
    }
  alignas(32) float kt[D][kKeys];      // the tile's keys, transposed
  alignas(32) float vt[kKeys][D];
  alignas(32) float s[4][kKeys];
  const int64_t end_key = first + it.q1;            // keys [0, end_key) are seen by some row
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 no_score = _mm256_set1_ps(kvserve::kNoScore);
  for (int64_t t0 = 0; t0 < end_key;) {
    const int64_t in_block = t0 % g.block_size;
    const int64_t n = std::min({kKeys, end_key - t0, g.block_size - in_block});
    const int64_t base = blocks[t0 / g.block_size] * g.block_stride + in_block * g.token_stride + it.kv_head * D;
    for (int64_t t = 0; t < kKeys; ++t) {
      if (t < n) {
        const T* kr = k_cache + base + t * g.token_stride;
        const T* vr = v_cache + base + t * g.token_stride;
        for (int64_t d = 0; d < D; ++d) kt[d][t] = static_cast<float>(kr[d]), vt[t][d] = static_cast<float>(vr[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) kt[d][t] = 0.f, vt[t][d] = 0.f;
      }
    }
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const int64_t nr = std::min<int64_t>(4, rows - r0);
      if (last[r0] < t0 && last[r0 + nr - 1] < t0) continue;    // rows are in position order
      // scores of 4 rows × 16 keys: 8 independent FMA chains over head_dim
      __m256 lo[4], hi[4];
      for (int i = 0; i < 4; ++i) lo[i] = _mm256_setzero_ps(), hi[i] = _mm256_setzero_ps();
      const float* qr = q.data() + r0 * D;
      for (int64_t d = 0; d < D; ++d) {
        const __m256 k_lo = _mm256_load_ps(kt[d]), k_hi = _mm256_load_ps(kt[d] + 8);
        for (int i = 0; i < 4; ++i) {
          const __m256 qd = _mm256_broadcast_ss(qr + i * D + d);
          lo[i] = _mm256_fmadd_ps(qd, k_lo, lo[i]);
          hi[i] = _mm256_fmadd_ps(qd, k_hi, hi[i]);
        }
      }
      float alpha[4] = {1.f, 1.f, 1.f, 1.f};
      int64_t seen_n[4] = {0, 0, 0, 0};
      for (int i = 0; i < nr; ++i) {
        const int64_t r = r0 + i;
        // key t0 + t is seen when t < n and t0 + t <= last[r]
        const int64_t m = std::max<int64_t>(0, std::min<int64_t>(n, last[r] - t0 + 1));
        seen_n[i] = m;
        if (m == 0) {
          _mm256_store_ps(s[i], _mm256_setzero_ps());
          _mm256_store_ps(s[i] + 8, _mm256_setzero_ps());
          continue;
        }
        const __m256 seen = _mm256_set1_ps(static_cast<float>(m));
        const __m256 a = _mm256_blendv_ps(no_score, lo[i], _mm256_cmp_ps(lane, seen, _CMP_LT_OQ));
        const __m256 b = _mm256_blendv_ps(no_score, hi[i], _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(8.f)), seen, _CMP_LT_OQ));
        const float top = std::max(peak[r], kvserve::max8(_mm256_max_ps(a, b)));
        const __m256 top_v = _mm256_set1_ps(top);
        const __m256 pa = kvserve::exp8(_mm256_sub_ps(a, top_v)), pb = kvserve::exp8(_mm256_sub_ps(b, top_v));
        _mm256_store_ps(s[i], pa);
        _mm256_store_ps(s[i] + 8, pb);
        alpha[i] = std::exp(peak[r] - top);     // 0 on the first tile
        total[r] = total[r] * alpha[i] + kvserve::hsum8(_mm256_add_ps(pa, pb));
        peak[r] = top;
      }
      // outputs: two rows at a time, half a row (DC / 2 vectors) per pass, so each value vector
      // loaded serves both rows; probabilities past a row's keys are 0
      for (int i = 0; i < nr; i += 2) {
        const bool pair = i + 1 < nr;
        const int64_t m = std::max(seen_n[i], pair ? seen_n[i + 1] : 0);
        if (m == 0) continue;
        float* o0 = o.data() + (r0 + i) * D;
        float* o1 = pair ? o0 + D : o0;
        const __m256 a0 = _mm256_set1_ps(alpha[i]), a1 = _mm256_set1_ps(pair ? alpha[i + 1] : 1.f);
        for (int half = 0; half < 2; ++half) {
          constexpr int H = DC / 2;
          const int64_t off = half * H * 8;
          __m256 x0[H], x1[H];
          for (int cc = 0; cc < H; ++cc) {
            x0[cc] = _mm256_mul_ps(a0, _mm256_loadu_ps(o0 + off + 8 * cc));
            x1[cc] = _mm256_mul_ps(a1, _mm256_loadu_ps(o1 + off + 8 * cc));
          }
          for (int64_t t = 0; t < m; ++t) {
            const __m256 p0 = _mm256_set1_ps(s[i][t]), p1 = _mm256_set1_ps(pair ? s[i + 1][t] : 0.f);
            for (int cc = 0; cc < H; ++cc) {
              const __m256 v = _mm256_load_ps(vt[t] + off + 8 * cc);
              x0[cc] = _mm256_fmadd_ps(p0, v, x0[cc]);
              x1[cc] = _mm256_fmadd_ps(p1, v, x1[cc]);
            }
          }
          for (int cc = 0; cc < H; ++cc) {
            if (pair) _mm256_storeu_ps(o1 + off + 8 * cc, x1[cc]);
            _mm256_storeu_ps(o0 + off + 8 * cc, x0[cc]);
          }
        }
      }
    }
    t0 += n;
  }
  for (int64_t j = it.q0; j < it.q1; ++j)
    for (int64_t h = 0; h < g.group; ++h) {
      const int64_t r = (j - it.q0) * g.group + h;
      float* dst = out + ((c.start + j) * g.heads + it.kv_head * g.group + h) * D;
      const float inv = 1.f / total[r];
      for (int64_t d = 0; d < D; ++d) dst[d] = o[r * D + d] * inv;
    }
}
#endif

template <typename T>
void run(const float* query, const T* k_cache, const T* v_cache, const int64_t* table, const std::vector<Chunk>& chunks,
         const Geometry& g, float scale, float* out) {
  std::vector<Item> items;
  for (int64_t i = 0; i < static_cast<int64_t>(chunks.size()); ++i) {
    const Chunk& c = chunks[i];
    const int64_t first = c.seq_len - (c.end - c.start);
    for (int64_t q0 = 0; q0 < c.end - c.start; q0 += kQueries)
      for (int64_t h = 0; h < g.kv_heads; ++h) {
        const int64_t q1 = std::min(c.end - c.start, q0 + kQueries);
        items.push_back({i, h, q0, q1, first + q1});
      }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int level = kvserve::isa_level();
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < count; i = next++) {
      const Item& it = items[i];
      const Chunk& c = chunks[it.chunk];
#if defined(KVSERVE_PREFILL_AVX2)
      if (level >= kvserve::kAvx2) {
        if (g.dim == 64) { item_avx2<T, 8>(query, k_cache, v_cache, table, c, it, g, scale, out); continue; }
        if (g.dim == 128) { item_avx2<T, 16>(query, k_cache, v_cache, table, c, it, g, scale, out); continue; }
      }
#endif
      (void)level;
      item_portable(query, k_cache, v_cache, table, c, it, g, scale, out);
    }
  });
}

}  // namespace

// query [n, heads, d] fp32; caches [blocks, block_size, kv_heads, d] fp32 or bf16, this step's keys
// and values already written; block_table [seqs, max_blocks] int64; chunks [c, 4] int64 rows
// (block-table row, first query row, end query row, context length after the chunk); out [n, heads, d]
// fp32, whose chunk rows are written (other rows are left as they are).
void prefill_attention(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_table,
                       torch::Tensor chunks, double scale, torch::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat && query.is_contiguous(),
              "query must be contiguous [n, heads, head_dim] float32");
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "out must be contiguous float32 shaped like query");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type(),
              "caches must be contiguous [blocks, block_size, kv_heads, head_dim] of one dtype");
  TORCH_CHECK(k_cache.size(2) > 0 && query.size(1) % k_cache.size(2) == 0 && query.size(2) == k_cache.size(3) &&
                  query.size(2) <= kMaxDim,
              "heads must be a multiple of kv_heads, head_dim that of the cache (at most 256)");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 2 && block_table.is_contiguous(),
              "block_table must be contiguous int64 [seqs, max_blocks]");
  TORCH_CHECK(chunks.scalar_type() == at::kLong && chunks.dim() == 2 && chunks.size(1) == 4 && chunks.is_contiguous(),
              "chunks must be contiguous int64 [c, 4]");
  const Geometry g{query.size(1), k_cache.size(2), query.size(1) / k_cache.size(2), query.size(2), k_cache.size(1),
                   k_cache.size(2) * k_cache.size(3), k_cache.size(1) * k_cache.size(2) * k_cache.size(3),
                   block_table.size(1)};
  const auto* raw = chunks.data_ptr<int64_t>();
  const auto* table = block_table.data_ptr<int64_t>();
  std::vector<Chunk> list;
  for (int64_t i = 0; i < chunks.size(0); ++i) {
    const Chunk c{raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]};
    TORCH_CHECK(c.table_row >= 0 && c.table_row < block_table.size(0), "chunk ", i, ": block-table row out of range");
    TORCH_CHECK(c.start >= 0 && c.start < c.end && c.end <= query.size(0), "chunk ", i, ": query rows out of range");
    TORCH_CHECK(c.end - c.start <= c.seq_len && c.seq_len <= g.max_blocks * g.block_size,
                "chunk ", i, ": context length out of range");
    for (int64_t b = 0; b < (c.seq_len + g.block_size - 1) / g.block_size; ++b) {
      const int64_t id = table[c.table_row * g.max_blocks + b];
      TORCH_CHECK(id >= 0 && id < k_cache.size(0), "chunk ", i, ": block id out of the cache's range");
    }
    list.push_back(c);
  }
  if (list.empty()) return;
  const float s = static_cast<float>(scale);
  if (k_cache.scalar_type() == at::kBFloat16) {
    run(query.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), table, list, g, s,
        out.data_ptr<float>());
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat, "caches must be float32 or bfloat16");
    run(query.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), table, list, g, s,
        out.data_ptr<float>());
  }
}
