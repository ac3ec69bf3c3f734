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
#include "cuda_common.h"

#include <algorithm>
#include <initializer_list>

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

// The coefficients of csrc/cpu/bn_cpu_kernels.h's ChannelCoeffs, computed with the same roundings,
// so the pre-activation z = (x - mean) * scale + shift is bit-for-bit the one of the CPU kernels
// and the same in the forward and in the backward (which reads the activation's mask from its sign).
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
// The walk of one thread (the thread layout of the file comment): f(off) for each VEC-element
// vector it visits, off the vector's first element.

// planes: the vectors of channel c, in the planes of the n this thread row visits.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_plane_vector(int64_t N, int64_t C, int64_t S, int64_t c, F&& f) {
  const int64_t s_vec = S / VEC;
  for (int64_t n = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; n < N; n += int64_t(gridDim.y) * blockDim.y) {
    const int64_t base = (n * C + c) * S;
    for (int64_t i = threadIdx.x; i < s_vec; i += blockDim.x) f(base + i * VEC);
  }
}

// rows: channel vector cv of each row m this thread row visits.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_row_vector(int64_t M, int64_t C, int64_t cv, F&& f) {
  for (int64_t m = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; m < M; m += int64_t(gridDim.y) * blockDim.y)
    f(m * C + cv * VEC);
}

// ---------------------------------------------------------------------------------------------
// Launch shapes.

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

// A reduction kernel (one partial state per block along y) or an elementwise one.
enum class Pass { kReduce, kElementwise };

// How a BatchNorm kernel is launched over s's layout.
//   vec:    elements per access (vec_width: 16 bytes when every pointer is aligned and the
//           vectorized run, C for rows and S for planes, is a multiple of it, else 1);
//   planes: one block column per channel; blockDim.x covers S / vec (a power of two up to kThreads);
//   rows:   blockDim.x covers C / vec (a power of two up to 32, see block_reduce_columns).
// blockDim.y takes the rest of kThreads; gridDim.y splits n (planes) or m (rows) as `pass` needs.
struct LaunchPlan {
  int vec;
  dim3 block, grid;
};

template <typename scalar_t>
inline LaunchPlan launch_plan(const BnShape& s, std::initializer_list<const void*> ptrs, Pass pass,
                              const char* op) {
  LaunchPlan plan;
  plan.vec = vec_width<scalar_t>(s.rows ? s.C : s.S, ptrs);
  int64_t outer;
  if (s.rows) {
    const int bx = pow2_at_least(s.C / plan.vec, 32);
    plan.block = dim3(bx, kThreads / bx);
    plan.grid.x = static_cast<unsigned>(ceil_div(s.C / plan.vec, bx));
    outer = s.count();
  } else {
    check_grid_x(s.C, op);
    const int bx = pow2_at_least(s.S / plan.vec, kThreads);
    plan.block = dim3(bx, kThreads / bx);
    plan.grid.x = static_cast<unsigned>(s.C);
    outer = s.N;
  }
  plan.grid.y = pass == Pass::kReduce ? reduce_splits(plan.grid.x, outer, plan.block.y)
                                      : elementwise_splits(plan.grid.x, outer, plan.block.y);
  return plan;
}

// A per-channel reduction over `launch` (a Pass::kReduce plan), run as the file comment says:
// launch_kernel(out) launches the reduction kernel; when the grid splits the channels over
// gridDim.y > 1 blocks, out.partial first gets room for `fields` values per block and channel, and
// launch_finalize(blocks, partial, final_out) then launches the kernel that merges them per channel
// (one thread each, `blocks` blocks of kThreads) into final_out, which is out without partial.
template <typename acc_t, typename Out, typename LaunchKernel, typename LaunchFinalize>
void reduce_per_channel(const LaunchPlan& launch, int fields, Out out, const at::TensorOptions& options,
                        LaunchKernel&& launch_kernel, LaunchFinalize&& launch_finalize) {
  const bool split = launch.grid.y > 1;
  Tensor partial;
  if (split) {
    partial = at::empty({int64_t(launch.grid.y) * fields * out.C}, options);
    out.partial = partial.data_ptr<acc_t>();
  }
  launch_kernel(out);
  if (split) {
    Out final_out = out;
    final_out.partial = nullptr;
    launch_finalize(static_cast<unsigned>(ceil_div(out.C, kThreads)), out.partial, final_out);
  }
}

}  // namespace cuda
}  // namespace gan_fast
