// Argument validation shared by every op: one checker per op call, whose messages name the op, the
// argument, what was expected and what came. Raised as std::runtime_error (RuntimeError in Python).
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace mamba_adaptor {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream message;
  (message << ... << args);
  throw std::runtime_error(message.str());
}

std::string shape_str(const std::vector<int64_t>& shape);  // "(2, 192, 3136)"
std::string shape_str(const Tensor& t);
std::string dtype_str(ScalarType dtype);                    // "torch.float32"
std::string device_str(const Tensor& t);                    // "cpu", "cuda:0"
bool is_floating(ScalarType dtype);                          // float32, float64, float16, bfloat16
DType to_dtype(ScalarType dtype);                            // for a dtype is_floating() accepts
std::vector<int64_t> sizes_of(const Tensor& t);

// Which kernel the arguments are checked for: its tensors must all live on that kind of device.
enum class Backend { CPU, CUDA };

class ArgChecker {
 public:
  explicit ArgChecker(const char* op) : op_(op) {}

  template <typename... Args>
  [[noreturn]] void fail(const Args&... args) const {
    mamba_adaptor::fail(op_, ": ", args...);
  }
  template <typename... Args>
  void check(bool condition, const Args&... args) const {
    if (!condition) fail(args...);
  }

  // `name` has `rank` dimensions; `layout` spells them out for the message, e.g. "(b, dim, L)".
  void rank(const Tensor& t, const char* name, int64_t rank, const char* layout) const;
  // `name` has exactly `expected` sizes; `layout` spells them out, e.g. "(b, G, N, L)".
  void shape(const Tensor& t, const char* name, const std::vector<int64_t>& expected, const char* layout) const;
  // float32, float64, float16 or bfloat16.
  void floating(const Tensor& t, const char* name) const;
  void dtype(const Tensor& t, const char* name, ScalarType expected, const char* rule) const;
  // Same device type and index as `ref`.
  void same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) const;
  // On the kind of device the kernel runs on (a CPU kernel never reads a CUDA pointer, nor the other way round).
  void on(Backend backend, const Tensor& t, const char* name) const;

 private:
  const char* op_;
};

// Stride of `dim` for a kernel that accepts any strides in that dimension: 0 when the size is 1, so that
// broadcast-like views and size-1 dims never matter.
inline int64_t stride_or_zero(const Tensor& t, int64_t dim) { return t.size(dim) == 1 ? 0 : t.stride(dim); }

// `t` itself when its last dimension has stride 1 (or size 1), else a contiguous copy.
Tensor with_unit_last_stride(const Tensor& t);

}  // namespace mamba_adaptor
