// CPU kernels of the activation applied after an ATen convolution and of BCE-with-logits.
#include "../common.h"
#include "bce_math.h"
#include "cpu_vec.h"

#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/leaky_relu_backward.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>

#include <cmath>
#include <vector>

namespace gan_fast {
namespace {

using cpu::VecIO;

constexpr int64_t kGrain = 32768;

// BCE with logits for one dtype, scalar_t in memory, acc_t (the targets, the loss) for the arithmetic.
// (The fused D head, a GEMV + BCE, is compiled per ISA: bn_cpu_kernels.h.)
template <typename scalar_t>
struct BceCpu {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;

  static void forward(const Tensor& logits, const Tensor& target, Tensor& loss) {
    const scalar_t* L = logits.data_ptr<scalar_t>();
    const acc_t* T = target.data_ptr<acc_t>();
    const int64_t n = logits.numel();
    double sum = 0;  // a batch of logits: serial, in double, deterministic
    for (int64_t i = 0; i < n; ++i) sum += bce_term(static_cast<double>(L[i]), static_cast<double>(T[i]));
    *loss.data_ptr<acc_t>() = static_cast<acc_t>(sum / static_cast<double>(n));
  }

  static void backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& target, Tensor& grad_logits) {
    const scalar_t* L = logits.data_ptr<scalar_t>();
    const acc_t* T = target.data_ptr<acc_t>();
    scalar_t* G = grad_logits.data_ptr<scalar_t>();
    const int64_t n = logits.numel();
    const double g = static_cast<double>(*grad_loss.data_ptr<acc_t>()) / static_cast<double>(n);
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        G[i] = static_cast<scalar_t>(bce_grad(static_cast<double>(L[i]), static_cast<double>(T[i]), g));
    });
  }

};

}  // namespace

// The activation after an ATen convolution is ATen's own in-place kernel: one read and one write
// like a hand-written loop, but vectorized with ATen's runtime-dispatched AVX2 / AVX-512 builds (an
// extension compiles at::vec for the baseline ISA only, where its generic fallback branches per
// lane on every comparison) and the very arithmetic of F.leaky_relu / torch.tanh, so the op's output
// equals the reference composition's bit for bit.
void CpuKernels::act_forward_(Tensor& y, int64_t act, double slope) {
  if (act == kActTanh) {
    y.tanh_();
  } else {
    at::leaky_relu_(y, slope);  // ReLU is slope 0
  }
}

// dL/dz from the saved output: tanh' = 1 - y^2 (torch's tanh_backward); LeakyReLU reads its mask
// from the sign of y, which is the sign of z for slope >= 0 (self_is_result, as the in-place
// F.leaky_relu's backward does).
void CpuKernels::act_backward(const Tensor& grad_y, const Tensor& y, int64_t act, double slope, Tensor& grad_z) {
  if (act == kActTanh) {
    at::tanh_backward_out(grad_z, grad_y, y);
  } else {
    at::leaky_relu_backward_out(grad_z, grad_y, y, slope, /*self_is_result=*/true);
  }
}

void CpuKernels::bce_forward(const Tensor& logits, const Tensor& target, Tensor& loss) {
  GAN_FAST_DISPATCH(logits.scalar_type(), "gan_fast::bce_forward_cpu",
                    [&] { BceCpu<scalar_t>::forward(logits, target, loss); });
}

void CpuKernels::bce_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                              Tensor& grad_logits) {
  GAN_FAST_DISPATCH(logits.scalar_type(), "gan_fast::bce_backward_cpu",
                    [&] { BceCpu<scalar_t>::backward(grad_loss, logits, target, grad_logits); });
}

}  // namespace gan_fast
