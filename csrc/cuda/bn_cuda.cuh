// Shared by csrc/cuda/bn_forward_cuda.cu and bn_backward_cuda.cu: per-channel coefficients and
// the launch shapes of the BatchNorm kernels for the two layouts of csrc/common.h.
//
// Thread layout (the split of ATen's batch_norm CUDA kernels, aten/src/ATen/native/cuda/
// Normalization.cuh, between the NCHW "collect statistics per channel block" kernels and the
// channels_last 2-D tiles):
//   planes [N, C, S]: blockIdx.x = channel c; threadIdx.x walks S (VEC elements per access),
//                     threadIdx.y and blockIdx.y walk n. Every thread of a block works on one
//                     channel, so its coefficients are loaded once and a reduction is a
//                     whole-block reduction.
//   rows   [M, C]:    threadIdx.x (+ blockIdx.x) walks channel vectors (VEC channels, one 16-byte
//                     access), threadIdx.y and blockIdx.y walk rows; a warp reads
//                     32 / blockDim.x whole rows when C is small, so accesses stay coalesced.
//                     Reductions are column reductions (block_reduce_columns).
// Reductions over more than one block per channel (blockIdx.y > 0) write one partial state per
// block and per channel and a finalize kernel merges them in a fixed order: deterministic, no
// atomics, and the partial buffer is a torch allocation (stream-ordered, CUDA-graph safe).
#pragma once

#include "../common.h"
#include "../cuda_common.h"

#include <algorithm>

namespace gan_fast {
namespace cuda {

// Per-channel inputs of the normalization, in the accumulation dtype; w / b may be null
// (affine=False).
template <typename acc_t>
struct ChannelParams {
  const acc_t* mean;
  const acc_t* var;
  const acc_t* w;
  const acc_t* b;
  acc_t eps;
};

template <typename acc_t>
inline ChannelParams<acc_t> channel_params(const Tensor& mean, const Tensor& var, const Tensor& w,
                                           const Tensor& b, double eps) {
  return {mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), w.defined() ? w.data_ptr<acc_t>() : nullptr,
          b.defined() ? b.data_ptr<acc_t>() : nullptr, static_cast<acc_t>(eps)};
}

// The coefficients of csrc/bn_cpu.cpp's ChannelCoeffs, computed with the same roundings, so the
// pre-activation z = (x - mean) * scale + shift is bit-for-bit the one of the CPU kernels and
// the same in the forward and in the backward (which reads the activation's mask from its sign).
template <typename acc_t>
struct Coeffs {
  acc_t mean, scale, shift, invstd;
};

template <typename acc_t>
__device__ __forceinline__ Coeffs<acc_t> load_coeffs(const ChannelParams<acc_t>& p, int64_t c) {
  Coeffs<acc_t> k;
  k.invstd = div_rn(acc_t(1), sqrt_rn(add_rn(p.var[c], p.eps)));
  k.mean = p.mean[c];
  k.scale = p.w != nullptr ? mul_rn(p.w[c], k.invstd) : k.invstd;
  k.shift = p.b != nullptr ? p.b[c] : acc_t(0);
  return k;
}

template <typename acc_t>
__device__ __forceinline__ acc_t pre_act(acc_t x, const Coeffs<acc_t>& k) {
  return add_rn(mul_rn(sub_rn(x, k.mean), k.scale), k.shift);
}

// dL/dz: dy through the activation's mask (act: kActNone, kActRelu or kActLeakyRelu).
template <typename acc_t>
__device__ __forceinline__ acc_t masked_grad(acc_t dy, acc_t x, const Coeffs<acc_t>& k, acc_t slope, int act) {
  return act == kActNone ? dy : activate_grad(dy, pre_act(x, k), act, slope);
}

// ---------------------------------------------------------------------------------------------
// Launch shapes.

// planes: blockDim.x covers S / vec (a power of two up to kThreads), blockDim.y the rest.
inline dim3 planes_block(int64_t s_vec) {
  const int bx = pow2_at_least(s_vec, kThreads);
  return dim3(bx, kThreads / bx);
}

// rows: blockDim.x covers C / vec (a power of two up to 32, see block_reduce_columns).
inline dim3 rows_block(int64_t c_vec) {
  const int bx = pow2_at_least(c_vec, 32);
  return dim3(bx, kThreads / bx);
}

// Blocks along y for a reduction with grid_x blocks along x: about one wave of the device, and
// each thread row still visits at least two of the `outer` indices (n or m).
inline unsigned reduce_splits(int64_t grid_x, int64_t outer, unsigned by) {
  const int64_t want = ceil_div(one_wave_blocks(), grid_x);
  const int64_t most = outer / (int64_t(by) * 2);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min({want, most, kMaxGridY})));
}

// Blocks along y for a grid-stride elementwise kernel: a few waves, at most one per thread row.
inline unsigned elementwise_splits(int64_t grid_x, int64_t outer, unsigned by) {
  const int64_t want = ceil_div(int64_t(sm_count()) * 32, grid_x);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min({want, ceil_div(outer, by), kMaxGridY})));
}

}  // namespace cuda
}  // namespace gan_fast
