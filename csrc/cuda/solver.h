// CUDA kernels of the fused solver updates over lists of tensors (multi-tensor
// apply; plain CUDA launchers, no torch headers). Contract:
// commentaries_ext/ops/solver.py.
//
// A launch covers every tensor of the lists without concatenating them: a
// device table gives the data pointers of list l, tensor i at ptrs[l * T + i],
// and for each CUDA block b the tensor block_tensor[b] and first element
// block_start[b] (blocks of kSolverBlockElems elements). Dot products write one
// partial per block (accumulation dtype: double for double data, else float),
// summed by the caller.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace commentaries_ext {
namespace cuda_kernels {

enum class SolverDType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

constexpr int64_t kSolverBlockElems = 4096;

struct TensorTable {
  const int64_t* ptrs;          // [lists * T] device addresses
  int64_t num_tensors;          // T
  const int64_t* numel;         // [T]
  const int32_t* block_tensor;  // [blocks]
  const int64_t* block_start;   // [blocks]
  int64_t blocks;
};

// lists: c, p, h.  c -= alpha*h; p += c.  alpha: 0-dim device scalar (accumulation dtype).
cudaError_t neumann_step(SolverDType dtype, TensorTable tab, const void* alpha, cudaStream_t stream);
// lists: y, x[, z].  y += a*x; partial[b] = <y, z or y>.
cudaError_t axpy_dot(SolverDType dtype, TensorTable tab, bool has_z, const void* a, void* partial,
                     cudaStream_t stream);
// lists: x, r, d, q.  x += a*d; r -= a*q; partial[b] = <r, r>.
cudaError_t cg_update(SolverDType dtype, TensorTable tab, const void* a, void* partial, cudaStream_t stream);
// lists: x[, y].  partial[b] = <x, y or x>.
cudaError_t multi_dot(SolverDType dtype, TensorTable tab, bool has_y, void* partial, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace commentaries_ext
