// bf16 <-> fp32 as torch does it (round to nearest even), shared by the C++ kernels.
#pragma once

#include <cstdint>
#include <cstring>

namespace kvserve {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even (inputs here are finite).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// One head of rotate-half rotary in bf16, rounding where torch's ops do:
// out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)).
inline float rotary_element(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t j, int64_t half) {
  const float rotated = j < half ? -bf16_to_float(x[j + half]) : bf16_to_float(x[j - half]);
  return round_bf16(round_bf16(bf16_to_float(x[j]) * bf16_to_float(cos[j])) + round_bf16(rotated * bf16_to_float(sin[j])));
}

}  // namespace kvserve
