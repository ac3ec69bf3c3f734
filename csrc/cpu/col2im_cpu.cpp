// col2im for channels_last images (gan_fast/backends/ext_conv.py's GEMM + col2im forms): the columns
// [N, OH, OW, kH, kW, C] that a GEMM gives (row (n, oh, ow) holds every tap's C values) summed into
// the image [N, C, H, W] (channels_last memory [N, H, W, C]) they were taken from:
//   image[n, h, w, c] = sum over taps (i, j) with h = s0 * oh + i - p0, w = s1 * ow + j - p1 of
//                       cols[n, oh, ow, i, j, c].
// Gathered per image pixel (each written once, no zero fill, no write conflicts between threads),
// taps in (i, j) order from 0: the very sums, in the same order, of ext_conv's former strided adds
// (Caffe's col2im, scattered by taps, gathered here; Chellapilla et al. 2006). Accumulated in the
// dtype's accumulation type and rounded once. Few image channels are the point (G's last transposed
// convolution, D's first layer's input gradient): there oneDNN took 1.2-1.5 ms for what the GEMM +
// this pass do in ~0.3 (issue #16), so the loop is over pixels with an inner run of C values.
#include "../common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace gan_fast {
namespace {

// For each image position along one axis, the offsets into a column row (for rows: of the output row
// and tap i, (oh * OW * kH * kW + i * kW) * C; for columns: of the output column and tap j,
// (ow * kH * kW + j) * C) of the taps that land on it, in tap order (how the sum is defined).
struct AxisTaps {
  std::vector<int64_t> start, offset;  // position p's taps are offset[start[p]] .. offset[start[p + 1] - 1]
};

AxisTaps axis_taps(int64_t size, int64_t out, int64_t k, int64_t stride, int64_t pad, int64_t step_out,
                   int64_t step_tap) {
  AxisTaps t;
  t.start.push_back(0);
  for (int64_t pos = 0; pos < size; ++pos) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t o = pos + pad - i;  // = stride * output position
      if (o >= 0 && o % stride == 0 && o / stride < out) t.offset.push_back(o / stride * step_out + i * step_tap);
    }
    t.start.push_back(static_cast<int64_t>(t.offset.size()));
  }
  return t;
}

// One image row; kC > 0 fixes the channel count at compile time (the few-channel images this is for),
// so the accumulators live in registers.
template <int kC, typename scalar_t, typename acc_t>
void col2im_row(const scalar_t* src, scalar_t* dst, int64_t W, int64_t C, const int64_t* row_off, int64_t row_taps,
                const AxisTaps& cols) {
  constexpr int64_t kMaxC = kC > 0 ? kC : 64;
  const int64_t channels = kC > 0 ? kC : C;
  for (int64_t w = 0; w < W; ++w, dst += channels) {
    const int64_t* col_off = cols.offset.data() + cols.start[w];
    const int64_t col_taps = cols.start[w + 1] - cols.start[w];
    for (int64_t c0 = 0; c0 < channels; c0 += kMaxC) {
      const int64_t cn = std::min(kMaxC, channels - c0);
      acc_t acc[kMaxC];
      for (int64_t c = 0; c < cn; ++c) acc[c] = acc_t(0);
      for (int64_t r = 0; r < row_taps; ++r)
        for (int64_t q = 0; q < col_taps; ++q) {
          const scalar_t* from = src + row_off[r] + col_off[q] + c0;
          for (int64_t c = 0; c < cn; ++c) acc[c] += static_cast<acc_t>(from[c]);
        }
      for (int64_t c = 0; c < cn; ++c) dst[c0 + c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

template <typename scalar_t>
void col2im_kernel(const Tensor& cols, Tensor& image, int64_t H, int64_t W, at::IntArrayRef stride,
                   at::IntArrayRef padding) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = cols.size(0), OH = cols.size(1), OW = cols.size(2), KH = cols.size(3), KW = cols.size(4),
                C = cols.size(5);
  const AxisTaps rows = axis_taps(H, OH, KH, stride[0], padding[0], OW * KH * KW * C, KW * C);
  const AxisTaps columns = axis_taps(W, OW, KW, stride[1], padding[1], KH * KW * C, C);
  const scalar_t* src = cols.data_ptr<scalar_t>();
  scalar_t* dst = image.data_ptr<scalar_t>();
  const int64_t per_image = OH * OW * KH * KW * C;
  at::parallel_for(0, N * H, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, W * C)), [&](int64_t b, int64_t e) {
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const int64_t* row_off = rows.offset.data() + rows.start[h];
      const int64_t row_taps = rows.start[h + 1] - rows.start[h];
      const scalar_t* from = src + n * per_image;
      scalar_t* to = dst + nh * W * C;
      switch (C) {
        case 1: col2im_row<1, scalar_t, acc_t>(from, to, W, C, row_off, row_taps, columns); break;
        case 2: col2im_row<2, scalar_t, acc_t>(from, to, W, C, row_off, row_taps, columns); break;
        case 3: col2im_row<3, scalar_t, acc_t>(from, to, W, C, row_off, row_taps, columns); break;
        case 4: col2im_row<4, scalar_t, acc_t>(from, to, W, C, row_off, row_taps, columns); break;
        default: col2im_row<0, scalar_t, acc_t>(from, to, W, C, row_off, row_taps, columns);
      }
    }
  });
}

}  // namespace

Tensor col2im_cpu(const Tensor& cols, at::IntArrayRef image_hw, at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "gan_fast::col2im";
  check_floating(cols, op, "cols");
  TORCH_CHECK(cols.dim() == 6, op, ": cols must be [N, OH, OW, kH, kW, C], got ", cols.dim(), "-D shape ",
              cols.sizes());
  TORCH_CHECK(image_hw.size() == 2 && image_hw[0] > 0 && image_hw[1] > 0, op,
              ": image_hw must be two positive ints, got ", image_hw);
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op,
              ": stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  for (int64_t d = 0; d < 2; ++d) {
    const int64_t expect = (image_hw[d] + 2 * padding[d] - cols.size(3 + d)) / stride[d] + 1;
    TORCH_CHECK(image_hw[d] + 2 * padding[d] >= cols.size(3 + d) && cols.size(1 + d) == expect, op,
                ": cols ", cols.sizes(), " do not fit an image of ", image_hw, " with stride ", stride,
                " and padding ", padding, " (expected ", expect, " output positions along dim ", d, ")");
  }
  const Tensor src = cols.contiguous();
  Tensor image = new_output(at::empty({cols.size(0), cols.size(5), image_hw[0], image_hw[1]},
                                      cols.options().memory_format(at::MemoryFormat::ChannelsLast)));
  if (image.numel() == 0) return image;
  GAN_FAST_DISPATCH(cols.scalar_type(), "gan_fast_col2im",
                    [&] { col2im_kernel<scalar_t>(src, image, image_hw[0], image_hw[1], stride, padding); });
  return image;
}

}  // namespace gan_fast
