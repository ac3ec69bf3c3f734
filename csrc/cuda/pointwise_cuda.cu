// CUDA kernels of the activation applied after an ATen (cuDNN) convolution
// (CudaKernels::act_forward_ / act_backward), BCE-with-logits (bce_forward / bce_backward) and the
// fused D head, a GEMV + BCE (d_head_forward / d_head_backward). Same math as
// csrc/cpu/pointwise_cpu.cpp: the activations in the accumulation dtype, the BCE terms and the
// sigmoid in double, the losses' means as deterministic fixed-order reductions in double.
#include "../common.h"
#include "cuda_common.h"

namespace gan_fast {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Activation epilogue of the convolution, in place on a dense (contiguous or channels_last)
// tensor: one flat pass, VEC elements per access, and the last numel % VEC elements one by one.

// f(i, width) for each run [i, i + width) of this thread in a grid-stride pass over n elements:
// width is std::integral_constant<int, VEC> for whole vectors and <int, 1> for the tail.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_flat_vector(int64_t n, F&& f) {
  const int64_t n_vec = n / VEC;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < n_vec; i += stride) f(i * VEC, std::integral_constant<int, VEC>{});
  const int64_t t = n_vec * VEC + tid;  // tail
  if (t < n) f(t, std::integral_constant<int, 1>{});
}

template <typename acc_t>
__device__ __forceinline__ acc_t act_value(acc_t z, bool is_tanh, acc_t slope) {
  return is_tanh ? tanh_acc(z) : leaky(z, slope);
}

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void act_forward_kernel(scalar_t* __restrict__ y, int64_t n, bool is_tanh,
                                                               at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_flat_vector<VEC>(n, [&](int64_t i, auto width) {
    map_vec<decltype(width)::value>(y + i, y + i, [&](int, acc_t v) { return act_value(v, is_tanh, slope); });
  });
}

// grad_z = grad_y * act'(z) from the saved output y: tanh' = 1 - y^2 (torch's tanh_backward);
// LeakyReLU's mask is the sign of y, the sign of z for slope >= 0.
template <typename acc_t>
__device__ __forceinline__ acc_t act_grad(acc_t gy, acc_t y, bool is_tanh, acc_t slope) {
  return is_tanh ? mul_rn(gy, sub_rn(acc_t(1), mul_rn(y, y))) : leaky_grad(gy, y, slope);
}

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void act_backward_kernel(const scalar_t* __restrict__ gy,
                                                                const scalar_t* __restrict__ y,
                                                                scalar_t* __restrict__ gz, int64_t n, bool is_tanh,
                                                                at::opmath_type<scalar_t> slope) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_flat_vector<VEC>(n, [&](int64_t i, auto width) {
    map_vec<decltype(width)::value>(gy + i, y + i, gz + i,
                                    [&](int, acc_t g, acc_t v) { return act_grad(g, v, is_tanh, slope); });
  });
}

// ---------------------------------------------------------------------------------------------
// BCE with logits, mean reduction.

// Blocks of the first stage of a sum over n elements: one block up to 1024 elements (no second
// stage), then about one wave, at most kThreads blocks (what mean_of_partials_kernel reads).
inline unsigned sum_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>({ceil_div(n, int64_t(kThreads) * 4), one_wave_blocks(), int64_t(kThreads)})));
}

// loss = sum(bce_term) / n; one partial sum per block when there is more than one block.
template <typename scalar_t>
__global__ __launch_bounds__(kThreads) void bce_forward_kernel(const scalar_t* __restrict__ logits,
                                                               const at::opmath_type<scalar_t>* __restrict__ target,
                                                               int64_t n, double* __restrict__ partial,
                                                               at::opmath_type<scalar_t>* __restrict__ loss) {
  using acc_t = at::opmath_type<scalar_t>;
  double sum = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    sum += bce_term(static_cast<double>(logits[i]), static_cast<double>(target[i]));
  __shared__ double shared[kWarps];
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) {
    if (partial != nullptr) {
      partial[blockIdx.x] = sum;
    } else {
      *loss = static_cast<acc_t>(sum / static_cast<double>(n));
    }
  }
}

// *out = sum(values[0:count]) / divisor, one block, fixed order.
template <typename acc_t>
__global__ __launch_bounds__(kThreads) void mean_of_partials_kernel(const double* __restrict__ values, int64_t count,
                                                                    double divisor, acc_t* __restrict__ out) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += values[i];
  __shared__ double shared[kWarps];
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) *out = static_cast<acc_t>(sum / divisor);
}

// grad_logits = (sigmoid(l) - t) * grad_loss / n; grad_loss is read on the device (no sync).
template <typename scalar_t>
__global__ __launch_bounds__(kThreads) void bce_backward_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                                                const scalar_t* __restrict__ logits,
                                                                const at::opmath_type<scalar_t>* __restrict__ target,
                                                                int64_t n, scalar_t* __restrict__ grad) {
  const double g = static_cast<double>(*grad_loss) / static_cast<double>(n);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double d = __dsub_rn(stable_sigmoid(static_cast<double>(logits[i])), static_cast<double>(target[i]));
    grad[i] = static_cast<scalar_t>(__dmul_rn(d, g));
  }
}

// ---------------------------------------------------------------------------------------------
// D head: logits[n] = <x[n, :], w> over K = C * H * W (x and w flattened in the same memory
// order, csrc/common.h d_head_operands), one block per sample.

// Threads of a block that walks one sample's k_vec vectors: a power of two from a warp to kThreads.
inline int row_threads(int64_t k_vec) { return std::max(32, pow2_at_least(k_vec, kThreads)); }

template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void d_head_forward_kernel(const scalar_t* __restrict__ x,
                                                                  const scalar_t* __restrict__ w,
                                                                  const at::opmath_type<scalar_t>* __restrict__ target,
                                                                  int64_t K, scalar_t* __restrict__ logits,
                                                                  double* __restrict__ terms) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const scalar_t* row = x + n * K;
  acc_t dot = 0;
  for (int64_t k = threadIdx.x; k < K / VEC; k += blockDim.x) {
    acc_t xv[VEC], wv[VEC];
    load_vec<VEC>(row + k * VEC, xv);
    load_vec<VEC>(w + k * VEC, wv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) dot += xv[j] * wv[j];
  }
  __shared__ acc_t shared[kWarps];
  dot = block_sum(dot, shared);
  if (threadIdx.x == 0) {
    logits[n] = static_cast<scalar_t>(dot);
    // The loss term from the unrounded dot, as the CPU kernel.
    terms[n] = bce_term(static_cast<double>(dot), static_cast<double>(target[n]));
  }
}

// dl[n] = (sigmoid(logits[n]) - t[n]) * grad_loss / N, from the saved (rounded) logits.
template <typename scalar_t>
__global__ __launch_bounds__(kThreads) void d_head_dlogit_kernel(const at::opmath_type<scalar_t>* __restrict__ grad_loss,
                                                                 const scalar_t* __restrict__ logits,
                                                                 const at::opmath_type<scalar_t>* __restrict__ target,
                                                                 int64_t N, at::opmath_type<scalar_t>* __restrict__ dl) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const double g = static_cast<double>(*grad_loss) / static_cast<double>(N);
  const double d = __dsub_rn(stable_sigmoid(static_cast<double>(logits[n])), static_cast<double>(target[n]));
  dl[n] = static_cast<acc_t>(__dmul_rn(d, g));
}

// grad_x[n, :] = dl[n] * w; blockIdx.x = n, blockIdx.y walks K.
template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void d_head_grad_x_kernel(const scalar_t* __restrict__ w,
                                                                 const at::opmath_type<scalar_t>* __restrict__ dl,
                                                                 int64_t K, scalar_t* __restrict__ grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const acc_t d = dl[n];
  scalar_t* row = grad_x + n * K;
  for (int64_t k = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; k < K / VEC; k += int64_t(gridDim.y) * blockDim.x) {
    acc_t v[VEC];
    load_vec<VEC>(w + k * VEC, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = v[j] * d;
    store_vec<VEC>(row + k * VEC, v);
  }
}

// grad_w[k] = sum_n dl[n] * x[n, k]: a column reduction of the [N, K] matrix (threadIdx.x walks
// K in vectors, threadIdx.y walks n), one block per group of columns.
template <typename scalar_t, int VEC>
__global__ __launch_bounds__(kThreads) void d_head_grad_w_kernel(const scalar_t* __restrict__ x,
                                                                 const at::opmath_type<scalar_t>* __restrict__ dl,
                                                                 int64_t N, int64_t K, scalar_t* __restrict__ grad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t kv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = kv * VEC < K;
  Sums<acc_t, 1> acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j].v[0] = acc_t(0);
  if (active) {
    for (int64_t n = threadIdx.y; n < N; n += blockDim.y) {
      acc_t v[VEC];
      load_vec<VEC>(x + n * K + kv * VEC, v);
      const acc_t d = dl[n];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j].v[0] += v[j] * d;
    }
  }
  __shared__ Sums<acc_t, 1> shared[kThreads * VEC];
  block_reduce_columns<VEC>(acc, shared);  // every thread takes part (shuffles, __syncthreads)
  if (threadIdx.y == 0 && active) {
    acc_t out[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = acc[j].v[0];
    store_vec<VEC>(grad_w + kv * VEC, out);
  }
}

}  // namespace
}  // namespace cuda

void CudaKernels::act_forward_(Tensor& y, int64_t act, double slope) {
  const c10::cuda::CUDAGuard guard(y.device());
  GAN_FAST_DISPATCH(y.scalar_type(), "gan_fast::act_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* Y = y.data_ptr<scalar_t>();  // dense (contiguous or channels_last): one flat pass
    const int64_t n = y.numel();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cuda::with_vec<scalar_t>(cuda::aligned_vec<scalar_t>({Y}), [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const unsigned blocks = cuda::elementwise_blocks(std::max<int64_t>(1, n / VEC), cuda::kThreads);
      cuda::act_forward_kernel<scalar_t, VEC>
          <<<blocks, cuda::kThreads, 0, stream>>>(Y, n, act == kActTanh, static_cast<acc_t>(slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void CudaKernels::act_backward(const Tensor& grad_y, const Tensor& y, int64_t act, double slope, Tensor& grad_z) {
  const c10::cuda::CUDAGuard guard(y.device());
  GAN_FAST_DISPATCH(y.scalar_type(), "gan_fast::act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* GY = grad_y.data_ptr<scalar_t>();
    const scalar_t* Y = y.data_ptr<scalar_t>();
    scalar_t* G = grad_z.data_ptr<scalar_t>();
    const int64_t n = y.numel();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cuda::with_vec<scalar_t>(cuda::aligned_vec<scalar_t>({GY, Y, G}), [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const unsigned blocks = cuda::elementwise_blocks(std::max<int64_t>(1, n / VEC), cuda::kThreads);
      cuda::act_backward_kernel<scalar_t, VEC>
          <<<blocks, cuda::kThreads, 0, stream>>>(GY, Y, G, n, act == kActTanh, static_cast<acc_t>(slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void CudaKernels::bce_forward(const Tensor& logits, const Tensor& target, Tensor& loss) {
  const c10::cuda::CUDAGuard guard(logits.device());
  GAN_FAST_DISPATCH(logits.scalar_type(), "gan_fast::bce_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t n = logits.numel();
    const unsigned blocks = cuda::sum_blocks(n);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    Tensor partial;
    if (blocks > 1) partial = at::empty({int64_t(blocks)}, logits.options().dtype(at::kDouble));
    double* P = blocks > 1 ? partial.data_ptr<double>() : nullptr;
    cuda::bce_forward_kernel<scalar_t><<<blocks, cuda::kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), target.data_ptr<acc_t>(), n, P, loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (blocks > 1) {
      cuda::mean_of_partials_kernel<acc_t>
          <<<1, cuda::kThreads, 0, stream>>>(P, blocks, static_cast<double>(n), loss.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void CudaKernels::bce_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,
                               Tensor& grad_logits) {
  const c10::cuda::CUDAGuard guard(logits.device());
  GAN_FAST_DISPATCH(logits.scalar_type(), "gan_fast::bce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t n = logits.numel();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cuda::bce_backward_kernel<scalar_t><<<cuda::elementwise_blocks(n, cuda::kThreads), cuda::kThreads, 0, stream>>>(
        grad_loss.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), target.data_ptr<acc_t>(), n,
        grad_logits.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaKernels::d_head_forward(const Tensor& x, const Tensor& w, const Tensor& target, Tensor& logits,
                                 Tensor& loss) {
  const c10::cuda::CUDAGuard guard(x.device());
  GAN_FAST_DISPATCH(x.scalar_type(), "gan_fast::d_head_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t N = x.size(0), K = x.numel() / N;
    cuda::check_grid_x(N, "gan_fast::d_head_bce");
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    // Per-sample loss terms in double, summed in sample order by a second kernel.
    Tensor terms = at::empty({N}, x.options().dtype(at::kDouble));
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    cuda::with_vec<scalar_t>(cuda::vec_width<scalar_t>(K, {X, W}), [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      const int threads = cuda::row_threads(K / VEC);
      cuda::d_head_forward_kernel<scalar_t, VEC><<<static_cast<unsigned>(N), threads, 0, stream>>>(
          X, W, target.data_ptr<acc_t>(), K, logits.data_ptr<scalar_t>(), terms.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    cuda::mean_of_partials_kernel<acc_t><<<1, cuda::kThreads, 0, stream>>>(
        terms.data_ptr<double>(), N, static_cast<double>(N), loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaKernels::d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& w, const Tensor& target,
                                  const Tensor& logits, bool need_x, bool need_w, Tensor& grad_x, Tensor& grad_w) {
  const c10::cuda::CUDAGuard guard(x.device());
  GAN_FAST_DISPATCH(x.scalar_type(), "gan_fast::d_head_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t N = x.size(0), K = x.numel() / N;
    if (K == 0 || !(need_x || need_w)) return;
    cuda::check_grid_x(N, "gan_fast::d_head_bce_backward");
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* W = w.data_ptr<scalar_t>();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // dloss/dlogit per sample, once, in the accumulation dtype (the CPU kernel's dl vector).
    Tensor dl = at::empty({N}, x.options().dtype(at::toOpMathType(x.scalar_type())));
    acc_t* DL = dl.data_ptr<acc_t>();
    cuda::d_head_dlogit_kernel<scalar_t>
        <<<static_cast<unsigned>(cuda::ceil_div(N, cuda::kThreads)), cuda::kThreads, 0, stream>>>(
            grad_loss.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), target.data_ptr<acc_t>(), N, DL);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_x) {
      scalar_t* GX = grad_x.data_ptr<scalar_t>();
      cuda::with_vec<scalar_t>(cuda::vec_width<scalar_t>(K, {W, GX}), [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        const int64_t k_vec = K / VEC;
        const int threads = cuda::row_threads(k_vec);
        const dim3 grid(static_cast<unsigned>(N),
                        static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(k_vec, threads), cuda::kMaxGridY)));
        cuda::d_head_grad_x_kernel<scalar_t, VEC><<<grid, threads, 0, stream>>>(W, DL, K, GX);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    if (need_w) {
      scalar_t* GW = grad_w.data_ptr<scalar_t>();
      cuda::with_vec<scalar_t>(cuda::vec_width<scalar_t>(K, {X, GW}), [&](auto vec_c) {
        constexpr int VEC = decltype(vec_c)::value;
        const int64_t k_vec = K / VEC;
        const int bx = cuda::pow2_at_least(k_vec, 32);
        const dim3 block(bx, cuda::kThreads / bx);
        cuda::d_head_grad_w_kernel<scalar_t, VEC>
            <<<static_cast<unsigned>(cuda::ceil_div(k_vec, bx)), block, 0, stream>>>(X, DL, N, K, GW);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  });
}

}  // namespace gan_fast
