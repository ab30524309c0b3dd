// Which at::vec::Vectorized specialisation the CPU kernels use (include first,
// before any ATen header), and a software-prefetch helper.
//
// at::vec::Vectorized picks AVX-512 or AVX2 only when CPU_CAPABILITY_AVX512 /
// CPU_CAPABILITY_AVX2 is defined (ATen's own kernels get it from per-capability
// builds); without either, every Vectorized op is a scalar loop over an array.
// setup.py compiles for the best instruction set of the building machine
// (-mavx512f/dq/bw/vl or -mavx2 -mfma, COMMENTARIES_EXT_SIMD overrides), and this
// selects the matching specialisations, in ATen's namespace for them
// (at::vec::AVX512 / at::vec::AVX2) like ATen's kernels.
#pragma once
#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif

#include <cstdint>

namespace commentaries_ext {

// Software prefetch of kLines 64-byte lines kBytes past p, for streaming loops whose
// hardware prefetch falls behind (several streams, or compute between the loads). A
// prefetch past the end of an allocation is harmless (it never faults).
template <int64_t kBytes, int kLines>
inline __attribute__((always_inline)) void prefetch_lines(const void* p) {
  const char* q = static_cast<const char*>(p) + kBytes;
  for (int k = 0; k < kLines; ++k) __builtin_prefetch(q + 64 * k);
}

}  // namespace commentaries_ext
