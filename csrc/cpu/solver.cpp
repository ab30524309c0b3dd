// Fused solver updates over lists of tensors on the CPU (multi-tensor apply):
// the work is cut into chunks of kChunk elements over every tensor of the
// list, the chunks are spread over threads with at::parallel_for, and each
// chunk is one vectorised pass over all the vectors it touches. Dot products
// are summed per chunk (in the data dtype, several vector accumulators) and the
// chunk sums combined in float64 in chunk order: the result does not depend on
// the number of threads.
// Contract (validated by commentaries_ext/ops/solver.py): non-empty lists of
// contiguous tensors of one dtype (float32/float64) and device, tensor i of
// every list the same shape; updated lists do not alias the others; scalars are
// 0-dim tensors.
#include "cpu/simd.h"  // first: selects the Vectorized specialisation
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace commentaries_ext {
namespace {

constexpr int64_t kChunk = 16384;

struct Chunk {
  int32_t tensor;
  int64_t begin, end;
};

std::vector<Chunk> make_chunks(const at::TensorList& ts) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < ts.size(); ++t) {
    const int64_t n = ts[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({static_cast<int32_t>(t), b, std::min(n, b + kChunk)});
  }
  return chunks;
}

void check_lists(const char* op, std::initializer_list<at::TensorList> lists) {
  const at::TensorList& first = *lists.begin();
  TORCH_CHECK(!first.empty(), op, ": empty tensor list");
  const auto dtype = first[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": expected float32 or float64 tensors, got ", dtype);
  for (const auto& l : lists) {
    TORCH_CHECK(l.size() == first.size(), op, ": lists of different lengths");
    for (size_t i = 0; i < l.size(); ++i) {
      TORCH_CHECK(l[i].device().is_cpu(), op, ": expected CPU tensors");
      TORCH_CHECK(l[i].scalar_type() == dtype, op, ": mixed dtypes");
      TORCH_CHECK(l[i].is_contiguous(), op, ": expected contiguous tensors");
      TORCH_CHECK(l[i].numel() == first[i].numel(), op, ": tensor ", i, " has different sizes in different lists");
    }
  }
}

// The first n_mut lists are updated in place: none of their tensors may share memory with
// another tensor of any list (the pass reads and writes them together, chunks in parallel).
// ops/solver.py leaves this check to the C++ kernels when they run (it checks for the others).
// Every tensor is contiguous (check_lists), so each spans [data_ptr, data_ptr + nbytes): one
// sort, one sweep.
void check_no_overlap(const char* op, std::initializer_list<at::TensorList> lists,
                      std::initializer_list<const char*> names, size_t n_mut) {
  struct Span {
    uintptr_t begin, end;
    size_t list, index;
  };
  std::vector<Span> spans;
  size_t l = 0;
  for (const auto& list : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      const auto b = reinterpret_cast<uintptr_t>(list[i].data_ptr());
      const auto n = static_cast<uintptr_t>(list[i].numel()) * list[i].element_size();
      if (n) spans.push_back({b, b + n, l, i});
    }
    ++l;
  }
  std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  // the spans reaching furthest so far: of any list, and of an updated list
  const Span* far_any = nullptr;
  const Span* far_mut = nullptr;
  const auto name = [&](const Span& s) { return std::string(names.begin()[s.list]) + "[" + std::to_string(s.index) + "]"; };
  for (const Span& s : spans) {
    const bool mut = s.list < n_mut;
    const Span* other = mut ? far_any : far_mut;
    if (other && s.begin < other->end) {  // (the message and the error type of ops/solver.py's check)
      const bool s_named_first = !(mut && other->list >= n_mut);  // the updated one goes second
      TORCH_CHECK_VALUE(false, op, ": ", name(s_named_first ? s : *other), " shares memory with ",
                        name(s_named_first ? *other : s),
                        ", which is updated in place; the updated vectors must not alias or overlap any other argument");
    }
    if (!far_any || s.end > far_any->end) far_any = &s;
    if (mut && (!far_mut || s.end > far_mut->end)) far_mut = &s;
  }
}

template <typename T>
std::vector<T*> mut_ptrs(const at::TensorList& ts) {
  std::vector<T*> p;
  for (const auto& t : ts) p.push_back(t.data_ptr<T>());
  return p;
}

template <typename T>
std::vector<const T*> ptrs(const at::TensorList& ts) {
  std::vector<const T*> p;
  for (const auto& t : ts) p.push_back(t.const_data_ptr<T>());
  return p;
}

// run f(chunk_index, chunk) over all chunks in parallel
template <typename F>
void for_chunks(const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 2, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) f(k, chunks[k]);
  });
}

at::Tensor scalar_out(const at::Tensor& like, double v) {
  at::Tensor out = new_output({}, like.options());
  // a float32 result beyond float32's range rounds to +-inf (fill_ would refuse the double)
  if (out.scalar_type() == at::kFloat && std::isfinite(v) && std::abs(v) > std::numeric_limits<float>::max())
    v = std::copysign(std::numeric_limits<double>::infinity(), v);
  out.fill_(v);
  return out;
}

double sum_partials(const std::vector<double>& partial) {
  double s = 0.0;
  for (double v : partial) s += v;
  return s;
}

// -------------------------------------------------------------- neumann_step

// one line per vector of W floats (AVX-512) or half a line (AVX2: a repeat is free), 2 KB ahead
template <typename T>
inline __attribute__((always_inline)) void prefetch_stream(const T* p) {
  prefetch_lines<2048, 1>(p);
}

template <typename T>
void neumann_impl(at::TensorList c, at::TensorList p, at::TensorList h, double alpha) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const auto chunks = make_chunks(c);
  const auto pc = mut_ptrs<T>(c), pp = mut_ptrs<T>(p);
  const auto ph = ptrs<T>(h);
  const T a = static_cast<T>(alpha);
  const Vec na(-a);
  for_chunks(chunks, [&](int64_t, const Chunk& ch) {
    T* cc = pc[ch.tensor];
    T* pv = pp[ch.tensor];
    const T* hv = ph[ch.tensor];
    int64_t i = ch.begin;
    for (; i + W <= ch.end; i += W) {
      prefetch_stream(cc + i);  // three read streams: the hardware prefetcher alone falls behind
      prefetch_stream(hv + i);
      prefetch_stream(pv + i);
      // all loads before the stores: large tensors are page-aligned, so c[i] and p[i] share
      // their low 12 address bits and a load of p[i] after the store to c[i] would stall on
      // the store (4K aliasing)
      const Vec hl = Vec::loadu(hv + i), cl = Vec::loadu(cc + i), pl = Vec::loadu(pv + i);
      const Vec nc = at::vec::fmadd(na, hl, cl);
      nc.store(cc + i);
      (pl + nc).store(pv + i);
    }
    for (; i < ch.end; ++i) {
      const T nc = cc[i] - a * hv[i];
      cc[i] = nc;
      pv[i] += nc;
    }
  });
}

void cpp_neumann_step(at::TensorList c, at::TensorList p, at::TensorList h, const at::Tensor& alpha) {
  check_lists("neumann_step", {c, p, h});
  check_no_overlap("neumann_step", {c, p, h}, {"c", "p", "h"}, 2);
  const double a = alpha.item<double>();
  AT_DISPATCH_FLOATING_TYPES(c[0].scalar_type(), "cpp_neumann_step", [&] { neumann_impl<scalar_t>(c, p, h, a); });
}

// -------------------------------------------------------------- axpy_dot

template <typename T>
double axpy_dot_impl(at::TensorList y, double alpha, at::TensorList x, at::TensorList z) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const auto chunks = make_chunks(y);
  const auto py = mut_ptrs<T>(y);
  const auto px = ptrs<T>(x);
  const bool self = z.empty();
  const auto pz = self ? std::vector<const T*>() : ptrs<T>(z);
  const T a = static_cast<T>(alpha);
  const Vec va(a);
  std::vector<double> partial(chunks.size(), 0.0);
  for_chunks(chunks, [&](int64_t k, const Chunk& ch) {
    T* yv = py[ch.tensor];
    const T* xv = px[ch.tensor];
    const T* zv = self ? nullptr : pz[ch.tensor];
    Vec acc0(T(0)), acc1(T(0));
    int64_t i = ch.begin;
    for (; i + 2 * W <= ch.end; i += 2 * W) {
      const Vec y0 = at::vec::fmadd(va, Vec::loadu(xv + i), Vec::loadu(yv + i));
      const Vec y1 = at::vec::fmadd(va, Vec::loadu(xv + i + W), Vec::loadu(yv + i + W));
      y0.store(yv + i);
      y1.store(yv + i + W);
      acc0 = at::vec::fmadd(y0, self ? y0 : Vec::loadu(zv + i), acc0);
      acc1 = at::vec::fmadd(y1, self ? y1 : Vec::loadu(zv + i + W), acc1);
    }
    double s = at::vec::vec_reduce_all<T>([](Vec& u, Vec& v) { return u + v; }, acc0 + acc1);
    for (; i < ch.end; ++i) {
      const T ny = yv[i] + a * xv[i];
      yv[i] = ny;
      s += static_cast<double>(ny) * static_cast<double>(self ? ny : zv[i]);
    }
    partial[k] = s;
  });
  return sum_partials(partial);
}

at::Tensor cpp_axpy_dot(at::TensorList y, const at::Tensor& a, at::TensorList x, at::TensorList z) {
  if (z.empty()) {
    check_lists("axpy_dot", {y, x});
    check_no_overlap("axpy_dot", {y, x}, {"y", "x"}, 1);
  } else {
    check_lists("axpy_dot", {y, x, z});
    check_no_overlap("axpy_dot", {y, x, z}, {"y", "x", "z"}, 1);
  }
  const double av = a.item<double>();
  double r = 0.0;
  AT_DISPATCH_FLOATING_TYPES(y[0].scalar_type(), "cpp_axpy_dot", [&] { r = axpy_dot_impl<scalar_t>(y, av, x, z); });
  return scalar_out(y[0], r);
}

// -------------------------------------------------------------- cg_update

template <typename T>
double cg_impl(at::TensorList x, at::TensorList r, at::TensorList d, at::TensorList q, double alpha) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const auto chunks = make_chunks(x);
  const auto px = mut_ptrs<T>(x), pr = mut_ptrs<T>(r);
  const auto pd = ptrs<T>(d), pq = ptrs<T>(q);
  const T a = static_cast<T>(alpha);
  const Vec va(a), na(-a);
  std::vector<double> partial(chunks.size(), 0.0);
  for_chunks(chunks, [&](int64_t k, const Chunk& ch) {
    T* xv = px[ch.tensor];
    T* rv = pr[ch.tensor];
    const T* dv = pd[ch.tensor];
    const T* qv = pq[ch.tensor];
    Vec acc0(T(0)), acc1(T(0));
    int64_t i = ch.begin;
    for (; i + 2 * W <= ch.end; i += 2 * W) {
      at::vec::fmadd(va, Vec::loadu(dv + i), Vec::loadu(xv + i)).store(xv + i);
      at::vec::fmadd(va, Vec::loadu(dv + i + W), Vec::loadu(xv + i + W)).store(xv + i + W);
      const Vec r0 = at::vec::fmadd(na, Vec::loadu(qv + i), Vec::loadu(rv + i));
      const Vec r1 = at::vec::fmadd(na, Vec::loadu(qv + i + W), Vec::loadu(rv + i + W));
      r0.store(rv + i);
      r1.store(rv + i + W);
      acc0 = at::vec::fmadd(r0, r0, acc0);
      acc1 = at::vec::fmadd(r1, r1, acc1);
    }
    double s = at::vec::vec_reduce_all<T>([](Vec& u, Vec& v) { return u + v; }, acc0 + acc1);
    for (; i < ch.end; ++i) {
      xv[i] += a * dv[i];
      const T nr = rv[i] - a * qv[i];
      rv[i] = nr;
      s += static_cast<double>(nr) * static_cast<double>(nr);
    }
    partial[k] = s;
  });
  return sum_partials(partial);
}

at::Tensor cpp_cg_update(at::TensorList x, at::TensorList r, at::TensorList d, at::TensorList q, const at::Tensor& a) {
  check_lists("cg_update", {x, r, d, q});
  check_no_overlap("cg_update", {x, r, d, q}, {"x", "r", "d", "q"}, 2);
  const double av = a.item<double>();
  double res = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x[0].scalar_type(), "cpp_cg_update", [&] { res = cg_impl<scalar_t>(x, r, d, q, av); });
  return scalar_out(x[0], res);
}

// -------------------------------------------------------------- multi_dot

template <typename T>
double dot_impl(at::TensorList x, at::TensorList y) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const auto chunks = make_chunks(x);
  const auto px = ptrs<T>(x);
  const bool self = y.empty();
  const auto py = self ? px : ptrs<T>(y);
  std::vector<double> partial(chunks.size(), 0.0);
  for_chunks(chunks, [&](int64_t k, const Chunk& ch) {
    const T* xv = px[ch.tensor];
    const T* yv = py[ch.tensor];
    Vec acc0(T(0)), acc1(T(0)), acc2(T(0)), acc3(T(0));
    int64_t i = ch.begin;
    for (; i + 4 * W <= ch.end; i += 4 * W) {
      acc0 = at::vec::fmadd(Vec::loadu(xv + i), Vec::loadu(yv + i), acc0);
      acc1 = at::vec::fmadd(Vec::loadu(xv + i + W), Vec::loadu(yv + i + W), acc1);
      acc2 = at::vec::fmadd(Vec::loadu(xv + i + 2 * W), Vec::loadu(yv + i + 2 * W), acc2);
      acc3 = at::vec::fmadd(Vec::loadu(xv + i + 3 * W), Vec::loadu(yv + i + 3 * W), acc3);
    }
    double s = at::vec::vec_reduce_all<T>([](Vec& u, Vec& v) { return u + v; }, (acc0 + acc1) + (acc2 + acc3));
    for (; i < ch.end; ++i) s += static_cast<double>(xv[i]) * static_cast<double>(yv[i]);
    partial[k] = s;
  });
  return sum_partials(partial);
}

at::Tensor cpp_multi_dot(at::TensorList x, at::TensorList y) {
  if (y.empty())
    check_lists("multi_dot", {x});
  else
    check_lists("multi_dot", {x, y});
  double res = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x[0].scalar_type(), "cpp_multi_dot", [&] { res = dot_impl<scalar_t>(x, y); });
  return scalar_out(x[0], res);
}


// -------------------------------------------------------------- adam_step (engine/unroll.py's inner Adam)

// torch.optim.Adam's formula, op for op (ATen's lerp is one fma, from the nearer end: start
// for a weight < 0.5, end otherwise, so that beta1 near 0 keeps g's precision; the rest are
// separate roundings, as this file is compiled without contraction). Not the same bits in every
// element: sqrt here is correctly rounded (ATen's float32 sqrt is not always):
//   m' = m + (1 - b1)(g - m) [= g - b1 (g - m)]; v' = (v b2) + ((1 - b2) g) g; d = sqrt(v') / sqrt(bc2) + eps;
//   p' = p + (-(lr / bc1) m') / d.  Tails run the same vector code on partial vectors.
struct AdamHyper {
  double lr, b1, b2, eps, bc1, bc2;
};

std::vector<at::Tensor> new_like(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(new_output(t.sizes(), t.options()));
  return out;
}

template <typename T>
void adam_impl(at::TensorList p, at::TensorList g, at::TensorList m, at::TensorList v, const AdamHyper& h,
               std::vector<at::Tensor>& po, std::vector<at::Tensor>& mo, std::vector<at::Tensor>& vo) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const auto chunks = make_chunks(p);
  const auto pp = ptrs<T>(p), pg = ptrs<T>(g), pm = ptrs<T>(m), pv = ptrs<T>(v);
  const auto opp = mut_ptrs<T>(po), opm = mut_ptrs<T>(mo), opv = mut_ptrs<T>(vo);
  const T w = static_cast<T>(1 - h.b1);
  const bool from_start = w < T(0.5);
  const Vec coeff(from_start ? w : w - T(1)), b2(static_cast<T>(h.b2)), c2(static_cast<T>(1 - h.b2));
  const Vec rs(static_cast<T>(std::sqrt(h.bc2))), eps(static_cast<T>(h.eps)), step(static_cast<T>(-(h.lr / h.bc1)));
  for_chunks(chunks, [&](int64_t, const Chunk& ch) {
    const int t = ch.tensor;
    for (int64_t i = ch.begin; i < ch.end; i += W) {
      const int64_t n = std::min<int64_t>(W, ch.end - i);
      const Vec gi = Vec::loadu(pg[t] + i, n), mi = Vec::loadu(pm[t] + i, n);
      const Vec vi = Vec::loadu(pv[t] + i, n), pi = Vec::loadu(pp[t] + i, n);
      const Vec mn = at::vec::fmadd(coeff, gi - mi, from_start ? mi : gi);
      const Vec vn = vi * b2 + c2 * gi * gi;
      const Vec d = vn.sqrt() / rs + eps;
      const Vec pn = pi + step * mn / d;
      mn.store(opm[t] + i, n);
      vn.store(opv[t] + i, n);
      pn.store(opp[t] + i, n);
    }
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> cpp_adam_step(
    at::TensorList p, at::TensorList g, at::TensorList m, at::TensorList v, double lr, double beta1, double beta2,
    double eps, double bc1, double bc2) {
  check_lists("adam_step", {p, g, m, v});
  auto po = new_like(p), mo = new_like(m), vo = new_like(v);
  const AdamHyper h{lr, beta1, beta2, eps, bc1, bc2};
  AT_DISPATCH_FLOATING_TYPES(p[0].scalar_type(), "cpp_adam_step",
                             [&] { adam_impl<scalar_t>(p, g, m, v, h, po, mo, vo); });
  return {po, mo, vo};
}

// Reverse mode of adam_step (not differentiable itself: a double backward uses the reference):
// for incoming P, M, V (grads of p', m', v'; an undefined one is zero),
//   q = P / d;  M~ = M + (-(lr / bc1)) q;  V~ = V + ((q m') / d) / sqrt(v') (lr / bc1 / (2 sqrt(bc2)))
//   (0 where v' = 0);  dg = (1 - b1) M~ + (2 (1 - b2) g) V~;  dm = b1 M~;  dv = b2 V~.
template <typename T>
void adam_backward_impl(const std::vector<const T*>& P, const std::vector<const T*>& M,
                        const std::vector<const T*>& V, at::TensorList g, at::TensorList mn, at::TensorList vn,
                        const AdamHyper& h, const std::vector<T*>& dg, const std::vector<T*>& dm,
                        const std::vector<T*>& dv) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const auto chunks = make_chunks(g);
  const auto pg = ptrs<T>(g), pm = ptrs<T>(mn), pv = ptrs<T>(vn);
  const double a = h.lr / h.bc1;
  const Vec rs(static_cast<T>(std::sqrt(h.bc2))), eps(static_cast<T>(h.eps)), na(static_cast<T>(-a));
  const Vec cv(static_cast<T>(a / (2 * std::sqrt(h.bc2)))), zero(0);
  const Vec b1(static_cast<T>(h.b1)), c1(static_cast<T>(1 - h.b1)), b2(static_cast<T>(h.b2));
  const Vec c2(static_cast<T>(2 * (1 - h.b2)));
  for_chunks(chunks, [&](int64_t, const Chunk& ch) {
    const int t = ch.tensor;
    for (int64_t i = ch.begin; i < ch.end; i += W) {
      const int64_t n = std::min<int64_t>(W, ch.end - i);
      Vec mt = M[t] ? Vec::loadu(M[t] + i, n) : zero;
      Vec vt = V[t] ? Vec::loadu(V[t] + i, n) : zero;
      if (P[t]) {
        const Vec vi = Vec::loadu(pv[t] + i, n), sq = vi.sqrt();
        const Vec d = sq / rs + eps;
        const Vec q = Vec::loadu(P[t] + i, n) / d;
        mt = mt + na * q;
        const Vec dvv = q * Vec::loadu(pm[t] + i, n) / d / sq * cv;
        vt = vt + Vec::blendv(zero, dvv, vi > zero);  // sqrt's derivative at 0 taken as 0
      }
      if (!dg.empty()) (c1 * mt + c2 * Vec::loadu(pg[t] + i, n) * vt).store(dg[t] + i, n);
      if (!dm.empty()) (b1 * mt).store(dm[t] + i, n);
      if (!dv.empty()) (b2 * vt).store(dv[t] + i, n);
    }
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> cpp_adam_step_backward(
    const c10::List<std::optional<at::Tensor>>& gp, const c10::List<std::optional<at::Tensor>>& gm,
    const c10::List<std::optional<at::Tensor>>& gv, at::TensorList g, at::TensorList m, at::TensorList v, double lr,
    double beta1, double beta2, double eps, double bc1, double bc2, std::array<bool, 3> output_mask) {
  check_lists("adam_step_backward", {g, m, v});
  const size_t k = g.size();
  TORCH_CHECK(gp.size() == k && gm.size() == k && gv.size() == k, "adam_step_backward: lists of different lengths");
  std::vector<at::Tensor> keep;  // the defined incoming grads, checked like the other lists
  auto check = [&](const c10::List<std::optional<at::Tensor>>& l) {
    for (size_t i = 0; i < k; ++i) {
      const std::optional<at::Tensor> t = l[i];
      if (!t.has_value() || !t->defined()) continue;
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == g[0].scalar_type() && t->is_contiguous() &&
                      t->numel() == g[i].numel(),
                  "adam_step_backward: incoming gradient ", i, " must be a contiguous CPU tensor like g");
    }
  };
  check(gp);
  check(gm);
  check(gv);
  std::vector<at::Tensor> dg = output_mask[0] ? new_like(g) : std::vector<at::Tensor>{};
  std::vector<at::Tensor> dm = output_mask[1] ? new_like(m) : std::vector<at::Tensor>{};
  std::vector<at::Tensor> dv = output_mask[2] ? new_like(v) : std::vector<at::Tensor>{};
  const AdamHyper h{lr, beta1, beta2, eps, bc1, bc2};
  AT_DISPATCH_FLOATING_TYPES(g[0].scalar_type(), "cpp_adam_step_backward", [&] {
    using T = scalar_t;
    auto opt_ptrs = [&](const c10::List<std::optional<at::Tensor>>& l) {
      std::vector<const T*> out(k, nullptr);
      for (size_t i = 0; i < k; ++i) {
        const std::optional<at::Tensor> t = l[i];
        if (t.has_value() && t->defined()) out[i] = t->const_data_ptr<T>();
      }
      return out;
    };
    adam_backward_impl<T>(opt_ptrs(gp), opt_ptrs(gm), opt_ptrs(gv), g, m, v, h, mut_ptrs<T>(dg), mut_ptrs<T>(dm),
                          mut_ptrs<T>(dv));
  });
  return {dg, dm, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cpp_neumann_step(Tensor(a!)[] c, Tensor(b!)[] p, Tensor[] h, Tensor alpha) -> ()");
  m.def("cpp_axpy_dot(Tensor(a!)[] y, Tensor a, Tensor[] x, Tensor[] z) -> Tensor");
  m.def("cpp_cg_update(Tensor(a!)[] x, Tensor(b!)[] r, Tensor[] d, Tensor[] q, Tensor a) -> Tensor");
  m.def("cpp_multi_dot(Tensor[] x, Tensor[] y) -> Tensor");
  m.def("cpp_adam_step(Tensor[] p, Tensor[] g, Tensor[] m, Tensor[] v, float lr, float beta1, float beta2, "
        "float eps, float bc1, float bc2) -> (Tensor[], Tensor[], Tensor[])");
  m.def("cpp_adam_step_backward(Tensor?[] gp, Tensor?[] gm, Tensor?[] gv, Tensor[] g, Tensor[] m, Tensor[] v, "
        "float lr, float beta1, float beta2, float eps, float bc1, float bc2, bool[3] output_mask) "
        "-> (Tensor[], Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CPU, m) {
  m.impl("cpp_neumann_step", &cpp_neumann_step);
  m.impl("cpp_axpy_dot", &cpp_axpy_dot);
  m.impl("cpp_cg_update", &cpp_cg_update);
  m.impl("cpp_multi_dot", &cpp_multi_dot);
  m.impl("cpp_adam_step", &cpp_adam_step);
  m.impl("cpp_adam_step_backward", &cpp_adam_step_backward);
}

}  // namespace commentaries_ext
