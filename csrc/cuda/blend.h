// CUDA kernels of masked blending (plain CUDA launchers, no torch headers).
// Contract: commentaries_ext/ops/blend.py. A row of x_a (contiguous or
// channels-last) is F elements dense in memory; the partner row perm[n] of
// x_b (or x_a) is gathered in the kernel. The mask m (any strides, broadcast
// dimensions) is addressed through up to three coalesced trailing dimensions in
// x_a's memory order: offset(n, k) = n*sn + i1*s1 + i2*s2 + i3*s3 with
// k = (i1*size2 + i2)*size3 + i3.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace commentaries_ext {
namespace cuda_kernels {

enum class BlendDType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct MaskLayout {
  int64_t sn, s1, s2, s3, size2, size3;
};

// out[n] = xb + m * (x_a[n] - xb), xb = (x_b or x_a)[perm ? perm[n] : n]; out has x_a's row stride.
cudaError_t blend_forward(BlendDType dtype, const void* x_a, int64_t s_xa, const void* x_b, int64_t s_xb,
                          const int64_t* perm, const void* m, MaskLayout ml, void* out, int64_t n, int64_t f,
                          cudaStream_t stream);

// Elementwise part of the backward, each output optional (nullptr: skipped):
// gxa[n] = g*m (row stride s_xa), gxb[n] = g*(1-m) (row stride s_xb, no perm),
// prod[n*f + k] = g*(x_a - xb) in the accumulation dtype (float, double for double);
// with row_sum (a per-example m), prod[n * blend_row_blocks(f) + b] holds partial
// sums of g*(x_a - xb) over row n instead (summed by the caller).
cudaError_t blend_backward_elementwise(BlendDType dtype, const void* grad, const void* x_a, int64_t s_xa,
                                      const void* x_b, int64_t s_xb, const int64_t* perm, const void* m,
                                      MaskLayout ml, void* gxa, void* gxb, void* prod, bool row_sum, int64_t n,
                                      int64_t f, cudaStream_t stream);

// Number of partial sums per row written by blend_backward_elementwise with row_sum.
int64_t blend_row_blocks(int64_t f);

// Scattered partner gradient, gathered through the CSR inverse of perm
// (order: source rows sorted by perm value; offs[rows + 1]):
// out[i] = (self ? g[i]*m[i] : 0) + sum_{j in offs[i]..offs[i+1]} g[order[j]] * (1 - m[order[j]]).
cudaError_t blend_backward_gather(BlendDType dtype, const void* grad, int64_t s_g, const void* m, MaskLayout ml,
                                  const int64_t* order, const int64_t* offs, bool self, void* out, int64_t s_out,
                                  int64_t rows, int64_t f, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace commentaries_ext
