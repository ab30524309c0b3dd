// Torch binding of the CUDA cross-entropy kernels: the cuda_wce_* kernel ops.
#include <torch/library.h>

#include "binding_common.h"
#include "cross_entropy_contract.h"
#include "cross_entropy.h"

#include <limits>

namespace commentaries_ext {
namespace {

namespace ck = cuda_kernels;
using namespace cuda_binding;

ck::DType element(const at::Tensor& t, const char* op) { return static_cast<ck::DType>(dtype_code(t, op)); }

ck::RowMatrix matrix(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

// Shapes and devices of the inputs are checked (csrc/cross_entropy_contract.h); dtypes are
// converted below. The targets' range is guarded in the forward kernel (an out-of-range target
// gives a NaN loss without a read): checking it here would synchronise with the host.
using cross_entropy_contract::check_like_logits;
using cross_entropy_contract::check_rows;

struct Targets {
  at::Tensor y, yb, lam;  // keep converted tensors alive during the launch
  ck::WceTargets tg;
};

Targets targets(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& target_b,
                const c10::optional<at::Tensor>& lam, int64_t ignore_index, at::ScalarType row, const char* op) {
  check_rows(target, logits, "target", op);
  TORCH_CHECK(!at::isFloatingType(target.scalar_type()), op, ": target must be an integer tensor");
  if (target_b.has_value()) {
    check_rows(*target_b, logits, "target_b", op);
    check_rows(*lam, logits, "lam", op);
  }
  Targets t;
  t.y = target.to(at::kLong);
  const bool mixed = target_b.has_value() && lam.has_value();
  if (mixed) {
    t.yb = target_b->to(at::kLong);
    t.lam = lam->to(row);
  }
  t.tg = {t.y.data_ptr<int64_t>(), t.y.stride(0), mixed ? t.yb.data_ptr<int64_t>() : nullptr,
          mixed ? t.yb.stride(0) : 0, mixed ? t.lam.data_ptr() : nullptr, mixed ? t.lam.stride(0) : 0, ignore_index};
  return t;
}

std::tuple<at::Tensor, at::Tensor> wce_forward(const at::Tensor& logits, const at::Tensor& target,
                                               const c10::optional<at::Tensor>& target_b,
                                               const c10::optional<at::Tensor>& lam, int64_t ignore_index) {
  const char* op = "cuda_wce_forward";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, C]");
  cross_entropy_contract::check_mix_pair(target_b.has_value(), lam.has_value(), op);
  c10::cuda::CUDAGuard guard(logits.device());
  const auto row = acc_type(logits.scalar_type());
  const int64_t n = logits.size(0), c = logits.size(1);
  at::Tensor loss = new_output({n}, logits.options().dtype(row));
  at::Tensor lse = new_output({n}, logits.options().dtype(row));
  if (c == 0) {  // no classes: lse = -inf, loss 0 (as the reference)
    loss.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {loss, lse};
  }
  Targets t = targets(logits, target, target_b, lam, ignore_index, row, op);
  check_cuda(ck::wce_forward(element(logits, op), matrix(logits), n, c, t.tg, loss.data_ptr(), lse.data_ptr(),
                             current_stream()),
             op);
  return {loss, lse};
}

at::Tensor wce_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& lse,
                        const at::Tensor& target, const c10::optional<at::Tensor>& target_b,
                        const c10::optional<at::Tensor>& lam, int64_t ignore_index) {
  const char* op = "cuda_wce_backward";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, C]");
  cross_entropy_contract::check_mix_pair(target_b.has_value(), lam.has_value(), op);
  c10::cuda::CUDAGuard guard(logits.device());
  const auto row = acc_type(logits.scalar_type());
  const int64_t n = logits.size(0), c = logits.size(1);
  at::Tensor out = new_output({n, c}, logits.options());
  check_rows(grad_loss, logits, "grad_loss", op);
  check_rows(lse, logits, "lse", op);
  at::Tensor g = grad_loss.to(row), l = lse.to(row);
  Targets t = targets(logits, target, target_b, lam, ignore_index, row, op);
  check_cuda(ck::wce_backward(element(logits, op), g.data_ptr(), g.stride(0), matrix(logits), n, c, l.data_ptr(),
                              l.stride(0), t.tg, out.data_ptr(), current_stream()),
             op);
  return out;
}

at::Tensor wce_hvp(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& scale, const at::Tensor& u) {
  const char* op = "cuda_wce_hvp";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, C]");
  c10::cuda::CUDAGuard guard(logits.device());
  const auto row = acc_type(logits.scalar_type());
  const int64_t n = logits.size(0), c = logits.size(1);
  at::Tensor out = new_output({n, c}, logits.options());
  check_rows(lse, logits, "lse", op);
  check_rows(scale, logits, "scale", op);
  check_like_logits(u, logits, "u", op);
  at::Tensor l = lse.to(row), s = scale.to(row), uu = u.to(logits.scalar_type());
  check_cuda(ck::wce_hvp(element(logits, op), matrix(logits), n, c, l.data_ptr(), l.stride(0), s.data_ptr(),
                         s.stride(0), matrix(uu), out.data_ptr(), current_stream()),
             op);
  return out;
}

at::Tensor wce_jvp(const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& target,
                   const c10::optional<at::Tensor>& target_b, const c10::optional<at::Tensor>& lam,
                   const at::Tensor& tangent, int64_t ignore_index) {
  const char* op = "cuda_wce_jvp";
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, C]");
  cross_entropy_contract::check_mix_pair(target_b.has_value(), lam.has_value(), op);
  c10::cuda::CUDAGuard guard(logits.device());
  const auto row = acc_type(logits.scalar_type());
  const int64_t n = logits.size(0), c = logits.size(1);
  at::Tensor out = new_output({n}, logits.options().dtype(row));
  if (c == 0) return out.zero_();
  check_rows(lse, logits, "lse", op);
  check_like_logits(tangent, logits, "t", op);
  at::Tensor l = lse.to(row), tt = tangent.to(logits.scalar_type());
  Targets t = targets(logits, target, target_b, lam, ignore_index, row, op);
  check_cuda(ck::wce_jvp(element(logits, op), matrix(logits), n, c, l.data_ptr(), l.stride(0), t.tg, matrix(tt),
                         out.data_ptr(), current_stream()),
             op);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cuda_wce_forward(Tensor logits, Tensor target, Tensor? target_b, Tensor? lam, int ignore_index) -> (Tensor, Tensor)");
  m.def("cuda_wce_backward(Tensor grad_loss, Tensor logits, Tensor lse, Tensor target, Tensor? target_b, Tensor? lam, int ignore_index) -> Tensor");
  m.def("cuda_wce_hvp(Tensor logits, Tensor lse, Tensor scale, Tensor u) -> Tensor");
  m.def("cuda_wce_jvp(Tensor logits, Tensor lse, Tensor target, Tensor? target_b, Tensor? lam, Tensor t, int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CUDA, m) {
  m.impl("cuda_wce_forward", &wce_forward);
  m.impl("cuda_wce_backward", &wce_backward);
  m.impl("cuda_wce_hvp", &wce_hvp);
  m.impl("cuda_wce_jvp", &wce_jvp);
}

}  // namespace commentaries_ext
