// Host stand-in of __nv_bfloat16 for the CUDA emulator: conversions round to nearest even.
#pragma once
#include <cstdint>
#include <cstring>

namespace sk_emu {
inline uint16_t f32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_to_f32(uint16_t h) {
  const uint32_t x = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
}  // namespace sk_emu

struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(sk_emu::f32_to_bf16(f)) {}
  __nv_bfloat16(double d) : __x(sk_emu::f32_to_bf16(static_cast<float>(d))) {}
  __nv_bfloat16(int i) : __x(sk_emu::f32_to_bf16(static_cast<float>(i))) {}
  operator float() const { return sk_emu::bf16_to_f32(__x); }
};
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
