// Which at::vec::Vectorized specialisation the CPU kernels use. Include first,
// before any ATen header.
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
