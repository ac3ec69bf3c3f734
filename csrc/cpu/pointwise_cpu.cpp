// CPU kernels of the activation applied after an ATen convolution, BCE-with-logits and the fused
// D head (GEMV + BCE).
#include "../common.h"
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

// Per-element BCE-with-logits in double as torch arranges it: (1 - t) * l - log_sigmoid(l), with
// log_sigmoid(l) = min(l, 0) - log1p(exp(-|l|)); an infinite logit then gives the reference's inf or
// NaN (l = +inf, t = 0 is +inf, where max(l, 0) - l * t would give inf - inf).
inline double bce_term(double l, double t) {
  return (1.0 - t) * l - std::min(l, 0.0) + std::log1p(std::exp(-std::abs(l)));
}

// sigmoid(l) without overflow for either sign of l.
inline double stable_sigmoid(double l) {
  if (l >= 0) return 1.0 / (1.0 + std::exp(-l));
  const double e = std::exp(l);
  return e / (1.0 + e);
}

// dloss/dl = (sigmoid(l) - t) * scale, in double.
inline double bce_grad(double l, double t, double scale) { return (stable_sigmoid(l) - t) * scale; }

// BCE with logits and the fused D head for one dtype, scalar_t in memory, acc_t (the targets, the
// loss) and Vec for the arithmetic.
template <typename scalar_t>
struct BceCpu {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;

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

  // The D head: x as N rows of K features and the weight as K features in the same order
  // (csrc/common.h d_head_operands).
  static void d_head_forward(const Tensor& x, const Tensor& w, const Tensor& target, Tensor& logits,
                             Tensor& loss) {
    const int64_t N = x.size(0), K = x.numel() / N;
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* Wt = w.data_ptr<scalar_t>();
    const acc_t* T = target.data_ptr<acc_t>();
    scalar_t* L = logits.data_ptr<scalar_t>();
    std::vector<double> terms(N);
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / K), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        Vec acc(acc_t(0));
        IO::vec_loop(K, [&](int64_t k, int64_t m) {
          acc += IO::keep(IO::load(X + n * K + k, m) * IO::load(Wt + k, m), m);
        });
        const acc_t dot = IO::hsum(acc);
        L[n] = static_cast<scalar_t>(dot);
        terms[n] = bce_term(static_cast<double>(dot), static_cast<double>(T[n]));
      }
    });
    double sum = 0;
    for (int64_t n = 0; n < N; ++n) sum += terms[n];
    *loss.data_ptr<acc_t>() = static_cast<acc_t>(sum / static_cast<double>(N));
  }

  static void d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& w, const Tensor& target,
                              const Tensor& logits, bool need_x, bool need_w, Tensor& grad_x, Tensor& grad_w) {
    const int64_t N = x.size(0), K = x.numel() / N;
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* Wt = w.data_ptr<scalar_t>();
    const acc_t* T = target.data_ptr<acc_t>();
    const scalar_t* L = logits.data_ptr<scalar_t>();
    // dloss/dlogit_n = (sigmoid(l_n) - t_n) * grad / N.
    const double g = static_cast<double>(*grad_loss.data_ptr<acc_t>()) / static_cast<double>(N);
    std::vector<acc_t> dl(N);
    for (int64_t n = 0; n < N; ++n)
      dl[n] = static_cast<acc_t>(bce_grad(static_cast<double>(L[n]), static_cast<double>(T[n]), g));
    if (need_x) {  // grad_x[n, :] = dl[n] * w
      scalar_t* GX = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, N, std::max<int64_t>(1, kGrain / K), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const Vec d(dl[n]);
          IO::vec_loop(K, [&](int64_t k, int64_t m) { IO::store(GX + n * K + k, IO::load(Wt + k, m) * d, m); });
        }
      });
    }
    if (need_w) {  // grad_w = sum_n dl[n] * x[n, :], parallel over chunks of K
      scalar_t* GW = grad_w.data_ptr<scalar_t>();
      at::parallel_for(0, K, std::max<int64_t>(IO::W, kGrain / N), [&](int64_t k0, int64_t k1) {
        IO::vec_loop(k1 - k0, [&](int64_t i, int64_t m) {
          const int64_t k = k0 + i;
          Vec acc(acc_t(0));
          for (int64_t n = 0; n < N; ++n) acc += IO::load(X + n * K + k, m) * Vec(dl[n]);
          IO::store(GW + k, acc, m);
        });
      });
    }
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

void CpuKernels::d_head_forward(const Tensor& x, const Tensor& w, const Tensor& target, Tensor& logits,
                                Tensor& loss) {
  GAN_FAST_DISPATCH(x.scalar_type(), "gan_fast::d_head_forward_cpu",
                    [&] { BceCpu<scalar_t>::d_head_forward(x, w, target, logits, loss); });
}

void CpuKernels::d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& w, const Tensor& target,
                                 const Tensor& logits, bool need_x, bool need_w, Tensor& grad_x, Tensor& grad_w) {
  GAN_FAST_DISPATCH(x.scalar_type(), "gan_fast::d_head_backward_cpu", [&] {
    BceCpu<scalar_t>::d_head_backward(grad_loss, x, w, target, logits, need_x, need_w, grad_x, grad_w);
  });
}

}  // namespace gan_fast
