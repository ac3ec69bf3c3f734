// CUDA kernels of the BatchNorm + activation forward: batch statistics (CudaKernels::bn_stats),
// normalize + activation (CudaKernels::bn_apply) and the running-stat update
// (CudaKernels::bn_update_stats). See bn_cuda.cuh for the thread layout of the two memory layouts.
//
// Statistics are Welford's running (mean, M2) per thread, merged across threads and blocks with
// Chan et al.'s pairwise formula: one read of x, no cancellation of sum(x^2) - n * mean^2 (the
// scheme of ATen's batch_norm_collect_statistics_kernel and apex's syncbn welford kernels; the
// CPU kernels get the same numerical safety from two passes).
#include "bn_cuda.cuh"

namespace gan_fast {
namespace cuda {
namespace {

// Running Welford states of VEC lanes that have all seen the same number of values.
template <typename acc_t, int VEC>
struct WelfordLanes {
  acc_t mean[VEC];
  acc_t m2[VEC];
  int n;

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < VEC; ++i) mean[i] = m2[i] = acc_t(0);
    n = 0;
  }
  __device__ __forceinline__ void add(const acc_t (&v)[VEC]) {
    ++n;
    const acc_t r = acc_t(1) / static_cast<acc_t>(n);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t d = v[i] - mean[i];
      mean[i] += d * r;
      m2[i] += d * (v[i] - mean[i]);
    }
  }
  __device__ __forceinline__ Welford<acc_t> lane(int i) const { return {mean[i], m2[i], static_cast<acc_t>(n)}; }
};

// Where a statistics reduction goes: without `partial` (one block per channel) the final mean and
// biased variance M2 / count, else the block's state to partial[(blockIdx.y * 3 + field) * C + c].
template <typename acc_t>
struct StatsOut {
  acc_t* mean;
  acc_t* var;
  acc_t* partial;
  int64_t C;
  acc_t inv_count;

  __device__ __forceinline__ void store(const Welford<acc_t>& s, int64_t c) const {
    if (partial == nullptr) {
      mean[c] = s.mean;
      var[c] = mul_rn(s.m2, inv_count);  // the CPU kernels' sum of squared deviations * (1 / count)
    } else {
      acc_t* p = partial + int64_t(blockIdx.y) * 3 * C + c;
      p[0] = s.mean;
      p[C] = s.m2;
      p[2 * C] = s.n;
    }
  }
};

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void stats_planes_kernel(const scalar_t* __restrict__ x, int64_t N,
                                                                int64_t C, int64_t S,
                                                                StatsOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  WelfordLanes<acc_t, VEC> acc;
  acc.init();
  for_each_plane_vector<VEC>(N, C, S, c, [&](int64_t off) {
    acc_t v[VEC];
    load_vec<VEC>(x + off, v);
    acc.add(v);
  });
  Welford<acc_t> st = acc.lane(0);
#pragma unroll
  for (int i = 1; i < VEC; ++i) st = combine(st, acc.lane(i));
  __shared__ Welford<acc_t> shared[kWarps];
  st = block_reduce_all(st, shared);
  if (threadIdx.x == 0 && threadIdx.y == 0) out.store(st, c);
}

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void stats_rows_kernel(const scalar_t* __restrict__ x, int64_t M, int64_t C,
                                                              StatsOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv * VEC < C;
  WelfordLanes<acc_t, VEC> acc;
  acc.init();
  if (active) {
    for_each_row_vector<VEC>(M, C, cv, [&](int64_t off) {
      acc_t v[VEC];
      load_vec<VEC>(x + off, v);
      acc.add(v);
    });
  }
  Welford<acc_t> st[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) st[i] = acc.lane(i);
  __shared__ Welford<acc_t> shared[kThreads * VEC];
  block_reduce_columns<VEC>(st, shared);  // every thread takes part (shuffles, __syncthreads)
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.store(st[i], cv * VEC + i);
  }
}

// Merges the per-block partial states of each channel, in block order.
template <typename acc_t>
__global__ __launch_bounds__(kThreads) void stats_finalize_kernel(const acc_t* __restrict__ partial, int64_t splits,
                                                                  StatsOut<acc_t> out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t C = out.C;
  if (c >= C) return;
  Welford<acc_t> st{partial[c], partial[C + c], partial[2 * C + c]};
  for (int64_t y = 1; y < splits; ++y) {
    const acc_t* p = partial + y * 3 * C + c;
    st = combine(st, Welford<acc_t>{p[0], p[C], p[2 * C]});
  }
  out.store(st, c);
}

template <typename scalar_t>
void bn_stats_cuda(const Tensor& x, const BnShape& s, Tensor& mean, Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* X = x.data_ptr<scalar_t>();
  StatsOut<acc_t> out{mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), nullptr, s.C,
                      acc_t(1) / static_cast<acc_t>(s.count())};
  const LaunchPlan launch = launch_plan<scalar_t>(s, {X}, Pass::kReduce, "gan_fast::bn_act");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  reduce_per_channel<acc_t>(
      launch, 3, out, mean.options(),
      [&](const StatsOut<acc_t>& o) {
        with_vec<scalar_t>(launch.vec, [&](auto vec_c) {
          constexpr int VEC = decltype(vec_c)::value;
          if (s.rows) {
            stats_rows_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(X, s.count(), s.C, o);
          } else {
            stats_planes_kernel<scalar_t, VEC><<<launch.grid, launch.block, 0, stream>>>(X, s.N, s.C, s.S, o);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      },
      [&](unsigned blocks, const acc_t* partial, const StatsOut<acc_t>& final_out) {
        stats_finalize_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(partial, launch.grid.y, final_out);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// y = act((x - mean) * (w * invstd) + b).
template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void apply_planes_kernel(const scalar_t* __restrict__ x,
                                                                scalar_t* __restrict__ y, int64_t N, int64_t C,
                                                                int64_t S,
                                                                ChannelParams<at::opmath_type<scalar_t>> prm,
                                                                at::opmath_type<scalar_t> slope, int act_kind) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  const Coeffs<acc_t> k = load_coeffs(prm, c);
  for_each_plane_vector<VEC>(N, C, S, c, [&](int64_t off) {
    map_vec<VEC>(x + off, y + off, [&](int, acc_t v) { return activate(pre_act(v, k), act_kind, slope); });
  });
}

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void apply_rows_kernel(const scalar_t* __restrict__ x,
                                                              scalar_t* __restrict__ y, int64_t M, int64_t C,
                                                              ChannelParams<at::opmath_type<scalar_t>> prm,
                                                              at::opmath_type<scalar_t> slope, int act_kind) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv * VEC >= C) return;  // no block-wide synchronisation below
  Coeffs<acc_t> k[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) k[j] = load_coeffs(prm, cv * VEC + j);
  for_each_row_vector<VEC>(M, C, cv, [&](int64_t off) {
    map_vec<VEC>(x + off, y + off, [&](int j, acc_t v) { return activate(pre_act(v, k[j]), act_kind, slope); });
  });
}

template <typename scalar_t>
void bn_apply_cuda(const Tensor& x, const BnShape& s, const Tensor& mean, const Tensor& var, const Tensor& w,
                   const Tensor& b, double eps, double slope, int64_t act, Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* X = x.data_ptr<scalar_t>();
  scalar_t* Y = y.data_ptr<scalar_t>();
  const auto prm = channel_params<acc_t>(mean, var, w, b, eps);
  const int act_kind = static_cast<int>(act);
  const acc_t slope_a = static_cast<acc_t>(slope);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const LaunchPlan launch = launch_plan<scalar_t>(s, {X, Y}, Pass::kElementwise, "gan_fast::bn_act");
  with_vec<scalar_t>(launch.vec, [&](auto vec_c) {
    constexpr int VEC = decltype(vec_c)::value;
    if (s.rows) {
      apply_rows_kernel<scalar_t, VEC>
          <<<launch.grid, launch.block, 0, stream>>>(X, Y, s.count(), s.C, prm, slope_a, act_kind);
    } else {
      apply_planes_kernel<scalar_t, VEC>
          <<<launch.grid, launch.block, 0, stream>>>(X, Y, s.N, s.C, s.S, prm, slope_a, act_kind);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// running = momentum * batch + (1 - momentum) * running, with the unbiased batch variance;
// csrc/cpu/bn_cpu.cpp's expression and roundings.
template <typename scalar_t>
__global__ __launch_bounds__(kThreads) void update_stats_kernel(scalar_t* __restrict__ rm, scalar_t* __restrict__ rv,
                                                                const at::opmath_type<scalar_t>* __restrict__ mean,
                                                                const at::opmath_type<scalar_t>* __restrict__ var,
                                                                int64_t C, at::opmath_type<scalar_t> mom,
                                                                at::opmath_type<scalar_t> unbias) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t keep = sub_rn(acc_t(1), mom);
  rm[c] = static_cast<scalar_t>(add_rn(mul_rn(mom, mean[c]), mul_rn(keep, static_cast<acc_t>(rm[c]))));
  rv[c] = static_cast<scalar_t>(
      add_rn(mul_rn(mul_rn(mom, var[c]), unbias), mul_rn(keep, static_cast<acc_t>(rv[c]))));
}

}  // namespace
}  // namespace cuda

void CudaKernels::bn_stats(const Tensor& x, const BnShape& s, Tensor& mean, Tensor& var) {
  const c10::cuda::CUDAGuard guard(x.device());
  GAN_FAST_DISPATCH(x.scalar_type(), "gan_fast::bn_stats_cuda", [&] { cuda::bn_stats_cuda<scalar_t>(x, s, mean, var); });
}

void CudaKernels::bn_apply(const Tensor& x, const BnShape& s, const Tensor& mean, const Tensor& var,
                           const Tensor& w, const Tensor& b, double eps, double slope, int64_t act, Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  GAN_FAST_DISPATCH(x.scalar_type(), "gan_fast::bn_apply_cuda",
                    [&] { cuda::bn_apply_cuda<scalar_t>(x, s, mean, var, w, b, eps, slope, act, y); });
}

void CudaKernels::bn_update_stats(Tensor& running_mean, Tensor& running_var, const Tensor& mean, const Tensor& var,
                                  double momentum, int64_t count) {
  const c10::cuda::CUDAGuard guard(running_mean.device());
  GAN_FAST_DISPATCH(running_mean.scalar_type(), "gan_fast::bn_update_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = running_mean.numel();
    const acc_t unbias = static_cast<acc_t>(count) / static_cast<acc_t>(count - 1);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cuda::update_stats_kernel<scalar_t><<<static_cast<unsigned>(cuda::ceil_div(C, cuda::kThreads)), cuda::kThreads,
                                          0, stream>>>(running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(),
                                                       mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), C,
                                                       static_cast<acc_t>(momentum), unbias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gan_fast
