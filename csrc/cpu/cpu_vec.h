// CPU helpers: at::vec::Vectorized over the accumulation type with converting loads / stores, so
// half and bfloat16 tensors are computed in float (and float64 in double) by the same code.
// Every loop runs whole vectors plus one partial vector (loadu / store with a count), never a
// separate scalar tail, so each element sees exactly the same arithmetic whichever position it
// has; the backward recomputes the forward's pre-activation and must get the same sign.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

namespace gan_fast {
namespace cpu {
// Internal linkage: bn_cpu_avx2.cpp compiles this header against at::vec's AVX2 Vectorized and the
// other files against the baseline one; with external linkage VecIO<float>::load etc. would have two
// different definitions under one mangled name, and the linker would keep either for both.
namespace {

template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();

  static inline Vec load(const scalar_t* p, int64_t n = W) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return n == W ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      acc_t t[W] = {};
      for (int64_t i = 0; i < n; ++i) t[i] = static_cast<acc_t>(p[i]);
      return Vec::loadu(t);
    }
  }
  static inline void store(scalar_t* p, const Vec& v, int64_t n = W) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p, static_cast<int>(n));
    } else {
      acc_t t[W];
      v.store(t);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(t[i]);
    }
  }
  // f(i, n) over [0, len) in vectors of W: whole vectors, then one partial vector. After inlining,
  // the whole-vector calls see n == W as a constant, so their loads and stores are plain (unmasked).
  template <typename F>
  static inline void vec_loop(int64_t len, F&& f) {
    int64_t i = 0;
    for (; i + W <= len; i += W) f(i, W);
    if (i < len) f(i, len - i);
  }
  // Lanes >= n set to zero, so a partial vector adds nothing to a sum.
  static inline Vec keep(const Vec& v, int64_t n) { return n == W ? v : Vec::set(Vec(acc_t(0)), v, n); }
  static inline acc_t hsum(const Vec& v) {
    acc_t t[W];
    v.store(t);
    acc_t s = 0;
    for (int64_t i = 0; i < W; ++i) s += t[i];
    return s;
  }
};

// The activation after BatchNorm, element for element as torch computes it. ReLU (torch.relu,
// clamp_min): 0 where z < 0, z elsewhere (NaN and -0 kept); never 0 * z, which is NaN for z = -inf
// (an fp16 conv that overflows gives one). LeakyReLU (torch's leaky_relu): z where z > 0, else
// slope * z (one rounding).
template <typename V, typename A>
inline V activate(const V& z, bool relu, A slope) {
  if (relu) return V::blendv(z, V(A(0)), z < V(A(0)));
  return V::blendv(z * V(slope), z, z > V(A(0)));
}
// dL/dz from dL/dy. ReLU: 0 where z <= 0 (torch's threshold_backward, so an infinite dy there gives
// 0, not NaN), dy elsewhere; LeakyReLU: dy where z > 0, else slope * dy (torch's leaky_relu_backward).
template <typename V, typename A>
inline V activate_grad(const V& dy, const V& z, bool relu, A slope) {
  if (relu) return V::blendv(dy, V(A(0)), z <= V(A(0)));
  return V::blendv(dy * V(slope), dy, z > V(A(0)));
}

// Splits [0, n) into at most at::get_num_threads() contiguous chunks of at least `grain`
// (deterministic for a given thread count), for reductions that keep one partial per chunk.
inline int64_t num_chunks(int64_t n, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain));
}

}  // namespace
}  // namespace cpu
}  // namespace gan_fast
