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

# PREFKERNELS_BUILD_CUDA: build the CUDA kernels (True), not (False), or when they can be (None).
BUILD_CUDA_CHOICES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                      "off": False, "auto": None, "": None}


def nvcc_path() -> str | None:
    """$CUDA_HOME/bin/nvcc (torch's CUDA_HOME: the env variable, else where nvcc is on PATH), None when absent."""
    path = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME is not None else None
    return path if path is not None and os.path.isfile(path) else None


def nvcc_major(nvcc: str) -> int | None:
    """CUDA major version of ``nvcc``, None when it cannot be run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.", out)
    return int(found.group(1)) if found else None


def cuda_wanted(choice: str, torch_cuda: str | None, nvcc: str | None, major) -> bool:
    """Whether to build the CUDA kernels, for PREFKERNELS_BUILD_CUDA=``choice``, torch's CUDA version
    ``torch_cuda`` (None: a CPU torch), the path of ``nvcc`` (None: not found) and ``major()``, nvcc's CUDA
    major version (called only when needed). torch refuses to build with an nvcc of another major
    version. ``auto`` then builds the CPU kernels only and says why; ``1`` stops with the reason, as
    does an unknown choice."""
    if choice.strip().lower() not in BUILD_CUDA_CHOICES:
        raise SystemExit(f"PREFKERNELS_BUILD_CUDA={choice!r}: expected 0, 1 or auto")
    wanted = BUILD_CUDA_CHOICES[choice.strip().lower()]
    if wanted is False:
        return False
    problem = None
    if torch_cuda is None:
        problem = f"torch {torch.__version__} has no CUDA"
    elif nvcc is None:
        problem = "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
    else:
        found = major()
        if found != int(torch_cuda.split(".")[0]):
            problem = (f"torch was built with CUDA {torch_cuda} but {nvcc} is CUDA "
                       f"{found if found is not None else '(unreadable)'}; install a matching CUDA toolkit "
                       "(set CUDA_HOME)")
    if problem is None:
        return True
    if wanted:
        raise SystemExit(f"PREFKERNELS_BUILD_CUDA={choice}: cannot build the CUDA kernels: {problem}")
    if torch_cuda is not None:
        print(f"prefkernels: building the CPU kernels only: {problem}", file=sys.stderr)
    return False


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
    nvcc = nvcc_path()
    if not cuda_wanted(os.environ.get("PREFKERNELS_BUILD_CUDA", "auto"), torch.version.cuda, nvcc,
                       lambda: nvcc_major(nvcc)):
        return CppExtension("prefkernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=link_args())
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # unset or empty
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    sources = cpp_sources + sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "prefkernels._C", sources,
        define_macros=[("PREFKERNELS_WITH_CUDA", None)],
        # No --use_fast_math: the kernels are memory-bound, and exact expf/log1pf/division keep
        # the loss and its gradient matching the CPU reference (csrc/bt_math.h).
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=link_args())


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
