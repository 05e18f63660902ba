// The functions of kvserve's C++ CPU kernels that the Python module exposes (bindings.cpp) and that
// other kernels call (decode_layers.cpp), declared once. Each is defined in its own source file.
#pragma once

#include <ATen/core/Tensor.h>   // not tensor.h: bindings.cpp has <torch/extension.h>, whose torch::empty it would clash with

#include <vector>

at::Tensor paged_decode(at::Tensor query, at::Tensor k_cache, at::Tensor v_cache,
                        at::Tensor block_table, at::Tensor seq_lens, double scale);
at::Tensor decode_step(at::Tensor query, at::Tensor key, at::Tensor value, at::Tensor k_cache,
                       at::Tensor v_cache, at::Tensor slot_mapping, at::Tensor block_table,
                       at::Tensor seq_lens, double scale);
at::Tensor decode_qkv(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                      at::Tensor v_cache, at::Tensor slot_mapping, at::Tensor block_table,
                      at::Tensor seq_lens, double scale, int64_t num_heads, int64_t num_kv_heads);
std::vector<at::Tensor> rms_norm(at::Tensor x, c10::optional<at::Tensor> residual, at::Tensor weight,
                                 double eps);
at::Tensor silu_mul(at::Tensor gate_up);
at::Tensor int8_matmul(at::Tensor x, at::Tensor w, at::Tensor scale);
at::Tensor int8_matmul_portable(at::Tensor x, at::Tensor w, at::Tensor scale);
at::Tensor int4_matmul(at::Tensor x, at::Tensor qs, at::Tensor dm);
at::Tensor int4_matmul_portable(at::Tensor x, at::Tensor qs, at::Tensor dm);
at::Tensor int4_gemm(at::Tensor x, at::Tensor w, at::Tensor d, at::Tensor m);
at::Tensor int8_gemm(at::Tensor x, at::Tensor w, at::Tensor scale);
at::Tensor int8_gemm_portable(at::Tensor x, at::Tensor w, at::Tensor scale);
at::Tensor int4_gemm_portable(at::Tensor x, at::Tensor w, at::Tensor d, at::Tensor m);
void prefill_attention(at::Tensor query, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_table,
                    at::Tensor chunks, double scale, at::Tensor out);
at::Tensor rotary(at::Tensor x, at::Tensor cos, at::Tensor sin);
std::vector<at::Tensor> decode_layers(at::Tensor hidden, std::vector<at::Tensor> weights,
                                      std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                                      at::Tensor cos, at::Tensor sin, at::Tensor slot_mapping,
                                      at::Tensor block_table, at::Tensor seq_lens, double scale,
                                      int64_t num_heads, int64_t num_kv_heads, double eps);
