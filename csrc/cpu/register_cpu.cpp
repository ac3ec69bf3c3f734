// The CPU registration of every gan_fast op: the device-agnostic op bodies of csrc/common.h
// (argument checks, layouts, allocation) instantiated with CpuKernels, whose methods are defined in
// csrc/cpu/bn_cpu.cpp and pointwise_cpu.cpp (conv_act's CPU bodies: image_conv_cpu.cpp). The CUDA registration is csrc/cuda/register_cuda.cu;
// the schemas are csrc/ops.cpp's TORCH_LIBRARY(gan_fast, m).
#include "../common.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(gan_fast, CPU, m) {
  using K = gan_fast::CpuKernels;
  m.impl("bn_act", &gan_fast::bn_act_forward<K>);
  m.impl("bn_act_backward", &gan_fast::bn_act_backward<K>);
  m.impl("bn_update_stats_", &gan_fast::bn_update_stats<K>);
  m.impl("conv_act", &gan_fast::conv_act_forward_cpu);  // a few-channel image: direct kernels
  m.impl("conv_act_backward", &gan_fast::conv_act_backward_cpu);
  m.impl("bce_with_logits", &gan_fast::bce_forward<K>);
  m.impl("bce_with_logits_backward", &gan_fast::bce_backward<K>);
  m.impl("d_head_bce", &gan_fast::d_head_forward<K>);
  m.impl("d_head_bce_backward", &gan_fast::d_head_backward<K>);
  m.impl("col2im", &gan_fast::col2im_cpu);  // CPU only: ext_conv's GEMM forms run on a CPU
}
