// selective_scan CUDA entry points (declared in cpp/selective_scan.h): dtype dispatch to the per-dtype
// instantiations of selective_scan_kernels.cuh, and the size of the backward's workspace.
#include "selective_scan_kernels.cuh"

namespace mamba_adaptor {

namespace {

bool has_work(const SelectiveScanParams& p) { return p.batch > 0 && p.dim > 0 && p.seqlen > 0; }

}  // namespace

void selective_scan_fwd_cuda(const SelectiveScanParams& params, void* stream) {
  cuda::dispatch_dtype(params.dtype, "selective_scan", [&](auto tag) {
    if (!has_work(params)) return;
    cuda::scan::selective_scan_fwd_launch<decltype(tag)>(params, static_cast<cudaStream_t>(stream));
  });
}

void selective_scan_bwd_cuda(const SelectiveScanBwdParams& params, void* stream) {
  const SelectiveScanParams& p = params.fwd;
  cuda::dispatch_dtype(p.dtype, "selective_scan_backward", [&](auto tag) {
    using T = decltype(tag);
    auto cuda_stream = static_cast<cudaStream_t>(stream);
    if (p.batch > 0 && p.dim == 0 && p.seqlen > 0) {  // no channel adds to dB, dC: they are zero
      const size_t bytes = static_cast<size_t>(p.batch * p.n_groups * p.dstate * p.seqlen) * sizeof(T);
      cuda::check(cudaMemsetAsync(params.dB, 0, bytes, cuda_stream), "selective_scan_backward memset dB");
      if (params.dC) {
        cuda::check(cudaMemsetAsync(params.dC, 0, bytes, cuda_stream), "selective_scan_backward memset dC");
      }
    }
    if (!has_work(p)) return;
    cuda::scan::selective_scan_bwd_launch<T>(params, cuda_stream);
  });
}

size_t selective_scan_bwd_cuda_workspace_bytes(const SelectiveScanBwdParams& params) {
  if (!has_work(params.fwd)) return 0;
  return static_cast<size_t>(cuda::scan::bwd_workspace_layout(params).total) * sizeof(float);
}

}  // namespace mamba_adaptor
