// extern "C" entry points of the emulated CUDA kernels for ctypes (tests/test_cuda_emu.py): the
// launchers of csrc/cuda/*.h, structs passed by pointer, the stream null, and the struct layouts
// so that the test can check its ctypes mirrors.
#include <cstddef>

#include "cuda/attention.h"
#include "cuda/rnn.h"
#include "cuda/rotary.h"
#include "cuda/wkv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sc = seqkern::cuda;

extern "C" {

int emu_attention_forward(const sc::AttnParams* p, void* out, float* lse) {
  return sc::attention_forward(*p, out, lse, nullptr);
}
int emu_attention_backward(const sc::AttnParams* p, const void* dout, const void* out, const float* lse, float* delta,
                           void* dq, void* dk, void* dv) {
  return sc::attention_backward(*p, dout, out, lse, delta, dq, dk, dv, nullptr);
}

int emu_wkv4_forward(int dtype, const void* negw, const void* u, const void* k, const void* v, const void* state,
                     void* y, void* state_out, void* saved, int64_t B, int64_t T, int64_t C) {
  return sc::wkv4_forward(static_cast<sc::DType>(dtype), negw, u, k, v, state, y, state_out, saved, B, T, C, nullptr);
}
int emu_wkv4_backward(int dtype, const void* negw, const void* u, const void* k, const void* v, const void* state,
                      const void* saved, const void* state_T, const void* gy, const void* gstate, void* gk, void* gv,
                      void* gstate_out, void* gw_bc, void* gu_bc, int64_t B, int64_t T, int64_t C) {
  return sc::wkv4_backward(static_cast<sc::DType>(dtype), negw, u, k, v, state, saved, state_T, gy, gstate, gk, gv,
                           gstate_out, gw_bc, gu_bc, B, T, C, nullptr);
}

int emu_rotary(int dtype, const void* x, void* out, const void* cos, const void* sin, int64_t rows, int64_t T,
               int64_t D, int64_t half, bool interleaved, bool inverse) {
  return sc::rotary(static_cast<sc::DType>(dtype), x, out, cos, sin, rows, T, D, half, interleaved, inverse, nullptr);
}

int emu_rnn_forward_step(const sc::RnnShape* d, int64_t s, const sc::RnnForwardStep* a) {
  return sc::rnn_forward_step(*d, s, *a, nullptr);
}
int emu_rnn_proj_forward_fix(const sc::RnnShape* d, int64_t s, void* hx, const void* hp, void* y) {
  return sc::rnn_proj_forward_fix(*d, s, hx, hp, y, nullptr);
}
int emu_rnn_proj_backward_in(const sc::RnnShape* d, int64_t s, void* dr, const void* dhh, const void* dhT,
                             const void* dy) {
  return sc::rnn_proj_backward_in(*d, s, dr, dhh, dhT, dy, nullptr);
}
int emu_rnn_backward_step(const sc::RnnShape* d, int64_t s, const sc::RnnBackwardStep* a) {
  return sc::rnn_backward_step(*d, s, *a, nullptr);
}
int emu_rnn_persistent_supported(const sc::RnnShape* d) { return sc::rnn_persistent_supported(*d); }
int emu_rnn_persistent_forward(const sc::RnnShape* d, const sc::RnnPersistentForward* a) {
  return sc::rnn_persistent_forward(*d, *a, nullptr);
}

// fp32 -> half type -> fp32 through the emulator's conversions (checked against torch's)
void emu_convert(int dtype, const float* x, void* h, float* back, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == 2) {
      static_cast<__half*>(h)[i] = __float2half(x[i]);
      back[i] = __half2float(static_cast<__half*>(h)[i]);
    } else {
      static_cast<__nv_bfloat16*>(h)[i] = __float2bfloat16(x[i]);
      back[i] = __bfloat162float(static_cast<__nv_bfloat16*>(h)[i]);
    }
  }
}

// (size, offset of the last field) of each struct, in the order the test lists them
void emu_layouts(int64_t* out) {
  out[0] = sizeof(sc::AttnParams), out[1] = offsetof(sc::AttnParams, inv_keep);
  out[2] = sizeof(sc::RnnShape), out[3] = offsetof(sc::RnnShape, lengths);
  out[4] = sizeof(sc::RnnForwardStep), out[5] = offsetof(sc::RnnForwardStep, y);
  out[6] = sizeof(sc::RnnBackwardStep), out[7] = offsetof(sc::RnnBackwardStep, separate);
  out[8] = sizeof(sc::RnnPersistentForward), out[9] = offsetof(sc::RnnPersistentForward, save);
}
}
