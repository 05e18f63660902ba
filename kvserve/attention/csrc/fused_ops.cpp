// Fused element-wise ops of a Llama layer for bf16 on CPU: one call where the torch spec
// (kvserve/model/layers.py) makes five to nine. Each rounds to bf16 exactly where the torch ops do
// (after every op that torch computes in bf16), so results match the spec up to the order of the
// RMS sum. Rows are spread over threads only when there is enough work to pay for it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "bf16.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using kvserve::bf16_to_float;
using kvserve::float_to_bf16;
using kvserve::round_bf16;

const uint16_t* bits(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bits_mut(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

template <typename F>
void for_rows(int64_t rows, int64_t row_work, const F& body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_work));
  if (rows <= grain) {
    body(0, rows);
  } else {
    at::parallel_for(0, rows, grain, body);
  }
}

void check_bf16_matrix(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous 2-D bfloat16 tensor");
}

}  // namespace

// [residual = x + residual;] out = weight * bf16(r * rsqrt(mean(r^2) + eps)), r in fp32.
// Returns (out, residual) where residual is the new sum (or x itself when no residual was given).
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps) {
  check_bf16_matrix(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.dim() == 1 && weight.size(0) == x.size(1),
              "weight must be bfloat16 [hidden]");
  const int64_t rows = x.size(0), h = x.size(1);
  torch::Tensor sum = x;
  if (residual.has_value()) {
    check_bf16_matrix(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual and x differ in shape");
    sum = torch::empty_like(x);
  }
  auto out = torch::empty_like(x);
  const uint16_t* xs = bits(x);
  const uint16_t* rs = residual.has_value() ? bits(*residual) : nullptr;
  uint16_t* ss = residual.has_value() ? bits_mut(sum) : nullptr;
  const uint16_t* w = bits(weight.contiguous());
  uint16_t* os = bits_mut(out);
  const float epsilon = static_cast<float>(eps);
  for_rows(rows, h, [&](int64_t begin, int64_t end) {
    std::vector<float> row(h);
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t* xi = xs + i * h;
      if (rs != nullptr) {
        const uint16_t* ri = rs + i * h;
        uint16_t* si = ss + i * h;
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) {
          const uint16_t b = float_to_bf16(bf16_to_float(xi[j]) + bf16_to_float(ri[j]));
          si[j] = b;
          row[j] = bf16_to_float(b);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) row[j] = bf16_to_float(xi[j]);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t j = 0; j < h; ++j) squares += row[j] * row[j];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(h) + epsilon);
      uint16_t* oi = os + i * h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) oi[j] = float_to_bf16(bf16_to_float(w[j]) * round_bf16(row[j] * inv));
    }
  });
  return {out, sum};
}

// gate_up [n, 2i] -> bf16(bf16(silu(gate)) * up), [n, i].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_bf16_matrix(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({rows, inter}, gate_up.options());
  const uint16_t* in = bits(gate_up);
  uint16_t* o = bits_mut(out);
  for_rows(rows, inter, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t* g = in + i * 2 * inter;
      const uint16_t* u = g + inter;
      uint16_t* oi = o + i * inter;
#pragma omp simd
      for (int64_t j = 0; j < inter; ++j) {
        const float x = bf16_to_float(g[j]);
        oi[j] = float_to_bf16(round_bf16(x / (1.f + std::exp(-x))) * bf16_to_float(u[j]));
      }
    }
  });
  return out;
}

// x [n, heads, d] (rows may be strided, as a slice of the qkv projection); cos, sin [n, 1, d].
// Returns bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), contiguous [n, heads, d].
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "x must be bfloat16 [n, heads, head_dim] with contiguous heads");
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even");
  cos = cos.reshape({x.size(0), x.size(2)}).contiguous();
  sin = sin.reshape({x.size(0), x.size(2)}).contiguous();
  check_bf16_matrix(cos, "cos");
  check_bf16_matrix(sin, "sin");
  const int64_t n = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2, row_stride = x.stride(0);
  auto out = torch::empty({n, heads, d}, x.options());
  const uint16_t* xs = bits(x);
  const uint16_t* cs = bits(cos);
  const uint16_t* sn = bits(sin);
  uint16_t* os = bits_mut(out);
  for_rows(n, heads * d, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint16_t* c = cs + i * d;
      const uint16_t* s = sn + i * d;
      for (int64_t hd = 0; hd < heads; ++hd) {
        const uint16_t* xi = xs + i * row_stride + hd * d;
        uint16_t* oi = os + (i * heads + hd) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) oi[j] = float_to_bf16(kvserve::rotary_element(xi, c, s, j, half));
      }
    }
  });
  return out;
}
