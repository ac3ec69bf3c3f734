// bn_act_eager: bn_act with its autograd formula in C++, what gan_fast/backends/ext.py calls in eager
// mode. bn_act's own autograd is registered from Python (torch.library.register_autograd), which
// torch.compile traces; in eager mode that Python layer (an autograd.Function's forward and backward,
// ~85 us per block at batch 2) cost more than the BatchNorm + activation kernels themselves, nine
// times per DCGAN step (issue #16). Here the graph node is a C++ torch::autograd::Function (the
// pattern of torchvision's csrc/ops/autograd/*.cpp), registered as the op's CompositeImplicitAutograd
// kernel: any device whose bn_act / bn_act_backward kernels are registered runs it.
//
// The formula is _bn_backward's in ext.py: the bn_act_backward kernel, gamma / beta gradients in
// their parameters' dtype; with create_graph=True (a gradient penalty differentiating D's input
// gradient) the gradients come from ATen's differentiable composition (batch_norm + activation)
// instead, so they are themselves differentiable (reference.differentiable_backward's idea).
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "common.h"

namespace gan_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = c10::optional<Tensor>;
using Three = std::tuple<Tensor, Tensor, Tensor>;

std::tuple<Tensor, Tensor, Tensor> call_bn_act(const Tensor& x, const c10::optional<Tensor>& weight,
                                               const c10::optional<Tensor>& bias,
                                               const c10::optional<Tensor>& running_mean,
                                               const c10::optional<Tensor>& running_var, bool training, double eps,
                                               int64_t act, double slope, int64_t chunks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gan_fast::bn_act", "")
                       .typed<Three(const Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, bool, double,
                                    int64_t, double, int64_t)>();
  return op.call(x, weight, bias, running_mean, running_var, training, eps, act, slope, chunks);
}

std::tuple<Tensor, Tensor, Tensor> call_bn_act_backward(const Tensor& grad_out, const Tensor& x,
                                                        const c10::optional<Tensor>& weight,
                                                        const c10::optional<Tensor>& bias, const Tensor& mean,
                                                        const Tensor& var, bool training, double eps, int64_t act,
                                                        double slope, int64_t chunks) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gan_fast::bn_act_backward", "")
                       .typed<Three(const Tensor&, const Tensor&, const Opt&, const Opt&, const Tensor&,
                                    const Tensor&, bool, double, int64_t, double, int64_t)>();
  return op.call(grad_out, x, weight, bias, mean, var, training, eps, act, slope, chunks);
}

c10::optional<Tensor> maybe(const Tensor& t) {
  return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt;
}

class BnActFunction : public torch::autograd::Function<BnActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, const c10::optional<Tensor>& running_mean,
                               const c10::optional<Tensor>& running_var, bool training, double eps, int64_t act,
                               double slope, int64_t chunks) {
    Tensor y, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the kernels, not bn_act's Python autograd
      std::tie(y, mean, var) =
          call_bn_act(x, weight, bias, running_mean, running_var, training, eps, act, slope, chunks);
    }
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, var});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["chunks"] = chunks;
    ctx->mark_non_differentiable({mean, var});
    // mean and var never get a gradient: no zero tensors for them (two per call otherwise)
    ctx->set_materialize_grads(false);
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &var = saved[4];
    const bool training = ctx->saved_data["training"].toBool();
    const double eps = ctx->saved_data["eps"].toDouble(), slope = ctx->saved_data["slope"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt(), chunks = ctx->saved_data["chunks"].toInt();
    // needs_input_grad counts the node's edges, one per tensor argument that was given: x, then the
    // weight and the bias where defined
    const bool need[3] = {ctx->needs_input_grad(0), weight.defined() && ctx->needs_input_grad(1),
                          bias.defined() && ctx->needs_input_grad(weight.defined() ? 2 : 1)};
    variable_list out(10);
    const Tensor& grad_y = grads[0];
    if (!grad_y.defined() || !(need[0] || need[1] || need[2])) return out;
    if (torch::autograd::GradMode::is_enabled()) {  // create_graph=True: differentiable gradients
      // each chunk with its own statistics (chunks > 1 is training only)
      std::vector<Tensor> parts;
      for (const Tensor& xk : x.chunk(chunks))
        parts.push_back(at::batch_norm(xk, maybe(weight), maybe(bias), training ? c10::optional<Tensor>() : maybe(mean),
                                       training ? c10::optional<Tensor>() : maybe(var), training, 0.0, eps, false));
      Tensor z = chunks == 1 ? parts[0] : at::cat(parts);
      Tensor y = act == kActRelu ? at::relu(z) : act == kActLeakyRelu ? at::leaky_relu(z, slope) : z;
      variable_list inputs;
      for (int i = 0; i < 3; ++i)
        if (need[i]) inputs.push_back(saved[i]);
      auto got = torch::autograd::grad({y}, inputs, {grad_y}, /*retain_graph=*/true, /*create_graph=*/true,
                                       /*allow_unused=*/true);
      for (int i = 0, k = 0; i < 3; ++i)
        if (need[i]) {
          out[i] = got[k].defined() ? got[k] : at::zeros_like(saved[i]);
          ++k;
        }
      return out;
    }
    auto [gx, gw, gb] =
        call_bn_act_backward(grad_y, x, maybe(weight), maybe(bias), mean, var, training, eps, act, slope, chunks);
    if (need[0]) out[0] = gx;
    if (need[1]) out[1] = gw.to(weight.scalar_type());
    if (need[2]) out[2] = gb.to(bias.scalar_type());
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> bn_act_eager(const Tensor& x, const c10::optional<Tensor>& weight,
                                                const c10::optional<Tensor>& bias,
                                                const c10::optional<Tensor>& running_mean,
                                                const c10::optional<Tensor>& running_var, bool training, double eps,
                                                int64_t act, double negative_slope, int64_t chunks) {
  auto out =
      BnActFunction::apply(x, weight, bias, running_mean, running_var, training, eps, act, negative_slope, chunks);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace gan_fast

TORCH_LIBRARY_IMPL(gan_fast, CompositeImplicitAutograd, m) {
  m.impl("bn_act_eager", &gan_fast::bn_act_eager);
}
