// Fused element-wise ops of a Llama layer on CPU: one call where the torch spec
// (kvserve/model/layers.py) makes five to nine. In bf16 each rounds to bf16 exactly where the torch
// ops do (after every op that torch computes in bf16), so results match the spec up to the order of
// the RMS sum. In fp32 (the quantized models of a CPU without native bf16 math) they are the same
// expressions with nothing to round: equal to the spec within a few ulps (sum order, fused
// multiply-adds). Rows are spread over threads only when there is enough work to pay for it.
// The loops are written for the compiler to vectorise at the build's width (-march=native).

#include "tensor.h"
#include <ATen/Parallel.h>

#include "elem.h"

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

using kvserve::Bf16;
using kvserve::by_dtype;
using kvserve::F32;
using kvserve::rotary_value;

template <typename F>
void for_rows(int64_t rows, int64_t row_work, const F& body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_work));
  if (rows <= grain) {
    body(0, rows);
  } else {
    at::parallel_for(0, rows, grain, body);
  }
}

bool supported(const torch::Tensor& t) { return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat; }

void check_matrix(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(supported(t) && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous 2-D bfloat16 or float32 tensor");
}

void check_same_dtype(const torch::Tensor& a, const torch::Tensor& b, const char* name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name, " must have the input's dtype");
}

template <typename E>
void rms_norm_rows(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual, torch::Tensor& sum,
                   const torch::Tensor& weight, torch::Tensor& out, float epsilon) {
  using T = typename E::T;
  const int64_t rows = x.size(0), h = x.size(1);
  const T* xs = E::data(x);
  const T* rs = residual.has_value() ? E::data(*residual) : nullptr;
  T* ss = residual.has_value() ? E::data_mut(sum) : nullptr;
  const T* w = E::data(weight);
  T* os = E::data_mut(out);
  for_rows(rows, h, [&](int64_t begin, int64_t end) {
    std::vector<float> row(h);
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = xs + i * h;
      if (rs != nullptr) {
        const T* ri = rs + i * h;
        T* si = ss + i * h;
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) {
          const T b = E::store(E::load(xi[j]) + E::load(ri[j]));
          si[j] = b;
          row[j] = E::load(b);
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < h; ++j) row[j] = E::load(xi[j]);
      }
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t j = 0; j < h; ++j) squares += row[j] * row[j];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(h) + epsilon);
      T* oi = os + i * h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) oi[j] = E::store(E::load(w[j]) * E::round(row[j] * inv));
    }
  });
}

template <typename E>
void silu_mul_rows(const torch::Tensor& gate_up, torch::Tensor& out) {
  using T = typename E::T;
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  const T* in = E::data(gate_up);
  T* o = E::data_mut(out);
  for_rows(rows, inter, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = in + i * 2 * inter;
      const T* u = g + inter;
      T* oi = o + i * inter;
#pragma omp simd
      for (int64_t j = 0; j < inter; ++j) {
        const float x = E::load(g[j]);
        oi[j] = E::store(E::round(x / (1.f + std::exp(-x))) * E::load(u[j]));
      }
    }
  });
}

template <typename E>
void rotary_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& out) {
  using T = typename E::T;
  const int64_t n = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2, row_stride = x.stride(0);
  const T* xs = E::data(x);
  const T* cs = E::data(cos);
  const T* sn = E::data(sin);
  T* os = E::data_mut(out);
  for_rows(n, heads * d, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* c = cs + i * d;
      const T* s = sn + i * d;
      for (int64_t hd = 0; hd < heads; ++hd) {
        const T* xi = xs + i * row_stride + hd * d;
        T* oi = os + (i * heads + hd) * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) oi[j] = E::store(rotary_value<E>(xi, c, s, j, half));
      }
    }
  });
}

}  // namespace

// [residual = x + residual;] out = weight * round(r * rsqrt(mean(r^2) + eps)), r in fp32; bf16 or fp32.
// Returns (out, residual) where residual is the new sum (or x itself when no residual was given).
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps) {
  check_matrix(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.dim() == 1 && weight.size(0) == x.size(1),
              "weight must be [hidden] in x's dtype");
  torch::Tensor sum = x;
  if (residual.has_value()) {
    check_matrix(*residual, "residual");
    check_same_dtype(x, *residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual and x differ in shape");
    sum = torch::empty_like(x);
  }
  auto out = torch::empty_like(x);
  const auto w = weight.contiguous();
  by_dtype(x, [&](auto e) { rms_norm_rows<decltype(e)>(x, residual, sum, w, out, static_cast<float>(eps)); });
  return {out, sum};
}

// gate_up [n, 2i] -> round(round(silu(gate)) * up), [n, i]; bf16 or fp32.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  check_matrix(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  auto out = torch::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  by_dtype(gate_up, [&](auto e) { silu_mul_rows<decltype(e)>(gate_up, out); });
  return out;
}

// x [n, heads, d] (rows may be strided, as a slice of the qkv projection); cos, sin [n, 1, d].
// Returns round(round(x * cos) + round(rotate_half(x) * sin)), contiguous [n, heads, d]; bf16 or fp32.
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(supported(x) && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "x must be bfloat16 or float32 [n, heads, head_dim] with contiguous heads");
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even");
  cos = cos.reshape({x.size(0), x.size(2)}).contiguous();
  sin = sin.reshape({x.size(0), x.size(2)}).contiguous();
  check_matrix(cos, "cos");
  check_matrix(sin, "sin");
  check_same_dtype(x, cos, "cos");
  check_same_dtype(x, sin, "sin");
  auto out = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  by_dtype(x, [&](auto e) { rotary_rows<decltype(e)>(x, cos, sin, out); });
  return out;
}
