// Shared by the CPU (.cpp) and CUDA (.cu) translation units: argument checks, memory-format
// handling and the device-agnostic op bodies. Each op body is a template over a `Kernels` struct
// (CpuKernels in csrc/cpu/, CudaKernels in csrc/cuda/) that only launches kernels on
// buffers this file has already checked, laid out and allocated, so every argument check is
// written once and both devices give the same error messages.
//
// Layout idea (same as ATen's batch_norm_cpu / batch_norm_cuda split between "contiguous" and
// "channels_last" kernels): a [N, C, *] tensor is either
//   - planes: NC(S) contiguous, element (n, c, s) at (n * C + c) * S + s, or
//   - rows:   [M = N * S, C] row-major, element (m, c) at m * C + c: channels_last 4-D tensors and
//             every tensor with S == 1 ([N, C] BatchNorm1d inputs, 1x1 feature maps).
// Any other strides are first copied to one of the two, and outputs keep that layout.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <array>
#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

// The dtype dispatch of every kernel: the floating types the op bodies below accept.
#define GAN_FAST_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// The CPU BatchNorm kernels get AVX2 + FMA and AVX-512 builds besides the baseline one
// (csrc/cpu/bn_cpu_avx2.cpp, bn_cpu_avx512.cpp, chosen at run time by csrc/cpu/bn_cpu.cpp) where
// `#pragma GCC target` can give them: GCC on x86-64. The bfloat16 kernels get one more AVX-512 build
// with AVX512_BF16's conversion instruction (bn_cpu_avx512_bf16.cpp) where GCC knows the target
// (GCC 10 and later).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GAN_FAST_CPU_AVX2_TU 1
#define GAN_FAST_CPU_AVX512_TU 1
#else
#define GAN_FAST_CPU_AVX2_TU 0
#define GAN_FAST_CPU_AVX512_TU 0
#endif
#if GAN_FAST_CPU_AVX512_TU && __GNUC__ >= 10
#define GAN_FAST_CPU_AVX512_BF16_TU 1
#else
#define GAN_FAST_CPU_AVX512_BF16_TU 0
#endif

namespace gan_fast {

using at::Tensor;

// Activation codes; their Python home is gan_fast/backends/reference.py (ACT_*). The BatchNorm
// kernels pass act through to the activation helpers (cpu/cpu_vec.h and cuda/cuda_common.h
// activate): ReLU is not LeakyReLU(0), whose 0 * -inf is NaN.
enum Act : int64_t { kActNone = 0, kActRelu = 1, kActLeakyRelu = 2, kActTanh = 3 };

// Testing hook (gan_fast.backends.ext.poison_outputs, op set_poison_outputs): while set, every buffer a
// kernel is to fill starts as NaN, so an element a kernel forgets to write fails the tests'
// comparison instead of passing on whatever the allocator returned. One flag for every translation
// unit (an inline function's static is shared across them).
inline std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}
inline Tensor new_output(Tensor t) {
  if (poison_outputs_flag().load(std::memory_order_relaxed) && t.numel() > 0) t.fill_(NAN);
  return t;
}

inline double act_slope(int64_t act, double negative_slope) {
  return act == kActRelu ? 0.0 : negative_slope;
}

// A [N, C, *] tensor seen as planes or rows (see the file comment).
struct BnShape {
  int64_t N, C, S;
  bool rows;
  int64_t count() const { return N * S; }  // elements per channel
  int64_t numel() const { return N * C * S; }
};

inline bool is_floating(const Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void check_floating(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_floating(t), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the input is on ", ref.device());
}

// Planes or rows: contiguous, or channels_last (4-D), else a copy. gan_fast/backends/ext.py's
// _dense_like() mirrors this rule for the fake (meta) kernels.
inline Tensor dense_input(const Tensor& x) {
  if (x.is_contiguous()) return x;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  if (x.dim() == 4 && x.stride(1) == 1) return x.contiguous(at::MemoryFormat::ChannelsLast);
  return x.contiguous();
}

// `t` with exactly the strides of `like` (a dense_input() result).
inline Tensor same_layout(const Tensor& t, const Tensor& like) {
  if (t.strides() == like.strides()) return t;
  if (like.is_contiguous()) return t.contiguous();
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

inline BnShape bn_shape(const Tensor& x) {
  BnShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s.S *= x.size(d);
  s.rows = s.S == 1 || !x.is_contiguous();
  return s;
}

// A per-channel parameter (BN weight, bias, running statistics) as a contiguous vector of the
// accumulation dtype, or an undefined tensor when absent. C elements: the copy, when one is
// needed at all, is negligible next to the activation tensor.
inline Tensor channel_param(const c10::optional<Tensor>& t, const Tensor& x, int64_t C,
                            const char* op, const char* name) {
  if (!t.has_value() || !t->defined()) return Tensor();
  check_same_device(*t, x, op, name);
  check_floating(*t, op, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape [", C,
              "] (the input's channel count), got ", t->sizes());
  return t->to(at::toOpMathType(x.scalar_type())).contiguous();
}

inline void check_bn_input(const Tensor& x, const char* op) {
  check_floating(x, op, "input");
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, op,
              ": input must be [N, C] (BatchNorm1d), [N, C, L] or [N, C, H, W] (BatchNorm2d), got ",
              x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, op, ": input has no channels, shape ", x.sizes());
}

inline void check_act(int64_t act, double slope, const char* op, bool allow_tanh) {
  TORCH_CHECK(act == kActNone || act == kActRelu || act == kActLeakyRelu ||
                  (allow_tanh && act == kActTanh),
              op, ": unsupported activation code ", act,
              allow_tanh ? " (0 none, 1 relu, 2 leaky_relu, 3 tanh)" : " (0 none, 1 relu, 2 leaky_relu)");
  TORCH_CHECK(act != kActLeakyRelu || slope >= 0, op,
              ": negative_slope must be >= 0 (the backward reads the mask from the sign), got ", slope);
}

// The kernels each device implements (CpuKernels, CudaKernels). Tensors reaching them are checked,
// dense in the layout BnShape describes, and per-channel vectors are contiguous in the
// accumulation dtype; an undefined w / b means affine=False (w = 1, b = 0).
#define GAN_FAST_KERNEL_DECLS                                                                        \
  static void bn_stats(const Tensor& x, const BnShape& s, Tensor& mean, Tensor& var);               \
  static void bn_apply(const Tensor& x, const BnShape& s, const Tensor& mean, const Tensor& var,    \
                       const Tensor& w, const Tensor& b, double eps, double slope, int64_t act,     \
                       Tensor& y);                                                                   \
  static void bn_backward_reduce(const Tensor& dy, const Tensor& x, const BnShape& s,               \
                                 const Tensor& mean, const Tensor& var, const Tensor& w,            \
                                 const Tensor& b, double eps, double slope, int64_t act,            \
                                 Tensor& grad_weight, Tensor& grad_bias);                           \
  static void bn_backward_apply(const Tensor& dy, const Tensor& x, const BnShape& s,                \
                                const Tensor& mean, const Tensor& var, const Tensor& w,             \
                                const Tensor& b, const Tensor& grad_weight, const Tensor& grad_bias,\
                                bool training, double eps, double slope, int64_t act, Tensor& dx);  \
  static void bn_update_stats(Tensor& running_mean, Tensor& running_var, const Tensor& mean,        \
                              const Tensor& var, double momentum, int64_t count);                   \
  static void act_forward_(Tensor& y, int64_t act, double slope);                                   \
  static void act_backward(const Tensor& grad_y, const Tensor& y, int64_t act, double slope,        \
                           Tensor& grad_z);                                                          \
  static void bce_forward(const Tensor& logits, const Tensor& target, Tensor& loss);                \
  static void bce_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& target,     \
                           Tensor& grad_logits);                                                     \
  static void d_head_forward(const Tensor& x, const Tensor& w, const Tensor& target,                \
                             Tensor& logits, Tensor& loss);                                          \
  static void d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& w,            \
                              const Tensor& target, const Tensor& logits, bool need_x, bool need_w, \
                              Tensor& grad_x, Tensor& grad_w)

struct CpuKernels {
  GAN_FAST_KERNEL_DECLS;
};
// The CPU-only col2im of ext_conv's GEMM + col2im forms (csrc/cpu/col2im_cpu.cpp).
Tensor col2im_cpu(const Tensor& cols, at::IntArrayRef image_hw, at::IntArrayRef stride, at::IntArrayRef padding);
// conv_act and conv_act_backward on the CPU (csrc/cpu/image_conv_cpu.cpp): conv_act_forward<CpuKernels> and
// conv_act_backward<CpuKernels> below, or the direct kernels for a few-channel image's conv2d.
Tensor conv_act_forward_cpu(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, bool transposed, int64_t act,
                            double negative_slope);
std::tuple<Tensor, Tensor, Tensor> conv_act_backward_cpu(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                                                         const Tensor& weight, bool has_bias, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, bool transposed, int64_t act,
                                                         double negative_slope, std::array<bool, 3> output_mask);
// Which build of the CPU BatchNorm kernels a dtype runs in this process ("default", "avx2",
// "avx512", "avx512_bf16"; csrc/cpu/bn_cpu.cpp), for the tests and the benchmarks.
const char* cpu_kernel_isa(at::ScalarType dtype);
struct CudaKernels {
  GAN_FAST_KERNEL_DECLS;
};

// ---------------------------------------------------------------------------------------------
// BatchNorm + activation.
// The backward recomputes xhat = (x - mean) * invstd from the saved *input* rather than inverting
// the saved output: inverting y = act(xhat * w + b) divides by w (0 or tiny for some channels
// after training) and cannot undo ReLU, so it is not exact; the input costs one more saved
// activation but the backward is then bit-for-bit the formula of torch's native kernels
// (aten/src/ATen/native/Normalization.cpp, batch_norm_backward_cpu_template).
// mean / var (biased) are returned in the accumulation dtype; invstd = 1/sqrt(var + eps) is
// recomputed from them wherever it is needed, which also serves the running-stat update.

// chunks > 1 (training only): the batch is that many equal batches stacked (D's real and fake batch
// in one pass, gan_fast.fuse.discriminator_loss); each is normalized with its own statistics, as
// separate calls would, into one output (no concatenation), and mean / var are [chunks, C]. A chunk
// of the batch is a dense slice of x_ in either layout: planes n in [k Nk, (k + 1) Nk), or rows.
inline BnShape chunk_shape(const BnShape& s, int64_t chunks) { return {s.N / chunks, s.C, s.S, s.rows}; }

inline void check_chunks(int64_t chunks, int64_t batch, bool training, const char* op) {
  TORCH_CHECK(chunks >= 1 && batch % chunks == 0, op, ": chunks must be >= 1 and divide the batch (", batch,
              "), got ", chunks);
  TORCH_CHECK(chunks == 1 || training, op, ": chunks > 1 normalizes each chunk with its own batch statistics, "
              "so it needs training=True");
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> bn_act_forward(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    bool training, double eps, int64_t act, double negative_slope, int64_t chunks) {
  const char* op = "gan_fast::bn_act";
  check_bn_input(x, op);
  check_act(act, negative_slope, op, /*allow_tanh=*/false);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
  check_chunks(chunks, x.size(0), training, op);
  Tensor x_ = dense_input(x);
  BnShape s = bn_shape(x_);
  Tensor w = channel_param(weight, x, s.C, op, "weight");
  Tensor b = channel_param(bias, x, s.C, op, "bias");
  auto acc = at::toOpMathType(x.scalar_type());
  Tensor y = new_output(at::empty_like(x_));
  Tensor mean, var;
  const double slope = act_slope(act, negative_slope);
  if (training) {
    const BnShape sk = chunk_shape(s, chunks);
    TORCH_CHECK(sk.count() > 1, op, ": expected more than 1 value per channel when training, got input of shape ",
                x.sizes(), chunks > 1 ? " in chunks" : "");
    const std::vector<int64_t> stat_shape = chunks == 1 ? std::vector<int64_t>{s.C} : std::vector<int64_t>{chunks, s.C};
    mean = new_output(at::empty(stat_shape, x.options().dtype(acc)));
    var = new_output(at::empty(stat_shape, x.options().dtype(acc)));
    for (int64_t k = 0; k < chunks; ++k) {
      Tensor xk = chunks == 1 ? x_ : x_.narrow(0, k * sk.N, sk.N);
      Tensor yk = chunks == 1 ? y : y.narrow(0, k * sk.N, sk.N);
      Tensor mk = chunks == 1 ? mean : mean.select(0, k), vk = chunks == 1 ? var : var.select(0, k);
      K::bn_stats(xk, sk, mk, vk);
      if (sk.numel() > 0) K::bn_apply(xk, sk, mk, vk, w, b, eps, slope, act, yk);
    }
    return {y, mean, var};
  }
  Tensor rm = channel_param(running_mean, x, s.C, op, "running_mean");
  Tensor rv = channel_param(running_var, x, s.C, op, "running_var");
  TORCH_CHECK(rm.defined() && rv.defined(), op,
              ": running_mean and running_var must be given in evaluation mode (training=False)");
  // Copies: the outputs must not alias the running buffers, which later steps update in place.
  mean = rm.is_same(*running_mean) ? rm.clone() : rm;
  var = rv.is_same(*running_var) ? rv.clone() : rv;
  if (s.numel() > 0) K::bn_apply(x_, s, mean, var, w, b, eps, slope, act, y);
  return {y, mean, var};
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> bn_act_backward(
    const Tensor& grad_out, const Tensor& x, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias, const Tensor& mean, const Tensor& var, bool training,
    double eps, int64_t act, double negative_slope, int64_t chunks) {
  const char* op = "gan_fast::bn_act_backward";
  check_bn_input(x, op);
  check_act(act, negative_slope, op, /*allow_tanh=*/false);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but the input has shape ", x.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out has dtype ",
              grad_out.scalar_type(), " but the input has dtype ", x.scalar_type());
  check_same_device(grad_out, x, op, "grad_out");
  check_chunks(chunks, x.size(0), training, op);
  Tensor x_ = dense_input(x);
  Tensor dy = same_layout(grad_out, x_);
  BnShape s = bn_shape(x_);
  Tensor w = channel_param(weight, x, s.C, op, "weight");
  Tensor b = channel_param(bias, x, s.C, op, "bias");
  Tensor m, v;
  if (chunks == 1) {
    m = channel_param(mean, x, s.C, op, "mean");
    v = channel_param(var, x, s.C, op, "var");
  } else {  // one row of statistics per chunk, as bn_act returned them
    TORCH_CHECK(mean.sizes() == at::IntArrayRef({chunks, s.C}) && var.sizes() == mean.sizes(), op,
                ": with ", chunks, " chunks mean and var must be [", chunks, ", ", s.C, "], got ", mean.sizes(),
                " and ", var.sizes());
    m = channel_param(mean.reshape({-1}), x, chunks * s.C, op, "mean").view({chunks, s.C});
    v = channel_param(var.reshape({-1}), x, chunks * s.C, op, "var").view({chunks, s.C});
  }
  auto acc = at::toOpMathType(x.scalar_type());
  Tensor grad_weight = new_output(at::empty({s.C}, x.options().dtype(acc)));
  Tensor grad_bias = new_output(at::empty({s.C}, x.options().dtype(acc)));
  Tensor grad_x = new_output(at::empty_like(x_));
  const double slope = act_slope(act, negative_slope);
  if (s.numel() == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  if (chunks == 1) {
    K::bn_backward_reduce(dy, x_, s, m, v, w, b, eps, slope, act, grad_weight, grad_bias);
    K::bn_backward_apply(dy, x_, s, m, v, w, b, grad_weight, grad_bias, training, eps, slope, act, grad_x);
    return {grad_x, grad_weight, grad_bias};
  }
  // Each chunk's own sums give its input gradient; gamma and beta get the sum over the chunks.
  const BnShape sk = chunk_shape(s, chunks);
  Tensor gw_k = at::empty({chunks, s.C}, x.options().dtype(acc)), gb_k = at::empty_like(gw_k);
  for (int64_t k = 0; k < chunks; ++k) {
    Tensor dyk = dy.narrow(0, k * sk.N, sk.N), xk = x_.narrow(0, k * sk.N, sk.N);
    Tensor dxk = grad_x.narrow(0, k * sk.N, sk.N);
    Tensor mk = m.select(0, k), vk = v.select(0, k), gwk = gw_k.select(0, k), gbk = gb_k.select(0, k);
    K::bn_backward_reduce(dyk, xk, sk, mk, vk, w, b, eps, slope, act, gwk, gbk);
    K::bn_backward_apply(dyk, xk, sk, mk, vk, w, b, gwk, gbk, training, eps, slope, act, dxk);
  }
  at::sum_out(grad_weight, gw_k, {0});
  at::sum_out(grad_bias, gb_k, {0});
  return {grad_x, grad_weight, grad_bias};
}

// running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance
// var * n / (n - 1), as nn.BatchNorm does.
template <class K>
void bn_update_stats(Tensor& running_mean, Tensor& running_var, const Tensor& mean,
                     const Tensor& var, double momentum, int64_t count) {
  const char* op = "gan_fast::bn_update_stats_";
  check_floating(running_mean, op, "running_mean");
  TORCH_CHECK(running_var.scalar_type() == running_mean.scalar_type(), op,
              ": running_mean and running_var must have the same dtype, got ",
              running_mean.scalar_type(), " and ", running_var.scalar_type());
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_mean.dim() == 1 && running_var.dim() == 1 && running_var.numel() == C &&
                  mean.numel() == C && var.numel() == C,
              op, ": running_mean and running_var must have shape [C] = [", mean.numel(),
              "] (the batch statistics' channel count), got running_mean ", running_mean.sizes(),
              ", running_var ", running_var.sizes(), ", mean ", mean.sizes(), ", var ", var.sizes());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(), op,
              ": running_mean and running_var must be contiguous (they are updated in place)");
  check_same_device(running_var, running_mean, op, "running_var");
  check_same_device(mean, running_mean, op, "mean");
  check_same_device(var, running_mean, op, "var");
  TORCH_CHECK(count > 1, op, ": count (values per channel) must be > 1, got ", count);
  auto acc = at::toOpMathType(running_mean.scalar_type());
  if (C == 0) return;
  K::bn_update_stats(running_mean, running_var, mean.to(acc).contiguous(), var.to(acc).contiguous(),
                     momentum, count);
}

// ---------------------------------------------------------------------------------------------
// Convolution + activation: the convolution is ATen's (oneDNN on CPU, cuDNN on GPU); the
// activation then runs in place on the freshly allocated output, one read and one write.

inline at::MemoryFormat conv_format(const Tensor& x) {
  // One channel is contiguous in both formats; its strides still say which one it was made in, and
  // ATen's convolution follows them (suggest_memory_format): NHWC strides give a channels_last output.
  if (x.is_contiguous())
    return (x.size(1) == 1 && x.stride(1) == 1 && x.size(2) * x.size(3) > 1) ? at::MemoryFormat::ChannelsLast
                                                                             : at::MemoryFormat::Contiguous;
  return (x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.stride(1) == 1) ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

inline void check_conv_args(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, bool transposed,
                            const char* op) {
  check_floating(x, op, "input");
  TORCH_CHECK(x.dim() == 4, op, ": input must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D, got shape ", weight.sizes());
  check_same_device(weight, x, op, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but the input has dtype ", x.scalar_type(), " (cast both to the autocast dtype)");
  const int64_t cin = transposed ? weight.size(0) : weight.size(1);
  const int64_t cout = transposed ? weight.size(1) : weight.size(0);
  TORCH_CHECK(x.size(1) == cin, op, ": input has ", x.size(1), " channels but weight ", weight.sizes(),
              transposed ? " (ConvTranspose2d layout [C_in, C_out, kH, kW])"
                         : " (Conv2d layout [C_out, C_in, kH, kW])",
              " expects ", cin);
  if (bias.has_value() && bias->defined()) {
    check_same_device(*bias, x, op, "bias");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ", bias->scalar_type(),
                " but the input has dtype ", x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == cout, op, ": bias must have shape [", cout,
                "], got ", bias->sizes());
  }
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, op,
              ": stride must be two positive ints, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
              ": padding must be two non-negative ints, got ", padding);
  // An empty or negative output size is checked here: ATen's transposed convolution does not check
  // it, and oneDNN then fails with "could not construct a memory descriptor using a format tag".
  for (int64_t d = 0; d < 2; ++d) {
    const int64_t in = x.size(2 + d), k = weight.size(2 + d);
    const bool empty = transposed ? (in - 1) * stride[d] - 2 * padding[d] + k <= 0 : in + 2 * padding[d] < k;
    TORCH_CHECK(!empty, op, ": input ", x.sizes(), " with kernel ", weight.sizes(), ", stride ", stride,
                " and padding ", padding,
                transposed ? " gives an empty output (padding too large for the transposed convolution)"
                           : " gives an empty output (the kernel is larger than the padded input)");
  }
}

inline void check_conv_act_args(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, bool transposed, int64_t act,
                                double negative_slope) {
  check_conv_args(x, weight, bias, stride, padding, transposed, "gan_fast::conv_act");
  check_act(act, negative_slope, "gan_fast::conv_act", /*allow_tanh=*/true);
}

template <class K>
Tensor conv_act_forward(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, bool transposed, int64_t act,
                        double negative_slope) {
  check_conv_act_args(x, weight, bias, stride, padding, transposed, act, negative_slope);
  std::vector<int64_t> zeros{0, 0}, ones{1, 1};
  Tensor y = at::convolution(x, weight, bias, stride, padding, ones, transposed, zeros, 1);
  // One layout per input layout (what the fake kernel promises); a no-op for oneDNN and cuDNN,
  // which already follow the input's layout.
  y = y.contiguous(conv_format(x));
  if (y.numel() > 0 && act != kActNone) K::act_forward_(y, act, act_slope(act, negative_slope));
  return y;
}

inline void check_conv_act_backward_args(const Tensor& grad_out, const Tensor& out, const Tensor& x,
                                         const Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                                         bool transposed, int64_t act, double negative_slope) {
  const char* op = "gan_fast::conv_act_backward";
  check_conv_args(x, weight, c10::nullopt, stride, padding, transposed, op);
  check_act(act, negative_slope, op, /*allow_tanh=*/true);
  TORCH_CHECK(grad_out.sizes() == out.sizes(), op, ": grad_out has shape ", grad_out.sizes(),
              " but the output has shape ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type() && out.scalar_type() == x.scalar_type(), op,
              ": grad_out, output and input must have one dtype, got ", grad_out.scalar_type(), ", ",
              out.scalar_type(), ", ", x.scalar_type());
  check_same_device(grad_out, x, op, "grad_out");
  check_same_device(out, x, op, "output");
}

template <class K>
std::tuple<Tensor, Tensor, Tensor> conv_act_backward(
    const Tensor& grad_out, const Tensor& out, const Tensor& x, const Tensor& weight, bool has_bias,
    at::IntArrayRef stride, at::IntArrayRef padding, bool transposed, int64_t act, double negative_slope,
    std::array<bool, 3> output_mask) {
  check_conv_act_backward_args(grad_out, out, x, weight, stride, padding, transposed, act, negative_slope);
  Tensor g = grad_out;
  if (act != kActNone) {
    // The activation's derivative from the saved output: tanh' = 1 - y^2; LeakyReLU's mask is
    // the sign of y, the same as the sign of its input for slope >= 0.
    Tensor y = dense_input(out);
    Tensor gy = same_layout(grad_out, y);
    g = new_output(at::empty_like(y));
    if (g.numel() > 0) K::act_backward(gy, y, act, act_slope(act, negative_slope), g);
  }
  std::vector<int64_t> zeros{0, 0}, ones{1, 1};
  std::vector<int64_t> bias_sizes{transposed ? weight.size(1) : weight.size(0)};
  auto grads = at::convolution_backward(
      g, x, weight, has_bias ? c10::optional<at::IntArrayRef>(bias_sizes) : c10::nullopt, stride,
      padding, ones, transposed, zeros, 1, {output_mask[0], output_mask[1], has_bias && output_mask[2]});
  // Grads that were not asked for come back empty ([0]) so the schema's outputs stay Tensors.
  // Gradients in their tensor's layout (what the fake kernel promises): oneDNN / cuDNN may pick
  // another for a channels_last input; the weight's copy is tiny.
  auto or_empty = [&](const Tensor& t, at::MemoryFormat format) {
    return t.defined() ? t.contiguous(format) : at::empty({0}, x.options());
  };
  return {or_empty(std::get<0>(grads), conv_format(x)), or_empty(std::get<1>(grads), conv_format(weight)),
          or_empty(std::get<2>(grads), at::MemoryFormat::Contiguous)};
}

// ---------------------------------------------------------------------------------------------
// Binary cross-entropy with logits, mean reduction. Per element
//   loss = (1 - t) * l - min(l, 0) + log1p(exp(-|l|)),  dloss/dl = sigmoid(l) - t,
// finite for any |l| (the exp argument is never positive). The loss is returned in the
// accumulation dtype (float32 for half / bfloat16 logits), as autocast runs
// binary_cross_entropy_with_logits in float32.

inline Tensor bce_target(const Tensor& target, const Tensor& like, at::IntArrayRef shape, const char* op) {
  check_floating(target, op, "target");
  check_same_device(target, like, op, "target");
  TORCH_CHECK(target.dim() <= static_cast<int64_t>(shape.size()), op, ": target of shape ", target.sizes(),
              " is not broadcastable to ", shape);
  for (int64_t i = 1; i <= target.dim(); ++i) {
    int64_t t = target.size(-i), s = shape[shape.size() - i];
    TORCH_CHECK(t == 1 || t == s, op, ": target of shape ", target.sizes(), " is not broadcastable to ", shape);
  }
  return target.to(at::toOpMathType(like.scalar_type())).expand(shape).contiguous();
}

template <class K>
Tensor bce_forward(const Tensor& logits, const Tensor& target) {
  const char* op = "gan_fast::bce_with_logits";
  check_floating(logits, op, "logits");
  TORCH_CHECK(logits.numel() > 0, op, ": logits is empty");
  Tensor l = logits.contiguous();
  Tensor t = bce_target(target, logits, logits.sizes(), op);
  Tensor loss = new_output(at::empty({}, logits.options().dtype(at::toOpMathType(logits.scalar_type()))));
  K::bce_forward(l, t, loss);
  return loss;
}

template <class K>
Tensor bce_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& target) {
  const char* op = "gan_fast::bce_with_logits_backward";
  check_floating(logits, op, "logits");
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ", grad_loss.sizes());
  check_same_device(grad_loss, logits, op, "grad_loss");
  Tensor l = logits.contiguous();
  Tensor t = bce_target(target, logits, logits.sizes(), op);
  Tensor g = grad_loss.to(at::toOpMathType(logits.scalar_type())).reshape({});
  Tensor grad = new_output(at::empty_like(l));
  if (l.numel() > 0) K::bce_backward(g, l, t, grad);
  return grad;
}

// D head: logits[n] = <x[n], w> (a Conv2d whose kernel covers the whole feature map is a GEMV),
// then the BCE above, in one pass over x. For a channels_last x the weight is permuted the same
// way, so both flatten to [N, K] / [K] in the same (h, w, c) order without copying x.
inline std::pair<Tensor, Tensor> d_head_operands(const Tensor& x, const Tensor& weight, const char* op) {
  check_floating(x, op, "input");
  TORCH_CHECK(x.dim() == 4, op, ": input must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0, op, ": the batch is empty");
  // conv2d refuses an empty kernel; a loss of log(2) from zero features would hide the mistake
  TORCH_CHECK(x.size(1) > 0 && x.size(2) > 0 && x.size(3) > 0, op,
              ": the input has no features per sample (shape ", x.sizes(), ")");
  check_same_device(weight, x, op, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but the input has dtype ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == 1 && weight.size(1) == x.size(1) &&
                  weight.size(2) == x.size(2) && weight.size(3) == x.size(3),
              op, ": weight must have shape [1, C, H, W] = [1, ", x.size(1), ", ", x.size(2), ", ", x.size(3),
              "] (one output channel, kernel = the input's spatial size), got ", weight.sizes());
  Tensor x_ = dense_input(x);
  Tensor w_ = x_.is_contiguous() ? weight.contiguous() : weight.contiguous(at::MemoryFormat::ChannelsLast);
  return {x_, w_};
}

template <class K>
std::tuple<Tensor, Tensor> d_head_forward(const Tensor& x, const Tensor& weight, const Tensor& target) {
  const char* op = "gan_fast::d_head_bce";
  auto xw = d_head_operands(x, weight, op);
  const int64_t N = x.size(0);
  Tensor t = bce_target(target, x, {N}, op);
  Tensor logits = new_output(at::empty({N}, x.options()));
  Tensor loss = new_output(at::empty({}, x.options().dtype(at::toOpMathType(x.scalar_type()))));
  K::d_head_forward(xw.first, xw.second, t, logits, loss);
  return {loss, logits};
}

template <class K>
std::tuple<Tensor, Tensor> d_head_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& weight,
                                           const Tensor& target, const Tensor& logits,
                                           std::array<bool, 2> output_mask) {
  const char* op = "gan_fast::d_head_bce_backward";
  auto xw = d_head_operands(x, weight, op);
  const int64_t N = x.size(0);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ", grad_loss.sizes());
  TORCH_CHECK(logits.dim() == 1 && logits.size(0) == N, op, ": logits must have shape [", N, "], got ",
              logits.sizes());
  check_same_device(grad_loss, x, op, "grad_loss");
  check_same_device(logits, x, op, "logits");
  auto acc = at::toOpMathType(x.scalar_type());
  Tensor t = bce_target(target, x, {N}, op);
  Tensor g = grad_loss.to(acc).reshape({});
  Tensor l = logits.contiguous();
  Tensor grad_x = output_mask[0] ? new_output(at::empty_like(xw.first)) : at::empty({0}, x.options());
  // grad_w in w_'s layout, then the weight's own (channels_last in a channels_last model), so that
  // AccumulateGrad does not copy it again.
  Tensor grad_w = output_mask[1] ? new_output(at::empty_like(xw.second)) : at::empty({0}, x.options());
  K::d_head_backward(g, xw.first, xw.second, t, l, output_mask[0], output_mask[1], grad_x, grad_w);
  if (output_mask[1]) grad_w = grad_w.contiguous(conv_format(weight));
  return {grad_x, grad_w};
}

}  // namespace gan_fast
