// cpp_wce_reduced: the reduced weighted / blended cross-entropy sum_i s_i l_i with its
// backward registered in C++ (AutogradCPU), the eager fast path of
// weighted_cross_entropy / blended_cross_entropy (commentaries_ext/ops/cross_entropy.py)
// on the cpp backend. The forward is one cpp_wce_forward_grad pass, which also writes
// the logits gradient s_i (p_i - mix_i); a first-order backward hands that gradient over
// (times the incoming scalar), so a forward + backward costs one kernel and no Python
// frame (the Python autograd.Function it replaces cost ~10 us per call, a third of a
// batch-128 loss's forward + backward).
//
// reduction: 0 sum, 1 mean over all N rows, 2 mean over the rows whose target is not
// ignore_index. Inputs are validated by the Python layer, except the class indices' range:
// cpp_wce_forward_grad checks that before it computes anything. With create_graph the backward
// is a differentiable composition of ATen ops (softmax, gathers, scatters), so higher
// derivatives are exact.
#include <ATen/ATen.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "cross_entropy_contract.h"

#include <optional>
#include <tuple>

namespace commentaries_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardGradFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, int64_t);

// cpp_wce_forward_grad through the dispatcher (below autograd: fake and meta tensors reach
// their registered implementations)
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_grad(const at::Tensor& z, const at::Tensor& target,
                                                            const at::Tensor& target_b, const at::Tensor& lam,
                                                            const at::Tensor& scale, int64_t ignore_index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("commentaries_ext::cpp_wce_forward_grad", "")
                             .typed<ForwardGradFn>();
  auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  return op.call(z, target, opt(target_b), opt(lam), opt(scale), ignore_index);
}

// A tensor whose memory holds its values, readable here: on the CPU, strided, not fake,
// functional or under a dispatch mode, no negative bit (a _neg_view), not a ZeroTensor.
bool has_values(const at::Tensor& t) {
  return !t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize})) &&
         !c10::impl::dispatch_mode_enabled() && t.device().is_cpu() && t.layout() == at::kStrided && !t.is_neg() &&
         !t._is_zerotensor();
}

// The divisor of a mean (0-dim, the logits dtype), undefined for a sum. The rows that are not
// ignored are counted by a loop over the targets (the Python layer calls every mean with
// reduction 2: three ATen ops here cost as much as the kernel at batch 128).
at::Tensor mean_divisor(const at::Tensor& z, const at::Tensor& target, int64_t reduction, int64_t ignore_index) {
  if (reduction == 1) return at::scalar_tensor(static_cast<double>(z.size(0)), z.options());
  if (reduction != 2) return at::Tensor();
  if (!has_values(target) || target.scalar_type() != at::kLong) return target.ne(ignore_index).sum().to(z.scalar_type());
  const int64_t* y = target.const_data_ptr<int64_t>();
  const int64_t n = target.numel(), stride = n > 0 ? target.stride(0) : 0;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += y[i * stride] != ignore_index;
  return at::scalar_tensor(static_cast<double>(count), z.options());
}

// Per-row factor of the loss in the total: weight / divisor (undefined: every factor is 1).
at::Tensor row_factor(const at::Tensor& z, const at::Tensor& weight, const at::Tensor& denom) {
  if (!denom.defined()) return weight;
  if (weight.defined()) return weight / denom;
  if (!has_values(denom)) return at::ones({z.size(0)}, z.options()).div_(denom);
  at::Tensor out;  // one op instead of two: 1 / denom in the logits dtype, as the division rounds
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "row_factor", [&] {
    out = at::full({z.size(0)}, scalar_t(1) / denom.item<scalar_t>(), z.options());
  });
  return out;
}

at::Tensor reduce_total(const at::Tensor& loss, const at::Tensor& weight, const at::Tensor& denom) {
  at::Tensor total = weight.defined() ? at::dot(loss, weight) : loss.sum();
  return denom.defined() ? total / denom : total;
}

// z[yb] - z[y] per row, 0 where the row is ignored (the derivative of the loss w.r.t. lam).
at::Tensor gather_diff(const at::Tensor& z, const at::Tensor& valid, const at::Tensor& y, const at::Tensor& yb) {
  const at::Tensor d = (z.gather(1, yb.unsqueeze(1)) - z.gather(1, y.unsqueeze(1))).squeeze(1);
  return at::where(valid, d, at::zeros({}, d.options()));
}

struct WceReducedFunction : public torch::autograd::Function<WceReducedFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, const std::optional<at::Tensor>& weight_opt,
                            const std::optional<at::Tensor>& lam_opt, const at::Tensor& target,
                            const std::optional<at::Tensor>& target_b_opt, int64_t reduction, int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor weight = weight_opt.value_or(at::Tensor()), lam = lam_opt.value_or(at::Tensor());
    const at::Tensor target_b = target_b_opt.value_or(at::Tensor());
    const at::Tensor denom = mean_divisor(z, target, reduction, ignore_index);
    const at::Tensor scale = row_factor(z, weight, denom);
    auto [loss, lse, grad] = forward_grad(z, target, target_b, lam, scale, ignore_index);
    ctx->save_for_backward({z, weight, lam});
    ctx->saved_data["grad"] = grad;
    ctx->saved_data["loss"] = loss;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["denom"] = denom;
    ctx->saved_data["target"] = target;
    ctx->saved_data["target_b"] = target_b;
    ctx->saved_data["ignore_index"] = ignore_index;
    return reduce_total(loss, weight, denom);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &z = saved[0], &weight = saved[1], &lam = saved[2];
    const at::Tensor g = grads[0];
    const at::Tensor target = ctx->saved_data["target"].toTensor();
    const at::Tensor target_b = ctx->saved_data["target_b"].toTensor();
    const at::Tensor denom = ctx->saved_data["denom"].toTensor();
    const at::Tensor scale = ctx->saved_data["scale"].toTensor();
    const int64_t ii = ctx->saved_data["ignore_index"].toInt();
    // needs_input_grad counts the tensors that were given (an absent optional has no slot)
    const bool need_z = ctx->needs_input_grad(0), need_w = weight.defined() && ctx->needs_input_grad(1);
    const bool need_lam = lam.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1);
    at::Tensor gz, gw, glam;
    at::Tensor valid;  // rows not ignored; only the lam gradient and create_graph need it
    if (need_lam || at::GradMode::is_enabled()) valid = target.ne(ii);
    // class indices safe to gather on ignored rows (their terms are masked out)
    auto safe = [&](const at::Tensor& t) { return at::where(valid, t, at::zeros({}, t.options())); };
    if (at::GradMode::is_enabled()) {  // create_graph: differentiable in g, z, weight and lam
      const at::Tensor y = safe(target);
      const at::Tensor yb = lam.defined() ? safe(target_b) : at::Tensor();
      at::Tensor row = row_factor(z, weight, denom);  // differentiable in weight
      if (!row.defined()) row = at::ones({z.size(0)}, z.options());
      // lam's gradient takes g * row unmasked (gather_diff is 0 on ignored rows), so that a mean
      // over no rows gives NaN there as in the first-order path; the logits gradient takes it
      // masked, so that its derivatives stay 0 on ignored rows (no inf * 0)
      const at::Tensor g_all = g * row;
      const at::Tensor g_row = at::where(valid, g_all, at::zeros({}, z.options()));
      if (need_z) {
        at::Tensor mix = at::zeros_like(z);
        if (lam.defined()) {
          mix = mix.scatter(1, y.unsqueeze(1), lam.unsqueeze(1)).scatter_add(1, yb.unsqueeze(1), (1 - lam).unsqueeze(1));
        } else {
          mix = mix.scatter(1, y.unsqueeze(1), 1.0);
        }
        gz = at::where(valid.unsqueeze(1), g_row.unsqueeze(1) * (at::softmax(z, 1) - mix), at::zeros({}, z.options()));
      }
      if (need_lam) glam = g_all * gather_diff(z, valid, y, yb);
      if (need_w) {
        // l_i = lse_i - (lam z[y] + (1 - lam) z[yb]), a term with a zero coefficient dropped
        // (so a -inf logit there gives no NaN), as the kernels compute it
        at::Tensor tgt = z.gather(1, y.unsqueeze(1)).squeeze(1);
        if (lam.defined()) {
          const at::Tensor zero = at::zeros({}, z.options());
          const at::Tensor tb = z.gather(1, yb.unsqueeze(1)).squeeze(1);
          tgt = at::where(lam == 0, zero, lam * tgt) + at::where(lam == 1, zero, (1 - lam) * tb);
        }
        at::Tensor loss = at::where(valid, at::logsumexp(z, {1}) - tgt, at::zeros({}, z.options()));
        gw = g * (denom.defined() ? loss / denom : loss);
      }
      return {gz, gw, glam, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    if (need_z) {
      gz = ctx->saved_data["grad"].toTensor();
      ctx->saved_data["grad"] = at::Tensor();  // handed over: autograd may keep it as .grad without a copy
      if (!gz.defined())  // a second backward through a retained graph: the same values again
        gz = std::get<2>(forward_grad(z, target, target_b, lam, scale, ii));
      // g == 1 (loss.backward()) skips a pass over the gradient; a traced g (fake, functional,
      // under a dispatch mode) has no value to read, so it is always multiplied
      if (!has_values(g) || g.item<double>() != 1.0) gz.mul_(g);
    }
    if (need_lam) {
      const at::Tensor s = scale.defined() ? g * scale : g.expand({z.size(0)});
      glam = s * gather_diff(z, valid, safe(target), safe(target_b));
    }
    if (need_w) {
      const at::Tensor loss = ctx->saved_data["loss"].toTensor();
      gw = g * (denom.defined() ? loss / denom : loss);
    }
    return {gz, gw, glam, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Below autograd (no_grad, inference, fake tensors): the total alone.
at::Tensor cpp_wce_reduced(const at::Tensor& z, const at::Tensor& target, const std::optional<at::Tensor>& target_b,
                           const std::optional<at::Tensor>& lam, const std::optional<at::Tensor>& weight,
                           int64_t reduction, int64_t ignore_index) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "cpp_wce_reduced: reduction must be 0 (sum), 1 or 2 (means)");
  cross_entropy_contract::check_mix_pair(target_b.has_value(), lam.has_value(), "cpp_wce_reduced");
  const at::Tensor w = weight.value_or(at::Tensor());
  const at::Tensor denom = mean_divisor(z, target, reduction, ignore_index);
  const at::Tensor l = lam.value_or(at::Tensor());
  const at::Tensor loss =
      std::get<0>(forward_grad(z, target, target_b.value_or(at::Tensor()), l,
                               row_factor(z, w, denom), ignore_index));
  return reduce_total(loss, w, denom);
}

at::Tensor cpp_wce_reduced_autograd(const at::Tensor& z, const at::Tensor& target,
                                    const std::optional<at::Tensor>& target_b, const std::optional<at::Tensor>& lam,
                                    const std::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "cpp_wce_reduced: reduction must be 0 (sum), 1 or 2 (means)");
  cross_entropy_contract::check_mix_pair(target_b.has_value(), lam.has_value(), "cpp_wce_reduced");
  return WceReducedFunction::apply(z, weight, lam, target, target_b, reduction, ignore_index);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def(
      "cpp_wce_reduced(Tensor logits, Tensor target, Tensor? target_b, Tensor? lam, Tensor? weight, int reduction, "
      "int ignore_index) -> Tensor");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CPU, m) { m.impl("cpp_wce_reduced", &cpp_wce_reduced); }

TORCH_LIBRARY_IMPL(commentaries_ext, AutogradCPU, m) { m.impl("cpp_wce_reduced", &cpp_wce_reduced_autograd); }

}  // namespace commentaries_ext
