// Device helpers shared by the CUDA kernels (plain CUDA: no torch headers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace commentaries_ext {
namespace cuda_detail {

// Accumulation type: double for double data, float otherwise.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> struct Cast;
template <> struct Cast<float> { __device__ static float from(float x) { return x; } };
template <> struct Cast<double> { __device__ static double from(double x) { return x; } };
template <> struct Cast<__half> { __device__ static __half from(float x) { return __float2half_rn(x); } };
template <> struct Cast<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <typename T, typename A> __device__ __forceinline__ T cast_to(A x) { return Cast<T>::from(x); }

__device__ __forceinline__ float xexp(float x) { return expf(x); }
__device__ __forceinline__ double xexp(double x) { return exp(x); }
__device__ __forceinline__ float xlog(float x) { return logf(x); }
__device__ __forceinline__ double xlog(double x) { return log(x); }
template <typename A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }
template <typename A> __device__ __forceinline__ A pos_inf() { return static_cast<A>(INFINITY); }

// V consecutive elements loaded/stored as one 16-byte access.
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };
template <typename T> __host__ __device__ constexpr int vec_width() { return 16 / static_cast<int>(sizeof(T)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// Reductions over a group of GROUP threads along threadIdx.x: a warp (GROUP == 32)
// or the whole block (GROUP > 32, blockDim.x == GROUP, a multiple of 32). The result
// is returned to every thread of the group. smem holds at least 32 values.
template <int GROUP, typename A> __device__ __forceinline__ A group_sum(A v, A* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (GROUP > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = lane < GROUP / 32 ? smem[lane] : A(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

template <int GROUP, typename A> __device__ __forceinline__ A group_max(A v, A* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  if constexpr (GROUP > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = lane < GROUP / 32 ? smem[lane] : neg_inf<A>();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  return v;
}

}  // namespace cuda_detail
}  // namespace commentaries_ext
