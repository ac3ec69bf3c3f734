"""Builds the C++/CUDA extension gan_fast._C from csrc/ against the installed torch.

- CUDAExtension when the installed torch was built with CUDA (torch.version.cuda) and nvcc is found,
  so a GPU-less build box can still build the CUDA kernels (the rule pytorch/extension-cpp and
  pytorch/ao follow); a CppExtension otherwise.
- GAN_FAST_NO_EXT=1 skips the extension; GAN_FAST_FORCE_CUDA=1 requires the CUDA build.
- A failed compile does not fail the install (gan_fast falls back to its other backends and says how
  to rebuild) unless GAN_FAST_EXT_REQUIRED=1, which CI sets so a C++ error turns CI red.
- Every build's full output (compiler errors included) goes to build/gan_fast_ext_build.log as well
  as to the terminal: pip hides a successful install's build output, so without the file a tolerated
  compiler error would leave no trace. gan_fast.backends.ext's unavailable_reason() and the tests name it.
"""
import glob
import os
import sys
import threading
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_LOG = os.path.join(ROOT, "build", "gan_fast_ext_build.log")  # gan_fast/backends/ext.py names this path too
# TORCH_CUDA_ARCH_LIST unless set: SASS for Ampere (sm_80) and Hopper (sm_90), plus compute_90 PTX that
# the driver JIT-compiles for newer GPUs (Blackwell sm_100 / sm_120). tools/check_cuda_compiles.sh reads it.
CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def run_logged(build, log_path):
    """Run ``build()`` with everything written to file descriptors 1 and 2 (by this process and by the
    compiler and ninja subprocesses it starts) copied into ``log_path`` while it still reaches the
    terminal; an exception's traceback is appended to the log and re-raised."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    read_end, write_end = os.pipe()
    with open(log_path, "wb") as log:
        def tee():  # pipe -> original stderr + log, until every writer has closed the pipe
            # It must keep draining whatever fails (a full pipe would block the build), and it ends
            # with an error only once the join below gave up and closed what it reads and writes.
            terminal = True
            try:
                while True:
                    chunk = os.read(read_end, 65536)
                    if not chunk:
                        break
                    if terminal:
                        try:
                            os.write(saved[1], chunk)
                        except OSError:  # the terminal went away: the log still gets everything
                            terminal = False
                    log.write(chunk)
            except (OSError, ValueError):
                pass
        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            build()
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)  # the pipe's last write ends close here: the reader sees EOF
            os.dup2(saved[1], 2)
            # A compiler daemon (sccache, ccache's server) started by the build can keep a copy of the
            # pipe open for ever: the log then ends here rather than the install hanging.
            reader.join(timeout=30)
            os.close(read_end)
            os.close(saved[0])
            os.close(saved[1])


def extension_setup():
    if _flag("GAN_FAST_NO_EXT"):
        return {}
    # the schemas (csrc/ops.cpp) and the CPU kernels and registration (csrc/cpu/)
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp:
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("gan_fast: torch is not importable, skipping the extension "
              "(install torch first, then pip install --no-build-isolation -e .)", file=sys.stderr)
        return {}
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cu) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if _flag("GAN_FAST_FORCE_CUDA") and not with_cuda:
        raise RuntimeError("GAN_FAST_FORCE_CUDA=1 but torch has no CUDA or nvcc was not found")
    # no -std: torch's BuildExtension passes the standard its own headers need (C++20 in torch 2.13)
    cxx = ["-O3"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is an inline `#pragma omp parallel` in ATen's headers (ParallelOpenMP.h):
        # without -fopenmp the compiler drops the pragma and every CPU kernel of the extension ran on
        # one thread. Linked as libgomp.so.1, the runtime torch already loaded (torch/lib), so the
        # extension shares torch's thread pool and at::set_num_threads.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_LIST)
        ext = cpp_extension.CUDAExtension(
            "gan_fast._C", cpp + cu, define_macros=[("GAN_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math",
                                                    "-lineinfo"]}, extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension("gan_fast._C", cpp, extra_compile_args={"cxx": cxx},
                                         extra_link_args=link)

    class TolerantBuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                run_logged(super().run, BUILD_LOG)
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if _flag("GAN_FAST_EXT_REQUIRED"):
                    raise
                print(f"\nWARNING gan_fast: the C++/CUDA extension failed to build ({e}).\n"
                      f"The compiler's output is in {BUILD_LOG}\n"
                      "gan_fast still works with the reference and triton backends. Rebuild with\n"
                      "  pip install --no-build-isolation -e .\n", file=sys.stderr)

    return {"ext_modules": [ext],
            "cmdclass": {"build_ext": TolerantBuildExt.with_options(use_ninja=True)}}


setup(**extension_setup())
