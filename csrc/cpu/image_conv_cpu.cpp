// The CPU bodies of conv_act and conv_act_backward: a conv2d of a few-channel channels_last fp32
// image followed by LeakyReLU (or nothing) runs the direct kernels of image_conv_kernels.h (image_conv.h
// says why); every other call is the device-agnostic body of csrc/common.h (ATen's convolution).
#include "image_conv.h"

#include <ATen/ops/empty.h>

namespace gan_fast {
namespace {

// After the op's argument checks: whether the direct kernels take this call.
bool image_conv_applies(const Tensor& x, const Tensor& weight, bool transposed, int64_t act) {
  return !transposed && (act == kActLeakyRelu || act == kActNone) && x.scalar_type() == at::kFloat &&
         x.size(1) <= kImageConvMaxChannels && x.numel() > 0 && conv_format(x) == at::MemoryFormat::ChannelsLast;
}

ImageConv image_conv_geometry(const Tensor& x, const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding) {
  ImageConv g{};
  g.N = x.size(0), g.C = x.size(1), g.H = x.size(2), g.W = x.size(3);
  g.Cout = weight.size(0), g.KH = weight.size(2), g.KW = weight.size(3);
  g.s0 = stride[0], g.s1 = stride[1], g.p0 = padding[0], g.p1 = padding[1];
  g.OH = (g.H + 2 * g.p0 - g.KH) / g.s0 + 1, g.OW = (g.W + 2 * g.p1 - g.KW) / g.s1 + 1;
  g.K = g.KH * g.KW * g.C;
  for (int d = 0; d < 4; ++d) g.xs[d] = x.stride(d);
  return g;
}

// LeakyReLU(slope), or no activation: LeakyReLU(1) is z exactly, and its derivative dy exactly.
double image_conv_slope(int64_t act, double negative_slope) { return act == kActNone ? 1.0 : negative_slope; }

}  // namespace

Tensor conv_act_forward_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, bool transposed, int64_t act,
                            double negative_slope) {
  check_conv_act_args(x, weight, bias, stride, padding, transposed, act, negative_slope);
  if (!image_conv_applies(x, weight, transposed, act))
    return conv_act_forward<CpuKernels>(x, weight, bias, stride, padding, transposed, act, negative_slope);
  const ImageConv g = image_conv_geometry(x, weight, stride, padding);
  const Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : Tensor();
  const auto channels_last = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  Tensor y = new_output(at::empty({g.N, g.Cout, g.OH, g.OW}, channels_last));
  image_conv_forward(x, weight, b, g, image_conv_slope(act, negative_slope), y);
  return y;
}

std::tuple<Tensor, Tensor, Tensor> conv_act_backward_cpu(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                                                         const Tensor& weight, bool has_bias, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, bool transposed, int64_t act,
                                                         double negative_slope, std::array<bool, 3> output_mask) {
  check_conv_act_backward_args(grad_out, out, x, weight, stride, padding, transposed, act, negative_slope);
  if (!image_conv_applies(x, weight, transposed, act))
    return conv_act_backward<CpuKernels>(grad_out, out, x, weight, has_bias, stride, padding, transposed, act,
                                         negative_slope, output_mask);
  const ImageConv g = image_conv_geometry(x, weight, stride, padding);
  // ATen's convolution_backward checks this for the other path; the kernels index by it.
  TORCH_CHECK(out.sizes() == at::IntArrayRef({g.N, g.Cout, g.OH, g.OW}),
              "gan_fast::conv_act_backward: output has shape ", out.sizes(), " but the convolution of input ",
              x.sizes(), " with weight ", weight.sizes(), " gives [", g.N, ", ", g.Cout, ", ", g.OH, ", ", g.OW, "]");
  const Tensor dy = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor y = out.contiguous(at::MemoryFormat::ChannelsLast);
  const auto f32 = x.options();
  Tensor grad_w = output_mask[1] ? new_output(at::empty(weight.sizes(), f32.memory_format(conv_format(weight))))
                                 : Tensor();
  Tensor grad_b = has_bias && output_mask[2] ? new_output(at::empty({g.Cout}, f32)) : Tensor();
  Tensor cols = output_mask[0] ? new_output(at::empty({g.N, g.OH, g.OW, g.KH, g.KW, g.C}, f32)) : Tensor();
  if (grad_w.defined() || grad_b.defined() || cols.defined())
    image_conv_backward(dy, y, x, weight, g, image_conv_slope(act, negative_slope), grad_w, grad_b, cols);
  // Gradients in their tensor's layout, skipped ones empty ([0]), as conv_act_backward<K> returns them.
  const Tensor gx = cols.defined() ? col2im_cpu(cols, {g.H, g.W}, stride, padding) : at::empty({0}, f32);
  return {gx, grad_w.defined() ? grad_w : at::empty({0}, f32), grad_b.defined() ? grad_b : at::empty({0}, f32)};
}

}  // namespace gan_fast
