// The Python module entry point of _C and _C_cuda. The modules export nothing to Python: importing them runs
// the static STABLE_TORCH_LIBRARY* registrations of the ops, which reach Python through torch.ops.
#include <Python.h>

#define MA_CONCAT_(a, b) a##b
#define MA_CONCAT(a, b) MA_CONCAT_(a, b)
#define MA_STRINGIFY_(a) #a
#define MA_STRINGIFY(a) MA_STRINGIFY_(a)

static PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    MA_STRINGIFY(MAMBA_ADAPTOR_MODULE_NAME),
    "mamba_adaptor_ops kernels; the ops are under torch.ops.mamba_adaptor",
    -1,       // m_size
    nullptr,  // m_methods
    nullptr,  // m_slots
    nullptr,  // m_traverse
    nullptr,  // m_clear
    nullptr,  // m_free
};

extern "C" __attribute__((visibility("default"))) PyObject* MA_CONCAT(PyInit_, MAMBA_ADAPTOR_MODULE_NAME)(void) {
  return PyModule_Create(&module_def);
}
