// state_gather (Adaptor-T) CUDA launchers: dtype dispatch to the per-dtype instantiations of state_gather.cuh.
// Shapes: h (b, S, D, L); offsets, weights (b, S, K, L) (state_gather.h).
#include "state_gather.cuh"

namespace mamba_adaptor {

namespace cuda::state_gather {

extern template void launch_fwd<float>(const StateGatherParams&, cudaStream_t);
extern template void launch_fwd<__half>(const StateGatherParams&, cudaStream_t);
extern template void launch_fwd<__nv_bfloat16>(const StateGatherParams&, cudaStream_t);
extern template void launch_bwd<float>(const StateGatherBwdParams&, cudaStream_t);
extern template void launch_bwd<__half>(const StateGatherBwdParams&, cudaStream_t);
extern template void launch_bwd<__nv_bfloat16>(const StateGatherBwdParams&, cudaStream_t);

}  // namespace cuda::state_gather

void state_gather_fwd_cuda(const StateGatherParams& params, void* stream) {
  cuda::dispatch_dtype(params.dtype, "state_gather", [&](auto tag) {
    if (params.batch * params.n_seq * params.dim * params.seqlen == 0) return;
    cuda::state_gather::launch_fwd<decltype(tag)>(params, static_cast<cudaStream_t>(stream));
  });
}

void state_gather_bwd_cuda(const StateGatherBwdParams& params, void* stream) {
  const StateGatherParams& p = params.fwd;
  cuda::dispatch_dtype(p.dtype, "state_gather_backward", [&](auto tag) {
    if (p.batch * p.n_seq * p.n_points * p.seqlen == 0) return;  // every gradient is empty
    cuda::state_gather::launch_bwd<decltype(tag)>(params, static_cast<cudaStream_t>(stream));
  });
}

size_t state_gather_bwd_workspace_bytes(const StateGatherBwdParams& params) {
  const StateGatherParams& p = params.fwd;
  if (p.batch * p.n_seq * p.dim * p.n_points * p.seqlen == 0) return 0;  // no grad_h to compute
  return static_cast<size_t>(cuda::state_gather::bucket_layout(p, cuda::max_block_smem()).total);
}

}  // namespace mamba_adaptor
