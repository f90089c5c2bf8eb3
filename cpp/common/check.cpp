#include "common/check.h"

namespace mamba_adaptor {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

std::vector<int64_t> sizes_of(const Tensor& t) {
  auto sizes = t.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end());
}

std::string shape_str(const Tensor& t) { return shape_str(sizes_of(t)); }

std::string dtype_str(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Byte: return "torch.uint8";
    case ScalarType::Char: return "torch.int8";
    case ScalarType::Short: return "torch.int16";
    case ScalarType::Int: return "torch.int32";
    case ScalarType::Long: return "torch.int64";
    case ScalarType::Bool: return "torch.bool";
    case ScalarType::ComplexFloat: return "torch.complex64";
    case ScalarType::ComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + torch::headeronly::toString(dtype);
  }
}

std::string device_str(const Tensor& t) {
  auto device = t.device();
  if (device.is_cpu()) return "cpu";
  std::string name = device.is_cuda() ? "cuda" : "device type " + std::to_string(static_cast<int>(device.type()));
  return device.has_index() ? name + ":" + std::to_string(device.index()) : name;
}

bool is_floating(ScalarType dtype) {
  return dtype == ScalarType::Float || dtype == ScalarType::Double || dtype == ScalarType::Half ||
         dtype == ScalarType::BFloat16;
}

DType to_dtype(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return DType::Float32;
    case ScalarType::Double: return DType::Float64;
    case ScalarType::Half: return DType::Float16;
    case ScalarType::BFloat16: return DType::BFloat16;
    default: fail("internal error: unsupported dtype ", dtype_str(dtype));
  }
}

void ArgChecker::rank(const Tensor& t, const char* name, int64_t rank, const char* layout) const {
  check(t.dim() == rank, "expected `", name, "` to be a ", rank, "-D tensor ", layout, ", but got a ", t.dim(),
        "-D tensor of shape ", shape_str(t));
}

void ArgChecker::shape(const Tensor& t, const char* name, const std::vector<int64_t>& expected,
                       const char* layout) const {
  check(sizes_of(t) == expected, "expected `", name, "` to have shape ", layout, " = ", shape_str(expected),
        ", but got ", shape_str(t));
}

void ArgChecker::floating(const Tensor& t, const char* name) const {
  check(is_floating(t.scalar_type()), "expected `", name,
        "` to have dtype torch.float32, torch.float64, torch.float16 or torch.bfloat16, but got ",
        dtype_str(t.scalar_type()));
}

void ArgChecker::dtype(const Tensor& t, const char* name, ScalarType expected, const char* rule) const {
  check(t.scalar_type() == expected, "expected `", name, "` to have dtype ", dtype_str(expected), " (", rule,
        "), but got ", dtype_str(t.scalar_type()));
}

void ArgChecker::same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) const {
  check(t.device() == ref.device(), "expected `", name, "` on the device of `", ref_name, "` (", device_str(ref),
        "), but got ", device_str(t));
}

void ArgChecker::on(Backend backend, const Tensor& t, const char* name) const {
  if (backend == Backend::CPU) {
    check(t.is_cpu(), "expected `", name, "` on the CPU, but got ", device_str(t));
  } else {
    check(t.is_cuda(), "expected `", name, "` on a CUDA device, but got ", device_str(t));
  }
}

Tensor with_unit_last_stride(const Tensor& t) {
  const int64_t last = t.dim() - 1;
  if (t.size(last) == 1 || t.stride(last) == 1) return t;
  return torch::stable::contiguous(t);
}

}  // namespace mamba_adaptor
