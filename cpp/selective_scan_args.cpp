#include "selective_scan_args.h"

namespace mamba_adaptor {

namespace {

constexpr const char* kOp = "selective_scan";

// A, D and delta_bias are float32, or float64 with float64 inputs.
ScalarType weight_dtype(ScalarType dtype) { return dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float; }

struct Checked {
  Tensor u, delta, A, B;
  std::optional<Tensor> C, D, delta_bias;
  int64_t batch, dim, seqlen, dstate, n_groups;
};

Checked check_inputs(const ArgChecker& check, Backend backend, const Tensor& u, const Tensor& delta,
                     const Tensor& A, const Tensor& B, const std::optional<Tensor>& C,
                     const std::optional<Tensor>& D, const std::optional<Tensor>& delta_bias) {
  check.rank(u, "u", 3, "(b, dim, L)");
  check.floating(u, "u");
  check.on(backend, u, "u");
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2);
  const ScalarType wtype = weight_dtype(u.scalar_type());

  check.shape(delta, "delta", sizes_of(u), "(b, dim, L), like u");
  check.dtype(delta, "delta", u.scalar_type(), "the dtype of u");
  check.same_device(delta, "delta", u, "u");

  check.rank(A, "A", 2, "(dim, N)");
  check.check(A.size(0) == dim, "expected `A` to have shape (dim, N) with dim = ", dim,
              " (u.shape[1]), but got ", shape_str(A));
  check.check(A.size(1) >= 1, "expected `A` to have d_state N >= 1, but got shape ", shape_str(A));
  check.dtype(A, "A", wtype, "A is float32, float64 with float64 inputs");
  check.same_device(A, "A", u, "u");
  const int64_t dstate = A.size(1);

  check.rank(B, "B", 4, "(b, G, N, L)");
  const int64_t n_groups = B.size(1);
  check.check(n_groups >= 1 && dim % n_groups == 0, "expected `B` to have shape (b, G, N, L) with G >= 1 dividing dim = ",
              dim, ", but got G = ", n_groups, " (shape ", shape_str(B), ")");
  check.shape(B, "B", {batch, n_groups, dstate, seqlen}, "(b, G, N, L)");
  check.dtype(B, "B", u.scalar_type(), "the dtype of u");
  check.same_device(B, "B", u, "u");

  if (C) {
    check.shape(*C, "C", sizes_of(B), "(b, G, N, L), like B");
    check.dtype(*C, "C", u.scalar_type(), "the dtype of u");
    check.same_device(*C, "C", u, "u");
  } else {
    check.check(!D.has_value(), "`D` must be None when `C` is None (states mode returns the hidden states)");
  }
  for (const auto& [t, name] : {std::pair{&D, "D"}, std::pair{&delta_bias, "delta_bias"}}) {
    if (!t->has_value()) continue;
    check.shape(**t, name, {dim}, "(dim,)");
    check.dtype(**t, name, wtype, "float32, float64 with float64 inputs");
    check.same_device(**t, name, u, "u");
  }

  auto contiguous = [](const std::optional<Tensor>& t) -> std::optional<Tensor> {
    return t ? std::optional<Tensor>(torch::stable::contiguous(*t)) : std::nullopt;
  };
  return Checked{with_unit_last_stride(u),
                 with_unit_last_stride(delta),
                 A,
                 with_unit_last_stride(B),
                 C ? std::optional<Tensor>(with_unit_last_stride(*C)) : std::nullopt,
                 contiguous(D),
                 contiguous(delta_bias),
                 batch,
                 dim,
                 seqlen,
                 dstate,
                 n_groups};
}

SelectiveScanParams make_params(const Checked& in, bool delta_softplus) {
  SelectiveScanParams p{};
  p.dtype = to_dtype(in.u.scalar_type());
  p.batch = in.batch;
  p.dim = in.dim;
  p.seqlen = in.seqlen;
  p.dstate = in.dstate;
  p.n_groups = in.n_groups;
  p.delta_softplus = delta_softplus;
  p.states_mode = !in.C.has_value();
  p.u = in.u.data_ptr();
  p.u_batch_stride = stride_or_zero(in.u, 0);
  p.u_dim_stride = stride_or_zero(in.u, 1);
  p.delta = in.delta.data_ptr();
  p.delta_batch_stride = stride_or_zero(in.delta, 0);
  p.delta_dim_stride = stride_or_zero(in.delta, 1);
  p.A = in.A.data_ptr();
  p.A_dim_stride = stride_or_zero(in.A, 0);
  p.A_dstate_stride = stride_or_zero(in.A, 1);
  p.B = in.B.data_ptr();
  p.B_batch_stride = stride_or_zero(in.B, 0);
  p.B_group_stride = stride_or_zero(in.B, 1);
  p.B_dstate_stride = stride_or_zero(in.B, 2);
  if (in.C) {
    p.C = in.C->data_ptr();
    p.C_batch_stride = stride_or_zero(*in.C, 0);
    p.C_group_stride = stride_or_zero(*in.C, 1);
    p.C_dstate_stride = stride_or_zero(*in.C, 2);
  }
  p.D = in.D ? in.D->data_ptr() : nullptr;
  p.delta_bias = in.delta_bias ? in.delta_bias->data_ptr() : nullptr;
  return p;
}

std::vector<Tensor> keep_alive(const Checked& in) {
  std::vector<Tensor> kept{in.u, in.delta, in.A, in.B};
  for (const auto* t : {&in.C, &in.D, &in.delta_bias}) {
    if (*t) kept.push_back(**t);
  }
  return kept;
}

std::vector<int64_t> output_shape(const Checked& in) {
  if (in.C) return {in.batch, in.dim, in.seqlen};
  return {in.batch, in.dim, in.dstate, in.seqlen};
}

std::vector<int64_t> checkpoints_shape(const SelectiveScanParams& p) {
  return {p.batch, p.dim, selective_scan_num_checkpoints(p), p.dstate};
}

}  // namespace

SelectiveScanCall selective_scan_call(Backend backend, const Tensor& u, const Tensor& delta, const Tensor& A,
                                      const Tensor& B, const std::optional<Tensor>& C,
                                      const std::optional<Tensor>& D, const std::optional<Tensor>& delta_bias,
                                      bool delta_softplus, bool with_checkpoints) {
  const ArgChecker check(with_checkpoints ? "selective_scan_forward" : kOp);
  Checked in = check_inputs(check, backend, u, delta, A, B, C, D, delta_bias);
  SelectiveScanCall call{};
  call.params = make_params(in, delta_softplus);
  call.out = torch::stable::new_empty(in.u, output_shape(in));
  call.params.out = call.out.data_ptr();
  if (with_checkpoints) {
    call.checkpoints = torch::stable::new_empty(in.A, checkpoints_shape(call.params));
    call.params.checkpoints = call.checkpoints->data_ptr();
  }
  call.keep_alive = keep_alive(in);
  return call;
}

SelectiveScanBwdCall selective_scan_bwd_call(Backend backend, const Tensor& grad_out, const Tensor& u,
                                             const Tensor& delta, const Tensor& A, const Tensor& B,
                                             const std::optional<Tensor>& C, const std::optional<Tensor>& D,
                                             const std::optional<Tensor>& delta_bias, bool delta_softplus,
                                             bool deterministic, const std::optional<Tensor>& checkpoints) {
  const ArgChecker check("selective_scan_backward");
  Checked in = check_inputs(check, backend, u, delta, A, B, C, D, delta_bias);
  const auto out_shape = output_shape(in);
  check.shape(grad_out, "grad_out", out_shape, C ? "(b, dim, L), like y" : "(b, dim, N, L), like the states");
  check.dtype(grad_out, "grad_out", u.scalar_type(), "the dtype of u");
  check.same_device(grad_out, "grad_out", u, "u");
  Tensor grad = torch::stable::contiguous(grad_out);

  SelectiveScanBwdCall call{};
  call.params.fwd = make_params(in, delta_softplus);
  call.params.grad_out = grad.data_ptr();
  call.params.deterministic = deterministic;
  std::optional<Tensor> given_checkpoints;
  if (checkpoints) {
    check.shape(*checkpoints, "checkpoints", checkpoints_shape(call.params.fwd),
                "(b, dim, (L - 1) // S, N) (S = 256 for d_state 1 in 16-bit types, else 128)");
    check.dtype(*checkpoints, "checkpoints", A.scalar_type(), "the dtype of A");
    check.same_device(*checkpoints, "checkpoints", u, "u");
    given_checkpoints = torch::stable::contiguous(*checkpoints);
    call.params.checkpoints = given_checkpoints->data_ptr();
  }
  call.du = torch::stable::new_empty(in.u, sizes_of(in.u));
  call.ddelta = torch::stable::new_empty(in.u, sizes_of(in.u));
  call.dA = torch::stable::new_zeros(in.A, sizes_of(in.A));
  call.dB = torch::stable::new_empty(in.B, sizes_of(in.B));
  call.params.du = call.du.data_ptr();
  call.params.ddelta = call.ddelta.data_ptr();
  call.params.dA = call.dA.data_ptr();
  call.params.dB = call.dB.data_ptr();
  if (in.C) {
    call.dC = torch::stable::new_empty(in.B, sizes_of(in.B));
    call.params.dC = call.dC->data_ptr();
  }
  if (in.D) {
    call.dD = torch::stable::new_zeros(*in.D, {in.dim});
    call.params.dD = call.dD->data_ptr();
  }
  if (in.delta_bias) {
    call.ddelta_bias = torch::stable::new_zeros(*in.delta_bias, {in.dim});
    call.params.ddelta_bias = call.ddelta_bias->data_ptr();
  }
  call.keep_alive = keep_alive(in);
  call.keep_alive.push_back(grad);
  if (given_checkpoints) call.keep_alive.push_back(*given_checkpoints);
  return call;
}

}  // namespace mamba_adaptor
