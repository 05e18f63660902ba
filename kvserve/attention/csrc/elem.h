// The element types the fused kernels take (bf16 or fp32, computed in fp32), and the rotate-half
// rotary element they share: fused_ops.cpp's `rotary` and paged_decode.cpp's `decode_qkv`.
#pragma once

#include "tensor.h"

#include "bf16.h"

#include <cstdint>

namespace kvserve {

// How each element type is read, written and rounded (fp32: not at all).
struct Bf16 {
  using T = uint16_t;
  static float load(T v) { return bf16_to_float(v); }
  static T store(float f) { return float_to_bf16(f); }
  static float round(float f) { return round_bf16(f); }
  static const T* data(const torch::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr<at::BFloat16>()); }
  static T* data_mut(torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr<at::BFloat16>()); }
};

struct F32 {
  using T = float;
  static float load(T v) { return v; }
  static T store(float f) { return f; }
  static float round(float f) { return f; }
  static const T* data(const torch::Tensor& t) { return t.data_ptr<float>(); }
  static T* data_mut(torch::Tensor& t) { return t.data_ptr<float>(); }
};

// fn(Bf16{}) or fn(F32{}) by the tensor's dtype (the only two).
template <typename Fn>
auto by_dtype(const torch::Tensor& t, Fn fn) {
  return t.scalar_type() == at::kBFloat16 ? fn(Bf16{}) : fn(F32{});
}

// One element of rotate-half rotary, rounding where torch's ops do:
// out = round(round(x * cos) + round(rotate_half(x) * sin)).
template <typename E>
inline float rotary_value(const typename E::T* x, const typename E::T* cos, const typename E::T* sin, int64_t j,
                          int64_t half) {
  const float rotated = j < half ? -E::load(x[j + half]) : E::load(x[j - half]);
  return E::round(E::round(E::load(x[j]) * E::load(cos[j])) + E::round(rotated * E::load(sin[j])));
}

}  // namespace kvserve
