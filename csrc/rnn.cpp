// Op schemas and bindings of the recurrent family (rnn / lstm / gru): argument checks,
// then the CPU kernels (csrc/cpu/rnn.cpp) or, for CUDA tensors, the CUDA kernels.
#include <torch/library.h>

#include <optional>
#include <string>

#include "checks.h"
#include "cpu/rnn.h"
#ifdef SEQKERN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/rnn.h"
#endif

namespace {

using seqkern::cpu::Cell;
using OptT = std::optional<at::Tensor>;

Cell parse_mode(const std::string& mode) {
  if (mode == "lstm") return Cell::kLSTM;
  if (mode == "gru") return Cell::kGRU;
  if (mode == "rnn_tanh") return Cell::kRNNTanh;
  if (mode == "rnn_relu") return Cell::kRNNRelu;
  TORCH_CHECK(false, "mode must be one of lstm, gru, rnn_tanh, rnn_relu; got '", mode, "'");
}

int64_t gates_of(Cell c) { return c == Cell::kLSTM ? 4 : c == Cell::kGRU ? 3 : 1; }

at::Tensor opt(const OptT& t) { return t.has_value() ? *t : at::Tensor(); }

struct Dims {
  int64_t T, B, I, H, P;
};

// Every shape, dtype and device the kernels rely on; messages name the argument.
Dims check_inputs(Cell cell, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                  const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_hr,
                  const at::Tensor& lengths) {
  const int64_t G = gates_of(cell);
  SEQKERN_CHECK_DIM(x, 3);
  SEQKERN_CHECK_DIM(w_ih, 2);
  SEQKERN_CHECK_DIM(w_hh, 2);
  SEQKERN_CHECK_DIM(h0, 2);
  SEQKERN_CHECK_FLOAT(x);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  TORCH_CHECK(w_hh.size(0) > 0 && w_hh.size(0) % G == 0, "w_hh.size(0) must be a positive multiple of ", G,
              ", got shape ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / G;
  int64_t P = H;
  if (w_hr.defined()) {
    TORCH_CHECK(cell == Cell::kLSTM, "w_hr (projection) is only defined for lstm");
    SEQKERN_CHECK_DIM(w_hr, 2);
    TORCH_CHECK(w_hr.size(1) == H && w_hr.size(0) > 0 && w_hr.size(0) < H, "w_hr must have shape (proj_size, H=", H,
                ") with 0 < proj_size < H, got ", w_hr.sizes());
    P = w_hr.size(0);
    SEQKERN_CHECK_SAME(w_hr, x);
  }
  TORCH_CHECK(w_hh.size(1) == P, "w_hh must have shape (", G * H, ", ", P, "), got ", w_hh.sizes());
  TORCH_CHECK(w_ih.size(0) == G * H && w_ih.size(1) == I, "w_ih must have shape (", G * H, ", I=", I, "), got ",
              w_ih.sizes());
  TORCH_CHECK(h0.size(0) == B && h0.size(1) == P, "h0 must have shape (B, ", P, ") = (", B, ", ", P, "), got ",
              h0.sizes());
  SEQKERN_CHECK_SAME(h0, x);
  SEQKERN_CHECK_SAME(w_ih, x);
  SEQKERN_CHECK_SAME(w_hh, x);
  if (cell == Cell::kLSTM) {
    TORCH_CHECK(c0.defined(), "c0 is required for lstm");
    SEQKERN_CHECK_DIM(c0, 2);
    TORCH_CHECK(c0.size(0) == B && c0.size(1) == H, "c0 must have shape (B, H) = (", B, ", ", H, "), got ",
                c0.sizes());
    SEQKERN_CHECK_SAME(c0, x);
  }
  if (b_ih.defined()) {
    TORCH_CHECK(b_ih.dim() == 1 && b_ih.size(0) == G * H, "b_ih must have shape (", G * H, ",), got ", b_ih.sizes());
    SEQKERN_CHECK_SAME(b_ih, x);
  }
  if (b_hh.defined()) {
    TORCH_CHECK(b_hh.dim() == 1 && b_hh.size(0) == G * H, "b_hh must have shape (", G * H, ",), got ", b_hh.sizes());
    SEQKERN_CHECK_SAME(b_hh, x);
  }
  if (lengths.defined()) {
    TORCH_CHECK(lengths.scalar_type() == at::kLong, "lengths must be int64, got ", lengths.scalar_type());
    TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, "lengths must have shape (B,) = (", B, ",), got ",
                lengths.sizes());
    TORCH_CHECK(lengths.device() == x.device(), "lengths is on ", lengths.device(), " but x is on ", x.device());
  }
  return Dims{T, B, I, H, P};
}

void check_lengths_values(const at::Tensor& lengths, int64_t T) {
  if (!lengths.defined() || lengths.numel() == 0) return;
  const bool ok = ((lengths >= 0) & (lengths <= T)).all().item<bool>();
  TORCH_CHECK(ok, "lengths must lie in [0, T=", T, "]");
}

void check_grads(Cell cell, const Dims& d, const at::Tensor& x, const at::Tensor& dy, const at::Tensor& dh,
                 const at::Tensor& dc, const at::Tensor& ws, bool save_expected, const std::vector<bool>& need) {
  TORCH_CHECK(need.size() == 8, "need must have 8 entries (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), got ",
              need.size());
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == d.T && dy.size(1) == d.B && dy.size(2) == d.P,
              "dy must have shape (T, B, P) = (", d.T, ", ", d.B, ", ", d.P, "), got ", dy.sizes());
  TORCH_CHECK(dh.dim() == 2 && dh.size(0) == d.B && dh.size(1) == d.P, "dh must have shape (", d.B, ", ", d.P,
              "), got ", dh.sizes());
  SEQKERN_CHECK_SAME(dy, x);
  SEQKERN_CHECK_SAME(dh, x);
  if (cell == Cell::kLSTM) {
    TORCH_CHECK(dc.defined() && dc.dim() == 2 && dc.size(0) == d.B && dc.size(1) == d.H, "dc must have shape (",
                d.B, ", ", d.H, ")");
    SEQKERN_CHECK_SAME(dc, x);
  }
  const int64_t n = seqkern::cpu::workspace_numel(cell, d.T, d.B, d.H, d.P, save_expected);
  TORCH_CHECK(ws.dim() == 1 && ws.numel() == n, "ws must be the workspace of the forward (", n,
              " elements; run the forward with save=True), got shape ", ws.sizes());
  SEQKERN_CHECK_SAME(ws, x);
}

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Fwd rnn_forward_cpu(const std::string& mode, const at::Tensor& x, const at::Tensor& h0, const OptT& c0,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih, const OptT& b_hh,
                    const OptT& w_hr, const OptT& lengths, bool reverse, bool save) {
  const Cell cell = parse_mode(mode);
  const Dims d = check_inputs(cell, x, h0, opt(c0), w_ih, w_hh, opt(b_ih), opt(b_hh), opt(w_hr), opt(lengths));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x: the cpu backend supports float32 and float64, got ", x.scalar_type());
  check_lengths_values(opt(lengths), d.T);
  return seqkern::cpu::rnn_forward(cell, x, h0, opt(c0), w_ih, w_hh, opt(b_ih), opt(b_hh), opt(w_hr), opt(lengths),
                                   reverse, save);
}

std::vector<at::Tensor> rnn_backward_cpu(const std::string& mode, const at::Tensor& dy, const at::Tensor& dh,
                                         const OptT& dc, const at::Tensor& x, const at::Tensor& h0, const OptT& c0,
                                         const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih,
                                         const OptT& b_hh, const OptT& w_hr, const OptT& lengths, bool reverse,
                                         const at::Tensor& y, const at::Tensor& ws, c10::List<bool> need_l) {
  (void)y;
  const Cell cell = parse_mode(mode);
  const Dims d = check_inputs(cell, x, h0, opt(c0), w_ih, w_hh, opt(b_ih), opt(b_hh), opt(w_hr), opt(lengths));
  std::vector<bool> need(need_l.begin(), need_l.end());
  check_grads(cell, d, x, dy, dh, opt(dc), ws, true, need);
  check_lengths_values(opt(lengths), d.T);
  return seqkern::cpu::rnn_backward(cell, dy, dh, opt(dc), x, h0, opt(c0), w_ih, w_hh, opt(b_ih), opt(b_hh),
                                    opt(w_hr), opt(lengths), reverse, ws, need);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqkern_C, m) {
  m.def(
      "rnn_forward(str mode, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? w_hr, Tensor? lengths, bool reverse, bool save) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_backward(str mode, Tensor dy, Tensor dh, Tensor? dc, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor y, Tensor ws, "
      "bool[] need) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  m.impl("rnn_forward", &rnn_forward_cpu);
  m.impl("rnn_backward", &rnn_backward_cpu);
}
