// The gan_fast operator library: schemas only. Implementations are registered per device
// (csrc/cpu/register_cpu.cpp, csrc/cuda/register_cuda.cu); autograd formulas and fake (meta)
// kernels are registered from Python in gan_fast/backends/ext.py through torch.library, the layout
// pytorch/extension-cpp uses (extension_cpp/csrc/muladd.cpp + extension_cpp/ops.py).
//
// Every op is functional (returns fresh tensors) except bn_update_stats_, which updates the
// running statistics in place; torch.library.register_autograd needs functional ops, so the
// running-stat update is split from bn_act and carries no gradient.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "common.h"

extern "C" {
// `import gan_fast._C` loads this shared library, whose static initializers run the
// TORCH_LIBRARY registrations below; the Python module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gan_fast, m) {
  // Fake kernels live in gan_fast.backends.ext: torch.compile imports it when it meets these ops.
  m.set_python_module("gan_fast.backends.ext");
  // act: 0 none, 1 relu, 2 leaky_relu(negative_slope). Returns (y, mean, var): in training the
  // batch mean and biased variance, in eval copies of the running statistics; both in the
  // accumulation dtype (float32 for half / bfloat16 inputs).
  // chunks (training): the batch is that many equal batches, each normalized with its own statistics
  // into the one output; mean and var are then [chunks, C].
  m.def("bn_act(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float eps, int act, float negative_slope, int chunks=1) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias); the last two in the accumulation dtype.
  m.def("bn_act_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
        "bool training, float eps, int act, float negative_slope, int chunks=1) -> (Tensor, Tensor, Tensor)");
  // bn_act with its autograd formula in C++ (csrc/bn_act_autograd.cpp), for eager mode; bn_act's
  // Python-registered formula is what torch.compile traces.
  m.def("bn_act_eager(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float eps, int act, float negative_slope, int chunks=1) -> (Tensor, Tensor, Tensor)");
  m.def("bn_update_stats_(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
        "float momentum, int count) -> ()");
  // act: 0 none, 1 relu, 2 leaky_relu(negative_slope), 3 tanh.
  m.def("conv_act(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, bool transposed, "
        "int act, float negative_slope) -> Tensor");
  // Returns (grad_x, grad_weight, grad_bias); an entry whose output_mask is false is empty ([0]).
  m.def("conv_act_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, bool has_bias, "
        "int[2] stride, int[2] padding, bool transposed, int act, float negative_slope, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("bce_with_logits(Tensor logits, Tensor target) -> Tensor");
  m.def("bce_with_logits_backward(Tensor grad_loss, Tensor logits, Tensor target) -> Tensor");
  // Returns (loss, logits [N]).
  m.def("d_head_bce(Tensor x, Tensor weight, Tensor target) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_weight); an entry whose output_mask is false is empty ([0]).
  m.def("d_head_bce_backward(Tensor grad_loss, Tensor x, Tensor weight, Tensor target, Tensor logits, "
        "bool[2] output_mask) -> (Tensor, Tensor)");
  // cols [N, OH, OW, kH, kW, C] (a GEMM's output) summed into the channels_last image [N, C, H, W]
  // they came from; CPU only (csrc/cpu/col2im_cpu.cpp).
  m.def("col2im(Tensor cols, int[2] image_hw, int[2] stride, int[2] padding) -> Tensor");
  // Testing hook: NaN-fill every kernel output before the kernel writes it (common.h new_output).
  m.def("set_poison_outputs(bool enabled) -> ()",
        [](bool enabled) { gan_fast::poison_outputs_flag().store(enabled); });
  // Testing hook: the build of the CPU BatchNorm kernels that dtype runs (csrc/cpu/bn_cpu.cpp).
  m.def("cpu_kernel_isa(ScalarType dtype) -> str",
        [](c10::ScalarType dtype) { return std::string(gan_fast::cpu_kernel_isa(dtype)); });
  // Testing hook: how many threads an at::parallel_for over `tasks` tasks of this library runs on.
  // It is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h), so a build without -fopenmp
  // silently runs every CPU kernel on one thread (setup.py).
  m.def("cpu_threads_used(int tasks) -> int", [](int64_t tasks) {
    std::mutex mutex;
    std::set<std::thread::id> seen;
    at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
      std::lock_guard<std::mutex> lock(mutex);
      seen.insert(std::this_thread::get_id());
    });
    return static_cast<int64_t>(seen.size());
  });
}
