// state_gather (Adaptor-T) forward kernels for float16; the kernels are in state_gather.cuh.
// Shapes: h, out (b, S, D, L) contiguous; offsets, weights (b, S, K, L), any strides.
#include "state_gather.cuh"

namespace mamba_adaptor::cuda::state_gather {

template void launch_fwd<__half>(const StateGatherParams&, cudaStream_t);

}  // namespace mamba_adaptor::cuda::state_gather
