// Host stand-in of __half for the CUDA emulator: IEEE binary16 storage, conversions round to nearest
// even (as __float2half does), arithmetic through float.
#pragma once
#include <cstdint>
#include <cstring>

namespace sk_emu {
inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (ax < 0x38800000u) {  // subnormal half (or zero): scale by 2^24 and round the integer
    float a;
    std::memcpy(&a, &ax, 4);
    const float scaled = a * 16777216.0f;  // exact
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return static_cast<uint16_t>(sign | m);
  }
  const uint32_t e = ((ax >> 23) - 112u) << 10, mant = ax & 0x7fffffu;
  uint32_t h = e | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t x;
  if (e == 0) {
    float f = static_cast<float>(m) / 16777216.0f;
    std::memcpy(&x, &f, 4);
    x |= sign;
  } else if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else {
    x = sign | ((e + 112u) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
}  // namespace sk_emu

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(sk_emu::f32_to_f16(f)) {}
  __half(double d) : __x(sk_emu::f32_to_f16(static_cast<float>(d))) {}
  __half(int i) : __x(sk_emu::f32_to_f16(static_cast<float>(i))) {}
  operator float() const { return sk_emu::f16_to_f32(__x); }
};
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
