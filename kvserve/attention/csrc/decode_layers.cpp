// The decoder layers of an all-decode step in one call, for fp32 models whose linears all run the
// int4 GEMM (int4_gemm.cpp): the kernels that the Python layers (kvserve/model/llama.py, layers.py,
// quant.py, attention/cpu.py) call one by one, called here in the same order on the same tensors,
// so the result is the same to the bit. What goes away is the Python between them, 9 module calls
// and 8 extension calls a layer: in the AVX2 build, SmolLM2, one stream 11.1 → 8.3 ms a step, 32
// streams 69.7 → 64.3 (the two alternating in one process, 6 rounds of 15 steps).
//
// weights: per layer, kPerLayer tensors in this order (LlamaModel.decode_layers_weights builds it):
//   input norm weight, qkv (w, d, m, bias or an empty tensor), o (w, d, m),
//   post-attention norm weight, gate_up (w, d, m), down (w, d, m).

#include "kernels.h"
#include "tensor.h"

namespace {
constexpr size_t kPerLayer = 15;
}

// (hidden, residual) after the last layer: LlamaModel's final norm takes them, as after its own loop.
std::vector<torch::Tensor> decode_layers(torch::Tensor hidden, std::vector<torch::Tensor> weights,
                                         std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
                                         torch::Tensor cos, torch::Tensor sin, torch::Tensor slot_mapping,
                                         torch::Tensor block_table, torch::Tensor seq_lens, double scale,
                                         int64_t num_heads, int64_t num_kv_heads, double eps) {
  const size_t layers = k_caches.size();
  TORCH_CHECK(v_caches.size() == layers && weights.size() == layers * kPerLayer,
              "decode_layers needs ", kPerLayer, " weights and a K and a V cache per layer; got ", weights.size(),
              " weights, ", k_caches.size(), " K and ", v_caches.size(), " V caches");
  torch::Tensor residual;
  for (size_t i = 0; i < layers; ++i) {
    const torch::Tensor* w = weights.data() + i * kPerLayer;
    torch::Tensor x;
    if (i == 0) {
      residual = hidden;
      x = rms_norm(hidden, c10::nullopt, w[0], eps)[0];
    } else {
      auto normed = rms_norm(hidden, residual, w[0], eps);
      x = normed[0], residual = normed[1];
    }
    torch::Tensor qkv = int4_gemm(x, w[1], w[2], w[3]);
    if (w[4].numel() > 0) qkv = qkv.add(w[4]);      // Int4Linear: out + bias
    const torch::Tensor attn = decode_qkv(qkv, cos, sin, k_caches[i], v_caches[i], slot_mapping, block_table,
                                          seq_lens, scale, num_heads, num_kv_heads);
    auto normed = rms_norm(int4_gemm(attn, w[5], w[6], w[7]), residual, w[8], eps);
    residual = normed[1];
    hidden = int4_gemm(silu_mul(int4_gemm(normed[0], w[9], w[10], w[11])), w[12], w[13], w[14]);
  }
  return {hidden, residual};
}
