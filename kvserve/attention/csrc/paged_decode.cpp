// Decode attention read straight from the paged KV cache, on CPU.
//
// One query token per sequence. Each work item is (sequence, KV head): it reads that head's keys
// and values once, block by block through the block table, and serves the G = heads / kv_heads
// query heads that share them (grouped-query attention). Math in fp32 whatever the cache dtype.
// The torch reference (kvserve/attention/torch_ref.py) is the spec this must match.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
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

template <typename T>
void decode(const float* query, const T* k_cache, const T* v_cache, const int64_t* block_table,
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

}  // namespace

// query [n, heads, head_dim] fp32; caches [blocks, block_size, kv_heads, head_dim] fp32 or bf16;
// block_table [n, max_blocks] int64; seq_lens [n] int64 (each >= 1). Returns [n, heads, head_dim] fp32.
torch::Tensor paged_decode(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_table, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == at::kFloat, "query must be [n, heads, head_dim] float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "caches must be [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches must share a dtype");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, "indices must be int64");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "heads must be a multiple of kv_heads");
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (CPU)");
}
