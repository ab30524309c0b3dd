// The layout part of the blend kernel ops' contract (commentaries_ext/ops/blend.py), checked by
// the C++ and CUDA kernels alike (the Triton launchers mirror it in Python): the kernels address
// x_a, m, x_b, grad and their outputs from these shapes and strides, so a direct call of a kernel
// op with bad input must be an error, not an access out of bounds. Values are not checked here:
// perm's range is the CPU kernel's own check (on a GPU it would synchronise with the host).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

namespace commentaries_ext {
namespace blend_contract {

// m: x_a's rank, dtype and device, N rows, every other dimension 1 or x_a's (any strides).
inline void check_mask(const at::Tensor& x_a, const at::Tensor& m, const char* op) {
  TORCH_CHECK(m.dim() == x_a.dim(), op, ": m must have x_a's rank ", x_a.dim(), ", got ", m.dim());
  TORCH_CHECK(m.scalar_type() == x_a.scalar_type() && m.device() == x_a.device(), op,
              ": m must have x_a's dtype and device");
  TORCH_CHECK(m.size(0) == x_a.size(0), op, ": m must have x_a's ", x_a.size(0), " rows, got ", m.size(0));
  for (int64_t d = 1; d < x_a.dim(); ++d)
    TORCH_CHECK(m.size(d) == 1 || m.size(d) == x_a.size(d), op, ": m of shape ", m.sizes(),
                " does not broadcast to x_a of shape ", x_a.sizes(), " (each dimension 1 or x_a's)");
}

// x_b: x_a's dtype, device, trailing sizes and strides (a size-1 dimension's stride is never
// used), dense rows of `row` elements, and N rows without perm. perm: contiguous int64 [N] on
// x_a's device.
inline void check_partner(const at::Tensor& x_a, const std::optional<at::Tensor>& x_b,
                          const std::optional<at::Tensor>& perm, int64_t row, const char* op) {
  const int64_t n = x_a.size(0);
  if (x_b.has_value()) {
    const at::Tensor& b = *x_b;
    TORCH_CHECK(b.scalar_type() == x_a.scalar_type() && b.device() == x_a.device(), op,
                ": x_b must have x_a's dtype and device");
    bool same = b.dim() == x_a.dim() && b.sizes().slice(1) == x_a.sizes().slice(1) &&
                (b.size(0) <= 1 || b.stride(0) == row);
    for (int64_t d = 1; same && d < b.dim(); ++d) same = b.size(d) == 1 || b.stride(d) == x_a.stride(d);
    TORCH_CHECK(same, op, ": x_b must have x_a's trailing sizes and memory layout, with dense rows");
    TORCH_CHECK(perm.has_value() || b.size(0) == n, op, ": without perm, x_b must have x_a's ", n, " rows");
  }
  if (perm.has_value()) {
    const at::Tensor& p = *perm;
    TORCH_CHECK(p.scalar_type() == at::kLong && p.dim() == 1 && p.size(0) == n && p.is_contiguous() &&
                    p.device() == x_a.device(),
                op, ": perm must be a contiguous int64 tensor of shape [", n, "] on x_a's device");
  }
}

// grad: x_a's sizes, strides and dtype (the kernels read it with x_a's layout).
inline void check_grad(const at::Tensor& grad, const at::Tensor& x_a, const char* op) {
  TORCH_CHECK(grad.sizes() == x_a.sizes() && grad.strides() == x_a.strides() &&
                  grad.scalar_type() == x_a.scalar_type() && grad.device() == x_a.device(),
              op, ": grad must have x_a's shape, strides, dtype and device");
}

}  // namespace blend_contract
}  // namespace commentaries_ext
