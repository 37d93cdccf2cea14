// Op schemas and bindings of the recurrent family (rnn / lstm / gru): argument checks,
// then the CPU kernels (csrc/cpu/rnn.cpp) or, for CUDA tensors, the CUDA kernels.
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
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
                                         const at::Tensor& ws, c10::List<bool> need_l) {
  const Cell cell = parse_mode(mode);
  const Dims d = check_inputs(cell, x, h0, opt(c0), w_ih, w_hh, opt(b_ih), opt(b_hh), opt(w_hr), opt(lengths));
  std::vector<bool> need(need_l.begin(), need_l.end());
  check_grads(cell, d, x, dy, dh, opt(dc), ws, true, need);
  check_lengths_values(opt(lengths), d.T);
  return seqkern::cpu::rnn_backward(cell, dy, dh, opt(dc), x, h0, opt(c0), w_ih, w_hh, opt(b_ih), opt(b_hh),
                                    opt(w_hr), opt(lengths), reverse, ws, need);
}


// ---------------------------------------------------------------------------
// One step with its autograd node in C++ (the cells' eager path, seqkern/ops/rnn.py cell_eager):
// a Python autograd.Function costs tens of microseconds a call, more than the step at small
// batch. torch.compile and torch.func keep the registered custom op (seqkern::rnn_forward).
// x (B, I) or (1, B, I); returns [h'] or, for lstm, [h', c'].
// ---------------------------------------------------------------------------

at::Tensor as_step(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 || (x.dim() == 3 && x.size(0) == 1), "x must have shape (B, I) or (1, B, I), got ",
              x.sizes());
  return x.dim() == 2 ? x.unsqueeze(0) : x;
}

std::vector<at::Tensor> step_forward(Cell cell, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                                     const at::Tensor& b_hh, bool save, at::Tensor* ws) {
  const at::Tensor x3 = as_step(x);
  check_inputs(cell, x3, h, c, w_ih, w_hh, b_ih, b_hh, at::Tensor(), at::Tensor());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x: the cpu backend supports float32 and float64, got ", x.scalar_type());
  TORCH_CHECK(w_hh.size(1) == w_hh.size(0) / gates_of(cell), "w_hh must have shape (G * H, H), got ", w_hh.sizes());
  auto [y, h1, c1, w] = seqkern::cpu::rnn_forward(cell, x3, h, c, w_ih, w_hh, b_ih, b_hh, at::Tensor(), at::Tensor(),
                                                  false, save);
  if (ws) *ws = w;
  if (cell == Cell::kLSTM) return {h1, c1};
  return {h1};
}

// The step by the equations in ATen ops, differentiable: a create_graph backward (gradient
// penalties, MAML) differentiates it, as the op's backward does with the Python reference.
at::Tensor linear_of(const at::Tensor& a, const at::Tensor& w, const at::Tensor& b) {
  at::Tensor y = at::matmul(a, w.t());
  return b.defined() ? y + b : y;
}

torch::autograd::variable_list step_reference_grads(Cell cell, const at::Tensor& dh, const at::Tensor& dc,
                                                    const torch::autograd::variable_list& ins,
                                                    const std::vector<bool>& need) {
  // aliases of the inputs: the gradient taken with respect to each is its own partial
  // derivative, not also the paths through other inputs computed from it (c = f(h))
  torch::autograd::variable_list v;
  for (const auto& t : ins) v.push_back(t.defined() ? t.view_as(t) : t);
  const at::Tensor &x = v[0], &h = v[1], &c = v[2];
  const at::Tensor gi = linear_of(x, v[3], v[5]), gh = linear_of(h, v[4], v[6]);
  at::Tensor h1, c1;
  if (cell == Cell::kLSTM) {
    const auto g = (gi + gh).chunk(4, 1);
    c1 = at::sigmoid(g[1]) * c + at::sigmoid(g[0]) * at::tanh(g[2]);
    h1 = at::sigmoid(g[3]) * at::tanh(c1);
  } else if (cell == Cell::kGRU) {
    const auto a = gi.chunk(3, 1), b = gh.chunk(3, 1);
    const at::Tensor r = at::sigmoid(a[0] + b[0]), z = at::sigmoid(a[1] + b[1]);
    const at::Tensor n = at::tanh(a[2] + r * b[2]);
    h1 = (1 - z) * n + z * h;
  } else {
    h1 = cell == Cell::kRNNTanh ? at::tanh(gi + gh) : at::relu(gi + gh);
  }
  torch::autograd::variable_list outs, gos, wrt;
  if (dh.defined() && h1.requires_grad()) outs.push_back(h1), gos.push_back(dh);
  if (dc.defined() && c1.defined() && c1.requires_grad()) outs.push_back(c1), gos.push_back(dc);
  for (size_t i = 0; i < v.size(); ++i)
    if (need[i] && v[i].defined()) wrt.push_back(v[i]);
  torch::autograd::variable_list got;
  if (!outs.empty() && !wrt.empty())
    got = torch::autograd::grad(outs, wrt, gos, /*retain_graph=*/true, /*create_graph=*/true, /*allow_unused=*/true);
  torch::autograd::variable_list res(v.size());
  size_t k = 0;
  for (size_t i = 0; i < v.size(); ++i) {
    if (!(need[i] && v[i].defined())) continue;
    const at::Tensor g = k < got.size() ? got[k] : at::Tensor();
    ++k;
    res[i] = g.defined() ? g : at::zeros_like(ins[i]);
  }
  return res;
}

struct CellStep : public torch::autograd::Function<CellStep> {
  // forward's arguments: mode, x, h, c?, w_ih, w_hh, b_ih?, b_hh?, auto (the backend chosen
  // automatically: a create_graph backward may then fall back to the differentiable equations)
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const std::string& mode,
                                                const at::Tensor& x, const at::Tensor& h, const OptT& c,
                                                const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih,
                                                const OptT& b_hh, bool autosel) {
    const Cell cell = parse_mode(mode);
    at::Tensor ws;
    auto out = step_forward(cell, x, h, opt(c), w_ih, w_hh, opt(b_ih), opt(b_hh), true, &ws);
    ctx->saved_data["cell"] = static_cast<int64_t>(cell);
    ctx->saved_data["auto"] = autosel;
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, h, opt(c), w_ih, w_hh, opt(b_ih), opt(b_hh), ws});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const Cell cell = static_cast<Cell>(ctx->saved_data["cell"].toInt());
    const bool lstm = cell == Cell::kLSTM;
    const at::Tensor dh = grads[0], dc = lstm ? grads[1] : at::Tensor();
    // needs_input_grad counts the tensor arguments that were given (x, h, c?, w_ih, w_hh, b_ih?, b_hh?)
    std::vector<bool> need(8, false);
    size_t edge = 0;
    for (int i = 0; i < 7; ++i)
      if (s[i].defined()) need[i] = ctx->needs_input_grad(edge++);
    torch::autograd::variable_list ins(s.begin(), s.begin() + 7), g;
    if (at::GradMode::is_enabled()) {  // create_graph
      TORCH_CHECK(ctx->saved_data["auto"].toBool(), "seqkern ",
                  lstm ? "lstm" : cell == Cell::kGRU ? "gru" : cell == Cell::kRNNTanh ? "rnn_tanh" : "rnn_relu",
                  ": backend 'cpu' does not support double backward (its backward is a fused kernel); call it with "
                  "backend='reference' for higher-order gradients");
      g = step_reference_grads(cell, dh, dc, ins, need);
    } else {
      const at::Tensor& x = s[0];
      g = seqkern::cpu::rnn_cell_backward(cell, dh, dc, x, s[3], s[4], s[5].defined(), s[6].defined(), s[7], need);
      for (int i = 0; i < 7; ++i)
        if (!need[i]) g[i] = at::Tensor();
      g.resize(7);
    }
    // one entry per forward argument: mode, x, h, c, w_ih, w_hh, b_ih, b_hh, auto
    torch::autograd::variable_list res{at::Tensor()};
    res.insert(res.end(), g.begin(), g.end());
    res.push_back(at::Tensor());
    return res;
  }
};

std::vector<at::Tensor> rnn_cell_autograd(const std::string& mode, const at::Tensor& x, const at::Tensor& h,
                                          const OptT& c, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const OptT& b_ih, const OptT& b_hh, bool autosel) {
  return CellStep::apply(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, autosel);
}

// Below autograd (no input needs a gradient, or inference mode): the step without its workspace.
std::vector<at::Tensor> rnn_cell_cpu(const std::string& mode, const at::Tensor& x, const at::Tensor& h, const OptT& c,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh, const OptT& b_ih,
                                     const OptT& b_hh, bool autosel) {
  (void)autosel;
  return step_forward(parse_mode(mode), x, h, opt(c), w_ih, w_hh, opt(b_ih), opt(b_hh), false, nullptr);
}


#ifdef SEQKERN_WITH_CUDA
// CUDA: the GEMMs through ATen (cuBLAS) into preallocated buffers, the elementwise work
// of each step in the fused kernels of csrc/cuda/rnn.cu; small batches run the whole
// forward in one persistent cooperative launch when the device allows it.
namespace cu = seqkern::cuda;

void cuda_ok(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "seqkern rnn CUDA kernel (", what, ") failed: ", cudaGetErrorString(err));
}

// Named views of the flat workspace (layout: seqkern/ops/rnn.py workspace_numel).
struct WsViews {
  at::Tensor gates, c, h, hc, hn;
};

WsViews ws_views(Cell cell, const at::Tensor& ws, int64_t T, int64_t B, int64_t H, int64_t P) {
  WsViews v;
  int64_t off = 0;
  auto take = [&](at::IntArrayRef shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    at::Tensor t = ws.narrow(0, off, n).view(shape);
    off += n;
    return t;
  };
  if (cell == Cell::kLSTM) {
    v.gates = take({T, B, 4 * H});
    v.c = take({T + 1, B, H});
    v.h = take({T + 1, B, P});
    if (P < H) v.hc = take({T, B, H});
  } else if (cell == Cell::kGRU) {
    v.gates = take({T, B, 3 * H});
    v.hn = take({T, B, H});
    v.h = take({T + 1, B, H});
  } else {
    v.h = take({T + 1, B, H});
  }
  return v;
}

void* ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

Fwd rnn_forward_cuda(const std::string& mode, const at::Tensor& x_, const at::Tensor& h0, const OptT& c0,
                     const at::Tensor& w_ih_, const at::Tensor& w_hh_, const OptT& b_ih, const OptT& b_hh,
                     const OptT& w_hr_, const OptT& lengths_, bool reverse, bool save) {
  const Cell cell = parse_mode(mode);
  const Dims d = check_inputs(cell, x_, h0, opt(c0), w_ih_, w_hh_, opt(b_ih), opt(b_hh), opt(w_hr_), opt(lengths_));
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor w_hr = opt(w_hr_).defined() ? opt(w_hr_).contiguous() : at::Tensor();
  const at::Tensor lengths = opt(lengths_).defined() ? opt(lengths_).contiguous() : at::Tensor();
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P, G = gates_of(cell);
  const bool proj = w_hr.defined();
  const auto o = x.options();
  at::Tensor bias;
  if (opt(b_ih).defined()) bias = opt(b_ih);
  if (opt(b_hh).defined()) {
    at::Tensor bh = opt(b_hh);
    if (cell == Cell::kGRU) bh = at::cat({bh.narrow(0, 0, 2 * H), at::zeros({H}, o)});
    bias = bias.defined() ? bias + bh : bh;
  }
  const at::Tensor x2 = x.view({T * B, d.I});
  const at::Tensor xw = (bias.defined() ? at::addmm(bias, x2, w_ih.t()) : at::mm(x2, w_ih.t())).contiguous();
  const at::Tensor b_hn = (cell == Cell::kGRU && opt(b_hh).defined()) ? opt(b_hh).narrow(0, 2 * H, H).contiguous()
                                                                      : at::zeros({H}, o);
  at::Tensor ws = at::empty({seqkern::cpu::workspace_numel(cell, T, B, H, P, save)}, o);
  at::Tensor hbuf, cbuf, gbuf, hcbuf, hnbuf;
  if (save) {
    WsViews v = ws_views(cell, ws, T, B, H, P);
    hbuf = v.h; cbuf = v.c; gbuf = v.gates; hcbuf = v.hc; hnbuf = v.hn;
  } else {
    hbuf = at::empty({2, B, P}, o);
    if (cell == Cell::kLSTM) cbuf = at::empty({2, B, H}, o);
    if (cell == Cell::kLSTM || cell == Cell::kGRU) gbuf = at::empty({1, B, G * H}, o);
    if (proj) hcbuf = at::empty({1, B, H}, o);
    if (cell == Cell::kGRU) hnbuf = at::empty({1, B, H}, o);
  }
  hbuf[0].copy_(h0);
  if (cbuf.defined()) cbuf[0].copy_(opt(c0));
  at::Tensor y = at::empty({T, B, P}, o);
  const auto slot = [&](int64_t s) { return save ? s : (s & 1); };
  const auto one = [&](int64_t s) { return save ? s : int64_t(0); };
  cu::RnnShape shape{static_cast<int>(cell), cuda_dtype(x, "x"), T, B, H, P, proj, reverse,
                     lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  bool done = false;
  if (T > 0 && cu::rnn_persistent_supported(shape)) {
    at::Tensor barrier = at::zeros({1}, o.dtype(at::kInt));
    cu::RnnPersistentForward a{xw.data_ptr(), w_hh.data_ptr(), b_hn.data_ptr(), hbuf.data_ptr(), ptr(cbuf),
                               save ? ptr(gbuf) : nullptr, save ? ptr(hnbuf) : nullptr, y.data_ptr(),
                               reinterpret_cast<unsigned int*>(barrier.data_ptr<int>()), save};
    const cudaError_t err = cu::rnn_persistent_forward(shape, a, stream);
    if (err == cudaSuccess) done = true;
    else if (err != cudaErrorNotSupported) cuda_ok(err, "persistent forward");
    else (void)cudaGetLastError();  // not this device or shape: clear it and take the per-step path
  }
  for (int64_t s = 0; s < T && !done && B > 0; ++s) {
    at::Tensor hp = hbuf[slot(s)], hx = hbuf[slot(s + 1)];
    at::Tensor g = gbuf.defined() ? gbuf[one(s)] : hx;
    at::mm_out(g, hp, w_hh.t());
    at::Tensor hc = proj ? hcbuf[one(s)] : at::Tensor();
    cu::RnnForwardStep a{g.data_ptr(), xw.data_ptr(), hp.data_ptr(), hx.data_ptr(),
                         cbuf.defined() ? cbuf[slot(s)].data_ptr() : nullptr,
                         cbuf.defined() ? cbuf[slot(s + 1)].data_ptr() : nullptr, ptr(hc),
                         hnbuf.defined() ? hnbuf[one(s)].data_ptr() : nullptr, b_hn.data_ptr(), y.data_ptr()};
    cuda_ok(cu::rnn_forward_step(shape, s, a, stream), "forward step");
    if (proj) {
      at::mm_out(hx, hc, w_hr.t());
      cuda_ok(cu::rnn_proj_forward_fix(shape, s, hx.data_ptr(), hp.data_ptr(), y.data_ptr(), stream), "projection");
    }
  }
  at::Tensor hT = hbuf[slot(T)].clone();
  at::Tensor cT = cell == Cell::kLSTM ? cbuf[slot(T)].clone() : at::empty({0}, o);
  return {y, hT, cT, ws};
}

std::vector<at::Tensor> rnn_backward_cuda(const std::string& mode, const at::Tensor& dy_, const at::Tensor& dh_,
                                          const OptT& dc, const at::Tensor& x_, const at::Tensor& h0, const OptT& c0,
                                          const at::Tensor& w_ih_, const at::Tensor& w_hh_, const OptT& b_ih,
                                          const OptT& b_hh, const OptT& w_hr_, const OptT& lengths_, bool reverse,
                                          const at::Tensor& ws_, c10::List<bool> need_l) {
  const Cell cell = parse_mode(mode);
  const Dims d = check_inputs(cell, x_, h0, opt(c0), w_ih_, w_hh_, opt(b_ih), opt(b_hh), opt(w_hr_), opt(lengths_));
  std::vector<bool> need(need_l.begin(), need_l.end());
  check_grads(cell, d, x_, dy_, dh_, opt(dc), ws_, true, need);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor dy = dy_.contiguous(), dhT = dh_.contiguous(), ws = ws_.contiguous();
  const at::Tensor w_hr = opt(w_hr_).defined() ? opt(w_hr_).contiguous() : at::Tensor();
  const at::Tensor lengths = opt(lengths_).defined() ? opt(lengths_).contiguous() : at::Tensor();
  const int64_t T = d.T, B = d.B, H = d.H, P = d.P, G = gates_of(cell), GH = G * H;
  const bool proj = w_hr.defined(), gru = cell == Cell::kGRU;
  const auto o = x.options();
  WsViews v = ws_views(cell, ws, T, B, H, P);
  const bool separate = gru || reverse;
  at::Tensor dgh = at::empty({T, B, GH}, o);
  at::Tensor dgi = separate ? at::empty({T, B, GH}, o) : dgh;
  at::Tensor dhh = at::zeros({B, P}, o);
  at::Tensor dcc = cell == Cell::kLSTM ? opt(dc).contiguous().clone() : at::Tensor();
  at::Tensor dr = proj ? at::empty({T, B, P}, o) : at::Tensor();
  at::Tensor dhc = proj ? at::empty({B, H}, o) : at::Tensor();
  cu::RnnShape shape{static_cast<int>(cell), cuda_dtype(x, "x"), T, B, H, P, proj, reverse,
                     lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t s = T - 1; s >= 0 && B > 0; --s) {
    if (proj) {
      cuda_ok(cu::rnn_proj_backward_in(shape, s, dr[s].data_ptr(), dhh.data_ptr(), dhT.data_ptr(), dy.data_ptr(),
                                       stream), "projection backward");
      at::mm_out(dhc, dr[s], w_hr);
    }
    at::Tensor dgs = dgh[s];
    cu::RnnBackwardStep a{dgs.data_ptr(), dgi.data_ptr(), dhh.data_ptr(), dhT.data_ptr(), dy.data_ptr(), ptr(dhc),
                          ptr(dcc), v.gates.defined() ? v.gates[s].data_ptr() : nullptr, ptr(v.c), v.h.data_ptr(),
                          v.hn.defined() ? v.hn[s].data_ptr() : nullptr, separate};
    cuda_ok(cu::rnn_backward_step(shape, s, a, stream), "backward step");
    if (gru) dhh.addmm_(dgs, w_hh);  // the kernel left dh * z there
    else at::mm_out(dhh, dgs, w_hh);
  }
  std::vector<at::Tensor> out(8);
  for (auto& t : out) t = at::empty({0}, o);
  const at::Tensor dgi2 = dgi.view({T * B, GH}), dgh2 = dgh.view({T * B, GH});
  if (need[0]) out[0] = at::mm(dgi2, w_ih).view({T, B, d.I});
  if (need[1]) {
    if (lengths.defined()) out[1] = at::where((lengths > 0).unsqueeze(1), dhh, dhT);
    else out[1] = T > 0 ? dhh : dhT.clone();
  }
  if (need[2] && cell == Cell::kLSTM) out[2] = dcc;
  if (need[3]) out[3] = at::mm(dgi2.t(), x.view({T * B, d.I}));
  if (need[4]) out[4] = at::mm(dgh2.t(), v.h.narrow(0, 0, T).reshape({T * B, P}));
  if (need[5] && opt(b_ih).defined()) out[5] = dgi2.sum(0);
  if (need[6] && opt(b_hh).defined()) out[6] = dgh2.sum(0);
  if (need[7] && proj) out[7] = at::mm(dr.view({T * B, P}).t(), v.hc.view({T * B, H}));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqkern_C, m) {
  m.def(
      "rnn_forward(str mode, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor? w_hr, Tensor? lengths, bool reverse, bool save) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_backward(str mode, Tensor dy, Tensor dh, Tensor? dc, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor ws, "
      "bool[] need) -> Tensor[]");
  m.def(
      "rnn_cell(str mode, Tensor x, Tensor h, Tensor? c, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "bool auto) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(seqkern_C, CPU, m) {
  m.impl("rnn_forward", &rnn_forward_cpu);
  m.impl("rnn_backward", &rnn_backward_cpu);
  m.impl("rnn_cell", &rnn_cell_cpu);
}

TORCH_LIBRARY_IMPL(seqkern_C, AutogradCPU, m) { m.impl("rnn_cell", &rnn_cell_autograd); }

#ifdef SEQKERN_WITH_CUDA
TORCH_LIBRARY_IMPL(seqkern_C, CUDA, m) {
  m.impl("rnn_forward", &rnn_forward_cuda);
  m.impl("rnn_backward", &rnn_backward_cuda);
}
#endif
