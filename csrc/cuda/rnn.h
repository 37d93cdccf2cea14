// CUDA kernels of the recurrent family: raw pointers, no torch headers. The GEMMs are
// done by the caller (cuBLAS through ATen); these are the fused elementwise parts of
// each step, and a persistent whole-sequence forward for small batches.
//
// Conventions (seqkern/ops/rnn.py): row-major contiguous buffers; step s of batch row b
// works on time index t = L_b - 1 - s when reversed and s < L_b, else s; rows at or past
// their length keep their state and output 0. mode: 0 lstm, 1 gru, 2 rnn tanh, 3 rnn relu.
#pragma once
#include "cuda/common.h"

namespace seqkern::cuda {

struct RnnShape {
  int mode;
  DType dtype;
  int64_t T, B, H, P;  // steps, batch, hidden, hidden after projection (P == H without)
  bool proj, reverse;
  const int64_t* lengths;  // (B,) on the device, or nullptr (every row has length T)
};

// One forward step. g (B, G*H): the recurrent GEMM's output, overwritten by the gate
// activations (for the rnn modes g is hx itself). xw (T*B, G*H) input projection with the
// biases folded in (time order); hp/hx (B, P) state before/after; cp/cn (B, H) lstm cell
// before/after; hc (B, H) lstm o*tanh(c) when projecting; hn (B, H) gru W_hn h + b_hn;
// b_hn (H) gru; y (T, B, P) output (time order; untouched here when projecting).
struct RnnForwardStep {
  void* g;
  const void* xw;
  const void* hp;
  void* hx;
  const void* cp;
  void* cn;
  void* hc;
  void* hn;
  const void* b_hn;
  void* y;
};
cudaError_t rnn_forward_step(const RnnShape& d, int64_t s, const RnnForwardStep& a, cudaStream_t stream);

// After hx = hc @ w_hr^T (projection): rows past their end keep hp; the others go to y.
cudaError_t rnn_proj_forward_fix(const RnnShape& d, int64_t s, void* hx, const void* hp, void* y,
                                 cudaStream_t stream);

// Backward: dr (B, P) = gradient of the projected h at step s (0 past the row's end).
cudaError_t rnn_proj_backward_in(const RnnShape& d, int64_t s, void* dr, const void* dhh, const void* dhT,
                                 const void* dy, cudaStream_t stream);

// One backward step. dgs (B, G*H) gradients of the pre-activations (step order); dgi
// (T*B, G*H) the same in time order (gru: the n gate without r; written when separate);
// dhh (B, P) gradient into h from the step after (gru: overwritten with dh * z); dhT
// (B, P); dy (T, B, P); dhc (B, H) gradient of o*tanh(c) when projecting; dcc (B, H) lstm
// cell gradient, updated in place; gates/hn (B, ...) of step s; c (T+1, B, H); h (T+1, B, P).
struct RnnBackwardStep {
  void* dgs;
  void* dgi;
  void* dhh;
  const void* dhT;
  const void* dy;
  const void* dhc;
  void* dcc;
  const void* gates;
  const void* c;
  const void* h;
  const void* hn;
  bool separate;
};
cudaError_t rnn_backward_step(const RnnShape& d, int64_t s, const RnnBackwardStep& a, cudaStream_t stream);

// Whole forward in one cooperative launch for small batches: each block keeps its slice of
// W_hh in shared memory for all steps, and the blocks meet at a grid-wide barrier (an
// atomic counter, zeroed by the caller) after every step. h (T+1 or 2, B, P) states, h[0]
// set; c likewise for lstm; gates (T, B, G*H) and hn (T, B, H) when save (else nullptr);
// w_hh (G*H, P). Returns cudaErrorNotSupported when the shape does not suit it
// (projection, B > 16, too little shared memory, not enough co-resident blocks): the
// caller then runs the per-step path.
struct RnnPersistentForward {
  const void* xw;
  const void* w_hh;
  const void* b_hn;
  void* h;
  void* c;
  void* gates;
  void* hn;
  void* y;
  unsigned int* barrier;
  bool save;
};
bool rnn_persistent_supported(const RnnShape& d);
cudaError_t rnn_persistent_forward(const RnnShape& d, const RnnPersistentForward& a, cudaStream_t stream);

}  // namespace seqkern::cuda
