#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu, for a box with nvcc but no GPU (and possibly a CPU-only
# torch): each file is compiled to an object in a temporary directory with the flags setup.py's
# CUDAExtension build uses (torch.utils.cpp_extension's nvcc flags, -O3 --use_fast_math -lineinfo,
# -DGAN_FAST_WITH_CUDA, the gencodes of setup.py's TORCH_CUDA_ARCH_LIST), nothing is linked or run.
# Exits nonzero, with the compiler output, when any file fails to compile, or when an object lacks
# the PTX of an arch listed with +PTX (checked with cuobjdump --list-ptx where cuobjdump is found).
#
#   tools/check_cuda_compiles.sh [--werror] [-j JOBS] [--objdir DIR] [FILE.cu ...]
#
#   --werror      also fail on any compiler warning (torch's own headers are included with -isystem,
#                 so warnings left are the project's)
#   -j JOBS       files compiled in parallel (default: the number of CPU cores)
#   --objdir DIR  keep the objects in DIR (e.g. to link them against the CPU objects and look for
#                 duplicate symbols); default: a temporary directory, removed
#   env NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc), PYTHON (default: python),
#       TORCH_CUDA_ARCH_LIST (default: setup.py's CUDA_ARCH_LIST, e.g. "8.0;9.0+PTX"),
#       CUOBJDUMP (default: cuobjdump on PATH, else beside nvcc; a full CUDA toolkit has it, and
#       `pip install nvidia-cuda-cuobjdump` ships one; without it the PTX check is skipped, said so)
set -euo pipefail

werror=0
objdir=""
jobs=$(nproc 2>/dev/null || echo 2)
files=()
while [ $# -gt 0 ]; do
    case "$1" in
        --werror) werror=1 ;;
        -j) shift; jobs="$1" ;;
        --objdir) shift; objdir="$(realpath -m "$1")" ;;
        -j*) jobs="${1#-j}" ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) files+=("$(realpath -m "$1")") ;;
    esac
    shift
done
cd "$(dirname "$0")/.."
if [ ${#files[@]} -eq 0 ]; then
    shopt -s nullglob
    files=(csrc/cuda/*.cu)
    shopt -u nullglob
fi
if [ ${#files[@]} -eq 0 ]; then
    echo "check_cuda_compiles: no csrc/cuda/*.cu files" >&2
    exit 1
fi

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
    echo "check_cuda_compiles: nvcc not found (set NVCC or CUDA_HOME)" >&2
    exit 1
fi
PYTHON="${PYTHON:-python}"
CUOBJDUMP="${CUOBJDUMP:-$(command -v cuobjdump || true)}"
if [ -z "$CUOBJDUMP" ] && [ -x "$(dirname "$NVCC")/cuobjdump" ]; then CUOBJDUMP="$(dirname "$NVCC")/cuobjdump"; fi

# The archs as torch's build reads TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", ';' or ' ' between entries):
# SASS for each, and the PTX too for an entry ending in +PTX.
arch_list="${TORCH_CUDA_ARCH_LIST:-$(sed -n 's/^CUDA_ARCH_LIST = "\(.*\)".*/\1/p' setup.py)}"
if [ -z "$arch_list" ]; then
    echo "check_cuda_compiles: no TORCH_CUDA_ARCH_LIST and no CUDA_ARCH_LIST = \"...\" line in setup.py" >&2
    exit 1
fi
gencodes=()
sass_archs=()
ptx_archs=()
for entry in ${arch_list//;/ }; do
    if [[ ! "$entry" =~ ^([0-9]+)\.([0-9]+[a-z]?)(\+PTX)?$ ]]; then
        echo "check_cuda_compiles: cannot read arch '$entry' of TORCH_CUDA_ARCH_LIST='$arch_list'" >&2
        exit 1
    fi
    num="${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
    gencodes+=("-gencode=arch=compute_$num,code=sm_$num")
    sass_archs+=("sm_$num")
    if [ -n "${BASH_REMATCH[3]}" ]; then
        gencodes+=("-gencode=arch=compute_$num,code=compute_$num")
        ptx_archs+=("$num")
    fi
done

# Torch's include directories, the Python headers, torch's C++ ABI, and whether this torch ships
# c10/cuda/impl/cuda_cmake_macros.h (CUDA wheels do; CPU wheels ship the c10/cuda headers without
# that generated file, whose only macro, C10_CUDA_BUILD_SHARED_LIBS, matters on Windows only).
torch_info=$("$PYTHON" - <<'EOF'
import os
import sysconfig

import torch
from torch.utils import cpp_extension

for path in cpp_extension.include_paths():
    print("I", path)
print("I", sysconfig.get_paths()["include"])
print("ABI", int(torch._C._GLIBCXX_USE_CXX11_ABI))
root = cpp_extension.include_paths()[0]
print("CMAKE_MACROS", int(os.path.exists(os.path.join(root, "c10", "cuda", "impl", "cuda_cmake_macros.h"))))
print("TORCH", torch.__version__, torch.version.cuda)
# the C++ standard torch's BuildExtension compiles extensions with (what its headers need)
import inspect
print("STD", "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17")
EOF
)

includes=()
abi=""
cmake_macros=1
cxx_std=c++17
torch_desc=""
while read -r key value; do
    case "$key" in
        I) includes+=(-isystem "$value") ;;
        ABI) abi="$value" ;;
        CMAKE_MACROS) cmake_macros="$value" ;;
        TORCH) torch_desc="$value" ;;
        STD) cxx_std="$value" ;;
    esac
done <<< "$torch_info"

flags=(-c "-std=$cxx_std" -O3 --use_fast_math -lineinfo -Xcompiler -fPIC -Xcompiler -Wall
       -DGAN_FAST_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
       "-D_GLIBCXX_USE_CXX11_ABI=$abi"
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
       -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
flags+=("${gencodes[@]}")
if [ "$cmake_macros" = 0 ]; then flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE); fi
flags+=("${includes[@]}")

ptx_names=""
for num in "${ptx_archs[@]}"; do ptx_names+="${ptx_names:+ }compute_$num"; done
echo "check_cuda_compiles: $("$NVCC" --version | tail -n 1); torch $torch_desc; SASS ${sass_archs[*]}${ptx_names:+, PTX $ptx_names}; ${#files[@]} file(s), $jobs at a time"
if [ "$cmake_macros" = 0 ]; then
    echo "check_cuda_compiles: this torch has no c10/cuda/impl/cuda_cmake_macros.h (a CPU wheel): -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ -n "$objdir" ]; then mkdir -p "$objdir"; fi

object_of() {  # file index
    if [ -n "$objdir" ]; then echo "$objdir/$(basename "$1" .cu).o"; else echo "$tmp/$2.o"; fi
}

compile() {  # file index
    local src="$1" i="$2" start end rc=0 obj
    obj=$(object_of "$1" "$2")
    start=$(date +%s)
    "$NVCC" "${flags[@]}" -o "$obj" "$src" >"$tmp/$i.log" 2>&1 || rc=$?
    end=$(date +%s)
    echo "$rc $((end - start))" >"$tmp/$i.rc"
}

# Run up to $jobs compiles at once; report each file in order as it finishes.
for f in "${files[@]}"; do
    if [ ! -f "$f" ]; then
        echo "check_cuda_compiles: no such file $f" >&2
        exit 1
    fi
done
pids=()
running=0
for i in "${!files[@]}"; do
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true  # compile() always succeeds; its nvcc status is in $tmp/$i.rc
        running=$((running - 1))
    fi
    echo "checking ${files[$i]} ..."
    compile "${files[$i]}" "$i" &
    pids+=($!)
    running=$((running + 1))
done

failed=()
warned=()
no_ptx=()
for i in "${!files[@]}"; do
    wait "${pids[$i]}" || true
    read -r rc secs <"$tmp/$i.rc"
    nwarn=$(grep -ciE 'warning' "$tmp/$i.log" || true)
    if [ "$rc" != 0 ]; then
        echo "FAILED ${files[$i]} (nvcc exit $rc, ${secs}s):"
        cat "$tmp/$i.log"
        failed+=("${files[$i]}")
    else
        echo "ok     ${files[$i]} (${secs}s, $nwarn warning line(s))"
        if [ "$nwarn" != 0 ]; then
            cat "$tmp/$i.log"
            warned+=("${files[$i]}")
        fi
        if [ -n "$CUOBJDUMP" ]; then
            # one line per embedded PTX, named like "bn_forward_cuda.1.sm_90.ptx" for compute_90
            ptx_list=$("$CUOBJDUMP" --list-ptx "$(object_of "${files[$i]}" "$i")" 2>&1 || true)
            for num in "${ptx_archs[@]}"; do
                if ! grep -qF ".sm_$num.ptx" <<< "$ptx_list"; then
                    echo "NO PTX ${files[$i]}: no compute_$num PTX in the object (cuobjdump --list-ptx: ${ptx_list:-nothing})"
                    no_ptx+=("${files[$i]}")
                fi
            done
        fi
    fi
done

if [ ${#failed[@]} -ne 0 ]; then
    echo "check_cuda_compiles: ${#failed[@]} of ${#files[@]} file(s) failed to compile: ${failed[*]}" >&2
    exit 1
fi
if [ ${#no_ptx[@]} -ne 0 ]; then
    echo "check_cuda_compiles: PTX missing in ${no_ptx[*]} (TORCH_CUDA_ARCH_LIST='$arch_list')" >&2
    exit 1
fi
if [ ${#warned[@]} -ne 0 ] && [ "$werror" = 1 ]; then
    echo "check_cuda_compiles: warnings in ${warned[*]} (--werror)" >&2
    exit 1
fi
if [ ${#ptx_archs[@]} -eq 0 ]; then
    ptx_note="no arch asks for PTX"
elif [ -n "$CUOBJDUMP" ]; then
    ptx_note="each embeds the PTX of $ptx_names"
else
    ptx_note="PTX not checked: no cuobjdump (set CUOBJDUMP; pip install nvidia-cuda-cuobjdump ships one)"
fi
echo "check_cuda_compiles: all ${#files[@]} file(s) compile; $ptx_note"
