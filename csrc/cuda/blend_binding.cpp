// Torch binding of the CUDA blend kernels: the cuda_blend_* kernel ops.
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <vector>

#include "binding_common.h"
#include "blend_contract.h"
#include "blend.h"

namespace commentaries_ext {
namespace {

namespace ck = cuda_kernels;
using namespace cuda_binding;

// m's offsets over x_a's trailing dims in memory order, merged to at most three
// dims; false when more remain (the caller then materialises m like x_a).
bool mask_layout(const at::Tensor& x_a, const at::Tensor& m, ck::MaskLayout* out) {
  const at::Tensor me = m.expand(x_a.sizes());
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < x_a.dim(); ++d) {
    if (x_a.size(d) != 1) dims.push_back(d);
  }
  std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return x_a.stride(a) > x_a.stride(b); });
  std::vector<std::array<int64_t, 2>> merged;  // (size, m stride)
  for (int64_t d : dims) {
    const int64_t size = x_a.size(d), st = me.stride(d);
    if (!merged.empty() && merged.back()[1] == st * size) {
      merged.back() = {merged.back()[0] * size, st};
    } else {
      merged.push_back({size, st});
    }
  }
  if (merged.size() > 3) return false;
  while (merged.size() < 3) merged.insert(merged.begin(), {1, 0});
  *out = {me.stride(0), merged[0][1], merged[1][1], merged[2][1], merged[1][0], merged[2][0]};
  return true;
}

at::Tensor usable_mask(const at::Tensor& x_a, const at::Tensor& m, ck::MaskLayout* ml) {
  if (mask_layout(x_a, m, ml)) return m;
  at::Tensor full = at::empty_like(x_a).copy_(m.expand(x_a.sizes()));
  TORCH_CHECK(mask_layout(x_a, full, ml), "cuda_blend: cannot address m");
  return full;
}

ck::BlendDType element(const at::Tensor& t, const char* op) { return static_cast<ck::BlendDType>(dtype_code(t, op)); }

at::Tensor poisoned_like(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t);
  if (poison_outputs_flag().load(std::memory_order_relaxed)) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

// x_a contiguous or channels-last (the kernels' rows are dense runs in one of these two orders),
// then the rest of the layout contract shared with the C++ kernels (csrc/blend_contract.h).
void check_layout(const at::Tensor& x_a, const at::Tensor& m, const c10::optional<at::Tensor>& x_b,
                  const c10::optional<at::Tensor>& perm, int64_t f, const char* op) {
  TORCH_CHECK(x_a.is_contiguous() || (x_a.dim() == 4 && x_a.is_contiguous(at::MemoryFormat::ChannelsLast)), op,
              ": x_a must be contiguous or channels-last");
  blend_contract::check_mask(x_a, m, op);
  blend_contract::check_partner(x_a, x_b, perm, f, op);
}

at::Tensor blend_forward(const at::Tensor& x_a, const at::Tensor& m, const c10::optional<at::Tensor>& x_b,
                         const c10::optional<at::Tensor>& perm) {
  const char* op = "cuda_blend_forward";
  c10::cuda::CUDAGuard guard(x_a.device());
  at::Tensor out = poisoned_like(x_a);
  const int64_t n = x_a.size(0);
  const int64_t f = n ? x_a.numel() / n : 0;
  if (n == 0 || f == 0) return out;
  check_layout(x_a, m, x_b, perm, f, op);
  ck::MaskLayout ml;
  at::Tensor mm = usable_mask(x_a, m, &ml);
  const at::Tensor& xb = x_b.has_value() ? *x_b : x_a;
  check_cuda(ck::blend_forward(element(x_a, op), x_a.data_ptr(), x_a.stride(0), xb.data_ptr(), xb.stride(0),
                               perm.has_value() ? perm->data_ptr<int64_t>() : nullptr, mm.data_ptr(), ml,
                               out.data_ptr(), n, f, current_stream()),
             op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blend_backward(const at::Tensor& grad, const at::Tensor& x_a,
                                                              const at::Tensor& m, const c10::optional<at::Tensor>& x_b,
                                                              const c10::optional<at::Tensor>& perm,
                                                              std::array<bool, 3> output_mask) {
  const char* op = "cuda_blend_backward";
  c10::cuda::CUDAGuard guard(x_a.device());
  const bool want_xa = output_mask[0], want_xb = output_mask[1] && x_b.has_value(), want_m = output_mask[2];
  const int64_t n = x_a.size(0);
  const int64_t f = n ? x_a.numel() / n : 0;
  at::Tensor gxa = want_xa ? poisoned_like(x_a) : x_a.new_empty({0});
  at::Tensor gxb = want_xb ? poisoned_like(*x_b) : x_a.new_empty({0});
  at::Tensor gm = want_m ? new_output(m.sizes(), m.options()) : x_a.new_empty({0});
  if (n == 0 || f == 0) {
    if (want_xb) gxb.zero_();
    if (want_m) gm.zero_();
    return {gxa, gxb, gm};
  }
  blend_contract::check_grad(grad, x_a, op);
  check_layout(x_a, m, x_b, perm, f, op);
  ck::MaskLayout ml;
  at::Tensor mm = usable_mask(x_a, m, &ml);
  const at::Tensor& xb = x_b.has_value() ? *x_b : x_a;
  const int64_t* pp = perm.has_value() ? perm->data_ptr<int64_t>() : nullptr;
  const bool scatter_xa = want_xa && perm.has_value() && !x_b.has_value();
  const bool scatter_xb = want_xb && perm.has_value();
  const bool ew_xa = want_xa && !scatter_xa, ew_xb = want_xb && !scatter_xb;
  const auto acc = acc_type(x_a.scalar_type());
  bool per_example = true;
  for (int64_t d = 1; d < x_a.dim(); ++d) per_example = per_example && m.size(d) == 1;
  const int64_t width = per_example ? ck::blend_row_blocks(f) : f;
  at::Tensor prod = want_m ? at::empty({n, width}, x_a.options().dtype(acc)) : at::Tensor();
  const auto dt = element(x_a, op);
  const cudaStream_t st = current_stream();
  if (ew_xa || ew_xb || want_m) {
    check_cuda(ck::blend_backward_elementwise(dt, grad.data_ptr(), x_a.data_ptr(), x_a.stride(0), xb.data_ptr(),
                                              xb.stride(0), pp, mm.data_ptr(), ml, ew_xa ? gxa.data_ptr() : nullptr,
                                              ew_xb ? gxb.data_ptr() : nullptr, want_m ? prod.data_ptr() : nullptr,
                                              per_example, n, f, st),
               op);
  }
  if (scatter_xa || scatter_xb) {
    const int64_t rows = x_b.has_value() ? x_b->size(0) : n;
    at::Tensor order = std::get<1>(perm->sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    at::Tensor sorted = perm->index_select(0, order);
    at::Tensor offs = at::searchsorted(sorted, at::arange(rows + 1, perm->options()));
    at::Tensor& out = scatter_xa ? gxa : gxb;
    check_cuda(ck::blend_backward_gather(dt, grad.data_ptr(), grad.stride(0), mm.data_ptr(), ml,
                                         order.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), scatter_xa,
                                         out.data_ptr(), out.stride(0), rows, f, st),
               op);
  }
  if (want_m && per_example) {
    gm.copy_(prod.sum(1).reshape(m.sizes()));
  } else if (want_m) {
    // prod is in x_a's memory order: view it with x_a's logical shape and strides
    std::vector<int64_t> strides(x_a.strides().begin(), x_a.strides().end());
    strides[0] = f;
    at::Tensor p = prod.as_strided(x_a.sizes(), strides);
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x_a.dim(); ++d) {
      if (m.size(d) == 1 && x_a.size(d) != 1) dims.push_back(d);
    }
    at::Tensor red = dims.empty() ? p : p.sum(dims, /*keepdim=*/true);
    gm.copy_(red.reshape(m.sizes()));
  }
  return {gxa, gxb, gm};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cuda_blend_forward(Tensor x_a, Tensor m, Tensor? x_b, Tensor? perm) -> Tensor");
  m.def("cuda_blend_backward(Tensor grad, Tensor x_a, Tensor m, Tensor? x_b, Tensor? perm, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CUDA, m) {
  m.impl("cuda_blend_forward", &blend_forward);
  m.impl("cuda_blend_backward", &blend_backward);
}

}  // namespace commentaries_ext
