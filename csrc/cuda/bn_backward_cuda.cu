// CUDA kernels of the BatchNorm + activation backward: one reduction pass for
// grad_bias = sum(dz) and grad_weight = invstd * sum(dz * (x - mean)), dz = dy * act'(z)
// (CudaKernels::bn_backward_reduce), then one elementwise pass (CudaKernels::bn_backward_apply)
//   training: dx = (dz - mean(dz) - (x - mean) * invstd^2 * mean(dz * (x - mean))) * w * invstd,
//   eval:     dx = dz * w * invstd,
// the formula of ATen's batch_norm_backward kernels (and csrc/cpu/bn_cpu_kernels.h), with the mask
// of the activation recomputed from the saved input: z = (x - mean) * scale + shift with the
// forward's exact roundings (bn_cuda.cuh), so the mask is the forward's.
#include "bn_cuda.cuh"

namespace gan_fast {
namespace cuda {
namespace {

// Where a gradient reduction goes: without `partial` the final grad_bias / grad_weight, else the
// block's sums to partial[(blockIdx.y * 2 + k) * C + c].
template <typename acc_t>
struct GradOut {
  acc_t* grad_weight;
  acc_t* grad_bias;
  acc_t* partial;
  int64_t C;

  __device__ __forceinline__ void store(const Sums<acc_t, 2>& s, int64_t c, acc_t invstd) const {
    if (partial == nullptr) {
      grad_bias[c] = s.v[0];
      grad_weight[c] = mul_rn(s.v[1], invstd);
    } else {
      acc_t* p = partial + int64_t(blockIdx.y) * 2 * C + c;
      p[0] = s.v[0];
      p[C] = s.v[1];
    }
  }
};

// acc += (dz, dz * (x - mean)) with dz = dL/dz, the terms of grad_bias and grad_weight / invstd.
template <typename acc_t>
__device__ __forceinline__ void add_grad_terms(Sums<acc_t, 2>& acc, acc_t dy, acc_t x, const Coeffs<acc_t>& k,
                                               acc_t slope, int act_kind) {
  const acc_t dz = masked_grad(dy, x, k, slope, act_kind);
  acc.v[0] += dz;
  acc.v[1] += dz * (x - k.mean);
}

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void reduce_planes_kernel(const scalar_t* __restrict__ dy,
                                                                 const scalar_t* __restrict__ x, int64_t N,
                                                                 int64_t C, int64_t S,
                                                                 ChannelParams<at::opmath_type<scalar_t>> prm,
                                                                 at::opmath_type<scalar_t> slope, int act_kind,
                                                                 GradOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const Coeffs<acc_t> k = load_coeffs(prm, c);
  Sums<acc_t, 2> acc{{acc_t(0), acc_t(0)}};
  for_each_plane_vector<VEC>(N, C, S, c, [&](int64_t off) {
    acc_t xv[VEC], gv[VEC];
    load_vec<VEC>(x + off, xv);
    load_vec<VEC>(dy + off, gv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) add_grad_terms(acc, gv[j], xv[j], k, slope, act_kind);
  });
  __shared__ Sums<acc_t, 2> shared[kWarps];
  acc = block_reduce_all(acc, shared);
  if (threadIdx.x == 0 && threadIdx.y == 0) out.store(acc, c, k.invstd);
}

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void reduce_rows_kernel(const scalar_t* __restrict__ dy,
                                                               const scalar_t* __restrict__ x, int64_t M, int64_t C,
                                                               ChannelParams<at::opmath_type<scalar_t>> prm,
                                                               at::opmath_type<scalar_t> slope, int act_kind,
                                                               GradOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv * VEC < C;
  Coeffs<acc_t> k[VEC];
  Sums<acc_t, 2> acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    acc[j] = Sums<acc_t, 2>{{acc_t(0), acc_t(0)}};
    if (active) k[j] = load_coeffs(prm, cv * VEC + j);
  }
  if (active) {
    for_each_row_vector<VEC>(M, C, cv, [&](int64_t off) {
      acc_t xv[VEC], gv[VEC];
      load_vec<VEC>(x + off, xv);
      load_vec<VEC>(dy + off, gv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) add_grad_terms(acc[j], gv[j], xv[j], k[j], slope, act_kind);
    });
  }
  __shared__ Sums<acc_t, 2> shared[kThreads * VEC];
  block_reduce_columns<VEC>(acc, shared);  // every thread takes part (shuffles, __syncthreads)
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.store(acc[j], cv * VEC + j, k[j].invstd);
  }
}

// Adds the per-block partial sums of each channel, in block order.
template <typename acc_t>
__global__ __launch_bounds__(kThreads) void reduce_finalize_kernel(const acc_t* __restrict__ partial, int64_t splits,
                                                                   ChannelParams<acc_t> prm, GradOut<acc_t> out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = out.C;
  if (c >= C) return;
  Sums<acc_t, 2> acc{{partial[c], partial[C + c]}};
  for (int64_t y = 1; y < splits; ++y) {
    const acc_t* p = partial + y * 2 * C + c;
    acc.v[0] += p[0];
    acc.v[1] += p[C];
  }
  out.store(acc, c, load_coeffs(prm, c).invstd);
}

template <typename scalar_t>
void bn_backward_reduce_cuda(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                             const Tensor& var, const Tensor& w, const Tensor& b, double eps, double slope,
                             int64_t act, Tensor& grad_weight, Tensor& grad_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* X = x.data_ptr<scalar_t>();
  const scalar_t* DY = dy.data_ptr<scalar_t>();
  const auto prm = channel_params<acc_t>(mean, var, w, b, eps);
  const int act_kind = static_cast<int>(act);
  const acc_t slope_a = static_cast<acc_t>(slope);
  GradOut<acc_t> out{grad_weight.data_ptr<acc_t>(), grad_bias.data_ptr<acc_t>(), nullptr, s.C};
  const LaunchPlan launch = launch_plan<scalar_t>(s, {X, DY}, Pass::kReduce, "gan_fast::bn_act_backward");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  reduce_per_channel<acc_t>(
      launch, 2, out, grad_weight.options(),
      [&](const GradOut<acc_t>& o) {
        with_vec<scalar_t>(launch.vec, [&](auto vec_c) {
          constexpr int VEC = decltype(vec_c)::value;
          if (s.rows) {
            reduce_rows_kernel<scalar_t, VEC>
                <<<launch.grid, launch.block, 0, stream>>>(DY, X, s.count(), s.C, prm, slope_a, act_kind, o);
          } else {
            reduce_planes_kernel<scalar_t, VEC>
                <<<launch.grid, launch.block, 0, stream>>>(DY, X, s.N, s.C, s.S, prm, slope_a, act_kind, o);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      },
      [&](unsigned blocks, const acc_t* partial, const GradOut<acc_t>& final_out) {
        reduce_finalize_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(partial, launch.grid.y, prm, final_out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// Per-channel terms of the elementwise backward: dx = (dz - c1 - (x - mean) * c2) * scale in
// training (c1 = grad_bias / count, c2 = grad_weight * invstd / count), dx = dz * scale in eval.
template <typename acc_t>
struct BackwardParams {
  ChannelParams<acc_t> ch;
  const acc_t* grad_weight;
  const acc_t* grad_bias;
  acc_t inv_count;
  acc_t slope;
  bool training;
  int act_kind;
};

template <typename acc_t>
struct BackwardCoeffs {
  Coeffs<acc_t> k;
  acc_t c1, c2;
};

template <typename acc_t>
__device__ __forceinline__ BackwardCoeffs<acc_t> load_backward_coeffs(const BackwardParams<acc_t>& p, int64_t c) {
  BackwardCoeffs<acc_t> r;
  r.k = load_coeffs(p.ch, c);
  r.c1 = p.training ? mul_rn(p.grad_bias[c], p.inv_count) : acc_t(0);
  r.c2 = p.training ? mul_rn(mul_rn(p.grad_weight[c], r.k.invstd), p.inv_count) : acc_t(0);
  return r;
}

template <typename acc_t>
__device__ __forceinline__ acc_t grad_input(acc_t dy, acc_t x, const BackwardCoeffs<acc_t>& r,
                                            const BackwardParams<acc_t>& p) {
  const acc_t dz = masked_grad(dy, x, r.k, p.slope, p.act_kind);
  return p.training ? mul_rn(sub_rn(sub_rn(dz, r.c1), mul_rn(sub_rn(x, r.k.mean), r.c2)), r.k.scale)
                    : mul_rn(dz, r.k.scale);
}

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void grad_input_planes_kernel(const scalar_t* __restrict__ dy,
                                                                     const scalar_t* __restrict__ x,
                                                                     scalar_t* __restrict__ dx, int64_t N, int64_t C,
                                                                     int64_t S,
                                                                     BackwardParams<at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const BackwardCoeffs<acc_t> r = load_backward_coeffs(p, c);
  for_each_plane_vector<VEC>(N, C, S, c, [&](int64_t off) {
    map_vec<VEC>(dy + off, x + off, dx + off, [&](int, acc_t g, acc_t xv) { return grad_input(g, xv, r, p); });
  });
}

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void grad_input_rows_kernel(const scalar_t* __restrict__ dy,
                                                                   const scalar_t* __restrict__ x,
                                                                   scalar_t* __restrict__ dx, int64_t M, int64_t C,
                                                                   BackwardParams<at::opmath_type<scalar_t>> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv * VEC >= C) return;  // no block-wide synchronisation below
  BackwardCoeffs<acc_t> r[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) r[j] = load_backward_coeffs(p, cv * VEC + j);
  for_each_row_vector<VEC>(M, C, cv, [&](int64_t off) {
    map_vec<VEC>(dy + off, x + off, dx + off, [&](int j, acc_t g, acc_t xv) { return grad_input(g, xv, r[j], p); });
  });
}

template <typename scalar_t>
void bn_backward_apply_cuda(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                            const Tensor& var, const Tensor& w, const Tensor& b, const Tensor& grad_weight,
                            const Tensor& grad_bias, bool training, double eps, double slope, int64_t act,
                            Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* X = x.data_ptr<scalar_t>();
  const scalar_t* DY = dy.data_ptr<scalar_t>();
  scalar_t* DX = dx.data_ptr<scalar_t>();
  const BackwardParams<acc_t> p{channel_params<acc_t>(mean, var, w, b, eps),
                                grad_weight.data_ptr<acc_t>(),
                                grad_bias.data_ptr<acc_t>(),
                                acc_t(1) / static_cast<acc_t>(s.count()),
                                static_cast<acc_t>(slope),
                                training,
                                static_cast<int>(act)};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LaunchPlan launch =
      launch_plan<scalar_t>(s, {X, DY, DX}, Pass::kElementwise, "gan_fast::bn_act_backward");
  with_vec<scalar_t>(launch.vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (s.rows) {
      grad_input_rows_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(DY, X, DX, s.count(), s.C, p);
    } else {
      grad_input_planes_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(DY, X, DX, s.N, s.C, s.S, p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda

void CudaKernels::bn_backward_reduce(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                                     const Tensor& var, const Tensor& w, const Tensor& b, double eps, double slope,
                                     int64_t act, Tensor& grad_weight, Tensor& grad_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  GAN_FAST_DISPATCH(x.scalar_type(), "gan_fast::bn_backward_reduce_cuda", [&] {
    cuda::bn_backward_reduce_cuda<scalar_t>(dy, x, s, mean, var, w, b, eps, slope, act, grad_weight, grad_bias);
  });
}

void CudaKernels::bn_backward_apply(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                                    const Tensor& var, const Tensor& w, const Tensor& b, const Tensor& grad_weight,
                                    const Tensor& grad_bias, bool training, double eps, double slope, int64_t act,
                                    Tensor& dx) {
  const c10::cuda::CUDAGuard guard(x.device());
  GAN_FAST_DISPATCH(x.scalar_type(), "gan_fast::bn_backward_apply_cuda", [&] {
    cuda::bn_backward_apply_cuda<scalar_t>(dy, x, s, mean, var, w, b, grad_weight, grad_bias, training, eps, slope,
                                           act, dx);
  });
}

}  // namespace gan_fast
