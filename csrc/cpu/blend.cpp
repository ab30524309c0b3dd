// Masked blending on the CPU: out = m * x_a + (1 - m) * xb, xb = (x_a or x_b)[perm].
// Contract (validated by commentaries_ext/ops/blend.py): x_a dense (contiguous or
// channels-last), x_b with x_a's trailing strides, m of x_a's rank with
// m.size(0) == N and other dims 1 or equal (any strides), perm int64 [N] in range.
//
// Layout: every example (row) is the same dense block of `row` elements. Its
// dimensions are put in memory order and coalesced wherever x, m and grad_m can
// all be walked with one stride, which leaves an innermost run (length `inner`)
// along which m is either constant (stride 0: per example, per pixel of a
// channels-last tensor ...) or contiguous (stride 1: per pixel of an NCHW tensor),
// and an "outer" counter over the remaining dims. Runs are vectorised with
// at::vec::Vectorized; rows are spread over threads with at::parallel_for.
#include "cpu/simd.h"  // first: selects the Vectorized specialisation
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "blend_contract.h"
#include "common.h"

namespace commentaries_ext {
namespace {

constexpr int kMaxDims = 12;

struct RowLayout {
  int64_t n = 0;         // examples
  int64_t row = 1;       // elements per example (x)
  int64_t m_row = 0;     // stride of m between examples
  int64_t g_row = 0;     // stride of grad_m (contiguous) between examples
  int64_t gm_numel_row = 1;  // elements of grad_m per example
  int nd = 0;            // coalesced inner dims (memory order, outer -> inner); last is the run
  std::array<int64_t, kMaxDims> size{}, xs{}, ms{}, gs{};

  int64_t inner() const { return nd ? size[nd - 1] : 1; }
  int64_t m_inner() const { return nd ? ms[nd - 1] : 0; }
  int64_t g_inner() const { return nd ? gs[nd - 1] : 0; }
  int64_t outer() const {
    int64_t o = 1;
    for (int d = 0; d + 1 < nd; ++d) o *= size[d];
    return o;
  }
  // offsets of outer index `o` (x, m, grad_m)
  void offsets(int64_t o, int64_t& xo, int64_t& mo, int64_t& go) const {
    xo = mo = go = 0;
    for (int d = nd - 2; d >= 0; --d) {
      const int64_t i = o % size[d];
      o /= size[d];
      xo += i * xs[d];
      mo += i * ms[d];
      go += i * gs[d];
    }
  }
};

RowLayout make_layout(const at::Tensor& x, const at::Tensor& m) {
  const int64_t D = x.dim();
  TORCH_CHECK(D >= 1, "blend: x_a must have at least 1 dimension");
  // the kernels address x_a (and their outputs, empty_like(x_a)) as dense rows, in any order of
  // the dimensions (contiguous, channels-last, ...), and m per example
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "blend: x_a must be dense (contiguous, channels-last or another "
              "order of its dimensions, without gaps)");
  blend_contract::check_mask(x, m, "blend");
  RowLayout L;
  L.n = x.size(0);
  // contiguous strides of grad_m (m's shape), 0 along broadcast dims
  std::vector<int64_t> gstr(D, 0);
  int64_t acc = 1;
  for (int64_t d = D - 1; d >= 0; --d) {
    gstr[d] = m.size(d) == 1 ? 0 : acc;
    acc *= m.size(d);
  }
  L.m_row = m.size(0) == 1 ? 0 : m.stride(0);
  L.g_row = gstr[0];
  L.gm_numel_row = L.n > 0 ? m.numel() / std::max<int64_t>(m.size(0), 1) : 0;
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < D; ++d)
    if (x.size(d) != 1) dims.push_back(d);
  // size-1 dimensions are dropped, so only the others count against the layout's capacity
  TORCH_CHECK(dims.size() <= static_cast<size_t>(kMaxDims), "blend: x_a has ", dims.size(),
              " dimensions of size > 1 after the first; at most ", kMaxDims, " are supported");
  std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
  L.row = 1;
  for (int64_t d : dims) L.row *= x.size(d);
  // coalesce from the innermost dimension outwards
  std::array<int64_t, kMaxDims> size{}, xs{}, ms{}, gs{};
  int nd = 0;
  for (auto it = dims.rbegin(); it != dims.rend(); ++it) {
    const int64_t d = *it;
    const int64_t sz = x.size(d), sx = x.stride(d);
    const int64_t sm = m.size(d) == 1 ? 0 : m.stride(d), sg = gstr[d];
    if (nd > 0) {
      const int k = nd - 1;  // the dimension just inside this one
      if (sx == size[k] * xs[k] && sm == size[k] * ms[k] && sg == size[k] * gs[k]) {
        size[k] *= sz;
        continue;
      }
    }
    size[nd] = sz;
    xs[nd] = sx;
    ms[nd] = sm;
    gs[nd] = sg;
    ++nd;
  }
  // reverse into outer -> inner order
  L.nd = nd;
  for (int i = 0; i < nd; ++i) {
    L.size[i] = size[nd - 1 - i];
    L.xs[i] = xs[nd - 1 - i];
    L.ms[i] = ms[nd - 1 - i];
    L.gs[i] = gs[nd - 1 - i];
  }
  if (nd == 0) {  // one element per example
    L.nd = 1;
    L.size[0] = 1;
    L.xs[0] = 1;
    L.ms[0] = 0;
    L.gs[0] = 0;
  }
  TORCH_CHECK(L.xs[L.nd - 1] == 1, "blend: x_a must be contiguous or channels-last");
  TORCH_CHECK(L.n <= 1 || x.stride(0) == L.row, "blend: x_a must be contiguous or channels-last");
  return L;
}

// perm's values in [0, rows of the partner) (its layout: blend_contract::check_partner)
void check_perm_range(const at::Tensor& x_a, const c10::optional<at::Tensor>& x_b,
                      const c10::optional<at::Tensor>& perm, const char* op) {
  if (!perm.has_value()) return;
  const int64_t rows = x_b.has_value() ? x_b->size(0) : x_a.size(0);
  const int64_t* pp = perm->const_data_ptr<int64_t>();
  for (int64_t i = 0; i < perm->size(0); ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < rows, op, ": perm holds ", pp[i], ", out of range for ", rows, " rows");
}

// Order in which to visit the examples. With a gathered partner that is a true
// permutation of x_a's rows, walking its cycles (i, perm[i], perm[perm[i]], ...)
// makes every row of x (and of grad) be loaded from memory once: the row read as
// the partner of i is the own row of the next example, and the grad row sent to
// i's partner term is the own grad row of the previous one. Otherwise (x_b given,
// repeats in perm) the identity.
std::vector<int64_t> visit_order(const int64_t* perm, int64_t n, bool self_partner) {
  std::vector<int64_t> order(n);
  bool bijection = self_partner && perm != nullptr;
  std::vector<char> seen;
  if (bijection) {
    seen.assign(n, 0);
    for (int64_t i = 0; i < n && bijection; ++i) {
      const int64_t j = perm[i];
      if (j < 0 || j >= n || seen[j]) bijection = false;
      else seen[j] = 1;
    }
  }
  if (!bijection) {
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    return order;
  }
  std::fill(seen.begin(), seen.end(), 0);
  int64_t q = 0;
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t i = s; !seen[i]; i = perm[i]) {
      seen[i] = 1;
      order[q++] = i;
    }
  }
  return order;
}

// out = m * a + (1 - m) * b over a run of `len` elements; m constant (ms == 0) or strided.
// As written (one rounding of (1 - m) * b, then an fma), not as the lerp b + m * (a - b): a 0/1
// mask gives a or b exactly, and there is no a - b to overflow.
template <typename T>
inline void blend_run(T* out, const T* a, const T* b, const T* m, int64_t ms, int64_t len) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  if (ms == 0) {
    const T mv = *m, wv = T(1) - mv;
    const Vec vm(mv), vw(wv);
    for (; i + W <= len; i += W) at::vec::fmadd(vm, Vec::loadu(a + i), vw * Vec::loadu(b + i)).store(out + i);
    for (; i < len; ++i) out[i] = std::fma(mv, a[i], wv * b[i]);
  } else if (ms == 1) {
    const Vec one(T(1));
    for (; i + W <= len; i += W) {
      const Vec vm = Vec::loadu(m + i);
      at::vec::fmadd(vm, Vec::loadu(a + i), (one - vm) * Vec::loadu(b + i)).store(out + i);
    }
    for (; i < len; ++i) out[i] = std::fma(m[i], a[i], (T(1) - m[i]) * b[i]);
  } else {
    for (; i < len; ++i) out[i] = std::fma(m[i * ms], a[i], (T(1) - m[i * ms]) * b[i]);
  }
}

template <typename T>
void forward_impl(const at::Tensor& x_a, const at::Tensor& m, const c10::optional<at::Tensor>& x_b,
                  const c10::optional<at::Tensor>& perm, at::Tensor& out) {
  const RowLayout L = make_layout(x_a, m);
  blend_contract::check_partner(x_a, x_b, perm, L.row, "blend_forward");
  check_perm_range(x_a, x_b, perm, "blend_forward");
  const T* pa = x_a.const_data_ptr<T>();
  const T* pb = x_b.has_value() ? x_b->const_data_ptr<T>() : pa;
  const T* pm = m.const_data_ptr<T>();
  const int64_t* pp = perm.has_value() ? perm->const_data_ptr<int64_t>() : nullptr;
  T* po = out.mutable_data_ptr<T>();
  const int64_t outer = L.outer(), inner = L.inner(), ms = L.m_inner();
  const std::vector<int64_t> order = visit_order(pp, L.n, pp && !x_b.has_value());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(L.row, 1));
  at::parallel_for(0, L.n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t i = order[q];
      const int64_t j = pp ? pp[i] : i;
      for (int64_t o = 0; o < outer; ++o) {
        int64_t xo, mo, go;
        L.offsets(o, xo, mo, go);
        blend_run<T>(po + i * L.row + xo, pa + i * L.row + xo, pb + j * L.row + xo, pm + i * L.m_row + mo, ms,
                     inner);
      }
    }
  });
}

at::Tensor cpp_blend_forward(const at::Tensor& x_a, const at::Tensor& m, const c10::optional<at::Tensor>& x_b,
                             const c10::optional<at::Tensor>& perm) {
  TORCH_CHECK(x_b.has_value() || perm.has_value(), "blend_forward: give x_b or perm");
  at::Tensor out = at::empty_like(x_a);
  if (poison_outputs_flag().load(std::memory_order_relaxed)) out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (x_a.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x_a.scalar_type(), "cpp_blend_forward", [&] { forward_impl<scalar_t>(x_a, m, x_b, perm, out); });
  return out;
}

// One run of the backward of example i against partner row xb:
//   gxa = g * m (if gxa), gxb = g - g*m (if gxb), gm += reduce(g * (a - b)) (if gm).
// g2/w2: the one partner row sending g2 * w2 (w2 = 1 - m of that row, constant) to
// gxa, fused into the same pass (only in the m-constant branch; else nullptr).
template <typename T>
inline void backward_run(const T* g, const T* a, const T* b, const T* m, int64_t ms, T* gxa, T* gxb, T* gm,
                         int64_t gs, int64_t len, const T* g2 = nullptr, T w2 = T(0)) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  if (ms == 0 && gs == 0) {  // m constant along the run: one reduction into *gm
    const T mv = *m;
    const Vec vm(mv), vw2(w2);
    Vec acc0(T(0)), acc1(T(0));
    for (; i + 2 * W <= len; i += 2 * W) {
      const Vec g0 = Vec::loadu(g + i), g1 = Vec::loadu(g + i + W);
      if (gxa && g2) {
        at::vec::fmadd(Vec::loadu(g2 + i), vw2, g0 * vm).store(gxa + i);
        at::vec::fmadd(Vec::loadu(g2 + i + W), vw2, g1 * vm).store(gxa + i + W);
      } else if (gxa) {
        (g0 * vm).store(gxa + i);
        (g1 * vm).store(gxa + i + W);
      }
      if (gxb) {
        at::vec::fnmadd(g0, vm, g0).store(gxb + i);
        at::vec::fnmadd(g1, vm, g1).store(gxb + i + W);
      }
      if (gm) {
        acc0 = at::vec::fmadd(g0, Vec::loadu(a + i) - Vec::loadu(b + i), acc0);
        acc1 = at::vec::fmadd(g1, Vec::loadu(a + i + W) - Vec::loadu(b + i + W), acc1);
      }
    }
    T s = T(0);
    if (gm) s = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc0 + acc1);
    for (; i < len; ++i) {
      if (gxa) gxa[i] = g[i] * mv + (g2 ? g2[i] * w2 : T(0));
      if (gxb) gxb[i] = g[i] - g[i] * mv;
      if (gm) s += g[i] * (a[i] - b[i]);
    }
    if (gm) *gm += s;
  } else if (ms == 1 && gs == 1) {
    for (; i + W <= len; i += W) {
      const Vec vg = Vec::loadu(g + i), vm = Vec::loadu(m + i);
      if (gxa) (vg * vm).store(gxa + i);
      if (gxb) at::vec::fnmadd(vg, vm, vg).store(gxb + i);
      if (gm) at::vec::fmadd(vg, Vec::loadu(a + i) - Vec::loadu(b + i), Vec::loadu(gm + i)).store(gm + i);
    }
    for (; i < len; ++i) {
      if (gxa) gxa[i] = g[i] * m[i];
      if (gxb) gxb[i] = g[i] - g[i] * m[i];
      if (gm) gm[i] += g[i] * (a[i] - b[i]);
    }
  } else {
    for (; i < len; ++i) {
      const T mv = m[i * ms];
      if (gxa) gxa[i] = g[i] * mv;
      if (gxb) gxb[i] = g[i] - g[i] * mv;
      if (gm) gm[i * gs] += g[i] * (a[i] - b[i]);
    }
  }
}

// Per-pixel mask of an NCHW tensor (m constant over the outer dim, contiguous
// along the run): blocks of 4 vectors along the run, the outer dim (channels)
// inside, so grad_m accumulates in registers and m stays in registers, instead of
// a read-modify-write of grad_m per channel. Optional fused partner row (g2, m2):
// gxa = g*m + g2*(1 - m2).
template <typename T>
void pixel_backward(const T* g, const T* a, const T* b, const T* m, T* gxa, T* gm, const T* g2, const T* m2,
                    int64_t outer, int64_t ostride, int64_t len) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr int K = 4;
  const Vec one(T(1));
  int64_t k0 = 0;
  for (; k0 + K * W <= len; k0 += K * W) {
    Vec mv[K], w2[K], acc[K];
    for (int v = 0; v < K; ++v) {
      mv[v] = Vec::loadu(m + k0 + v * W);
      if (g2) w2[v] = one - Vec::loadu(m2 + k0 + v * W);
      acc[v] = Vec(T(0));
    }
    for (int64_t o = 0; o < outer; ++o) {
      const int64_t off = o * ostride + k0;
      for (int v = 0; v < K; ++v) {
        const Vec gv = Vec::loadu(g + off + v * W);
        if (gxa) {
          Vec r = gv * mv[v];
          if (g2) r = at::vec::fmadd(Vec::loadu(g2 + off + v * W), w2[v], r);
          r.store(gxa + off + v * W);
        }
        if (gm) acc[v] = at::vec::fmadd(gv, Vec::loadu(a + off + v * W) - Vec::loadu(b + off + v * W), acc[v]);
      }
    }
    if (gm)
      for (int v = 0; v < K; ++v) acc[v].store(gm + k0 + v * W);
  }
  for (int64_t k = k0; k < len; ++k) {
    T acc = T(0);
    for (int64_t o = 0; o < outer; ++o) {
      const int64_t off = o * ostride + k;
      if (gxa) gxa[off] = g[off] * m[k] + (g2 ? g2[off] * (T(1) - m2[k]) : T(0));
      acc += g[off] * (a[off] - b[off]);
    }
    if (gm) gm[k] = acc;
  }
}

// dst += g * (1 - m) over a run
template <typename T>
inline void partner_run(T* dst, const T* g, const T* m, int64_t ms, int64_t len) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  if (ms == 0) {
    const T w = T(1) - *m;
    const Vec vw(w);
    for (; i + W <= len; i += W) at::vec::fmadd(Vec::loadu(g + i), vw, Vec::loadu(dst + i)).store(dst + i);
    for (; i < len; ++i) dst[i] += g[i] * w;
  } else if (ms == 1) {
    const Vec one(T(1));
    for (; i + W <= len; i += W)
      at::vec::fmadd(Vec::loadu(g + i), one - Vec::loadu(m + i), Vec::loadu(dst + i)).store(dst + i);
    for (; i < len; ++i) dst[i] += g[i] * (T(1) - m[i]);
  } else {
    for (; i < len; ++i) dst[i] += g[i] * (T(1) - m[i * ms]);
  }
}

// For each destination row r in [0, rows): the examples n with perm[n] == r (CSR).
void invert_perm(const int64_t* perm, int64_t n, int64_t rows, std::vector<int64_t>& start,
                 std::vector<int64_t>& src) {
  start.assign(rows + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++start[perm[i] + 1];  // in range: check_perm_range
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  src.assign(n, 0);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) src[fill[perm[i]]++] = i;  // increasing n per row: deterministic
}

template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& x_a, const at::Tensor& m,
                   const c10::optional<at::Tensor>& x_b, const c10::optional<at::Tensor>& perm, bool need_xa,
                   bool need_xb, bool need_m, at::Tensor& gxa_t, at::Tensor& gxb_t, at::Tensor& gm_t) {
  const RowLayout L = make_layout(x_a, m);
  blend_contract::check_partner(x_a, x_b, perm, L.row, "blend_backward");
  check_perm_range(x_a, x_b, perm, "blend_backward");
  const T* pg = grad.const_data_ptr<T>();
  const T* pa = x_a.const_data_ptr<T>();
  const T* pb = x_b.has_value() ? x_b->const_data_ptr<T>() : pa;
  const T* pm = m.const_data_ptr<T>();
  const int64_t* pp = perm.has_value() ? perm->const_data_ptr<int64_t>() : nullptr;
  T* gxa = need_xa ? gxa_t.mutable_data_ptr<T>() : nullptr;
  T* gxb = need_xb ? gxb_t.mutable_data_ptr<T>() : nullptr;
  T* gm = need_m ? gm_t.mutable_data_ptr<T>() : nullptr;
  const int64_t outer = L.outer(), inner = L.inner(), ms = L.m_inner(), gs = L.g_inner();
  const bool self_partner = pp && !x_b.has_value();
  // direct grad_x_b (no perm): grad * (1 - m) in the same pass
  const bool direct_xb = need_xb && !pp;
  std::vector<int64_t> start, src;
  if (pp && ((self_partner && need_xa) || need_xb)) {
    const int64_t rows = x_b.has_value() ? x_b->size(0) : L.n;
    invert_perm(pp, L.n, rows, start, src);
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(L.row, 1));
  // pass 1, per example i: grad_x_a[i] = g m (+ partner terms), direct grad_x_b, grad_m[i]
  if (need_xa || direct_xb || need_m) {
    const std::vector<int64_t> order = visit_order(pp, L.n, self_partner);
    // per pixel of an NCHW tensor: m constant over the one outer dim, contiguous along the run
    const bool pixel = L.nd == 2 && L.ms[0] == 0 && L.gs[0] == 0 && ms == 1 && gs == 1 && L.xs[0] >= inner;
    at::parallel_for(0, L.n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t i = order[q];
        const int64_t j = pp ? pp[i] : i;
        T* gm_i = gm ? gm + i * L.g_row : nullptr;
        // exactly one row n with perm[n] == i (a permutation): its partner term is fused
        const bool one_src = self_partner && gxa && start[i + 1] - start[i] == 1;
        const int64_t n1 = one_src ? src[start[i]] : 0;
        if (pixel && !direct_xb) {
          pixel_backward<T>(pg + i * L.row, pa + i * L.row, pb + j * L.row, pm + i * L.m_row,
                            gxa ? gxa + i * L.row : nullptr, gm_i, one_src ? pg + n1 * L.row : nullptr,
                            one_src ? pm + n1 * L.m_row : nullptr, outer, L.xs[0], inner);
          if (self_partner && gxa && !one_src) {
            for (int64_t k = start[i]; k < start[i + 1]; ++k) {
              const int64_t n = src[k];
              for (int64_t o = 0; o < outer; ++o)
                partner_run<T>(gxa + i * L.row + o * L.xs[0], pg + n * L.row + o * L.xs[0], pm + n * L.m_row, ms,
                               inner);
            }
          }
          continue;
        }
        if (gm_i) std::fill(gm_i, gm_i + (L.g_row ? L.g_row : L.gm_numel_row), T(0));
        const bool fuse = one_src && ms == 0 && gs == 0;
        for (int64_t o = 0; o < outer; ++o) {
          int64_t xo, mo, go;
          L.offsets(o, xo, mo, go);
          const int64_t base = i * L.row + xo;
          backward_run<T>(pg + base, pa + base, pb + j * L.row + xo, pm + i * L.m_row + mo, ms,
                          gxa ? gxa + base : nullptr, direct_xb ? gxb + base : nullptr, gm_i ? gm_i + go : nullptr,
                          gs, inner, fuse ? pg + n1 * L.row + xo : nullptr,
                          fuse ? T(1) - pm[n1 * L.m_row + mo] : T(0));
          if (self_partner && gxa && !fuse) {  // rows n with perm[n] == i send g[n] (1 - m[n]) here
            for (int64_t k = start[i]; k < start[i + 1]; ++k) {
              const int64_t n = src[k];
              partner_run<T>(gxa + base, pg + n * L.row + xo, pm + n * L.m_row + mo, ms, inner);
            }
          }
        }
      }
    });
  }
  // pass 2: grad_x_b rows gathered through perm (x_b given with perm)
  if (need_xb && pp) {
    const int64_t rows = x_b->size(0);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* dst = gxb + r * L.row;
        std::fill(dst, dst + L.row, T(0));
        for (int64_t k = start[r]; k < start[r + 1]; ++k) {
          const int64_t n = src[k];
          for (int64_t o = 0; o < outer; ++o) {
            int64_t xo, mo, go;
            L.offsets(o, xo, mo, go);
            partner_run<T>(dst + xo, pg + n * L.row + xo, pm + n * L.m_row + mo, ms, inner);
          }
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpp_blend_backward(const at::Tensor& grad, const at::Tensor& x_a,
                                                                  const at::Tensor& m,
                                                                  const c10::optional<at::Tensor>& x_b,
                                                                  const c10::optional<at::Tensor>& perm,
                                                                  std::array<bool, 3> output_mask) {
  TORCH_CHECK(x_b.has_value() || perm.has_value(), "blend_backward: give x_b or perm");
  blend_contract::check_grad(grad, x_a, "blend_backward");
  const bool need_xa = output_mask[0], need_xb = output_mask[1] && x_b.has_value(), need_m = output_mask[2];
  const bool poison = poison_outputs_flag().load(std::memory_order_relaxed);
  auto fresh = [&](const at::Tensor& like) {
    at::Tensor t = at::empty_like(like);
    if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
    return t;
  };
  at::Tensor gxa = need_xa ? fresh(x_a) : new_output({0}, x_a.options());
  at::Tensor gxb = need_xb ? fresh(*x_b) : new_output({0}, x_a.options());
  at::Tensor gm = need_m ? new_output(m.sizes(), m.options().memory_format(at::MemoryFormat::Contiguous))
                         : new_output({0}, x_a.options());
  if (x_a.numel() == 0) {
    if (need_m) gm.zero_();
    if (need_xb) gxb.zero_();
    return {gxa, gxb, gm};
  }
  AT_DISPATCH_FLOATING_TYPES(x_a.scalar_type(), "cpp_blend_backward", [&] {
    backward_impl<scalar_t>(grad, x_a, m, x_b, perm, need_xa, need_xb, need_m, gxa, gxb, gm);
  });
  return {gxa, gxb, gm};
}


// ----------------------------------------------------------------- the autograd op
//
// cpp_masked_blend: the forward kernel with its backward registered in C++ (AutogradCPU), so
// that an eager forward + backward costs two dispatcher calls and no Python: at
// 256x3x32x32 the Python autograd.Function's layers (apply, saved tensors, the backward's
// Python frame) took ~0.25 ms of a ~0.65 ms round trip. With create_graph the backward is the
// differentiable composition of ATen ops (reference/blend.py blend_backward_differentiable).

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_differentiable(const at::Tensor& grad, const at::Tensor& x_a,
                                                                       const at::Tensor& m, const at::Tensor& x_b,
                                                                       const at::Tensor& perm, bool need_xa,
                                                                       bool need_xb, bool need_m) {
  at::Tensor gxa, gxb, gm;
  const at::Tensor partner_grad = grad * (1 - m);
  if (need_xa) {
    gxa = grad * m;
    if (perm.defined() && !x_b.defined()) gxa = gxa.index_add(0, perm, partner_grad);
  }
  if (need_xb) gxb = perm.defined() ? at::zeros_like(x_b).index_add(0, perm, partner_grad) : partner_grad;
  if (need_m) {
    const at::Tensor& src = x_b.defined() ? x_b : x_a;
    const at::Tensor xb = perm.defined() ? src.index_select(0, perm) : src;
    gm = (grad * (x_a - xb)).sum_to_size_symint(m.sym_sizes());
  }
  return {gxa, gxb, gm};
}

struct MaskedBlendFunction : public torch::autograd::Function<MaskedBlendFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_a, const at::Tensor& m,
                            const std::optional<at::Tensor>& x_b, const std::optional<at::Tensor>& perm) {
    ctx->save_for_backward({x_a, m, x_b.value_or(at::Tensor()), perm.value_or(at::Tensor())});
    // through the dispatcher below autograd, so that fake and meta tensors reach their registered
    // implementations
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("commentaries_ext::cpp_masked_blend", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const std::optional<at::Tensor>&)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x_a, m, x_b, perm);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x_a = saved[0], &m = saved[1], &x_b = saved[2], &perm = saved[3];
    at::Tensor grad = grads[0];
    const bool need_xa = ctx->needs_input_grad(0), need_m = ctx->needs_input_grad(1);
    const bool need_xb = x_b.defined() && ctx->needs_input_grad(2);
    at::Tensor gxa, gxb, gm;
    const bool create_graph = at::GradMode::is_enabled() &&
                              (grad.requires_grad() || x_a.requires_grad() || m.requires_grad() ||
                               (x_b.defined() && x_b.requires_grad()));
    if (create_graph) {
      std::tie(gxa, gxb, gm) = backward_differentiable(grad, x_a, m, x_b, perm, need_xa, need_xb, need_m);
    } else {
      if (grad.sym_strides() != x_a.sym_strides()) {  // the kernel reads grad with x_a's layout
        grad = grad.contiguous(x_a.suggest_memory_format());
        if (grad.sym_strides() != x_a.sym_strides()) grad = at::empty_like(x_a).copy_(grad);  // ambiguous strides
      }
      const std::optional<at::Tensor> xb_opt = x_b.defined() ? std::optional<at::Tensor>(x_b) : std::nullopt;
      const std::optional<at::Tensor> perm_opt = perm.defined() ? std::optional<at::Tensor>(perm) : std::nullopt;
      static const auto op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("commentaries_ext::cpp_blend_backward", "")
              .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                  const std::optional<at::Tensor>&, std::array<bool, 3>)>();
      const std::array<bool, 3> mask{need_xa, need_xb, need_m};
      std::tie(gxa, gxb, gm) = op.call(grad, x_a, m, xb_opt, perm_opt, mask);
      if (!need_xa) gxa = at::Tensor();
      if (!need_xb) gxb = at::Tensor();
      if (!need_m) gm = at::Tensor();
    }
    return {gxa, gm, gxb, at::Tensor()};
  }
};

at::Tensor cpp_masked_blend_autograd(const at::Tensor& x_a, const at::Tensor& m, const std::optional<at::Tensor>& x_b,
                                     const std::optional<at::Tensor>& perm) {
  return MaskedBlendFunction::apply(x_a, m, x_b, perm);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(commentaries_ext, m) {
  m.def("cpp_blend_forward(Tensor x_a, Tensor m, Tensor? x_b, Tensor? perm) -> Tensor");
  m.def(
      "cpp_blend_backward(Tensor grad, Tensor x_a, Tensor m, Tensor? x_b, Tensor? perm, bool[3] output_mask) -> "
      "(Tensor, Tensor, Tensor)");
  m.def("cpp_masked_blend(Tensor x_a, Tensor m, Tensor? x_b, Tensor? perm) -> Tensor");
}

TORCH_LIBRARY_IMPL(commentaries_ext, CPU, m) {
  m.impl("cpp_blend_forward", &cpp_blend_forward);
  m.impl("cpp_blend_backward", &cpp_blend_backward);
  m.impl("cpp_masked_blend", &cpp_blend_forward);
}

TORCH_LIBRARY_IMPL(commentaries_ext, AutogradCPU, m) { m.impl("cpp_masked_blend", &cpp_masked_blend_autograd); }

}  // namespace commentaries_ext
