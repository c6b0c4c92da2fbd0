"""Builds prefkernels._C: the C++ CPU kernels, and the CUDA kernels when torch has CUDA and
nvcc is found (PREFKERNELS_BUILD_CUDA=0/1/auto; arch list from TORCH_CUDA_ARCH_LIST, default
8.0;9.0). ``auto`` also needs nvcc's CUDA major version to be torch's (torch refuses to build
otherwise); when it is not, it says so and builds the CPU kernels only.

Build against the torch you run with: ``pip install -e ".[test]" --no-build-isolation``.
An isolated build would compile against a different torch wheel (and may download a multi-GB
CUDA build), and the extension's ABI must match the installed torch exactly.
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import setup

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def nvcc_major() -> int | None:
    """CUDA major version of $CUDA_HOME/bin/nvcc, None when it cannot be run."""
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.", out)
    return int(found.group(1)) if found else None


def want_cuda() -> bool:
    choice = os.environ.get("PREFKERNELS_BUILD_CUDA", "auto").lower()
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if choice in ("0", "false", "no"):
        return False
    if choice in ("1", "true", "yes"):
        if not available:
            raise RuntimeError("PREFKERNELS_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    if not available:
        return False
    torch_major, nvcc = int(torch.version.cuda.split(".")[0]), nvcc_major()
    if nvcc != torch_major:
        print(f"prefkernels: building the CPU kernels only: torch was built with CUDA {torch.version.cuda} but "
              f"{os.path.join(CUDA_HOME, 'bin', 'nvcc')} is CUDA {nvcc if nvcc is not None else '(unreadable)'}; "
              "install a matching CUDA toolkit (set CUDA_HOME) or PREFKERNELS_BUILD_CUDA=1 to insist",
              file=sys.stderr)
        return False
    return True


def link_args() -> list[str]:
    """OpenMP, and on Linux the shared libstdc++ named before the compiler driver's own -lstdc++.
    A toolchain that links libstdc++ statically into a shared object (the H200 image's g++ 13 did:
    every torch extension built there held a private copy) leaves that copy's iostreams
    uninitialized: c10::str("got ", 3) in an error message segfaulted there and dropped the number
    with g++ 12. Linked first, the shared library defines every libstdc++ symbol the extension
    needs, so no archive member is pulled in and libtorch and the extension share one libstdc++."""
    return ["-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else [])


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if not want_cuda():
        return CppExtension("prefkernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=link_args())
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = cpp_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "prefkernels._C", sources,
        define_macros=[("PREFKERNELS_WITH_CUDA", None)],
        # No --use_fast_math: the kernels are memory-bound, and exact expf/log1pf/division keep
        # the loss and its gradient matching the CPU reference (csrc/bt_math.h).
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=link_args())


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
