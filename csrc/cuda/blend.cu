// CUDA kernels of masked blending: grid (column blocks of a row, rows), grid-stride
// over both; coalesced loads along the dense row; float accumulation.
#include "blend.h"
#include "common.cuh"

namespace commentaries_ext {
namespace cuda_kernels {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t mask_offset(const MaskLayout& ml, int64_t n, int64_t k) {
  const int64_t i3 = k % ml.size3;
  const int64_t r = k / ml.size3;
  const int64_t i2 = r % ml.size2;
  const int64_t i1 = r / ml.size2;
  return n * ml.sn + i1 * ml.s1 + i2 * ml.s2 + i3 * ml.s3;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* xa, int64_t sxa, const T* xb, int64_t sxb,
                                                           const int64_t* perm, const T* m, MaskLayout ml, T* out,
                                                           int64_t n, int64_t f) {
  using A = acc_t<T>;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    const int64_t src = perm ? perm[row] : row;
    const T* a = xa + row * sxa;
    const T* b = xb + src * sxb;
    T* o = out + row * sxa;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < f;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const A bv = to_acc(b[k]);
      const A mv = to_acc(m[mask_offset(ml, row, k)]);
      o[k] = cast_to<T>(fma(mv, to_acc(a[k]), (A(1) - mv) * bv));  // exact for a 0/1 mask (not a lerp)
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(const T* g, const T* xa, int64_t sxa, const T* xb,
                                                            int64_t sxb, const int64_t* perm, const T* m,
                                                            MaskLayout ml, T* gxa, T* gxb, acc_t<T>* prod,
                                                            bool row_sum, int64_t n, int64_t f) {
  using A = acc_t<T>;
  __shared__ A smem[32];
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    const int64_t src = perm ? perm[row] : row;
    A part = A(0);
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < f;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const A gv = to_acc(g[row * sxa + k]);
      const A mv = to_acc(m[mask_offset(ml, row, k)]);
      if (gxa) gxa[row * sxa + k] = cast_to<T>(gv * mv);
      if (gxb) gxb[row * sxb + k] = cast_to<T>(gv * (A(1) - mv));
      if (prod) {
        const A d = gv * (to_acc(xa[row * sxa + k]) - to_acc(xb[src * sxb + k]));
        if (row_sum) {
          part += d;
        } else {
          prod[row * f + k] = d;
        }
      }
    }
    if (prod && row_sum) {  // uniform over the block
      part = group_sum<kThreads>(part, smem);
      if (threadIdx.x == 0) prod[row * gridDim.x + blockIdx.x] = part;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_kernel(const T* g, int64_t sg, const T* m, MaskLayout ml,
                                                          const int64_t* order, const int64_t* offs, bool self,
                                                          T* out, int64_t sout, int64_t rows, int64_t f) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const int64_t start = offs[i], end = offs[i + 1];
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < f;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      A acc = A(0);
      if (self) acc = to_acc(g[i * sg + k]) * to_acc(m[mask_offset(ml, i, k)]);
      for (int64_t j = start; j < end; ++j) {
        const int64_t src = order[j];
        acc += to_acc(g[src * sg + k]) * (A(1) - to_acc(m[mask_offset(ml, src, k)]));
      }
      out[i * sout + k] = cast_to<T>(acc);
    }
  }
}

int64_t row_blocks(int64_t f) {
  int64_t bx = (f + kThreads - 1) / kThreads;
  if (bx > 1024) bx = 1024;
  if (bx < 1) bx = 1;
  return bx;
}

dim3 grid_for(int64_t rows, int64_t f) {
  const int64_t bx = row_blocks(f);
  int64_t by = rows < 65535 ? rows : 65535;
  if (by < 1) by = 1;
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
}

template <typename T>
cudaError_t forward_t(const void* xa, int64_t sxa, const void* xb, int64_t sxb, const int64_t* perm, const void* m,
                      MaskLayout ml, void* out, int64_t n, int64_t f, cudaStream_t st) {
  forward_kernel<T><<<grid_for(n, f), kThreads, 0, st>>>(static_cast<const T*>(xa), sxa, static_cast<const T*>(xb),
                                                         sxb, perm, static_cast<const T*>(m), ml,
                                                         static_cast<T*>(out), n, f);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_t(const void* g, const void* xa, int64_t sxa, const void* xb, int64_t sxb, const int64_t* perm,
                       const void* m, MaskLayout ml, void* gxa, void* gxb, void* prod, bool row_sum, int64_t n,
                       int64_t f, cudaStream_t st) {
  backward_kernel<T><<<grid_for(n, f), kThreads, 0, st>>>(
      static_cast<const T*>(g), static_cast<const T*>(xa), sxa, static_cast<const T*>(xb), sxb, perm,
      static_cast<const T*>(m), ml, static_cast<T*>(gxa), static_cast<T*>(gxb), static_cast<acc_t<T>*>(prod), row_sum, n,
      f);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_t(const void* g, int64_t sg, const void* m, MaskLayout ml, const int64_t* order,
                     const int64_t* offs, bool self, void* out, int64_t sout, int64_t rows, int64_t f,
                     cudaStream_t st) {
  gather_kernel<T><<<grid_for(rows, f), kThreads, 0, st>>>(static_cast<const T*>(g), sg, static_cast<const T*>(m),
                                                           ml, order, offs, self, static_cast<T*>(out), sout, rows,
                                                           f);
  return cudaGetLastError();
}

}  // namespace

#define COMMENTARIES_EXT_BLEND_DISPATCH(fn, ...)                      \
  switch (dtype) {                                                    \
    case BlendDType::kF32: return fn<float>(__VA_ARGS__);             \
    case BlendDType::kF64: return fn<double>(__VA_ARGS__);            \
    case BlendDType::kF16: return fn<__half>(__VA_ARGS__);            \
    case BlendDType::kBF16: return fn<__nv_bfloat16>(__VA_ARGS__);    \
  }                                                                   \
  return cudaErrorInvalidValue

cudaError_t blend_forward(BlendDType dtype, const void* x_a, int64_t s_xa, const void* x_b, int64_t s_xb,
                          const int64_t* perm, const void* m, MaskLayout ml, void* out, int64_t n, int64_t f,
                          cudaStream_t stream) {
  if (n == 0 || f == 0) return cudaSuccess;
  COMMENTARIES_EXT_BLEND_DISPATCH(forward_t, x_a, s_xa, x_b, s_xb, perm, m, ml, out, n, f, stream);
}

cudaError_t blend_backward_elementwise(BlendDType dtype, const void* grad, const void* x_a, int64_t s_xa,
                                      const void* x_b, int64_t s_xb, const int64_t* perm, const void* m,
                                      MaskLayout ml, void* gxa, void* gxb, void* prod, bool row_sum, int64_t n,
                                      int64_t f, cudaStream_t stream) {
  if (n == 0 || f == 0) return cudaSuccess;
  COMMENTARIES_EXT_BLEND_DISPATCH(backward_t, grad, x_a, s_xa, x_b, s_xb, perm, m, ml, gxa, gxb, prod, row_sum, n, f,
                                  stream);
}

int64_t blend_row_blocks(int64_t f) { return row_blocks(f); }

cudaError_t blend_backward_gather(BlendDType dtype, const void* grad, int64_t s_g, const void* m, MaskLayout ml,
                                  const int64_t* order, const int64_t* offs, bool self, void* out, int64_t s_out,
                                  int64_t rows, int64_t f, cudaStream_t stream) {
  if (rows == 0 || f == 0) return cudaSuccess;
  COMMENTARIES_EXT_BLEND_DISPATCH(gather_t, grad, s_g, m, ml, order, offs, self, out, s_out, rows, f, stream);
}

#undef COMMENTARIES_EXT_BLEND_DISPATCH

}  // namespace cuda_kernels
}  // namespace commentaries_ext
