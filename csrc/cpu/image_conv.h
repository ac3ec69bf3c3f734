// Conv2d + LeakyReLU of a few-channel image on the CPU (D's first layer), computed directly instead of
// through oneDNN: the shapes and entry points shared by the op bodies (image_conv_cpu.cpp) and the
// per-ISA kernels (image_conv_kernels.h, compiled with the BatchNorm kernels' builds and picked by
// bn_cpu.cpp the same way).
//
// Why (issue #16): oneDNN's fp32 convolution from a 1-channel 32x32 image to 32 channels (the digits
// D, batch 64) took 0.35-0.73 ms a call inside the training step against 0.17 on its own, its weight
// gradient 0.22-0.26 ms, and the LeakyReLU's separate backward pass 0.16 ms a call; with the input
// gradient (GEMM + col2im) D's first layer cost ~2.9 ms of a ~33 ms step. Its arithmetic is tiny
// (16 multiply-adds per output value): what costs is memory passes and per-call overhead, so these
// kernels do one pass each: the forward writes the activation once; the backward reads dY and Y once,
// applies LeakyReLU's derivative in registers, and reduces the weight and bias gradients and/or
// writes the input gradient's columns (col2im then sums them into the image).
#pragma once

#include "../common.h"

namespace gan_fast {

// The largest image channel count the direct kernels take (gan_fast/backends/ext_conv.py's
// _IMAGE_MAX_CHANNELS is the same limit in Python): the images they are for (1-channel digits, RGB,
// RGBA); wider inputs were not measured against oneDNN.
constexpr int64_t kImageConvMaxChannels = 4;

// A conv2d's geometry: x [N, C, H, W] -> y [N, Cout, OH, OW], kernel KH x KW, stride, padding;
// x's strides (any), K = KH * KW * C taps per output value in (i, j, c) order.
struct ImageConv {
  int64_t N, C, H, W, Cout, KH, KW, OH, OW, s0, s1, p0, p1, K;
  int64_t xs[4];
};

// Each ISA build's entry points (image_conv_kernels.h), fp32 only; the weight [Cout, C, KH, KW] in any
// layout:
//   forward:  y (channels_last [N, OH, OW, Cout]) = act(x * w + b), b may be undefined; act is
//             LeakyReLU(slope) (slope 1: none);
//   backward: from dy and y (channels_last) with g = dy * act'(y): grad_w (in its own strides) and
//             grad_b [Cout] when defined, and cols [N * OH * OW, K] = g @ w^T (w as [Cout, K]) when defined.
#define GAN_FAST_IMAGE_CONV_ENTRY_POINTS                                                                          \
  void image_conv_forward(const Tensor& x, const Tensor& weight, const Tensor& b, const ImageConv& g, double slope, \
                          Tensor& y);                                                                               \
  void image_conv_backward(const Tensor& dy, const Tensor& y, const Tensor& x, const Tensor& weight,                \
                           const ImageConv& g, double slope, Tensor& grad_w, Tensor& grad_b, Tensor& cols);

// The best build's (bn_cpu.cpp).
GAN_FAST_IMAGE_CONV_ENTRY_POINTS

}  // namespace gan_fast
