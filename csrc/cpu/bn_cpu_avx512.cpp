// The AVX-512 build of the BatchNorm kernels (bn_cpu_avx512.h), every dtype; bfloat16 is rounded
// with integer instructions here (bn_cpu_avx512_bf16.cpp has the AVX512_BF16 instruction). GCC on
// x86-64 only (GAN_FAST_CPU_AVX512_TU): elsewhere this file is empty.

// GCC 12's AVX-512 intrinsics initialize their "undefined" operand from itself (avx512fintrin.h
// _mm512_undefined_epi32: __m512i __Y = __Y), which -Wmaybe-uninitialized reports once they are
// inlined into a kernel (GCC bug 105593, fixed in GCC 13): hundreds of false warnings. The warning
// is judged at the header's own lines, so it is turned off for the whole file, before any include.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "../common.h"

#if GAN_FAST_CPU_AVX512_TU
#include "isa_prelude.h"

#define GAN_FAST_CPU_NS cpu_avx512
#include "bn_cpu_avx512.h"

#endif  // GAN_FAST_CPU_AVX512_TU
