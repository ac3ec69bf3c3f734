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
// Internal linkage: bn_cpu_avx2.cpp / bn_cpu_avx512*.cpp compile this header against at::vec's
// AVX2 / AVX512 Vectorized and the other files against the baseline one; with external linkage
// VecIO<float>::load etc. would have several different definitions under one mangled name, and the
// linker would keep any one of them for all.
namespace {

#if defined(CPU_CAPABILITY_AVX512)
// bfloat16 <-> float on 16 lanes, for the AVX-512 builds (bn_cpu_avx512.h), bit for bit what the
// other builds get from c10::BFloat16 element by element: a float is a bfloat16 shifted left 16, and
// float -> bfloat16 is c10's round_to_nearest_even (round to nearest, ties to even, on the bits; every
// NaN becomes 0x7FC0). A partial vector's loads and stores are masked, so they never touch memory
// past the n elements.
inline __m512 bf16_load(const c10::BFloat16* p, int64_t n) {
  const __m256i h = n == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                            : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// c10's round_to_nearest_even in integer instructions (ATen's vec512 cvtfp32_bf16 does the same, but
// makes a NaN 0xFFFF where c10 makes it 0x7FC0).
inline __m256i bf16_round_int(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);  // every lane is < 0x10000 now: the truncation is exact
}
inline __m256i bf16_round(__m512 v) {
#if GAN_FAST_CPU_NATIVE_BF16
  // vcvtneps2bf16 rounds to nearest even like c10 but (Intel SDM) flushes a subnormal input to a
  // signed zero and keeps a NaN's sign and payload; those lanes (never in a normal run: a rare
  // branch) take the integer rounding, which is c10's.
  const __m256i native = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  const __m512i mag = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
  const __mmask16 subnormal =
      _mm512_cmplt_epu32_mask(_mm512_sub_epi32(mag, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x007FFFFF));
  const __mmask16 special = subnormal | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return special ? _mm256_mask_blend_epi16(special, native, bf16_round_int(v)) : native;
#else
  return bf16_round_int(v);
#endif
}
inline void bf16_store(c10::BFloat16* p, __m512 v, int64_t n) {
  const __m256i h = bf16_round(v);
  if (n == 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  } else {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), h);
  }
}
#endif  // CPU_CAPABILITY_AVX512

template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t W = Vec::size();

  static inline Vec load(const scalar_t* p, int64_t n = W) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return n == W ? Vec::loadu(p) : Vec::loadu(p, n);
#if defined(CPU_CAPABILITY_AVX512)
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return Vec(bf16_load(p, n));
#endif
    } else {
      acc_t t[W] = {};
      for (int64_t i = 0; i < n; ++i) t[i] = static_cast<acc_t>(p[i]);
      return Vec::loadu(t);
    }
  }
  static inline void store(scalar_t* p, const Vec& v, int64_t n = W) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p, static_cast<int>(n));
#if defined(CPU_CAPABILITY_AVX512)
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      bf16_store(p, __m512(v), n);
#endif
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
