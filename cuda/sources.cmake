# Sources of the _C_cuda module (included from the top-level CMakeLists.txt when CUDA is on). Kernels are
# split per op, direction and dtype so that a 2-core build compiles them in parallel and a change
# recompiles little.
set(MAMBA_ADAPTOR_CUDA_SOURCES
  cuda/context.cpp
  cuda/common.cu
)
