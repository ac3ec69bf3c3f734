// The BatchNorm + activation CPU kernels (forward statistics, normalize + activation, backward
// reduction, backward elementwise) and the fused D head's (GEMV + BCE), written once over at::vec
// and compiled once per ISA: by
// bn_cpu.cpp for the baseline, bn_cpu_avx2.cpp for AVX2 + FMA, bn_cpu_avx512.cpp for AVX-512 (and
// bn_cpu_avx512_bf16.cpp for bfloat16 with AVX512_BF16), which bn_cpu.cpp picks at run time.
// An extension is built with the compiler's default flags (x86-64: SSE2), where at::vec is its
// generic fallback: element loops with a branch per lane for every comparison, max and blend, which
// made these kernels 5-10x slower than ATen's own (runtime-dispatched AVX2) batch_norm. ATen solves
// this by compiling its kernels once per CPU capability (DispatchStub); this is the same scheme.
//
// The including translation unit defines GAN_FAST_CPU_NS (the namespace of the entry points below),
// optionally GAN_FAST_CPU_DISPATCH (the dtypes it compiles; GAN_FAST_DISPATCH's by default) and, for
// an ISA build, CPU_CAPABILITY / CPU_CAPABILITY_<ISA> and the target pragma before this header.
// Statistics and gradient sums accumulate in acc_t (float for bfloat16 and half), whatever the ISA.
//
// Parallel plan (the split of ATen's aten/src/ATen/native/cpu/batch_norm_kernel.cpp):
//   planes [N, C, S]: one task per (n, c) plane, vectorized along S; per-plane partial sums are
//                     then added over n per channel;
//   rows   [M, C]:    row chunks per thread, vectorized along C into per-chunk partial vectors.
// Statistics are two-pass (mean, then the sum of squared deviations) for accuracy.
#pragma once

#ifndef GAN_FAST_CPU_NS
#error "define GAN_FAST_CPU_NS (the namespace of this ISA's entry points) before including bn_cpu_kernels.h"
#endif

#include "../common.h"
#include "bce_math.h"
#include "cpu_vec.h"

#include <cmath>
#include <type_traits>
#include <vector>

#ifndef GAN_FAST_CPU_DISPATCH
#define GAN_FAST_CPU_DISPATCH GAN_FAST_DISPATCH
#endif

namespace gan_fast {
// Internal linkage: each translation unit (ISA) keeps its own copy of these templates, so the
// linker can never substitute the AVX2 instantiation for the baseline one (or the reverse).
namespace {

using cpu::VecIO;

// Per-channel coefficients shared by forward and backward, so the backward recomputes the
// forward's pre-activation z = (x - mean) * scale + shift with the very same arithmetic.
template <typename acc_t>
struct ChannelCoeffs {
  std::vector<acc_t> mean, scale, shift, invstd;
  ChannelCoeffs(const BnShape& s, const Tensor& m, const Tensor& v, const Tensor& w, const Tensor& b,
                double eps)
      : mean(s.C), scale(s.C), shift(s.C), invstd(s.C) {
    const acc_t* mp = m.data_ptr<acc_t>();
    const acc_t* vp = v.data_ptr<acc_t>();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
    for (int64_t c = 0; c < s.C; ++c) {
      invstd[c] = acc_t(1) / std::sqrt(vp[c] + static_cast<acc_t>(eps));
      mean[c] = mp[c];
      scale[c] = wp ? wp[c] * invstd[c] : invstd[c];
      shift[c] = bp ? bp[c] : acc_t(0);
    }
  }
};

template <typename V>
inline V pre_act(const V& x, const V& mean, const V& scale, const V& shift) {
  return (x - mean) * scale + shift;
}

// Calls body(std::bool_constant<b>) so that hot loops are compiled once per value of a runtime flag
// (activation or not, training or eval) instead of testing it per element: the inner loops below
// also hoist every pointer into a local, since a store through the output pointer could otherwise
// alias the captured vectors and force a reload of each per iteration.
template <typename F>
inline void with_flag(bool b, F&& body) {
  if (b) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// Rows [r0, r1) of channels [c0, c0 + NV vectors), summed in registers in row order, then stored as
// the chunk's partials (part[k * C + c]): the sums a partial in memory would get, in the same order,
// without making each row's add wait on the previous row's store (4-5x slower, issue #16).
// kLastWhole: the last vector has all its lanes; else C - c0 - (NV - 1) * W of them.
constexpr int64_t kRowBlockVecs = 4;  // sum_row_block's NV: 4 x K accumulators fit AVX2's 16 registers

template <int NV, bool kLastWhole, int K, typename acc_t, typename RowFn>
inline void sum_row_block(int64_t r0, int64_t r1, int64_t c0, int64_t C, RowFn& row_fn, acc_t* part) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t last = kLastWhole ? W : C - c0 - (NV - 1) * W;
  Vec acc[NV][K];
  for (int v = 0; v < NV; ++v)
    for (int k = 0; k < K; ++k) acc[v][k] = Vec(acc_t(0));
  for (int64_t r = r0; r < r1; ++r)
    for (int v = 0; v < NV; ++v) row_fn(r, c0 + v * W, v + 1 < NV ? W : last, acc[v]);
  for (int v = 0; v < NV; ++v)
    for (int k = 0; k < K; ++k) acc[v][k].store(part + k * C + c0 + v * W, static_cast<int>(v + 1 < NV ? W : last));
}

// Per-channel sums over all N * S values.
//   planes: plane_fn(p, acc) adds plane p's values into K vector accumulators (registers); tasks
//           are (channel, chunk of n) pairs, each reduced to scalars once, so a small plane (4x4:
//           two vectors) does not pay a horizontal sum per plane;
//   rows:   row_fn(r, c, n, acc) adds row r's channels [c, c + n) (n <= one vector) into K vector
//           accumulators; each chunk of rows sums a block of up to kRowBlockVecs vectors of channels at
//           a time over all its rows in registers (sum_row_block), into K per-chunk partials of C.
// The partials are then added per channel in a fixed order (deterministic for a thread count).
template <typename acc_t, int K, typename PlaneFn, typename RowFn>
void channel_sums(const BnShape& s, PlaneFn plane_fn, RowFn row_fn, acc_t* const out[K]) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t C = s.C, N = s.N;
  if (!s.rows) {
    const int64_t threads = at::get_num_threads();
    // Split the batch only when there are fewer channels than threads (a 1- or 3-channel layer).
    const int64_t chunks = std::min<int64_t>(N, std::max<int64_t>(1, threads / C));
    const int64_t tasks = chunks * C;
    const int64_t per_task = (N + chunks - 1) / chunks * s.S;
    std::vector<acc_t> part(static_cast<size_t>(tasks) * K);
    at::parallel_for(0, tasks, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_task)),
                     [&](int64_t t0, int64_t t1) {
                       for (int64_t t = t0; t < t1; ++t) {
                         const int64_t chunk = t / C, c = t % C;
                         Vec acc[K];
                         for (int k = 0; k < K; ++k) acc[k] = Vec(acc_t(0));
                         for (int64_t n = N * chunk / chunks; n < N * (chunk + 1) / chunks; ++n)
                           plane_fn(n * C + c, acc);
                         for (int k = 0; k < K; ++k) part[t * K + k] = VecIO<acc_t>::hsum(acc[k]);
                       }
                     });
    for (int64_t c = 0; c < C; ++c) {
      for (int k = 0; k < K; ++k) {
        acc_t sum = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += part[(chunk * C + c) * K + k];
        out[k][c] = sum;
      }
    }
  } else {
    const int64_t M = s.count();
    const int64_t T = cpu::num_chunks(M, std::max<int64_t>(1, 16384 / C));
    std::vector<acc_t> part(static_cast<size_t>(T) * K * C, acc_t(0));
    constexpr int64_t W = Vec::size();
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = M * t / T, r1 = M * (t + 1) / T;
        acc_t* const chunk = &part[t * K * C];
        for (int64_t c0 = 0; c0 < C; c0 += kRowBlockVecs * W) {
          const int64_t vecs = std::min<int64_t>(kRowBlockVecs, (C - c0 + W - 1) / W);
          const bool whole = c0 + vecs * W <= C;  // the block's last vector has all its lanes
          switch (vecs * 2 + whole) {
            case 2: sum_row_block<1, false, K>(r0, r1, c0, C, row_fn, chunk); break;
            case 3: sum_row_block<1, true, K>(r0, r1, c0, C, row_fn, chunk); break;
            case 4: sum_row_block<2, false, K>(r0, r1, c0, C, row_fn, chunk); break;
            case 5: sum_row_block<2, true, K>(r0, r1, c0, C, row_fn, chunk); break;
            case 6: sum_row_block<3, false, K>(r0, r1, c0, C, row_fn, chunk); break;
            case 7: sum_row_block<3, true, K>(r0, r1, c0, C, row_fn, chunk); break;
            case 8: sum_row_block<4, false, K>(r0, r1, c0, C, row_fn, chunk); break;
            default: sum_row_block<4, true, K>(r0, r1, c0, C, row_fn, chunk);
          }
        }
      }
    });
    for (int k = 0; k < K; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        acc_t sum = 0;
        for (int64_t t = 0; t < T; ++t) sum += part[(t * K + k) * C + c];
        out[k][c] = sum;
      }
    }
  }
}

// The kernels for one dtype: scalar_t in memory, computed in Vec (acc_t lanes).
template <typename scalar_t>
struct BnCpu {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;

  static void stats(const Tensor& x, const BnShape& s, Tensor& mean_t, Tensor& var_t) {
    const scalar_t* const X = x.data_ptr<scalar_t>();
    const int64_t C = s.C, S = s.S;
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(s.count());
    acc_t* const mean = mean_t.data_ptr<acc_t>();
    acc_t* const var = var_t.data_ptr<acc_t>();

    // Pass 1: sums -> mean.
    {
      acc_t* out[1] = {mean};
      channel_sums<acc_t, 1>(
          s,
          [X, S](int64_t p, Vec* acc) {
            const scalar_t* xp = X + p * S;
            IO::vec_loop(S, [&](int64_t i, int64_t n) { acc[0] += IO::keep(IO::load(xp + i, n), n); });
          },
          [X, C](int64_t r, int64_t c, int64_t n, Vec* acc) { acc[0] += IO::load(X + r * C + c, n); },
          out);
      for (int64_t c = 0; c < C; ++c) mean[c] *= inv_count;
    }
    // Pass 2: sums of the deviations d = x - mean and of d^2 -> corrected mean and biased variance.
    // The corrected two-pass algorithm (Chan, Golub & LeVeque 1983, "Algorithms for computing the
    // sample variance"): sum(d) is the rounding error of pass 1's float mean, so mean + sum(d) / n is
    // as accurate as ATen's CPU batch_norm, which accumulates float statistics in double. Without it
    // a channel whose |mean| dwarfs its spread (a bias on tiny inputs) normalized with a mean a few
    // float ulps off: errors of 1e-4 relative in the output where the reference had 3e-5.
    {
      std::vector<acc_t> dsum(C);
      acc_t* out[2] = {dsum.data(), var};
      const acc_t* const mp = mean;
      channel_sums<acc_t, 2>(
          s,
          [X, S, C, mp](int64_t p, Vec* acc) {
            const scalar_t* xp = X + p * S;
            const Vec m(mp[p % C]);
            IO::vec_loop(S, [&](int64_t i, int64_t n) {
              const Vec d = IO::keep(IO::load(xp + i, n) - m, n);
              acc[0] += d;
              acc[1] += d * d;
            });
          },
          [X, C, mp](int64_t r, int64_t c, int64_t n, Vec* acc) {
            const Vec d = IO::load(X + r * C + c, n) - Vec::loadu(mp + c, n);
            acc[0] += d;
            acc[1] += d * d;
          },
          out);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t dm = dsum[c] * inv_count;
        mean[c] += dm;
        var[c] = std::max(var[c] * inv_count - dm * dm, acc_t(0));
      }
    }
  }

  static void apply(const Tensor& x, const BnShape& s, const Tensor& m, const Tensor& v, const Tensor& w,
                    const Tensor& b, double eps, double slope_d, int64_t act, Tensor& y) {
    const ChannelCoeffs<acc_t> k(s, m, v, w, b, eps);
    const acc_t* const MEAN = k.mean.data();
    const acc_t* const SCALE = k.scale.data();
    const acc_t* const SHIFT = k.shift.data();
    const scalar_t* const X = x.data_ptr<scalar_t>();
    scalar_t* const Y = y.data_ptr<scalar_t>();
    const int64_t C = s.C, S = s.S;
    const acc_t slope = static_cast<acc_t>(slope_d);
    const bool relu = act == kActRelu;
    with_flag(act != kActNone, [&](auto masked_t) {
      constexpr bool kMasked = decltype(masked_t)::value;
      auto out = [slope, relu](const Vec& z) { return kMasked ? cpu::activate(z, relu, slope) : z; };
      if (!s.rows) {
        at::parallel_for(0, s.N * C, std::max<int64_t>(1, 32768 / S), [&](int64_t p0, int64_t p1) {
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t c = p % C;
            const Vec mv(MEAN[c]), sv(SCALE[c]), bv(SHIFT[c]);
            const scalar_t* xp = X + p * S;
            scalar_t* yp = Y + p * S;
            IO::vec_loop(S, [&](int64_t i, int64_t n) {
              IO::store(yp + i, out(pre_act(IO::load(xp + i, n), mv, sv, bv)), n);
            });
          }
        });
      } else {
        at::parallel_for(0, s.count(), std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* xr = X + r * C;
            scalar_t* yr = Y + r * C;
            IO::vec_loop(C, [&](int64_t c, int64_t n) {
              const Vec z = pre_act(IO::load(xr + c, n), Vec::loadu(MEAN + c, n), Vec::loadu(SCALE + c, n),
                                    Vec::loadu(SHIFT + c, n));
              IO::store(yr + c, out(z), n);
            });
          }
        });
      }
    });
  }

  // grad_bias = sum(dz), grad_weight = invstd * sum(dz * (x - mean)), dz = dy * act'(z).
  static void backward_reduce(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& m,
                              const Tensor& v, const Tensor& w, const Tensor& b, double eps, double slope_d,
                              int64_t act, Tensor& gw_t, Tensor& gb_t) {
    const ChannelCoeffs<acc_t> k(s, m, v, w, b, eps);
    const acc_t* const MEAN = k.mean.data();
    const acc_t* const SCALE = k.scale.data();
    const acc_t* const SHIFT = k.shift.data();
    const scalar_t* const X = x.data_ptr<scalar_t>();
    const scalar_t* const DY = dy.data_ptr<scalar_t>();
    const int64_t C = s.C, S = s.S;
    const acc_t slope = static_cast<acc_t>(slope_d);
    const bool relu = act == kActRelu;
    acc_t* const gw = gw_t.data_ptr<acc_t>();
    acc_t* const gb = gb_t.data_ptr<acc_t>();
    acc_t* out[2] = {gb, gw};
    with_flag(act != kActNone, [&](auto masked_t) {
      constexpr bool kMasked = decltype(masked_t)::value;
      channel_sums<acc_t, 2>(
          s,
          [=](int64_t p, Vec* acc) {
            const int64_t c = p % C;
            const Vec mv(MEAN[c]), sv(SCALE[c]), bv(SHIFT[c]);
            const scalar_t* xp = X + p * S;
            const scalar_t* dyp = DY + p * S;
            IO::vec_loop(S, [&](int64_t i, int64_t n) {
              const Vec xv = IO::load(xp + i, n);
              Vec dz = IO::load(dyp + i, n);
              if constexpr (kMasked) dz = cpu::activate_grad(dz, pre_act(xv, mv, sv, bv), relu, slope);
              dz = IO::keep(dz, n);  // the partial vector's padding lanes: x - mean != 0 there
              acc[0] += dz;
              acc[1] += dz * (xv - mv);
            });
          },
          [=](int64_t r, int64_t c, int64_t n, Vec* acc) {
            const Vec xv = IO::load(X + r * C + c, n);
            const Vec mv = Vec::loadu(MEAN + c, n);
            Vec dz = IO::load(DY + r * C + c, n);
            if constexpr (kMasked) {
              const Vec z = pre_act(xv, mv, Vec::loadu(SCALE + c, n), Vec::loadu(SHIFT + c, n));
              dz = cpu::activate_grad(dz, z, relu, slope);
            }
            acc[0] += dz;
            acc[1] += dz * (xv - mv);
          },
          out);
    });
    for (int64_t c = 0; c < C; ++c) gw[c] *= k.invstd[c];
  }

  // training: dx = (dz - mean(dz) - (x - mean) * k) * w * invstd with k = invstd * grad_weight / M
  //           (batch_norm_backward_cpu_template's formula); eval: dx = dz * w * invstd.
  static void backward_apply(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& m,
                             const Tensor& v, const Tensor& w, const Tensor& b, const Tensor& gw_t,
                             const Tensor& gb_t, bool training, double eps, double slope_d, int64_t act,
                             Tensor& dx) {
    const ChannelCoeffs<acc_t> k(s, m, v, w, b, eps);
    const int64_t C = s.C, S = s.S;
    std::vector<acc_t> c1(C), c2(C);
    const acc_t* gw = gw_t.data_ptr<acc_t>();
    const acc_t* gb = gb_t.data_ptr<acc_t>();
    const acc_t inv_count = acc_t(1) / static_cast<acc_t>(s.count());
    for (int64_t c = 0; c < C; ++c) {
      c1[c] = training ? gb[c] * inv_count : acc_t(0);
      c2[c] = training ? gw[c] * k.invstd[c] * inv_count : acc_t(0);
    }
    const acc_t* const MEAN = k.mean.data();
    const acc_t* const SCALE = k.scale.data();
    const acc_t* const SHIFT = k.shift.data();
    const acc_t* const C1 = c1.data();
    const acc_t* const C2 = c2.data();
    const scalar_t* const X = x.data_ptr<scalar_t>();
    const scalar_t* const DY = dy.data_ptr<scalar_t>();
    scalar_t* const DX = dx.data_ptr<scalar_t>();
    const acc_t slope = static_cast<acc_t>(slope_d);
    const bool relu = act == kActRelu;
    with_flag(act != kActNone, [&](auto masked_t) {
      with_flag(training, [&](auto training_t) {
        constexpr bool kMasked = decltype(masked_t)::value;
        constexpr bool kTraining = decltype(training_t)::value;
        auto grad = [slope, relu](const Vec& xv, const Vec& dyv, const Vec& mv, const Vec& sv, const Vec& bv,
                            const Vec& c1v, const Vec& c2v) {
          Vec dz = dyv;
          if constexpr (kMasked) dz = cpu::activate_grad(dz, pre_act(xv, mv, sv, bv), relu, slope);
          if constexpr (kTraining) return (dz - c1v - (xv - mv) * c2v) * sv;
          return dz * sv;
        };
        if (!s.rows) {
          at::parallel_for(0, s.N * C, std::max<int64_t>(1, 32768 / S), [&](int64_t p0, int64_t p1) {
            for (int64_t p = p0; p < p1; ++p) {
              const int64_t c = p % C;
              const Vec mv(MEAN[c]), sv(SCALE[c]), bv(SHIFT[c]), c1v(C1[c]), c2v(C2[c]);
              const scalar_t* xp = X + p * S;
              const scalar_t* dyp = DY + p * S;
              scalar_t* dxp = DX + p * S;
              IO::vec_loop(S, [&](int64_t i, int64_t n) {
                IO::store(dxp + i, grad(IO::load(xp + i, n), IO::load(dyp + i, n), mv, sv, bv, c1v, c2v), n);
              });
            }
          });
        } else {
          at::parallel_for(0, s.count(), std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              const scalar_t* xr = X + r * C;
              const scalar_t* dyr = DY + r * C;
              scalar_t* dxr = DX + r * C;
              IO::vec_loop(C, [&](int64_t c, int64_t n) {
                const Vec g = grad(IO::load(xr + c, n), IO::load(dyr + c, n), Vec::loadu(MEAN + c, n),
                                   Vec::loadu(SCALE + c, n), Vec::loadu(SHIFT + c, n), Vec::loadu(C1 + c, n),
                                   Vec::loadu(C2 + c, n));
                IO::store(dxr + c, g, n);
              });
            }
          });
        }
      });
    });
  }
};

// The fused D head (a full-size Conv2d to one logit, as a GEMV, then BCE-with-logits) for one dtype:
// scalar_t in memory, Vec (acc_t lanes) for the dot products, double for the loss. Compiled per ISA
// like the BatchNorm kernels: in the baseline build, at::vec's generic fallback and bfloat16's
// element-by-element conversion made the D head's forward + backward [64, 128, 4, 4] take ~1.5 ms
// (fp32) and ~2.8 ms (bf16) on 2 cores, three times per DCGAN step (issue #16).
template <typename scalar_t>
struct DHeadCpu {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static constexpr int64_t kGrain = 32768;

  // The D head: x as N rows of K features and the weight as K features in the same order
  // (csrc/common.h d_head_operands).
  static void d_head_forward(const Tensor& x, const Tensor& w, const Tensor& target, Tensor& logits,
                             Tensor& loss) {
    const int64_t N = x.size(0), K = x.numel() / N;
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* Wt = w.data_ptr<scalar_t>();
    const acc_t* T = target.data_ptr<acc_t>();
    scalar_t* L = logits.data_ptr<scalar_t>();
    std::vector<double> terms(N);
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / K), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        Vec acc(acc_t(0));
        IO::vec_loop(K, [&](int64_t k, int64_t m) {
          acc += IO::keep(IO::load(X + n * K + k, m) * IO::load(Wt + k, m), m);
        });
        const acc_t dot = IO::hsum(acc);
        L[n] = static_cast<scalar_t>(dot);
        terms[n] = bce_term(static_cast<double>(dot), static_cast<double>(T[n]));
      }
    });
    double sum = 0;
    for (int64_t n = 0; n < N; ++n) sum += terms[n];
    *loss.data_ptr<acc_t>() = static_cast<acc_t>(sum / static_cast<double>(N));
  }

  static void d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& w, const Tensor& target,
                              const Tensor& logits, bool need_x, bool need_w, Tensor& grad_x, Tensor& grad_w) {
    const int64_t N = x.size(0), K = x.numel() / N;
    const scalar_t* X = x.data_ptr<scalar_t>();
    const scalar_t* Wt = w.data_ptr<scalar_t>();
    const acc_t* T = target.data_ptr<acc_t>();
    const scalar_t* L = logits.data_ptr<scalar_t>();
    // dloss/dlogit_n = (sigmoid(l_n) - t_n) * grad / N.
    const double g = static_cast<double>(*grad_loss.data_ptr<acc_t>()) / static_cast<double>(N);
    std::vector<acc_t> dl(N);
    for (int64_t n = 0; n < N; ++n)
      dl[n] = static_cast<acc_t>(bce_grad(static_cast<double>(L[n]), static_cast<double>(T[n]), g));
    if (need_x) {  // grad_x[n, :] = dl[n] * w
      scalar_t* GX = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, N, std::max<int64_t>(1, kGrain / K), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
          const Vec d(dl[n]);
          IO::vec_loop(K, [&](int64_t k, int64_t m) { IO::store(GX + n * K + k, IO::load(Wt + k, m) * d, m); });
        }
      });
    }
    if (need_w) {  // grad_w = sum_n dl[n] * x[n, :], parallel over chunks of K
      scalar_t* GW = grad_w.data_ptr<scalar_t>();
      at::parallel_for(0, K, std::max<int64_t>(IO::W, kGrain / N), [&](int64_t k0, int64_t k1) {
        IO::vec_loop(k1 - k0, [&](int64_t i, int64_t m) {
          const int64_t k = k0 + i;
          Vec acc(acc_t(0));
          for (int64_t n = 0; n < N; ++n) acc += IO::load(X + n * K + k, m) * Vec(dl[n]);
          IO::store(GW + k, acc, m);
        });
      });
    }
  }
};

}  // namespace

// The entry points of this ISA (dtype dispatch); CpuKernels (bn_cpu.cpp) picks the ISA.
namespace GAN_FAST_CPU_NS {

void bn_stats(const Tensor& x, const BnShape& s, Tensor& mean, Tensor& var) {
  GAN_FAST_CPU_DISPATCH(x.scalar_type(), "gan_fast::bn_stats_cpu", [&] { BnCpu<scalar_t>::stats(x, s, mean, var); });
}

void bn_apply(const Tensor& x, const BnShape& s, const Tensor& mean, const Tensor& var, const Tensor& w,
              const Tensor& b, double eps, double slope, int64_t act, Tensor& y) {
  GAN_FAST_CPU_DISPATCH(x.scalar_type(), "gan_fast::bn_apply_cpu",
                    [&] { BnCpu<scalar_t>::apply(x, s, mean, var, w, b, eps, slope, act, y); });
}

void bn_backward_reduce(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                        const Tensor& var, const Tensor& w, const Tensor& b, double eps, double slope,
                        int64_t act, Tensor& grad_weight, Tensor& grad_bias) {
  GAN_FAST_CPU_DISPATCH(x.scalar_type(), "gan_fast::bn_backward_reduce_cpu", [&] {
    BnCpu<scalar_t>::backward_reduce(dy, x, s, mean, var, w, b, eps, slope, act, grad_weight, grad_bias);
  });
}

void bn_backward_apply(const Tensor& dy, const Tensor& x, const BnShape& s, const Tensor& mean,
                       const Tensor& var, const Tensor& w, const Tensor& b, const Tensor& grad_weight,
                       const Tensor& grad_bias, bool training, double eps, double slope, int64_t act,
                       Tensor& dx) {
  GAN_FAST_CPU_DISPATCH(x.scalar_type(), "gan_fast::bn_backward_apply_cpu", [&] {
    BnCpu<scalar_t>::backward_apply(dy, x, s, mean, var, w, b, grad_weight, grad_bias, training, eps, slope,
                                    act, dx);
  });
}

void d_head_forward(const Tensor& x, const Tensor& w, const Tensor& target, Tensor& logits, Tensor& loss) {
  GAN_FAST_CPU_DISPATCH(x.scalar_type(), "gan_fast::d_head_forward_cpu",
                        [&] { DHeadCpu<scalar_t>::d_head_forward(x, w, target, logits, loss); });
}

void d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& w, const Tensor& target,
                     const Tensor& logits, bool need_x, bool need_w, Tensor& grad_x, Tensor& grad_w) {
  GAN_FAST_CPU_DISPATCH(x.scalar_type(), "gan_fast::d_head_backward_cpu", [&] {
    DHeadCpu<scalar_t>::d_head_backward(grad_loss, x, w, target, logits, need_x, need_w, grad_x, grad_w);
  });
}

}  // namespace GAN_FAST_CPU_NS
}  // namespace gan_fast
