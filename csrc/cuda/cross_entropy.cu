// CUDA kernels of the weighted / blended softmax cross-entropy.
//
// One warp per row (8 rows per 256-thread block) for C <= kWarpMaxC, one
// 256-thread block per row above that. Each thread walks its columns with
// 16-byte vector loads when the row is contiguous and aligned (scalar strided
// loads otherwise), keeping an online (max, sum) pair; the group then combines
// them with shuffles (and shared memory across warps). Float accumulation
// (double for double data).
#include "common.cuh"
#include "cross_entropy.h"

namespace commentaries_ext {
namespace cuda_kernels {
namespace {

using namespace cuda_detail;

constexpr int kBlock = 256;
constexpr int64_t kWarpMaxC = 1024;

// Calls f(col, value) for the columns of one row that this thread owns.
template <typename T, int GROUP, typename F>
__device__ __forceinline__ void scan1(const T* row, int64_t c, int64_t sc, bool vec, F&& f) {
  constexpr int V = vec_width<T>();
  const int lane = threadIdx.x;
  if (vec) {
    const int64_t cv = c / V * V;
    for (int64_t j = static_cast<int64_t>(lane) * V; j < cv; j += static_cast<int64_t>(GROUP) * V) {
      const Pack<T, V> p = *reinterpret_cast<const Pack<T, V>*>(row + j);
#pragma unroll
      for (int k = 0; k < V; ++k) f(j + k, to_acc(p.v[k]));
    }
    for (int64_t j = cv + lane; j < c; j += GROUP) f(j, to_acc(row[j]));
  } else {
    for (int64_t j = lane; j < c; j += GROUP) f(j, to_acc(row[j * sc]));
  }
}

// Two rows walked together: f(col, a_value, b_value).
template <typename T, int GROUP, typename F>
__device__ __forceinline__ void scan2(const T* a, int64_t sa, const T* b, int64_t sb, int64_t c, bool vec, F&& f) {
  constexpr int V = vec_width<T>();
  const int lane = threadIdx.x;
  if (vec) {
    const int64_t cv = c / V * V;
    for (int64_t j = static_cast<int64_t>(lane) * V; j < cv; j += static_cast<int64_t>(GROUP) * V) {
      const Pack<T, V> pa = *reinterpret_cast<const Pack<T, V>*>(a + j);
      const Pack<T, V> pb = *reinterpret_cast<const Pack<T, V>*>(b + j);
#pragma unroll
      for (int k = 0; k < V; ++k) f(j + k, to_acc(pa.v[k]), to_acc(pb.v[k]));
    }
    for (int64_t j = cv + lane; j < c; j += GROUP) f(j, to_acc(a[j]), to_acc(b[j]));
  } else {
    for (int64_t j = lane; j < c; j += GROUP) f(j, to_acc(a[j * sa]), to_acc(b[j * sb]));
  }
}

template <int GROUP> __device__ __forceinline__ int64_t row_index() {
  if constexpr (GROUP == 32) {
    return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  } else {
    return blockIdx.x;
  }
}

// Per-row mixing: target, partner, lam (1 without mixing), valid.
template <typename A> struct Mix {
  int64_t y, yb;
  A lam;
  bool valid, mixed;
};

template <typename A> __device__ __forceinline__ Mix<A> load_mix(const WceTargets& tg, int64_t row) {
  Mix<A> m;
  m.y = tg.y[row * tg.sy];
  m.valid = m.y != tg.ignore_index;
  m.mixed = tg.yb != nullptr && tg.lam != nullptr;
  m.yb = m.mixed ? tg.yb[row * tg.syb] : m.y;
  m.lam = m.mixed ? static_cast<const A*>(tg.lam)[row * tg.slam] : A(1);
  return m;
}

template <typename A> __device__ __forceinline__ A mix_at(const Mix<A>& m, int64_t col) {
  A v = col == m.y ? m.lam : A(0);
  if (m.mixed && col == m.yb) v += A(1) - m.lam;
  return v;
}

// The running max and sum of exp(x - max) of a thread's logits. A +inf logit sets the max
// and leaves the sum as it is (the row's lse is +inf unless a NaN made the sum NaN): no
// exp(inf - inf); -inf logits add nothing; a NaN adds exp(NaN), so the sum turns NaN.
template <typename A> __device__ __forceinline__ void online(A& mx, A& s, A x) {
  if (x > mx) {
    if (x != pos_inf<A>()) s = s * xexp(mx - x) + A(1);
    mx = x;
  } else if (x != neg_inf<A>() && x != pos_inf<A>()) {
    s += xexp(x - mx);
  }
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock) wce_forward_kernel(const T* z, int64_t szn, int64_t szc, bool vec, int64_t n,
                                                             int64_t c, WceTargets tg, acc_t<T>* loss,
                                                             acc_t<T>* lse_out) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  const int64_t row = row_index<GROUP>();
  if (row >= n) return;  // a whole warp (or block) leaves together
  const T* zr = z + row * szn;
  A mx = neg_inf<A>(), s = A(0);
  scan1<T, GROUP>(zr, c, szc, vec, [&](int64_t, A x) { online(mx, s, x); });
  const A mall = group_max<GROUP>(mx, smem);
  // a NaN logit makes s NaN (online() adds exp(NaN)); keep it NaN through to lse. The
  // thread(s) holding the max scale by 1 (no exp(inf - inf) when the max is +inf).
  const A part = mx == mall ? s : (mx == neg_inf<A>() && s == s) ? A(0) : s * xexp(mx - mall);
  const A sall = group_sum<GROUP>(part, smem);
  A lse;
  if (sall != sall) lse = sall;                 // a NaN logit
  else if (mall == pos_inf<A>()) lse = mall;    // a +inf logit
  else lse = sall > A(0) ? mall + xlog(sall) : neg_inf<A>();  // every logit -inf (or C == 0): -inf
  if (threadIdx.x == 0) {
    const Mix<A> m = load_mix<A>(tg, row);
    A out = A(0);
    // a target out of range (a direct call of the op: the Python layer checks) gives a NaN loss,
    // never a read outside the row
    const bool in_range = m.y >= 0 && m.y < c && (!m.mixed || (m.yb >= 0 && m.yb < c));
    if (m.valid && !in_range) {
      out = A(NAN);
    } else if (m.valid) {
      A tgt = m.lam == A(0) ? A(0) : m.lam * to_acc(zr[m.y * szc]);
      if (m.mixed && m.lam != A(1)) tgt += (A(1) - m.lam) * to_acc(zr[m.yb * szc]);
      out = lse - tgt;
    }
    loss[row] = out;
    lse_out[row] = lse;
  }
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock) wce_backward_kernel(const acc_t<T>* g, int64_t sg, const T* z, int64_t szn,
                                                              int64_t szc, bool vec, int64_t n, int64_t c,
                                                              const acc_t<T>* lse, int64_t slse, WceTargets tg,
                                                              T* out) {
  using A = acc_t<T>;
  const int64_t row = row_index<GROUP>();
  if (row >= n) return;
  const Mix<A> m = load_mix<A>(tg, row);
  T* orow = out + row * c;
  if (!m.valid) {
    for (int64_t j = threadIdx.x; j < c; j += GROUP) orow[j] = cast_to<T>(A(0));
    return;
  }
  // a target out of range (a direct call of the op) gives a NaN row, as the forward's loss
  const bool in_range = m.y >= 0 && m.y < c && (!m.mixed || (m.yb >= 0 && m.yb < c));
  const A gi = in_range ? g[row * sg] : A(NAN);
  const A l = lse[row * slse];
  scan1<T, GROUP>(z + row * szn, c, szc, vec,
                  [&](int64_t j, A x) { orow[j] = cast_to<T>(gi * (xexp(x - l) - mix_at(m, j))); });
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock) wce_hvp_kernel(const T* z, int64_t szn, int64_t szc, const T* u,
                                                         int64_t sun, int64_t suc, bool vec, int64_t n, int64_t c,
                                                         const acc_t<T>* lse, int64_t slse, const acc_t<T>* scale,
                                                         int64_t ssc, T* out) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  const int64_t row = row_index<GROUP>();
  if (row >= n) return;
  const T* zr = z + row * szn;
  const T* ur = u + row * sun;
  const A l = lse[row * slse];
  A dot = A(0);
  scan2<T, GROUP>(zr, szc, ur, suc, c, vec, [&](int64_t, A x, A uv) { dot += xexp(x - l) * uv; });
  dot = group_sum<GROUP>(dot, smem);
  const A sc = scale[row * ssc];
  T* orow = out + row * c;
  scan2<T, GROUP>(zr, szc, ur, suc, c, vec, [&](int64_t j, A x, A uv) {
    const A p = xexp(x - l);
    orow[j] = cast_to<T>(sc * (p * uv - p * dot));
  });
}

template <typename T, int GROUP>
__global__ void __launch_bounds__(kBlock) wce_jvp_kernel(const T* z, int64_t szn, int64_t szc, const T* t,
                                                         int64_t stn, int64_t stc, bool vec, int64_t n, int64_t c,
                                                         const acc_t<T>* lse, int64_t slse, WceTargets tg,
                                                         acc_t<T>* out) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  const int64_t row = row_index<GROUP>();
  if (row >= n) return;
  const Mix<A> m = load_mix<A>(tg, row);
  if (!m.valid) {  // uniform over the group: no reduction needed
    if (threadIdx.x == 0) out[row] = A(0);
    return;
  }
  const A l = lse[row * slse];
  A acc = A(0);
  scan2<T, GROUP>(z + row * szn, szc, t + row * stn, stc, c, vec,
                  [&](int64_t j, A x, A tv) { acc += (xexp(x - l) - mix_at(m, j)) * tv; });
  acc = group_sum<GROUP>(acc, smem);
  // a target out of range (a direct call of the op: the Python layer checks) gives NaN, as the
  // forward's loss does (mix_at never matches such a column: p . t alone would pass for a value)
  const bool in_range = m.y >= 0 && m.y < c && (!m.mixed || (m.yb >= 0 && m.yb < c));
  if (threadIdx.x == 0) out[row] = in_range ? acc : A(NAN);
}

struct Launch {
  bool warp;
  dim3 grid, block;
};

Launch plan(int64_t n, int64_t c) {
  if (c <= kWarpMaxC) {
    const int rows = kBlock / 32;
    return {true, dim3(static_cast<unsigned>((n + rows - 1) / rows)), dim3(32, rows)};
  }
  return {false, dim3(static_cast<unsigned>(n)), dim3(kBlock)};
}

template <typename T> bool vec_ok(const void* base, int64_t sn, int64_t sc) {
  return sc == 1 && aligned16(base) && (sn * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

template <typename T>
cudaError_t forward_t(RowMatrix zm, int64_t n, int64_t c, WceTargets tg, void* loss, void* lse, cudaStream_t st) {
  using A = acc_t<T>;
  const T* z = static_cast<const T*>(zm.data);
  const bool vec = vec_ok<T>(z, zm.stride_n, zm.stride_c);
  const Launch L = plan(n, c);
  if (L.warp) {
    wce_forward_kernel<T, 32><<<L.grid, L.block, 0, st>>>(z, zm.stride_n, zm.stride_c, vec, n, c, tg,
                                                          static_cast<A*>(loss), static_cast<A*>(lse));
  } else {
    wce_forward_kernel<T, kBlock><<<L.grid, L.block, 0, st>>>(z, zm.stride_n, zm.stride_c, vec, n, c, tg,
                                                              static_cast<A*>(loss), static_cast<A*>(lse));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* g, int64_t sg, RowMatrix zm, int64_t n, int64_t c, const void* lse, int64_t slse,
                       WceTargets tg, void* out, cudaStream_t st) {
  using A = acc_t<T>;
  const T* z = static_cast<const T*>(zm.data);
  const bool vec = vec_ok<T>(z, zm.stride_n, zm.stride_c);
  const Launch L = plan(n, c);
  if (L.warp) {
    wce_backward_kernel<T, 32><<<L.grid, L.block, 0, st>>>(static_cast<const A*>(g), sg, z, zm.stride_n, zm.stride_c,
                                                           vec, n, c, static_cast<const A*>(lse), slse, tg,
                                                           static_cast<T*>(out));
  } else {
    wce_backward_kernel<T, kBlock><<<L.grid, L.block, 0, st>>>(static_cast<const A*>(g), sg, z, zm.stride_n,
                                                               zm.stride_c, vec, n, c, static_cast<const A*>(lse),
                                                               slse, tg, static_cast<T*>(out));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t hvp_t(RowMatrix zm, int64_t n, int64_t c, const void* lse, int64_t slse, const void* scale, int64_t ssc,
                  RowMatrix um, void* out, cudaStream_t st) {
  using A = acc_t<T>;
  const T* z = static_cast<const T*>(zm.data);
  const T* u = static_cast<const T*>(um.data);
  const bool vec = vec_ok<T>(z, zm.stride_n, zm.stride_c) && vec_ok<T>(u, um.stride_n, um.stride_c);
  const Launch L = plan(n, c);
  if (L.warp) {
    wce_hvp_kernel<T, 32><<<L.grid, L.block, 0, st>>>(z, zm.stride_n, zm.stride_c, u, um.stride_n, um.stride_c, vec,
                                                      n, c, static_cast<const A*>(lse), slse,
                                                      static_cast<const A*>(scale), ssc, static_cast<T*>(out));
  } else {
    wce_hvp_kernel<T, kBlock><<<L.grid, L.block, 0, st>>>(z, zm.stride_n, zm.stride_c, u, um.stride_n, um.stride_c,
                                                          vec, n, c, static_cast<const A*>(lse), slse,
                                                          static_cast<const A*>(scale), ssc, static_cast<T*>(out));
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t jvp_t(RowMatrix zm, int64_t n, int64_t c, const void* lse, int64_t slse, WceTargets tg, RowMatrix tm,
                  void* out, cudaStream_t st) {
  using A = acc_t<T>;
  const T* z = static_cast<const T*>(zm.data);
  const T* t = static_cast<const T*>(tm.data);
  const bool vec = vec_ok<T>(z, zm.stride_n, zm.stride_c) && vec_ok<T>(t, tm.stride_n, tm.stride_c);
  const Launch L = plan(n, c);
  if (L.warp) {
    wce_jvp_kernel<T, 32><<<L.grid, L.block, 0, st>>>(z, zm.stride_n, zm.stride_c, t, tm.stride_n, tm.stride_c, vec,
                                                      n, c, static_cast<const A*>(lse), slse, tg,
                                                      static_cast<A*>(out));
  } else {
    wce_jvp_kernel<T, kBlock><<<L.grid, L.block, 0, st>>>(z, zm.stride_n, zm.stride_c, t, tm.stride_n, tm.stride_c,
                                                          vec, n, c, static_cast<const A*>(lse), slse, tg,
                                                          static_cast<A*>(out));
  }
  return cudaGetLastError();
}

template <template <typename> class F, typename... Args> cudaError_t dispatch(DType dt, Args&&... args) {
  switch (dt) {
    case DType::kF32: return F<float>::run(args...);
    case DType::kF64: return F<double>::run(args...);
    case DType::kF16: return F<__half>::run(args...);
    case DType::kBF16: return F<__nv_bfloat16>::run(args...);
  }
  return cudaErrorInvalidValue;
}

template <typename T> struct Fwd { template <typename... A> static cudaError_t run(A... a) { return forward_t<T>(a...); } };
template <typename T> struct Bwd { template <typename... A> static cudaError_t run(A... a) { return backward_t<T>(a...); } };
template <typename T> struct Hvp { template <typename... A> static cudaError_t run(A... a) { return hvp_t<T>(a...); } };
template <typename T> struct Jvp { template <typename... A> static cudaError_t run(A... a) { return jvp_t<T>(a...); } };

}  // namespace

cudaError_t wce_forward(DType dtype, RowMatrix logits, int64_t n, int64_t c, WceTargets tg, void* loss, void* lse,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch<Fwd>(dtype, logits, n, c, tg, loss, lse, stream);
}

cudaError_t wce_backward(DType dtype, const void* grad_loss, int64_t s_grad, RowMatrix logits, int64_t n, int64_t c,
                         const void* lse, int64_t s_lse, WceTargets tg, void* out, cudaStream_t stream) {
  if (n == 0 || c == 0) return cudaSuccess;
  return dispatch<Bwd>(dtype, grad_loss, s_grad, logits, n, c, lse, s_lse, tg, out, stream);
}

cudaError_t wce_hvp(DType dtype, RowMatrix logits, int64_t n, int64_t c, const void* lse, int64_t s_lse,
                    const void* scale, int64_t s_scale, RowMatrix u, void* out, cudaStream_t stream) {
  if (n == 0 || c == 0) return cudaSuccess;
  return dispatch<Hvp>(dtype, logits, n, c, lse, s_lse, scale, s_scale, u, out, stream);
}

cudaError_t wce_jvp(DType dtype, RowMatrix logits, int64_t n, int64_t c, const void* lse, int64_t s_lse,
                    WceTargets tg, RowMatrix t, void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch<Jvp>(dtype, logits, n, c, lse, s_lse, tg, t, out, stream);
}

}  // namespace cuda_kernels
}  // namespace commentaries_ext
