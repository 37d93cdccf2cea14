#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace seqkern::cpu {

enum class Cell { kLSTM, kGRU, kRNNTanh, kRNNRelu };

// One recurrent layer in one direction (see seqkern/ops/rnn.py for the semantics and the
// workspace layout). Optional tensors (c0, biases, w_hr, lengths) may be undefined.
// Returns (y (T,B,P), h_T (B,P), c_T (B,H) or empty, workspace (flat, empty unless save)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_forward(
    Cell cell, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_hr,
    const at::Tensor& lengths, bool reverse, bool save);

// Gradients (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr); an entry whose `need` is false (or
// whose input is undefined) is an empty tensor.
std::vector<at::Tensor> rnn_backward(Cell cell, const at::Tensor& dy, const at::Tensor& dh, const at::Tensor& dc,
                                     const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
                                     const at::Tensor& b_hh, const at::Tensor& w_hr, const at::Tensor& lengths,
                                     bool reverse, const at::Tensor& ws, const std::vector<bool>& need);

// Backward of one step (T = 1, no lengths, no projection) from the gradients of h_1 and c_1
// (undefined: zeros); x (B, I) or (1, B, I), ws the forward's workspace (saved). Returns as
// rnn_backward, the gradient of x shaped like x.
std::vector<at::Tensor> rnn_cell_backward(Cell cell, const at::Tensor& dh, const at::Tensor& dc, const at::Tensor& x,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_b_ih, bool has_b_hh,
                                          const at::Tensor& ws, const std::vector<bool>& need);

// Number of elements of the forward's workspace (0 unless save).
int64_t workspace_numel(Cell cell, int64_t T, int64_t B, int64_t H, int64_t P, bool save);

}  // namespace seqkern::cpu
