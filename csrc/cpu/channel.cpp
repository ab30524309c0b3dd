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

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "common.h"

namespace commentaries_ext {
namespace {

// Rows (one channel of one example, S elements) per chunk of the per-channel sums: ~16K elements,
// each chunk with its own partial sums of every channel (`sums_per_chunk` doubles), but no more
// chunks than keep that scratch within 8 MB or 64 outputs' worth (16K-element chunks of a [N, C]
// input with small S needed N C^2 / 16K doubles: 128 MB for a 32 MB [256, 32768]). Independent of
// the thread count, so that the sums are too; inputs with few channels keep their many chunks.
int64_t rows_per_chunk(int64_t rows, int64_t S, int64_t sums_per_chunk) {
  const int64_t max_chunks = std::max<int64_t>(64, (int64_t(1) << 20) / std::max<int64_t>(sums_per_chunk, 1));
  return std::max({int64_t(1), 16384 / std::max<int64_t>(S, 1), (rows + max_chunks - 1) / max_chunks});
}

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
    const int64_t rows = N * C, per = rows_per_chunk(rows, S, K * C);
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


// The double backward of batch normalisation with batch statistics (the formulas of
// reference/channel.py batch_norm_reverse_rule) in two passes over [N, C, S]: the sums Σu,
// Σu x̂, Σu gy per channel (float64 partials over fixed chunks, as channel_sums), then gy's and
// x's gradients in one pass that reads u, gy, x once and writes both; x̂ = (x - mean) rstd is
// never stored.
// u, gy, x contiguous of one shape and dtype; mean, rstd, weight, gw, gb, ugw, ugb [C].
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_batch_norm_reverse(
    const at::Tensor& u, const at::Tensor& gy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& gw, const at::Tensor& gb, const at::Tensor& ugw,
    const at::Tensor& ugb, std::array<bool, 3> needs) {
  check_inputs("batch_norm_reverse", {u, gy, x});
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = C > 0 && N > 0 ? x.numel() / (N * C) : 0;
  for (const at::Tensor* t : {&mean, &rstd, &weight, &gw, &gb, &ugw, &ugb})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->is_contiguous() && t->scalar_type() == x.scalar_type() &&
                    t->device().is_cpu(),
                "batch_norm_reverse: the per-channel tensors must be contiguous [C] CPU tensors of x's dtype");
  const double M = static_cast<double>(N * S);
  at::Tensor ggy = needs[0] ? new_output(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor gx = needs[1] ? new_output(x.sizes(), x.options()) : x.new_empty({0});
  at::Tensor gwi = needs[2] ? new_output({C}, x.options()) : x.new_empty({0});
  if (!(needs[0] || needs[1] || needs[2]) || C == 0) return {ggy, gx, gwi};
  if (N * S == 0) {  // no elements: gw and gb are zero sums, so is every gradient
    if (needs[2]) gwi.zero_();
    return {ggy, gx, gwi};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cpp_batch_norm_reverse", [&] {
    using T = scalar_t;
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t W = Vec::size();
    const T *pu = u.const_data_ptr<T>(), *pg = gy.const_data_ptr<T>(), *px = x.const_data_ptr<T>();
    const T* pmean = mean.const_data_ptr<T>();
    // pass 1: per-channel sums of u, u (x - mean), u gy
    const int64_t rows = N * C, per = rows_per_chunk(rows, S, 3 * C);
    const int64_t chunks = (rows + per - 1) / per;
    std::vector<double> part(static_cast<size_t>(chunks * 3 * C), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        double* pq = part.data() + q * 3 * C;
        for (int64_t r = q * per; r < std::min(rows, (q + 1) * per); ++r) {
          const int64_t c = r % C, off = r * S;
          const Vec vm(pmean[c]);
          Vec su(0), sux(0), sug(0);
          int64_t s = 0;
          for (; s + W <= S; s += W) {
            const Vec vu = Vec::loadu(pu + off + s);
            su = su + vu;
            sux = at::vec::fmadd(vu, Vec::loadu(px + off + s) - vm, sux);
            sug = at::vec::fmadd(vu, Vec::loadu(pg + off + s), sug);
          }
          if (s < S) {  // partial loads zero the missing lanes (of u: no term there)
            const Vec vu = Vec::loadu(pu + off + s, S - s);
            su = su + vu;
            sux = at::vec::fmadd(vu, Vec::loadu(px + off + s, S - s) - vm, sux);
            sug = at::vec::fmadd(vu, Vec::loadu(pg + off + s, S - s), sug);
          }
          const auto add = [](Vec& a, Vec& b) { return a + b; };
          pq[c] += static_cast<double>(at::vec::vec_reduce_all<T>(add, su));
          pq[C + c] += static_cast<double>(at::vec::vec_reduce_all<T>(add, sux));
          pq[2 * C + c] += static_cast<double>(at::vec::vec_reduce_all<T>(add, sug));
        }
      }
    });
    // per-channel coefficients (float64): ggy = a_u u + a_x (x - mean) + a_0,
    // gx = b_u u + b_g gy + b_x (x - mean) + b_0 (batch_norm_reverse_rule with x̂ expanded)
    std::vector<double> coef(static_cast<size_t>(7 * C));
    const T *pr = rstd.const_data_ptr<T>(), *pw = weight.const_data_ptr<T>(), *pgw = gw.const_data_ptr<T>(),
            *pgb = gb.const_data_ptr<T>(), *pugw = ugw.const_data_ptr<T>(), *pugb = ugb.const_data_ptr<T>();
    T* pwi = needs[2] ? gwi.mutable_data_ptr<T>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      double su = 0, sux = 0, sug = 0;
      for (int64_t q = 0; q < chunks; ++q) {
        su += part[q * 3 * C + c];
        sux += part[q * 3 * C + C + c];
        sug += part[q * 3 * C + 2 * C + c];
      }
      const double r = pr[c], wr = static_cast<double>(pw[c]) * r, A = pgb[c] / M, B = pgw[c] / M;
      sux *= r;  // Σ u x̂
      const double sup = sug - A * su - B * sux;  // Σ u P, P = gy - A - x̂ B
      const double k1 = pugw[c] - wr * sux / M;   // x̂'s coefficient in ggy; gy's in q
      const double cu = -wr * B;                  // u's coefficient in q
      const double sq = cu * su + k1 * pgb[c], sqx = cu * sux + k1 * pgw[c];
      double* k = coef.data() + 7 * c;
      k[0] = wr;                                  // ggy: u
      k[1] = k1 * r;                              //      (x - mean)
      k[2] = pugb[c] - wr * su / M;               //      constant
      k[3] = r * cu;                              // gx:  u
      k[4] = r * k1;                              //      gy
      k[5] = -r * (sqx + wr * sup) / M * r;       //      (x - mean)
      k[6] = -r * sq / M;                         //      constant
      if (pwi) pwi[c] = static_cast<T>(r * sup);
    }
    // pass 2: both activation-sized gradients
    T* o1 = needs[0] ? ggy.mutable_data_ptr<T>() : nullptr;
    T* o2 = needs[1] ? gx.mutable_data_ptr<T>() : nullptr;
    if (!o1 && !o2) return;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(S, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t c = r % C, off = r * S;
        const double* k = coef.data() + 7 * c;
        const Vec vm(pmean[c]), a_u(k[0]), a_x(k[1]), a_0(k[2]), b_u(k[3]), b_g(k[4]), b_x(k[5]), b_0(k[6]);
        const auto row = [&](int64_t s, int64_t n) {
          const Vec vu = n == W ? Vec::loadu(pu + off + s) : Vec::loadu(pu + off + s, n);
          const Vec vx = (n == W ? Vec::loadu(px + off + s) : Vec::loadu(px + off + s, n)) - vm;
          if (o1) {
            const Vec v = at::vec::fmadd(a_u, vu, at::vec::fmadd(a_x, vx, a_0));
            n == W ? v.store(o1 + off + s) : v.store(o1 + off + s, n);
          }
          if (o2) {
            const Vec vg = n == W ? Vec::loadu(pg + off + s) : Vec::loadu(pg + off + s, n);
            const Vec v = at::vec::fmadd(b_u, vu, at::vec::fmadd(b_g, vg, at::vec::fmadd(b_x, vx, b_0)));
            n == W ? v.store(o2 + off + s) : v.store(o2 + off + s, n);
          }
        };
        int64_t s = 0;
        for (; s + W <= S; s += W) row(s, W);
        if (s < S) row(s, S - s);
      }
    });
  });
  return {ggy, gx, gwi};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cpp_channel_sums(Tensor[] a, Tensor?[] b) -> Tensor");
  m.def("cpp_channel_combine(Tensor[] xs, Tensor coef, Tensor? bias) -> Tensor");
  m.def("cpp_batch_norm_reverse(Tensor u, Tensor gy, Tensor x, Tensor mean, Tensor rstd, Tensor weight, Tensor gw, "
        "Tensor gb, Tensor ugw, Tensor ugb, bool[3] needs) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CPU, m) {
  m.impl("cpp_channel_sums", &cpp_channel_sums);
  m.impl("cpp_channel_combine", &cpp_channel_combine);
  m.impl("cpp_batch_norm_reverse", &cpp_batch_norm_reverse);
}

}  // namespace commentaries_ext
