// CpuKernels' BatchNorm entry points: the kernels of bn_cpu_kernels.h compiled for the baseline ISA
// here, for AVX2 + FMA in bn_cpu_avx2.cpp and for AVX-512 in bn_cpu_avx512.cpp (bfloat16 also with
// AVX512_BF16's conversion instruction, bn_cpu_avx512_bf16.cpp), picked once per process as ATen's
// DispatchStub picks its kernels (aten/src/ATen/native/DispatchStub.cpp): the best build the CPU
// runs, capped by ATen's own CPU capability. Forward and backward always run the same build, so the
// backward recomputes the forward's pre-activation bit for bit.
//
// Forcing a build (how tests/backends/test_ext_isa.py runs each one in a subprocess):
//   ATEN_CPU_CAPABILITY=default | avx2 | avx512  caps ATen and these kernels alike;
//   GAN_FAST_CPU_NO_AVX512_BF16=1                 bfloat16 on AVX-512 without AVX512_BF16's
//                                                 instruction (what a CPU without it runs).
// gan_fast.backends.ext.cpu_kernel_isa(dtype) names the build a dtype runs.
#define GAN_FAST_CPU_NS cpu_default
#include "bn_cpu_kernels.h"
#include "image_conv_kernels.h"

#include <ATen/Version.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace gan_fast {

// The entry points each ISA build defines (bn_cpu_kernels.h, namespace GAN_FAST_CPU_NS).
#define GAN_FAST_BN_ENTRY_POINTS                                                                              \
  void bn_stats(const Tensor& x, const BnShape& s, Tensor& mean, Tensor& var);                                \
  void bn_apply(const Tensor& x, const BnShape& s, const Tensor& mean, const Tensor& var, const Tensor& w,   \
                const Tensor& b, double eps, double slope, int64_t act, Tensor& y);                          \
  void bn_backward_reduce(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,           \
                          const Tensor& var, const Tensor& w, const Tensor& b, double eps, double slope,     \
                          int64_t act, Tensor& grad_weight, Tensor& grad_bias);                              \
  void bn_backward_apply(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,            \
                         const Tensor& var, const Tensor& w, const Tensor& b, const Tensor& grad_weight,     \
                         const Tensor& grad_bias, bool training, double eps, double slope, int64_t act,      \
                         Tensor& dx);                                                                 \
  void d_head_forward(const Tensor& x, const Tensor& w, const Tensor& target, Tensor& logits, Tensor& loss); \
  void d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& w, const Tensor& target,      \
                       const Tensor& logits, bool need_x, bool need_w, Tensor& grad_x, Tensor& grad_w);
#if GAN_FAST_CPU_AVX2_TU
namespace cpu_avx2 { GAN_FAST_BN_ENTRY_POINTS }  // bn_cpu_avx2.cpp
#endif
#if GAN_FAST_CPU_AVX512_TU
namespace cpu_avx512 { GAN_FAST_BN_ENTRY_POINTS }  // bn_cpu_avx512.cpp
#endif
#if GAN_FAST_CPU_AVX512_BF16_TU
namespace cpu_avx512_bf16 { GAN_FAST_BN_ENTRY_POINTS }  // bn_cpu_avx512_bf16.cpp (bfloat16 only)
#endif
#undef GAN_FAST_BN_ENTRY_POINTS
// The image convolution kernels' builds (image_conv_kernels.h); fp32 only, so no AVX512_BF16 build.
#if GAN_FAST_CPU_AVX2_TU
namespace cpu_avx2 { GAN_FAST_IMAGE_CONV_ENTRY_POINTS }
#endif
#if GAN_FAST_CPU_AVX512_TU
namespace cpu_avx512 { GAN_FAST_IMAGE_CONV_ENTRY_POINTS }
#endif

namespace {

enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };

// The best build that may run: compiled, allowed by ATen's capability (at::get_cpu_capability(),
// which ATEN_CPU_CAPABILITY lowers), and every instruction set its `#pragma GCC target` names present
// on the CPU (ATEN_CPU_CAPABILITY can claim more than the CPU has; an illegal instruction must never
// be the answer). AVX2's set is ATen's (cmake/Codegen.cmake: -mavx2 -mfma -mf16c -mbmi -mbmi2),
// AVX-512's is ATen's (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma) on top of it.
Isa best_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") &&
                      __builtin_cpu_supports("bmi2");
#if GAN_FAST_CPU_AVX512_TU
    if (cap == "AVX512" && avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
#endif
#if GAN_FAST_CPU_AVX2_TU
    if ((cap == "AVX2" || cap == "AVX512") && avx2) return Isa::kAvx2;
#endif
    (void)cap;
    (void)avx2;
    return Isa::kDefault;
  }();
  return isa;
}

// bfloat16 runs the AVX512_BF16 build where the AVX-512 one runs and the CPU has the instruction
// (Cooper Lake, Sapphire Rapids, Zen 4); the other dtypes are not compiled there (nothing differs).
bool use_avx512_bf16() {
#if GAN_FAST_CPU_AVX512_BF16_TU
  static const bool yes = [] {
    const char* off = std::getenv("GAN_FAST_CPU_NO_AVX512_BF16");
    return best_isa() == Isa::kAvx512 && __builtin_cpu_supports("avx512bf16") &&
           !(off && *off && std::strcmp(off, "0") != 0);
  }();
  return yes;
#else
  return false;
#endif
}

Isa isa_for(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && use_avx512_bf16() ? Isa::kAvx512Bf16 : best_isa();
}

}  // namespace

const char* cpu_kernel_isa(at::ScalarType dtype) {
  switch (isa_for(dtype)) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

#if GAN_FAST_CPU_AVX2_TU
#define GAN_FAST_BN_CASE_AVX2(fn, ...) \
  case Isa::kAvx2: return cpu_avx2::fn(__VA_ARGS__);
#else
#define GAN_FAST_BN_CASE_AVX2(fn, ...)
#endif
#if GAN_FAST_CPU_AVX512_TU
#define GAN_FAST_BN_CASE_AVX512(fn, ...) \
  case Isa::kAvx512: return cpu_avx512::fn(__VA_ARGS__);
#else
#define GAN_FAST_BN_CASE_AVX512(fn, ...)
#endif
#if GAN_FAST_CPU_AVX512_BF16_TU
#define GAN_FAST_BN_CASE_AVX512_BF16(fn, ...) \
  case Isa::kAvx512Bf16: return cpu_avx512_bf16::fn(__VA_ARGS__);
#else
#define GAN_FAST_BN_CASE_AVX512_BF16(fn, ...)
#endif
// Calls fn of the build x's dtype runs.
#define GAN_FAST_BN_CALL(fn, x, ...)                    \
  switch (isa_for((x).scalar_type())) {                 \
    GAN_FAST_BN_CASE_AVX512_BF16(fn, __VA_ARGS__)       \
    GAN_FAST_BN_CASE_AVX512(fn, __VA_ARGS__)            \
    GAN_FAST_BN_CASE_AVX2(fn, __VA_ARGS__)              \
    default: return cpu_default::fn(__VA_ARGS__);       \
  }

void CpuKernels::bn_stats(const Tensor& x, const BnShape& s, Tensor& mean, Tensor& var) {
  GAN_FAST_BN_CALL(bn_stats, x, x, s, mean, var);
}

void CpuKernels::bn_apply(const Tensor& x, const BnShape& s, const Tensor& mean, const Tensor& var,
                          const Tensor& w, const Tensor& b, double eps, double slope, int64_t act, Tensor& y) {
  GAN_FAST_BN_CALL(bn_apply, x, x, s, mean, var, w, b, eps, slope, act, y);
}

void CpuKernels::bn_backward_reduce(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                                    const Tensor& var, const Tensor& w, const Tensor& b, double eps, double slope,
                                    int64_t act, Tensor& grad_weight, Tensor& grad_bias) {
  GAN_FAST_BN_CALL(bn_backward_reduce, x, dy, x, s, mean, var, w, b, eps, slope, act, grad_weight, grad_bias);
}

void CpuKernels::bn_backward_apply(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                                   const Tensor& var, const Tensor& w, const Tensor& b, const Tensor& grad_weight,
                                   const Tensor& grad_bias, bool training, double eps, double slope, int64_t act,
                                   Tensor& dx) {
  GAN_FAST_BN_CALL(bn_backward_apply, x, dy, x, s, mean, var, w, b, grad_weight, grad_bias, training, eps, slope,
                   act, dx);
}

void CpuKernels::d_head_forward(const Tensor& x, const Tensor& w, const Tensor& target, Tensor& logits,
                                Tensor& loss) {
  GAN_FAST_BN_CALL(d_head_forward, x, x, w, target, logits, loss);
}

void CpuKernels::d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& w, const Tensor& target,
                                 const Tensor& logits, bool need_x, bool need_w, Tensor& grad_x, Tensor& grad_w) {
  GAN_FAST_BN_CALL(d_head_backward, x, grad_loss, x, w, target, logits, need_x, need_w, grad_x, grad_w);
}

#undef GAN_FAST_BN_CALL
#undef GAN_FAST_BN_CASE_AVX2
#undef GAN_FAST_BN_CASE_AVX512
#undef GAN_FAST_BN_CASE_AVX512_BF16

// The image convolution (image_conv.h): the best build, as for the fp32 BatchNorm kernels.
#if GAN_FAST_CPU_AVX2_TU
#define GAN_FAST_IMAGE_CASE_AVX2(fn, ...) \
  case Isa::kAvx2: return cpu_avx2::fn(__VA_ARGS__);
#else
#define GAN_FAST_IMAGE_CASE_AVX2(fn, ...)
#endif
#if GAN_FAST_CPU_AVX512_TU
#define GAN_FAST_IMAGE_CASE_AVX512(fn, ...) \
  case Isa::kAvx512: return cpu_avx512::fn(__VA_ARGS__);
#else
#define GAN_FAST_IMAGE_CASE_AVX512(fn, ...)
#endif
#define GAN_FAST_IMAGE_CALL(fn, ...)              \
  switch (best_isa()) {                           \
    GAN_FAST_IMAGE_CASE_AVX512(fn, __VA_ARGS__)   \
    GAN_FAST_IMAGE_CASE_AVX2(fn, __VA_ARGS__)     \
    default: return cpu_default::fn(__VA_ARGS__); \
  }

void image_conv_forward(const Tensor& x, const Tensor& weight, const Tensor& b, const ImageConv& g, double slope,
                        Tensor& y) {
  GAN_FAST_IMAGE_CALL(image_conv_forward, x, weight, b, g, slope, y);
}

void image_conv_backward(const Tensor& dy, const Tensor& y, const Tensor& x, const Tensor& weight, const ImageConv& g,
                         double slope, Tensor& grad_w, Tensor& grad_b, Tensor& cols) {
  GAN_FAST_IMAGE_CALL(image_conv_backward, dy, y, x, weight, g, slope, grad_w, grad_b, cols);
}

#undef GAN_FAST_IMAGE_CALL
#undef GAN_FAST_IMAGE_CASE_AVX2
#undef GAN_FAST_IMAGE_CASE_AVX512

// The running-stat update: C elements, scalar.
void CpuKernels::bn_update_stats(Tensor& running_mean, Tensor& running_var, const Tensor& mean, const Tensor& var,
                                 double momentum, int64_t count) {
  GAN_FAST_DISPATCH(running_mean.scalar_type(), "gan_fast::bn_update_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const acc_t* mp = mean.data_ptr<acc_t>();
    const acc_t* vp = var.data_ptr<acc_t>();
    const acc_t mom = static_cast<acc_t>(momentum);
    const acc_t unbias = static_cast<acc_t>(count) / static_cast<acc_t>(count - 1);
    for (int64_t c = 0; c < running_mean.numel(); ++c) {
      rm[c] = static_cast<scalar_t>(mom * mp[c] + (acc_t(1) - mom) * static_cast<acc_t>(rm[c]));
      rv[c] = static_cast<scalar_t>(mom * vp[c] * unbias + (acc_t(1) - mom) * static_cast<acc_t>(rv[c]));
    }
  });
}

}  // namespace gan_fast
