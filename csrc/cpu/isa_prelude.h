// Included first by each ISA build of the CPU kernels (bn_cpu_avx2.cpp, bn_cpu_avx512.cpp,
// bn_cpu_avx512_bf16.cpp), before its `#pragma GCC target`: everything other translation units also
// compile (ATen, c10, the standard library) is included here, with the default target. An inline
// function compiled after the pragma could otherwise be the copy the linker keeps for the whole
// library and fault on a CPU without that ISA. After the pragma come only at::vec (which lives in
// the at::vec::<CPU_CAPABILITY> namespace once CPU_CAPABILITY says so) and the TU's own kernels
// (internal linkage).
#pragma once

#include "../common.h"

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
