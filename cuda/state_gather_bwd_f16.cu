// state_gather (Adaptor-T) backward kernels for float16; the kernels are in state_gather.cuh.
// Shapes: grad_out, h, grad_h (b, S, D, L) contiguous; offsets, weights (b, S, K, L), any strides;
// grad_offsets, grad_weights (b, S, K, L) contiguous; workspace: bucket_layout() in state_gather.cuh.
#include "state_gather.cuh"

namespace mamba_adaptor::cuda::state_gather {

template void launch_bwd<__half>(const StateGatherBwdParams&, cudaStream_t);

}  // namespace mamba_adaptor::cuda::state_gather
