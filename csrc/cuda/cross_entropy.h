// CUDA kernels of the weighted / blended softmax cross-entropy (wce_*).
// Plain CUDA launchers (no torch headers): raw pointers, sizes, strides (in
// elements) and a stream. Semantics: DEVELOPING.md "cross_entropy".
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace commentaries_ext {
namespace cuda_kernels {

// Element type of the [N, C] tensors (logits, u, t, backward/hvp outputs).
// Per-row tensors (lam, grad_loss, scale, loss, lse, jvp) are double for
// kF64 and float otherwise.
enum class DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

struct WceTargets {
  const int64_t* y;   // [N]
  int64_t sy;
  const int64_t* yb;  // [N] or nullptr (then lam is ignored: mix = e_y)
  int64_t syb;
  const void* lam;    // [N] per-row dtype, or nullptr
  int64_t slam;
  int64_t ignore_index;
};

struct RowMatrix {  // a [N, C] operand with any strides
  const void* data;
  int64_t stride_n;
  int64_t stride_c;
};

// loss [N], lse [N] contiguous, per-row dtype.
cudaError_t wce_forward(DType dtype, RowMatrix logits, int64_t n, int64_t c, WceTargets tg, void* loss, void* lse,
                        cudaStream_t stream);
// out [N, C] contiguous, element dtype.
cudaError_t wce_backward(DType dtype, const void* grad_loss, int64_t s_grad, RowMatrix logits, int64_t n, int64_t c,
                         const void* lse, int64_t s_lse, WceTargets tg, void* out, cudaStream_t stream);
// out [N, C] contiguous: scale_i * (p_i * u_i - p_i (p_i . u_i)).
cudaError_t wce_hvp(DType dtype, RowMatrix logits, int64_t n, int64_t c, const void* lse, int64_t s_lse,
                    const void* scale, int64_t s_scale, RowMatrix u, void* out, cudaStream_t stream);
// out [N] contiguous, per-row dtype: (p_i - mix_i) . t_i, 0 where ignored.
cudaError_t wce_jvp(DType dtype, RowMatrix logits, int64_t n, int64_t c, const void* lse, int64_t s_lse,
                    WceTargets tg, RowMatrix t, void* out, cudaStream_t stream);

}  // namespace cuda_kernels
}  // namespace commentaries_ext
