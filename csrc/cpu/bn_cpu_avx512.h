// The AVX-512 builds of the BatchNorm kernels (bn_cpu_kernels.h), shared by bn_cpu_avx512.cpp (every
// dtype) and bn_cpu_avx512_bf16.cpp (bfloat16 with AVX512_BF16's conversion instruction, defining
// GAN_FAST_CPU_NATIVE_BF16); bn_cpu.cpp decides at run time which may run. The including file
// defines GAN_FAST_CPU_NS and includes isa_prelude.h first.
#pragma once

// The instruction set of ATen's own AVX-512 kernels (cmake/Codegen.cmake: -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma) on top of its AVX2 set; bn_cpu.cpp checks the CPU has each (and
// avx512bf16 for the bfloat16 build) before it runs one of these builds.
#pragma GCC push_options
#if GAN_FAST_CPU_NATIVE_BF16
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2")
#define __AVX512BF16__ 1
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#endif
// The pragma enables the instructions but, unlike -mavx512f, defines none of the feature macros,
// which sleef.h (at::vec's vector math) tests before it declares its 16-lane functions.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
// at::vec's 512-bit Vectorized (16 float lanes), as ATen's AVX512 kernels get it.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "bn_cpu_kernels.h"
#if !GAN_FAST_CPU_NATIVE_BF16  // fp32 only: the bfloat16 build has nothing to add
#include "image_conv_kernels.h"
#endif

static_assert(std::is_same_v<at::vec::Vectorized<float>, at::vec::AVX512::Vectorized<float>> &&
                  at::vec::Vectorized<float>::size() == 16,
              "bn_cpu_avx512.h: at::vec was included before CPU_CAPABILITY_AVX512 was defined");

#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef __AVX512F__
#undef __AVX512BW__
#undef __AVX512VL__
#undef __AVX512DQ__
#ifdef __AVX512BF16__
#undef __AVX512BF16__
#endif
#pragma GCC pop_options
