// Per-channel reductions and combinations of [N, C, *] tensors on the CPU (kernel ops
// cpp_channel_sums, cpp_channel_combine): the passes of BatchNorm's forward-mode rules
// (commentaries_ext/engine/batchnorm.py), each one pass over all of its inputs.
// Contract (validated by commentaries_ext/ops/channel.py): K >= 1 contiguous tensors of
// one shape [N, C, *] (dim >= 2), one dtype (float32/float64), on the CPU; coef [K, C]
// and bias [C] contiguous, same dtype.
//
// A row is the S = prod(*) contiguous elements of one (n, c). Sums run over fixed chunks
// of rows in memory order (chunks spread over threads): each row is summed with vector
// accumulators in the data dtype, the row sums go to the chunk's float64 partials, and
// the partials are added in chunk order, so the result does not depend on the number of
// threads.
#include "cpu/simd.h"  // first: selects the Vectorized specialisation
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common.h"

namespace commentaries_ext {
namespace {

constexpr int64_t kMaxTerms = 8;

void check_inputs(const char* op, const at::TensorList& xs) {
  TORCH_CHECK(!xs.empty() && static_cast<int64_t>(xs.size()) <= kMaxTerms, op, ": expected 1 to ", kMaxTerms,
              " tensors, got ", xs.size());
  const auto& x0 = xs[0];
  TORCH_CHECK(x0.dim() >= 2, op, ": expected [N, C, *] tensors, got ", x0.dim(), " dimensions");
  TORCH_CHECK(x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble, op,
              ": expected float32 or float64, got ", x0.scalar_type());
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors");
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), op, ": mixed dtypes");
    TORCH_CHECK(x.sizes() == x0.sizes(), op, ": tensors of different shapes");
    TORCH_CHECK(x.is_contiguous(), op, ": expected contiguous tensors");
  }
}

// out[k, c] = sum over (n, s) of a_k * b_k (or a_k where b_k is absent)
at::Tensor cpp_channel_sums(at::TensorList a, const c10::List<std::optional<at::Tensor>>& b) {
  check_inputs("channel_sums", a);
  TORCH_CHECK(b.size() == a.size(), "channel_sums: a and b have different lengths");
  std::vector<at::Tensor> bt(a.size());
  for (size_t k = 0; k < a.size(); ++k) {
    const std::optional<at::Tensor> bk = b.get(k);
    if (bk.has_value()) {
      TORCH_CHECK(bk->device().is_cpu() && bk->scalar_type() == a[0].scalar_type() && bk->sizes() == a[0].sizes() &&
                      bk->is_contiguous(),
                  "channel_sums: b[", k, "] must be a contiguous CPU tensor of a's shape and dtype");
      bt[k] = *bk;
    }
  }
  const int64_t K = a.size(), N = a[0].size(0), C = a[0].size(1);
  const int64_t S = C > 0 && N > 0 ? a[0].numel() / (N * C) : 0;
  at::Tensor out = new_output({K, C}, a[0].options());
  AT_DISPATCH_FLOATING_TYPES(a[0].scalar_type(), "cpp_channel_sums", [&] {
    using T = scalar_t;
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t W = Vec::size();
    const T* pa[kMaxTerms];
    const T* pb[kMaxTerms];
    for (int64_t k = 0; k < K; ++k) {
      pa[k] = a[k].const_data_ptr<T>();
      pb[k] = bt[k].defined() ? bt[k].const_data_ptr<T>() : nullptr;
    }
    T* o = out.mutable_data_ptr<T>();
    // fixed chunks of rows in memory order (streaming reads); per-chunk partial sums, added
    // in chunk order
    const int64_t rows = N * C, per = std::max<int64_t>(1, 16384 / std::max<int64_t>(S, 1));
    const int64_t chunks = (rows + per - 1) / per;
    std::vector<double> part(static_cast<size_t>(chunks * K * C), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        double* pq = part.data() + q * K * C;
        for (int64_t r = q * per; r < std::min(rows, (q + 1) * per); ++r) {
          const int64_t c = r % C, off = r * S;
          Vec v[kMaxTerms];
          for (int64_t k = 0; k < K; ++k) v[k] = Vec(0);
          int64_t s = 0;
          for (; s + W <= S; s += W)
            for (int64_t k = 0; k < K; ++k) {
              const Vec x = Vec::loadu(pa[k] + off + s);
              v[k] = pb[k] ? at::vec::fmadd(x, Vec::loadu(pb[k] + off + s), v[k]) : v[k] + x;
            }
          if (s < S)  // partial loads zero the missing lanes
            for (int64_t k = 0; k < K; ++k) {
              const Vec x = Vec::loadu(pa[k] + off + s, S - s);
              v[k] = pb[k] ? at::vec::fmadd(x, Vec::loadu(pb[k] + off + s, S - s), v[k]) : v[k] + x;
            }
          for (int64_t k = 0; k < K; ++k)
            pq[k * C + c] += static_cast<double>(at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, v[k]));
        }
      }
    });
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t q = 0; q < chunks; ++q) acc += part[(q * K + k) * C + c];
        o[k * C + c] = static_cast<T>(acc);
      }
  });
  return out;
}

// out[n, c, s] = sum_k coef[k, c] * x_k[n, c, s] + bias[c]
at::Tensor cpp_channel_combine(at::TensorList xs, const at::Tensor& coef, const std::optional<at::Tensor>& bias) {
  check_inputs("channel_combine", xs);
  const int64_t K = xs.size(), N = xs[0].size(0), C = xs[0].size(1);
  TORCH_CHECK(coef.dim() == 2 && coef.size(0) == K && coef.size(1) == C && coef.is_contiguous() &&
                  coef.scalar_type() == xs[0].scalar_type() && coef.device().is_cpu(),
              "channel_combine: coef must be a contiguous [K, C] CPU tensor of the inputs' dtype");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->is_contiguous() &&
                    bias->scalar_type() == xs[0].scalar_type() && bias->device().is_cpu(),
                "channel_combine: bias must be a contiguous [C] CPU tensor of the inputs' dtype");
  at::Tensor out = new_output(xs[0].sizes(), xs[0].options());
  const int64_t S = C > 0 && N > 0 ? xs[0].numel() / (N * C) : 0;
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(xs[0].scalar_type(), "cpp_channel_combine", [&] {
    using T = scalar_t;
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t W = Vec::size();
    const T* px[kMaxTerms];
    for (int64_t k = 0; k < K; ++k) px[k] = xs[k].const_data_ptr<T>();
    const T* pc = coef.const_data_ptr<T>();
    const T* pbias = bias.has_value() ? bias->const_data_ptr<T>() : nullptr;
    T* o = out.mutable_data_ptr<T>();
    at::parallel_for(0, N * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C, off = r * S;
        Vec vc[kMaxTerms];
        for (int64_t k = 0; k < K; ++k) vc[k] = Vec(pc[k * C + c]);
        const Vec vb(pbias ? pbias[c] : T(0));
        int64_t s = 0;
        for (; s + W <= S; s += W) {
          Vec acc = vb;
          for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(vc[k], Vec::loadu(px[k] + off + s), acc);
          acc.store(o + off + s);
        }
        if (s < S) {
          Vec acc = vb;
          for (int64_t k = 0; k < K; ++k) acc = at::vec::fmadd(vc[k], Vec::loadu(px[k] + off + s, S - s), acc);
          acc.store(o + off + s, S - s);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cpp_channel_sums(Tensor[] a, Tensor?[] b) -> Tensor");
  m.def("cpp_channel_combine(Tensor[] xs, Tensor coef, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CPU, m) {
  m.impl("cpp_channel_sums", &cpp_channel_sums);
  m.impl("cpp_channel_combine", &cpp_channel_combine);
}

}  // namespace commentaries_ext
