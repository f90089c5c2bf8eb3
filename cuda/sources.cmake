# Sources of the _C_cuda module (included from the top-level CMakeLists.txt when CUDA is on): every .cu and
# .cpp file of cuda/. Kernels are split per op, direction and dtype so that a 2-core build compiles them in
# parallel and a change recompiles little.
file(GLOB MAMBA_ADAPTOR_CUDA_SOURCES CONFIGURE_DEPENDS
  "${CMAKE_CURRENT_SOURCE_DIR}/cuda/*.cu"
  "${CMAKE_CURRENT_SOURCE_DIR}/cuda/*.cpp")
