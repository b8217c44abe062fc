"""Builds the compiled extension fastdiff._C; everything else is declared in pyproject.toml.

Build switches (environment variables):
  FASTDIFF_SKIP_EXT=1      build no extension; fastdiff then runs on its pure-torch reference.
  FASTDIFF_SKIP_CUDA=1     build only the CPU kernels even where torch has CUDA and nvcc exists.
  FASTDIFF_CUDA_ARCHS=9.0  compute capabilities for the CUDA kernels (sets TORCH_CUDA_ARCH_LIST).

The build needs the installed torch: install with `pip install --no-build-isolation .`.
"""

import os

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("FASTDIFF_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/bindings.cpp", "csrc/step_cpu.cpp"]
    # No -std: BuildExtension adds the standard the installed torch's headers need, for both compilers (C++20
    # for torch 2.13, whose headers warn under C++17; newer ones refuse it).
    cxx = ["-O3", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not _flag("FASTDIFF_SKIP_CUDA")
    if with_cuda:
        if os.environ.get("FASTDIFF_CUDA_ARCHS"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["FASTDIFF_CUDA_ARCHS"]
        ext = CUDAExtension(
            "fastdiff._C",
            sources + ["csrc/step_cuda.cu", "csrc/step_cuda_glue.cpp"],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("fastdiff._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
