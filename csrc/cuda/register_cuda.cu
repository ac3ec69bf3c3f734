// The CUDA registration of every gan_fast op: the device-agnostic op bodies of csrc/common.h
// (argument checks, layouts, allocation) instantiated with CudaKernels, whose methods are
// defined in csrc/cuda/bn_forward_cuda.cu, bn_backward_cuda.cu and pointwise_cuda.cu. The CPU
// registration is csrc/pointwise_cpu.cpp's TORCH_LIBRARY_IMPL(gan_fast, CPU, m); the schemas are
// csrc/ops.cpp's TORCH_LIBRARY(gan_fast, m).
#include "../common.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(gan_fast, CUDA, m) {
  GAN_FAST_REGISTER_IMPLS(gan_fast::CudaKernels, m);
}
