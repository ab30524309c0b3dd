// Helpers of the thin torch bindings of the CUDA kernels (compiled only
// against a CUDA-enabled torch; the .cu files never include torch headers).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "common.h"

namespace commentaries_ext {
namespace cuda_binding {

// The launchers' element-type enum (each family header declares the same values).
inline int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    case at::kBFloat16: return 3;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(), " (float32/float64/float16/bfloat16)");
  }
  return -1;
}

// Per-row / scalar accumulation dtype: float64 for float64 data, else float32.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda_binding
}  // namespace commentaries_ext
