// Multi-tensor-apply CUDA kernels of the solver updates: one 256-thread block per
// kSolverBlockElems elements of one tensor, located through the device table.
#include "common.cuh"
#include "solver.h"

namespace commentaries_ext {
namespace cuda_kernels {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

enum Mode : int { kNeumann = 0, kAxpyDot = 1, kCg = 2, kDot = 3 };

template <typename T> __device__ __forceinline__ T* list_ptr(const TensorTable& tab, int l, int64_t t) {
  return reinterpret_cast<T*>(static_cast<std::uintptr_t>(tab.ptrs[l * tab.num_tensors + t]));
}

template <typename A> __device__ __forceinline__ A block_sum(A v) {
  __shared__ A smem[32];
  return group_sum<kThreads>(v, smem);
}

// NLISTS lists; HAS3: the optional third/second operand (z of axpy_dot, y of dot).
template <typename T, int MODE, bool HAS_OPT>
__global__ void __launch_bounds__(kThreads) solver_kernel(TensorTable tab, const acc_t<T>* scalar, acc_t<T>* partial) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x;
  const int64_t t = tab.block_tensor[b];
  const int64_t start = tab.block_start[b];
  int64_t end = start + kSolverBlockElems;
  if (end > tab.numel[t]) end = tab.numel[t];
  const A a = (MODE == kDot) ? A(0) : scalar[0];
  A acc = A(0);
  if constexpr (MODE == kNeumann) {
    T* c = list_ptr<T>(tab, 0, t);
    T* p = list_ptr<T>(tab, 1, t);
    const T* h = list_ptr<T>(tab, 2, t);
    for (int64_t k = start + threadIdx.x; k < end; k += kThreads) {
      const T cn = cast_to<T>(to_acc(c[k]) - a * to_acc(h[k]));
      c[k] = cn;
      p[k] = cast_to<T>(to_acc(p[k]) + to_acc(cn));
    }
    return;
  } else if constexpr (MODE == kAxpyDot) {
    T* y = list_ptr<T>(tab, 0, t);
    const T* x = list_ptr<T>(tab, 1, t);
    const T* z = HAS_OPT ? list_ptr<T>(tab, 2, t) : nullptr;
    for (int64_t k = start + threadIdx.x; k < end; k += kThreads) {
      const T yn = cast_to<T>(to_acc(y[k]) + a * to_acc(x[k]));
      y[k] = yn;
      const A yv = to_acc(yn);
      acc += yv * (HAS_OPT ? to_acc(z[k]) : yv);
    }
  } else if constexpr (MODE == kCg) {
    T* x = list_ptr<T>(tab, 0, t);
    T* r = list_ptr<T>(tab, 1, t);
    const T* d = list_ptr<T>(tab, 2, t);
    const T* q = list_ptr<T>(tab, 3, t);
    for (int64_t k = start + threadIdx.x; k < end; k += kThreads) {
      x[k] = cast_to<T>(to_acc(x[k]) + a * to_acc(d[k]));
      const T rn = cast_to<T>(to_acc(r[k]) - a * to_acc(q[k]));
      r[k] = rn;
      const A rv = to_acc(rn);
      acc += rv * rv;
    }
  } else {
    const T* x = list_ptr<T>(tab, 0, t);
    const T* y = HAS_OPT ? list_ptr<T>(tab, 1, t) : nullptr;
    for (int64_t k = start + threadIdx.x; k < end; k += kThreads) {
      const A xv = to_acc(x[k]);
      acc += xv * (HAS_OPT ? to_acc(y[k]) : xv);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[b] = acc;
}

template <typename T, int MODE>
cudaError_t launch_t(const TensorTable& tab, bool has_opt, const void* scalar, void* partial, cudaStream_t st) {
  using A = acc_t<T>;
  if (tab.blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(tab.blocks));
  if (has_opt) {
    solver_kernel<T, MODE, true><<<grid, kThreads, 0, st>>>(tab, static_cast<const A*>(scalar),
                                                            static_cast<A*>(partial));
  } else {
    solver_kernel<T, MODE, false><<<grid, kThreads, 0, st>>>(tab, static_cast<const A*>(scalar),
                                                             static_cast<A*>(partial));
  }
  return cudaGetLastError();
}

template <int MODE>
cudaError_t launch(SolverDType dtype, const TensorTable& tab, bool has_opt, const void* scalar, void* partial,
                   cudaStream_t st) {
  switch (dtype) {
    case SolverDType::kF32: return launch_t<float, MODE>(tab, has_opt, scalar, partial, st);
    case SolverDType::kF64: return launch_t<double, MODE>(tab, has_opt, scalar, partial, st);
    case SolverDType::kF16: return launch_t<__half, MODE>(tab, has_opt, scalar, partial, st);
    case SolverDType::kBF16: return launch_t<__nv_bfloat16, MODE>(tab, has_opt, scalar, partial, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t neumann_step(SolverDType dtype, TensorTable tab, const void* alpha, cudaStream_t stream) {
  return launch<kNeumann>(dtype, tab, false, alpha, nullptr, stream);
}

cudaError_t axpy_dot(SolverDType dtype, TensorTable tab, bool has_z, const void* a, void* partial,
                     cudaStream_t stream) {
  return launch<kAxpyDot>(dtype, tab, has_z, a, partial, stream);
}

cudaError_t cg_update(SolverDType dtype, TensorTable tab, const void* a, void* partial, cudaStream_t stream) {
  return launch<kCg>(dtype, tab, false, a, partial, stream);
}

cudaError_t multi_dot(SolverDType dtype, TensorTable tab, bool has_y, void* partial, cudaStream_t stream) {
  return launch<kDot>(dtype, tab, has_y, nullptr, partial, stream);
}

}  // namespace cuda_kernels
}  // namespace commentaries_ext
