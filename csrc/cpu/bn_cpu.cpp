// CpuKernels' BatchNorm entry points: the kernels of bn_cpu_kernels.h compiled for the baseline ISA
// here and for AVX2 + FMA in bn_cpu_avx2.cpp, picked once per process from the CPU capability ATen
// itself uses (torch.backends.cpu.get_cpu_capability(); ATEN_CPU_CAPABILITY=default forces the
// baseline, which is how the tests reach it on an AVX2 machine). Forward and backward always run
// the same build, so the backward recomputes the forward's pre-activation bit for bit.
#define GAN_FAST_CPU_NS cpu_default
#include "bn_cpu_kernels.h"

#include <ATen/Version.h>

#include <string>

namespace gan_fast {

#if GAN_FAST_CPU_AVX2_TU
namespace cpu_avx2 {  // defined in bn_cpu_avx2.cpp
void bn_stats(const Tensor& x, const BnShape& s, Tensor& mean, Tensor& var);
void bn_apply(const Tensor& x, const BnShape& s, const Tensor& mean, const Tensor& var, const Tensor& w,
              const Tensor& b, double eps, double slope, int64_t act, Tensor& y);
void bn_backward_reduce(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                        const Tensor& var, const Tensor& w, const Tensor& b, double eps, double slope,
                        int64_t act, Tensor& grad_weight, Tensor& grad_bias);
void bn_backward_apply(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                       const Tensor& var, const Tensor& w, const Tensor& b, const Tensor& grad_weight,
                       const Tensor& grad_bias, bool training, double eps, double slope, int64_t act,
                       Tensor& dx);
}  // namespace cpu_avx2
#endif

namespace {

// True when the AVX2 build of the kernels may run: it was compiled, ATen runs its own AVX2 (or
// AVX-512) kernels, and the CPU really has AVX2 and FMA (ATEN_CPU_CAPABILITY can claim more than
// the CPU has; an illegal instruction must never be the answer). The features are bn_cpu_avx2.cpp's target.
bool use_avx2() {
#if GAN_FAST_CPU_AVX2_TU
  static const bool yes = [] {
    const std::string cap = at::get_cpu_capability();
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace

#if GAN_FAST_CPU_AVX2_TU
#define GAN_FAST_BN_CALL(fn, ...) (use_avx2() ? cpu_avx2::fn(__VA_ARGS__) : cpu_default::fn(__VA_ARGS__))
#else
#define GAN_FAST_BN_CALL(fn, ...) cpu_default::fn(__VA_ARGS__)
#endif

void CpuKernels::bn_stats(const Tensor& x, const BnShape& s, Tensor& mean, Tensor& var) {
  GAN_FAST_BN_CALL(bn_stats, x, s, mean, var);
}

void CpuKernels::bn_apply(const Tensor& x, const BnShape& s, const Tensor& mean, const Tensor& var,
                          const Tensor& w, const Tensor& b, double eps, double slope, int64_t act, Tensor& y) {
  GAN_FAST_BN_CALL(bn_apply, x, s, mean, var, w, b, eps, slope, act, y);
}

void CpuKernels::bn_backward_reduce(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                                    const Tensor& var, const Tensor& w, const Tensor& b, double eps, double slope,
                                    int64_t act, Tensor& grad_weight, Tensor& grad_bias) {
  GAN_FAST_BN_CALL(bn_backward_reduce, dy, x, s, mean, var, w, b, eps, slope, act, grad_weight, grad_bias);
}

void CpuKernels::bn_backward_apply(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                                   const Tensor& var, const Tensor& w, const Tensor& b, const Tensor& grad_weight,
                                   const Tensor& grad_bias, bool training, double eps, double slope, int64_t act,
                                   Tensor& dx) {
  GAN_FAST_BN_CALL(bn_backward_apply, dy, x, s, mean, var, w, b, grad_weight, grad_bias, training, eps, slope,
                   act, dx);
}

#undef GAN_FAST_BN_CALL

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
