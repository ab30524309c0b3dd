// The shape part of the cross-entropy kernel ops' contract (commentaries_ext/ops/cross_entropy.py),
// checked by the C++ and CUDA kernels alike (the Triton launchers mirror it in Python): the kernels
// index rows and columns with these shapes, so a direct call of a kernel op with a bad input must
// be an error, not an access out of bounds. Dtypes are the caller's concern (the C++ kernels
// require the logits dtype, the CUDA binding converts).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace commentaries_ext {
namespace cross_entropy_contract {

// A per-row input: [N] (any stride) on the logits' device.
inline void check_rows(const at::Tensor& t, const at::Tensor& logits, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0) && t.device() == logits.device(), op, ": ", name,
              " must have shape [", logits.size(0), "] on the logits' device, got ", t.sizes(), " on ", t.device());
}

// A per-logit input: the logits' shape (any strides) on their device.
inline void check_like_logits(const at::Tensor& t, const at::Tensor& logits, const char* name, const char* op) {
  TORCH_CHECK(t.sizes() == logits.sizes() && t.device() == logits.device(), op, ": ", name,
              " must have the shape of logits ", logits.sizes(), " on their device, got ", t.sizes(), " on ",
              t.device());
}

// The blended form takes target_b and lam together; one without the other was read as the plain
// form, dropping the mixing silently.
inline void check_mix_pair(bool has_target_b, bool has_lam, const char* op) {
  TORCH_CHECK(has_target_b == has_lam, op, ": target_b and lam come together (the blended form needs both), got ",
              has_target_b ? "target_b" : "lam", " alone");
}

}  // namespace cross_entropy_contract
}  // namespace commentaries_ext
