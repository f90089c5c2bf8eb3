#include "state_gather_args.h"

namespace mamba_adaptor {

namespace {

StateGatherParams check_inputs(const ArgChecker& check, Backend backend, const Tensor& h, const Tensor& offsets,
                               const Tensor& weights, bool residual) {
  check.rank(h, "h", 4, "(b, S, D, L)");
  check.floating(h, "h");
  check.on(backend, h, "h");
  check.rank(offsets, "offsets", 4, "(b, S, K, L)");
  const int64_t n_points = offsets.size(2);
  check.check(n_points >= 1, "expected `offsets` to have K >= 1 points, but got shape ", shape_str(offsets));
  check.shape(offsets, "offsets", {h.size(0), h.size(1), n_points, h.size(3)}, "(b, S, K, L), b, S, L as in h");
  check.dtype(offsets, "offsets", h.scalar_type(), "the dtype of h");
  check.same_device(offsets, "offsets", h, "h");
  check.shape(weights, "weights", sizes_of(offsets), "(b, S, K, L), like offsets");
  check.dtype(weights, "weights", h.scalar_type(), "the dtype of h");
  check.same_device(weights, "weights", h, "h");

  StateGatherParams p{};
  p.dtype = to_dtype(h.scalar_type());
  p.batch = h.size(0);
  p.n_seq = h.size(1);
  p.dim = h.size(2);
  p.seqlen = h.size(3);
  p.n_points = n_points;
  p.residual = residual;
  p.offsets = offsets.data_ptr();
  p.weights = weights.data_ptr();
  for (int64_t i = 0; i < 4; ++i) {
    p.offsets_strides[i] = stride_or_zero(offsets, i);
    p.weights_strides[i] = stride_or_zero(weights, i);
  }
  return p;
}

}  // namespace

StateGatherCall state_gather_call(Backend backend, const Tensor& h, const Tensor& offsets, const Tensor& weights,
                                  bool residual) {
  StateGatherParams p = check_inputs(ArgChecker("state_gather"), backend, h, offsets, weights, residual);
  Tensor hc = torch::stable::contiguous(h);
  Tensor out = torch::stable::new_empty(hc, sizes_of(hc));
  p.h = hc.data_ptr();
  p.out = out.data_ptr();
  return StateGatherCall{p, out, {hc, offsets, weights}};
}

StateGatherBwdCall state_gather_bwd_call(Backend backend, const Tensor& grad_out, const Tensor& h,
                                         const Tensor& offsets, const Tensor& weights, bool residual,
                                         bool deterministic) {
  const ArgChecker check("state_gather_backward");
  StateGatherBwdCall call{};
  call.params.fwd = check_inputs(check, backend, h, offsets, weights, residual);
  check.shape(grad_out, "grad_out", sizes_of(h), "(b, S, D, L), like h");
  check.dtype(grad_out, "grad_out", h.scalar_type(), "the dtype of h");
  check.same_device(grad_out, "grad_out", h, "h");
  Tensor hc = torch::stable::contiguous(h);
  Tensor grad = torch::stable::contiguous(grad_out);
  call.grad_h = torch::stable::new_empty(hc, sizes_of(hc));
  call.grad_offsets = torch::stable::new_empty(hc, sizes_of(offsets));
  call.grad_weights = torch::stable::new_empty(hc, sizes_of(offsets));
  call.params.fwd.h = hc.data_ptr();
  call.params.grad_out = grad.data_ptr();
  call.params.deterministic = deterministic;
  call.params.grad_h = call.grad_h.data_ptr();
  call.params.grad_offsets = call.grad_offsets.data_ptr();
  call.params.grad_weights = call.grad_weights.data_ptr();
  call.keep_alive = {hc, grad, offsets, weights};
  return call;
}

}  // namespace mamba_adaptor
