// The Python module of kvserve's C++ CPU kernels (built by kvserve/attention/cpu_kernels.py).

#include <torch/extension.h>

#include "isa.h"
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache (CPU)");
  m.def("decode_step", &decode_step, "store this step's K/V, then decode attention (all rows decode)");
  m.def("decode_qkv", &decode_qkv, "bf16 decode_step from the fused qkv projection, rotary included");
  m.def("rms_norm", &rms_norm, "[residual add +] RMSNorm in bf16, rounding as torch does");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection, bf16");
  m.def("int8_matmul", &int8_matmul, "x @ W^T, int8 W with per-channel scales, fp32 math, <= 8 rows");
  m.def("int8_matmul_portable", &int8_matmul_portable, "the same, plain loops (the spec of the vector path)");
  m.def("int4_matmul", &int4_matmul, "x @ W^T, Q4_1 W (groups of 32), int8 activations, <= 8 rows");
  m.def("int4_matmul_portable", &int4_matmul_portable, "the same, plain loops (the spec of the vector paths)");
  m.def("int4_gemm", &int4_gemm, "x @ W^T for many rows, Q4_1 W repacked (int4_gemm_pack), int8 activations, fp32 out");
  m.def("int4_gemm_portable", &int4_gemm_portable, "the same, plain loops (the spec of the vector path)");
  m.def("int8_gemm", &int8_gemm, "x @ W^T for many rows, int8 W repacked (pack_int8_gemm), int16 activations, fp32 out");
  m.def("int8_gemm_portable", &int8_gemm_portable, "the same, plain loops (the spec of the vector path)");
  m.def("prefill_attention", &prefill_attention, "attention of prefill chunks over the paged cache, into out (CPU)");
  m.def("rotary", &rotary, "rotate-half rotary embedding, bf16");
  m.def("decode_layers", &decode_layers, "an all-decode step's decoder layers, fp32 with int4 GEMM linears");
  m.def("set_isa", [](int64_t level) { kvserve::isa_level() = static_cast<int>(level); },
        "the instruction-set level the kernels may use: 0 portable, 1 avx2, 2 avx512");
  m.def("get_isa", []() { return static_cast<int64_t>(kvserve::isa_level()); }, "the level set");
  m.def("built_with_avx512", []() {
#if defined(__AVX512F__)
    return true;
#else
    return false;
#endif
  }, "whether this build holds AVX-512 code (an AVX2-level process's build does not: 16 vector registers)");
}
