// Device helpers shared by csrc/cuda/*.cu (included by CUDA translation units only): exactly
// rounded arithmetic, activations, aligned vector loads / stores, warp-shuffle reductions of sums
// and Welford states, launch-size helpers. Only c10/cuda headers are used (not
// ATen/cuda/CUDAContext.h, which drags in cuBLAS / cuSPARSE headers a compile-only box may not
// have).
//
// setup.py compiles the .cu files with --use_fast_math (approximate division / sqrt / expf /
// tanhf, FMA contraction). Wherever a result must not depend on that -- the pre-activation the
// backward recomputes to find the activation's mask, BatchNorm's invstd, tanh, the BCE terms --
// the kernels use the explicitly rounded intrinsics below (never contracted, never approximated),
// which also round exactly like the CPU kernels' baseline (non-FMA) at::vec build.
#pragma once

#include "../common.h"

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace gan_fast {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
// Threads per block of every kernel (a multiple of 32; the reductions assume kThreads / 32 warps).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------------
// Exactly rounded arithmetic in the accumulation type (float or double).

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// ---------------------------------------------------------------------------------------------
// Activations (csrc/cpu/cpu_vec.h's leaky / leaky_grad, element by element).

// LeakyReLU as torch's leaky_relu: z where z > 0, else slope * z (one rounding).
template <typename T>
__device__ __forceinline__ T leaky(T z, T slope) {
  return z > T(0) ? z : mul_rn(z, slope);
}

// dL/dz from dL/dy: dy where z > 0, else slope * dy (torch's leaky_relu_backward rule).
template <typename T>
__device__ __forceinline__ T leaky_grad(T dy, T z, T slope) {
  return z > T(0) ? dy : mul_rn(dy, slope);
}

// The activation after BatchNorm (csrc/cpu/cpu_vec.h's activate / activate_grad, element by element).
// act is kActNone, kActRelu or kActLeakyRelu. ReLU is torch.relu: 0 where z < 0 (never 0 * z, NaN
// for z = -inf), z elsewhere; its gradient is 0 where z <= 0 (threshold_backward), dy elsewhere.
template <typename T>
__device__ __forceinline__ T activate(T z, int act, T slope) {
  if (act == kActRelu) return z < T(0) ? T(0) : z;
  return act == kActLeakyRelu ? leaky(z, slope) : z;
}
template <typename T>
__device__ __forceinline__ T activate_grad(T dy, T z, int act, T slope) {
  if (act == kActRelu) return z <= T(0) ? T(0) : dy;
  return act == kActLeakyRelu ? leaky_grad(dy, z, slope) : dy;
}

// tanh accurate to a few ulp whatever the compile flags: --use_fast_math turns tanhf() into the
// hardware tanh.approx.f32 (relative error ~2^-11), while expm1f is the same polynomial either way.
// tanh(a) = -expm1(-2a) / (2 + expm1(-2a)) for a = |z| >= 0 (no cancellation for small a, exactly
// 1 for large a), then the sign of z; NaN stays NaN.
__device__ __forceinline__ float tanh_acc(float z) {
  const float t = expm1f(-2.0f * fabsf(z));
  return copysignf(__fdiv_rn(-t, __fadd_rn(t, 2.0f)), z);
}
__device__ __forceinline__ double tanh_acc(double z) { return ::tanh(z); }  // fast math is fp32-only

// ---------------------------------------------------------------------------------------------
// Binary cross-entropy with logits, per element, in double like the CPU kernels
// (csrc/cpu/pointwise_cpu.cpp): (1 - t) * l - min(l, 0) + log1p(exp(-|l|)) and sigmoid(l) - t.

__device__ __forceinline__ double bce_term(double l, double t) {
  const double neg = l > 0.0 ? 0.0 : l;  // std::min(l, 0.0), NaN kept
  return __dadd_rn(__dsub_rn(__dmul_rn(__dsub_rn(1.0, t), l), neg), ::log1p(::exp(-::fabs(l))));
}

// sigmoid(l) without overflow for either sign of l.
__device__ __forceinline__ double stable_sigmoid(double l) {
  if (l >= 0) return __ddiv_rn(1.0, __dadd_rn(1.0, ::exp(-l)));
  const double e = ::exp(l);
  return __ddiv_rn(e, __dadd_rn(1.0, e));
}

// ---------------------------------------------------------------------------------------------
// Vector loads / stores: VEC consecutive elements in one 16-byte (at most) instruction, converted
// to / from the accumulation type.

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(pk.v[i]);
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

// One vector of VEC elements mapped elementwise in the accumulation type: out[j] = f(j, a[j]) or
// f(j, a[j], b[j]), j the lane (for per-lane coefficients). out may be a (in place).
template <int VEC, typename scalar_t, typename F>
__device__ __forceinline__ void map_vec(const scalar_t* a, scalar_t* out, F&& f) {
  at::opmath_type<scalar_t> v[VEC];
  load_vec<VEC>(a, v);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = f(j, v[j]);
  store_vec<VEC>(out, v);
}

template <int VEC, typename scalar_t, typename F>
__device__ __forceinline__ void map_vec(const scalar_t* a, const scalar_t* b, scalar_t* out, F&& f) {
  at::opmath_type<scalar_t> u[VEC], v[VEC];
  load_vec<VEC>(a, u);
  load_vec<VEC>(b, v);
#pragma unroll
  for (int j = 0; j < VEC; ++j) u[j] = f(j, u[j], v[j]);
  store_vec<VEC>(out, u);
}

// Elements of T per 16-byte vector.
template <typename T>
constexpr int max_vec() {
  return 16 / static_cast<int>(sizeof(T)) > 0 ? 16 / static_cast<int>(sizeof(T)) : 1;
}

// max_vec<T>() when every pointer is 16-byte aligned, else 1.
template <typename T>
inline int aligned_vec(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  return max_vec<T>();
}

// Elements per 16-byte vector when every pointer is 16-byte aligned and `multiple_of` is a
// multiple of it (the run of elements that shares, or walks through, channels), else 1.
template <typename T>
inline int vec_width(int64_t multiple_of, std::initializer_list<const void*> ptrs) {
  const int vec = aligned_vec<T>(ptrs);
  return multiple_of % vec == 0 ? vec : 1;
}

// Calls f(std::integral_constant<int, VEC>) with VEC = max_vec<scalar_t>() when vec says so, else
// with VEC = 1: each kernel is compiled for the 16-byte path and the scalar fallback.
template <typename scalar_t, typename F>
inline void with_vec(int vec, F&& f) {
  constexpr int kVec = max_vec<scalar_t>();
  if (vec == kVec) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions. A state type provides combine(a, b) (associative up to rounding) and
// shfl_down(s, offset); the block reductions merge in a fixed order, so results are
// deterministic for a given launch configuration.

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// Sum over the whole block (blockDim.x * blockDim.y threads, a multiple of 32); the result is
// valid in thread 0. `shared` holds one value per warp.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warps = (blockDim.x * blockDim.y) >> 5;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous call
  if ((tid & 31) == 0) shared[tid >> 5] = v;
  __syncthreads();
  v = tid < warps ? shared[tid] : T(0);
  if (tid < 32) v = warp_sum(v);
  return v;
}

// K running sums.
template <typename T, int K>
struct Sums {
  T v[K];
};

template <typename T, int K>
__device__ __forceinline__ Sums<T, K> combine(Sums<T, K> a, const Sums<T, K>& b) {
#pragma unroll
  for (int k = 0; k < K; ++k) a.v[k] += b.v[k];
  return a;
}

template <typename T, int K>
__device__ __forceinline__ Sums<T, K> shfl_down(Sums<T, K> s, int offset) {
#pragma unroll
  for (int k = 0; k < K; ++k) s.v[k] = __shfl_down_sync(kFullMask, s.v[k], offset);
  return s;
}

// Welford state: n values with mean `mean` and sum of squared deviations `m2`.
template <typename T>
struct Welford {
  T mean, m2, n;
};

// Chan et al.'s pairwise merge (the combine of ATen's WelfordOps and apex's syncbn
// welford_merge); either side may be empty (n == 0).
template <typename T>
__device__ __forceinline__ Welford<T> combine(const Welford<T>& a, const Welford<T>& b) {
  const T n = a.n + b.n;
  if (n == T(0)) return {T(0), T(0), T(0)};
  const T nb_over_n = div_rn(b.n, n);
  const T delta = b.mean - a.mean;
  return {a.mean + delta * nb_over_n, a.m2 + b.m2 + delta * delta * a.n * nb_over_n, n};
}

template <typename T>
__device__ __forceinline__ Welford<T> shfl_down(Welford<T> s, int offset) {
  s.mean = __shfl_down_sync(kFullMask, s.mean, offset);
  s.m2 = __shfl_down_sync(kFullMask, s.m2, offset);
  s.n = __shfl_down_sync(kFullMask, s.n, offset);
  return s;
}

// Reduces one state per thread over the whole block (kThreads threads, any 2-D shape); the
// result is valid in thread (0, 0). `shared` holds kWarps states.
template <typename S>
__device__ __forceinline__ S block_reduce_all(S v, S* shared) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine(v, shfl_down(v, offset));
  if ((tid & 31) == 0) shared[tid >> 5] = v;
  __syncthreads();
  if (tid == 0) {
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = combine(v, shared[w]);
  }
  return v;
}

// Reduces VEC states per thread over threadIdx.y, separately for each threadIdx.x (blockDim.x a
// power of two <= 32, blockDim.x * blockDim.y == kThreads): the column sums of a [rows, channels]
// tile. First with shuffles inside each warp (a warp holds 32 / blockDim.x rows), then across the
// warps through `shared` (kThreads * VEC states). The result is valid in the threads with
// threadIdx.y == 0.
template <int VEC, typename S>
__device__ __forceinline__ void block_reduce_columns(S (&v)[VEC], S* shared) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  for (int offset = 16; offset >= static_cast<int>(blockDim.x); offset >>= 1) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = combine(v[i], shfl_down(v[i], offset));
  }
  if (lane < static_cast<int>(blockDim.x)) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) shared[(warp * 32 + lane) * VEC + i] = v[i];
  }
  __syncthreads();
  if (tid < static_cast<int>(blockDim.x)) {  // threadIdx.y == 0: warp 0, lane == threadIdx.x
    for (int w = 1; w < kWarps; ++w) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] = combine(v[i], shared[(w * 32 + tid) * VEC + i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch sizes.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() {
  static std::atomic<int> cached[64];  // per device, zero-initialised (static storage)
  const int dev = c10::cuda::current_device();
  if (dev < 64) {
    const int n = cached[dev].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  n = std::max(n, 1);
  if (dev < 64) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Blocks of kThreads that fill the current device once (2048 resident threads per SM).
inline int64_t one_wave_blocks() { return int64_t(sm_count()) * (2048 / kThreads); }

// Blocks for a grid-stride elementwise kernel over `n` work items.
inline unsigned elementwise_blocks(int64_t n, int threads) {
  const int64_t want = ceil_div(n, threads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sm_count()) * 32)));
}

// Smallest power of two >= n, clamped to [1, cap] (cap a power of two).
inline int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p <<= 1;
  return p;
}

constexpr int64_t kMaxGridY = 65535;

// One block per channel / sample along gridDim.x (at most 2^31 - 1 blocks).
inline void check_grid_x(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks <= int64_t(0x7fffffff), op, ": ", blocks, " blocks do not fit one CUDA grid");
}

}  // namespace cuda
}  // namespace gan_fast
