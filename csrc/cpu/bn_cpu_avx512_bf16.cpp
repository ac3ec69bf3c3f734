// The AVX-512 build of the bfloat16 BatchNorm kernels with AVX512_BF16's float -> bfloat16
// instruction (vcvtneps2bf16; cpu_vec.h bf16_round); bn_cpu.cpp runs it for bfloat16 where the CPU
// has AVX512_BF16 and the AVX-512 build runs. Only bfloat16 is compiled: the other dtypes would be
// the AVX-512 build again. GCC 10 and later on x86-64 (GAN_FAST_CPU_AVX512_BF16_TU).

// GCC 12's false -Wmaybe-uninitialized in AVX-512 intrinsics: see bn_cpu_avx512.cpp.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "../common.h"

#if GAN_FAST_CPU_AVX512_BF16_TU
#include "isa_prelude.h"

#define GAN_FAST_CPU_NATIVE_BF16 1
#define GAN_FAST_CPU_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
#define GAN_FAST_CPU_NS cpu_avx512_bf16
#include "bn_cpu_avx512.h"

#endif  // GAN_FAST_CPU_AVX512_BF16_TU
