// The AVX2 + FMA build of the BatchNorm kernels (bn_cpu_kernels.h); bn_cpu.cpp decides at run time
// whether it may run. GCC on x86-64 only (GAN_FAST_CPU_AVX2_TU): elsewhere this file is empty and the
// baseline build runs.
#include "../common.h"

#if GAN_FAST_CPU_AVX2_TU
#include "isa_prelude.h"

// The instruction set of ATen's own AVX2 kernels (cmake/Codegen.cmake: -mavx2 -mfma -mf16c -mbmi
// -mbmi2); bn_cpu.cpp checks the CPU has each before it runs this build.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
// The pragma enables the instructions but, unlike -mavx2, defines none of the feature macros, which
// sleef.h (at::vec's vector math) tests before it declares its 8-lane functions.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define GAN_FAST_CPU_NS cpu_avx2
#include "bn_cpu_kernels.h"
#include "image_conv_kernels.h"

// The AVX2 specializations of at::vec were selected, not the generic fallback.
static_assert(std::is_same_v<at::vec::Vectorized<float>, at::vec::AVX2::Vectorized<float>>,
              "bn_cpu_avx2.cpp: at::vec was included before CPU_CAPABILITY_AVX2 was defined");

#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#pragma GCC pop_options

#endif  // GAN_FAST_CPU_AVX2_TU
