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

#include <cmath>
#include <limits>
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
  if (z.empty())
    check_lists("axpy_dot", {y, x});
  else
    check_lists("axpy_dot", {y, x, z});
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cpp_neumann_step(Tensor(a!)[] c, Tensor(b!)[] p, Tensor[] h, Tensor alpha) -> ()");
  m.def("cpp_axpy_dot(Tensor(a!)[] y, Tensor a, Tensor[] x, Tensor[] z) -> Tensor");
  m.def("cpp_cg_update(Tensor(a!)[] x, Tensor(b!)[] r, Tensor[] d, Tensor[] q, Tensor a) -> Tensor");
  m.def("cpp_multi_dot(Tensor[] x, Tensor[] y) -> Tensor");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CPU, m) {
  m.impl("cpp_neumann_step", &cpp_neumann_step);
  m.impl("cpp_axpy_dot", &cpp_axpy_dot);
  m.impl("cpp_cg_update", &cpp_cg_update);
  m.impl("cpp_multi_dot", &cpp_multi_dot);
}

}  // namespace commentaries_ext
