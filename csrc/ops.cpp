// Library definition of the commentaries_ext namespace and the Python module
// stub. Each op family defines its kernel-op schemas next to its kernels with
// TORCH_LIBRARY_FRAGMENT; Python defines the device-independent ops on top of
// them (commentaries_ext/ops/) with torch.library.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

#include <string>

#ifndef COMMENTARIES_EXT_TORCH_VERSION
#define COMMENTARIES_EXT_TORCH_VERSION "unknown"
#endif

namespace commentaries_ext {

std::string build_info() {
  std::string info = "torch=" COMMENTARIES_EXT_TORCH_VERSION;
#ifdef COMMENTARIES_EXT_WITH_CUDA
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__FMA__)
  info += ";simd=avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  info += ";simd=avx2";
#else
  info += ";simd=none";
#endif
  return info;
}

std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

bool set_poison_outputs(bool on) { return poison_outputs_flag().exchange(on); }

TORCH_LIBRARY(commentaries_ext, m) {
  m.def("build_info() -> str", &build_info);
  // Returns the previous setting.
  m.def("set_poison_outputs(bool on) -> bool", &set_poison_outputs);
}

}  // namespace commentaries_ext

// Importing commentaries_ext._C loads this library and runs the registrations.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
