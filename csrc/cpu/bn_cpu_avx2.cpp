// The AVX2 + FMA build of the BatchNorm kernels (bn_cpu_kernels.h); bn_cpu.cpp decides at run time
// whether it may run. GCC on x86-64 only (GAN_FAST_CPU_AVX2_TU): elsewhere this file is empty and the
// baseline build runs.
#include "../common.h"

#if GAN_FAST_CPU_AVX2_TU

// Everything other translation units also compile (ATen, c10, the standard library) is included
// first, with the default target: an inline function compiled here with AVX2 could otherwise be the
// copy the linker keeps for the whole library and fault on a CPU without AVX2. After the pragma come
// only at::vec (which lives in the at::vec::AVX2 namespace once CPU_CAPABILITY says so) and this
// file's own kernels (internal linkage).
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

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

// The AVX2 specializations of at::vec were selected, not the generic fallback.
static_assert(std::is_same_v<at::vec::Vectorized<float>, at::vec::AVX2::Vectorized<float>>,
              "bn_cpu_avx2.cpp: at::vec was included before CPU_CAPABILITY_AVX2 was defined");

#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#pragma GCC pop_options

#endif  // GAN_FAST_CPU_AVX2_TU
