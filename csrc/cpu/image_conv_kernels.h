// The direct Conv2d + LeakyReLU kernels of a few-channel image (image_conv.h says why), written once
// over at::vec and compiled once per ISA next to the BatchNorm kernels: by bn_cpu.cpp for the
// baseline, bn_cpu_avx2.cpp for AVX2 + FMA and bn_cpu_avx512.h for AVX-512, which bn_cpu.cpp picks at
// run time. fp32 only.
//
// Both passes walk output rows (n, oh). A row first gathers the KH input rows it reads into a
// zero-padded buffer, so tap (i, j, c) of output column ow is rows[i][(ow * s1 + j) * C + c] and no
// bounds test is left in the inner loops; each is then a small register-tiled matrix product
// ([OW, K] x [K, Cout] forward; [K, OW] x [OW, Cout] for the weight gradient; [OW, Cout] x [Cout, K]
// for the input gradient's columns), the im2col lowering (Chellapilla et al. 2006) done one row at
// a time in L1 instead of through a materialized column matrix.
#pragma once

#ifndef GAN_FAST_CPU_NS
#error "define GAN_FAST_CPU_NS (the namespace of this ISA's entry points) before including image_conv_kernels.h"
#endif

#include "cpu_vec.h"
#include "image_conv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace gan_fast {
namespace {  // internal linkage: one copy per ISA translation unit (bn_cpu_kernels.h says why)

using ImageVec = at::vec::Vectorized<float>;
constexpr int64_t kImageVW = ImageVec::size();

inline int64_t round_up_to_vec(int64_t n) { return (n + kImageVW - 1) / kImageVW * kImageVW; }

// The KH input rows that output row (n, oh) reads, each zero-padded left and right:
// rows[i * WP + (w + p1) * C + c] = x[n, c, oh * s0 + i - p0, w], 0 outside the image.
inline void gather_image_rows(const float* x, const ImageConv& g, int64_t n, int64_t oh, float* rows) {
  const int64_t C = g.C, WP = (g.W + 2 * g.p1) * C;
  for (int64_t i = 0; i < g.KH; ++i) {
    float* dst = rows + i * WP;
    const int64_t ih = oh * g.s0 + i - g.p0;
    if (ih < 0 || ih >= g.H) {
      std::fill(dst, dst + WP, 0.f);
      continue;
    }
    std::fill(dst, dst + g.p1 * C, 0.f);
    std::fill(dst + (g.p1 + g.W) * C, dst + WP, 0.f);
    const float* src = x + n * g.xs[0] + ih * g.xs[2];
    float* out = dst + g.p1 * C;
    if ((C == 1 || g.xs[1] == 1) && g.xs[3] == C) {  // channels_last (or one channel): one run
      std::copy(src, src + g.W * C, out);
    } else {
      for (int64_t w = 0; w < g.W; ++w)
        for (int64_t c = 0; c < C; ++c) out[w * C + c] = src[w * g.xs[3] + c * g.xs[1]];
    }
  }
}

// f(co, k, weight[co, c, i, j]) for every output channel and tap k = (i * KW + j) * C + c, read through
// the weight's strides (any layout: no packed copy of it first).
template <typename F>
inline void for_each_tap(const Tensor& weight, const ImageConv& g, F&& f) {
  const float* w = weight.data_ptr<float>();
  const int64_t s0 = weight.stride(0), s1 = weight.stride(1), s2 = weight.stride(2), s3 = weight.stride(3);
  for (int64_t co = 0; co < g.Cout; ++co)
    for (int64_t i = 0; i < g.KH; ++i)
      for (int64_t j = 0; j < g.KW; ++j)
        for (int64_t c = 0; c < g.C; ++c) f(co, (i * g.KW + j) * g.C + c, w[co * s0 + c * s1 + i * s2 + j * s3]);
}

// P output pixels (columns ow .. ow + P - 1 of a row, `a` at the first one's taps) x BV vectors of
// output channels: acc = b + sum over taps, in (i, j, c) order, of tap * w; then the activation.
template <int P, int BV>
inline void image_forward_tile(const float* a, int64_t WP, int64_t KH, int64_t KWC, int64_t step, const float* w,
                               int64_t CP, const float* b, float slope, float* out, int64_t Cout, int64_t left) {
  ImageVec acc[P][BV];
  for (int v = 0; v < BV; ++v) {
    const ImageVec init = b ? ImageVec::loadu(b + v * kImageVW) : ImageVec(0.f);
    for (int p = 0; p < P; ++p) acc[p][v] = init;
  }
  for (int64_t i = 0; i < KH; ++i) {
    const float* ai = a + i * WP;
    const float* wi = w + i * KWC * CP;
    for (int64_t t = 0; t < KWC; ++t, wi += CP) {
      ImageVec wv[BV];
      for (int v = 0; v < BV; ++v) wv[v] = ImageVec::loadu(wi + v * kImageVW);
      for (int p = 0; p < P; ++p) {
        const ImageVec av(ai[p * step + t]);
        for (int v = 0; v < BV; ++v) acc[p][v] = at::vec::fmadd(av, wv[v], acc[p][v]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < BV; ++v) {
      const int64_t n = std::min<int64_t>(kImageVW, left - v * kImageVW);
      if (n > 0) cpu::activate(acc[p][v], false, slope).store(out + p * Cout + v * kImageVW, static_cast<int>(n));
    }
}

// Vectors of output channels per forward tile: 4 x 4 accumulators and 4 weight vectors fit AVX-512's 32
// registers; AVX2 (16 registers) takes 4 x 2.
constexpr int64_t kImageTileVecs = kImageVW >= 16 ? 4 : 2;

template <int P>
inline void image_forward_tiles(int64_t vecs, const float* a, int64_t WP, int64_t KH, int64_t KWC, int64_t step,
                                const float* w, int64_t CP, const float* b, float slope, float* out, int64_t Cout,
                                int64_t left) {
  switch (vecs) {
    case 1: return image_forward_tile<P, 1>(a, WP, KH, KWC, step, w, CP, b, slope, out, Cout, left);
    case 2: return image_forward_tile<P, 2>(a, WP, KH, KWC, step, w, CP, b, slope, out, Cout, left);
    case 3: return image_forward_tile<P, 3>(a, WP, KH, KWC, step, w, CP, b, slope, out, Cout, left);
    default: return image_forward_tile<P, kImageTileVecs>(a, WP, KH, KWC, step, w, CP, b, slope, out, Cout, left);
  }
}

void image_forward_impl(const Tensor& x, const Tensor& weight, const Tensor& b, const ImageConv& g, double slope,
                        Tensor& y) {
  const int64_t CP = round_up_to_vec(g.Cout), WP = (g.W + 2 * g.p1) * g.C, KWC = g.KW * g.C, step = g.s1 * g.C;
  // The weight as [K, Cout] and the bias, channels padded to whole vectors (zeros): no partial loads.
  std::vector<float> w(static_cast<size_t>(g.K * CP), 0.f), bias(b.defined() ? CP : 0, 0.f);
  for_each_tap(weight, g, [&](int64_t co, int64_t k, float v) { w[k * CP + co] = v; });
  if (b.defined()) std::copy(b.data_ptr<float>(), b.data_ptr<float>() + g.Cout, bias.data());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data();
  const float* bp = b.defined() ? bias.data() : nullptr;
  float* yp = y.data_ptr<float>();
  const float s = static_cast<float>(slope);
  const ImageConv geo = g;
  at::parallel_for(0, g.N * g.OH, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.OW * g.Cout)),
                   [&](int64_t r0, int64_t r1) {
    std::vector<float> rows(static_cast<size_t>(geo.KH * WP));
    for (int64_t r = r0; r < r1; ++r) {
      gather_image_rows(xp, geo, r / geo.OH, r % geo.OH, rows.data());
      float* out = yp + r * geo.OW * geo.Cout;
      for (int64_t co = 0; co < CP; co += kImageTileVecs * kImageVW) {
        const int64_t vecs = std::min<int64_t>(kImageTileVecs, (CP - co) / kImageVW);
        const float* wc = wp + co;
        const float* bc = bp ? bp + co : nullptr;
        const int64_t left = geo.Cout - co;
        int64_t ow = 0;
        for (; ow + 4 <= geo.OW; ow += 4)
          image_forward_tiles<4>(vecs, rows.data() + ow * step, WP, geo.KH, KWC, step, wc, CP, bc, s,
                                 out + ow * geo.Cout + co, geo.Cout, left);
        for (; ow < geo.OW; ++ow)
          image_forward_tiles<1>(vecs, rows.data() + ow * step, WP, geo.KH, KWC, step, wc, CP, bc, s,
                                 out + ow * geo.Cout + co, geo.Cout, left);
      }
    }
  });
}

// T taps (consecutive within a kernel row: `a` at the first, `step` apart per output column) x BV
// vectors of channels of the weight gradient, summed over one output row's OW pixels of g [OW, CP]
// and added to part (the chunk's partial [K, CP] at the first tap).
template <int T, int BV>
inline void image_weight_grad_tile(const float* a, int64_t step, int64_t OW, const float* g, int64_t CP, float* part) {
  ImageVec acc[T][BV];
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < BV; ++v) acc[t][v] = ImageVec(0.f);
  for (int64_t ow = 0; ow < OW; ++ow) {
    ImageVec gv[BV];
    for (int v = 0; v < BV; ++v) gv[v] = ImageVec::loadu(g + ow * CP + v * kImageVW);
    for (int t = 0; t < T; ++t) {
      const ImageVec av(a[ow * step + t]);
      for (int v = 0; v < BV; ++v) acc[t][v] = at::vec::fmadd(av, gv[v], acc[t][v]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < BV; ++v) {
      float* dst = part + t * CP + v * kImageVW;
      (ImageVec::loadu(dst) + acc[t][v]).store(dst);
    }
}

// P pixels' columns: cols[p][k] = sum over channels co of g[p][co] * wk[co][k] (wk [Cout, KP]), KB
// vectors of taps from k0.
template <int P, int KB>
inline void image_cols_tile(const float* g, int64_t CP, int64_t Cout, const float* wk, int64_t KP, float* cols,
                            int64_t K, int64_t k0) {
  ImageVec acc[P][KB];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < KB; ++v) acc[p][v] = ImageVec(0.f);
  for (int64_t co = 0; co < Cout; ++co) {
    ImageVec wv[KB];
    for (int v = 0; v < KB; ++v) wv[v] = ImageVec::loadu(wk + co * KP + k0 + v * kImageVW);
    for (int p = 0; p < P; ++p) {
      const ImageVec gv(g[p * CP + co]);
      for (int v = 0; v < KB; ++v) acc[p][v] = at::vec::fmadd(gv, wv[v], acc[p][v]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < KB; ++v) {
      const int64_t n = std::min<int64_t>(kImageVW, K - k0 - v * kImageVW);
      if (n > 0) acc[p][v].store(cols + p * K + k0 + v * kImageVW, static_cast<int>(n));
    }
}

void image_backward_impl(const Tensor& dy, const Tensor& y, const Tensor& x, const Tensor& weight, const ImageConv& g,
                         double slope, Tensor& grad_w, Tensor& grad_b, Tensor& cols) {
  const bool need_w = grad_w.defined(), need_b = grad_b.defined(), need_x = cols.defined();
  const int64_t CP = round_up_to_vec(g.Cout), KP = round_up_to_vec(g.K), WP = (g.W + 2 * g.p1) * g.C;
  const int64_t KWC = g.KW * g.C, step = g.s1 * g.C, rows_total = g.N * g.OH;
  std::vector<float> wpad(need_x ? static_cast<size_t>(g.Cout * KP) : 0, 0.f);  // [Cout, KP]
  if (need_x) for_each_tap(weight, g, [&](int64_t co, int64_t k, float v) { wpad[co * KP + k] = v; });
  // One partial per chunk of rows, added in chunk order at the end (deterministic for a thread count).
  const int64_t chunks = need_w || need_b ? cpu::num_chunks(rows_total, 8) : 1;
  std::vector<float> part_w(need_w ? static_cast<size_t>(chunks * g.K * CP) : 0, 0.f);
  std::vector<float> part_b(need_b ? static_cast<size_t>(chunks * CP) : 0, 0.f);
  const float* dyp = dy.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wkp = wpad.data();
  float* colp = need_x ? cols.data_ptr<float>() : nullptr;
  const float s = static_cast<float>(slope);
  const ImageConv geo = g;
  auto rows_of = [&](int64_t r0, int64_t r1, float* pw, float* pb) {
    std::vector<float> gbuf(static_cast<size_t>(geo.OW * CP)), rows(need_w ? static_cast<size_t>(geo.KH * WP) : 0);
    float* gp = gbuf.data();
    for (int64_t r = r0; r < r1; ++r) {
      // g = dy * LeakyReLU'(y) for the row, [OW, CP] with the padding channels 0
      const float* d = dyp + r * geo.OW * geo.Cout;
      const float* yr = yp + r * geo.OW * geo.Cout;
      for (int64_t ow = 0; ow < geo.OW; ++ow)
        for (int64_t co = 0; co < CP; co += kImageVW) {
          const int n = static_cast<int>(std::min<int64_t>(kImageVW, geo.Cout - co));
          const int64_t off = ow * geo.Cout + co;
          const ImageVec dv = ImageVec::loadu(d + off, n), yv = ImageVec::loadu(yr + off, n);
          cpu::activate_grad(dv, yv, false, s).store(gp + ow * CP + co);
        }
      if (pb) {
        for (int64_t co = 0; co < CP; co += kImageVW) {
          ImageVec sum(0.f);
          for (int64_t ow = 0; ow < geo.OW; ++ow) sum = sum + ImageVec::loadu(gp + ow * CP + co);
          (ImageVec::loadu(pb + co) + sum).store(pb + co);
        }
      }
      if (pw) {
        gather_image_rows(xp, geo, r / geo.OH, r % geo.OH, rows.data());
        for (int64_t i = 0; i < geo.KH; ++i)
          for (int64_t co = 0; co < CP; co += 2 * kImageVW) {
            const bool two = co + 2 * kImageVW <= CP;
            int64_t t = 0;
            for (; t + 4 <= KWC; t += 4) {
              const float* a = rows.data() + i * WP + t;
              float* part = pw + (i * KWC + t) * CP + co;
              if (two) image_weight_grad_tile<4, 2>(a, step, geo.OW, gp + co, CP, part);
              else image_weight_grad_tile<4, 1>(a, step, geo.OW, gp + co, CP, part);
            }
            for (; t < KWC; ++t) {
              const float* a = rows.data() + i * WP + t;
              float* part = pw + (i * KWC + t) * CP + co;
              if (two) image_weight_grad_tile<1, 2>(a, step, geo.OW, gp + co, CP, part);
              else image_weight_grad_tile<1, 1>(a, step, geo.OW, gp + co, CP, part);
            }
          }
      }
      if (colp) {
        float* c = colp + r * geo.OW * geo.K;
        for (int64_t k0 = 0; k0 < KP; k0 += 2 * kImageVW) {
          const bool two = k0 + 2 * kImageVW <= KP;
          int64_t ow = 0;
          for (; ow + 4 <= geo.OW; ow += 4) {
            if (two) image_cols_tile<4, 2>(gp + ow * CP, CP, geo.Cout, wkp, KP, c + ow * geo.K, geo.K, k0);
            else image_cols_tile<4, 1>(gp + ow * CP, CP, geo.Cout, wkp, KP, c + ow * geo.K, geo.K, k0);
          }
          for (; ow < geo.OW; ++ow) {
            if (two) image_cols_tile<1, 2>(gp + ow * CP, CP, geo.Cout, wkp, KP, c + ow * geo.K, geo.K, k0);
            else image_cols_tile<1, 1>(gp + ow * CP, CP, geo.Cout, wkp, KP, c + ow * geo.K, geo.K, k0);
          }
        }
      }
    }
  };
  if (need_w || need_b) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        rows_of(rows_total * c / chunks, rows_total * (c + 1) / chunks,
                need_w ? part_w.data() + c * g.K * CP : nullptr, need_b ? part_b.data() + c * CP : nullptr);
    });
  } else {
    at::parallel_for(0, rows_total, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.OW * g.Cout)),
                     [&](int64_t r0, int64_t r1) { rows_of(r0, r1, nullptr, nullptr); });
  }
  if (need_w) {  // written in grad_w's own layout (strides)
    float* out = grad_w.data_ptr<float>();
    const int64_t ws[4] = {grad_w.stride(0), grad_w.stride(1), grad_w.stride(2), grad_w.stride(3)};
    for (int64_t i = 0; i < g.KH; ++i)
      for (int64_t j = 0; j < g.KW; ++j)
        for (int64_t c = 0; c < g.C; ++c)
          for (int64_t co = 0; co < g.Cout; ++co) {
            const int64_t k = (i * g.KW + j) * g.C + c;
            float sum = 0.f;
            for (int64_t t = 0; t < chunks; ++t) sum += part_w[(t * g.K + k) * CP + co];
            out[co * ws[0] + c * ws[1] + i * ws[2] + j * ws[3]] = sum;
          }
  }
  if (need_b) {
    float* out = grad_b.data_ptr<float>();
    for (int64_t co = 0; co < g.Cout; ++co) {
      float sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) sum += part_b[c * CP + co];
      out[co] = sum;
    }
  }
}

}  // namespace

namespace GAN_FAST_CPU_NS {
void image_conv_forward(const Tensor& x, const Tensor& weight, const Tensor& b, const ImageConv& g, double slope,
                        Tensor& y) {
  image_forward_impl(x, weight, b, g, slope, y);
}
void image_conv_backward(const Tensor& dy, const Tensor& y, const Tensor& x, const Tensor& weight, const ImageConv& g,
                         double slope, Tensor& grad_w, Tensor& grad_b, Tensor& cols) {
  image_backward_impl(dy, y, x, weight, g, slope, grad_w, grad_b, cols);
}
}  // namespace GAN_FAST_CPU_NS

}  // namespace gan_fast
