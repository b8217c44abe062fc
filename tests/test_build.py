"""The extension is built by `pip install`, and the CUDA sources compile with nvcc where it exists."""

import os
import shutil
import sysconfig
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp

from fastdiff import ops

ROOT = Path(__file__).resolve().parents[1]
# The flags torch's extension build passes to nvcc: no implicit half/bfloat16 conversions.
NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "-std=c++17", "-O3",
]  # fmt: skip


def test_extension_is_built():
    assert ops.extension_available(), "fastdiff._C did not import; was the package installed with its extension?"
    assert "cpu" in ops.available_backends()


def test_extension_op_matches_reference():
    from fastdiff import _C

    g = torch.Generator().manual_seed(3)
    x, dc, du, h, nz = (torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(5))
    x_out, e_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))  # poison
    _C.guided_step(x, dc, du, [h], nz, [0.9, 1.7, 0.0, 1.0, 0.2, 0.05, 0.05], x_out, e_out)
    rx, rd = ops.guided_step_reference(x, dc, du, [h], 0.9, [0.05, 0.05], 1.7, noise=nz, c_noise=0.2)
    assert torch.allclose(x_out, rx, rtol=0, atol=1e-14)
    assert torch.allclose(e_out, rd, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda C, x: C.guided_step(x, x.double(), None, [], None, [1, 1, 0, 1, 0, 0], x, None), "unsupported dtypes"),
        (lambda C, x: C.guided_step(x, x, None, [x.double()], None, [1] * 7, x, None), "history has dtype"),
        (lambda C, x: C.guided_step(x, x[:5], None, [], None, [1] * 6, x, None), "d_cond has 5 elements"),
        (lambda C, x: C.guided_step(x, x, None, [], None, [1] * 5, x, None), "need 6 \\+ len\\(history\\)"),
        (lambda C, x: C.guided_step(x, x, None, [], None, [float("nan")] * 6, x, None), "must be finite"),
    ],
)
def test_extension_checks_its_inputs(call, match):
    from fastdiff import _C

    with pytest.raises(RuntimeError, match=match):
        call(_C, torch.randn(10))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile_with_nvcc(tmp_path, arch):
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        cmd = ["nvcc", *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(cu)]
        res = subprocess.run([*cmd, "-o", str(tmp_path / (cu.stem + ".o"))], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_glue_compiles(tmp_path):
    """The torch side of the CUDA path (compiled only with a CUDA torch) at least parses against torch's headers.

    A CPU torch wheel ships the c10/cuda headers but not the CMake-generated macro header; an empty one serves.
    """
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    cuda_include = found[0] if found else None
    if cuda_include is None:
        pytest.skip("no CUDA toolkit headers found (set CUDA_HOME)")
    python_include = sysconfig.get_paths()["include"]
    includes = [tmp_path, *cpp.include_paths(), cuda_include, python_include, ROOT / "csrc"]
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C"]
    cmd += [f"-I{p}" for p in includes]
    for src in ("step_cuda_glue.cpp", "bindings.cpp"):
        res = subprocess.run([*cmd, str(ROOT / "csrc" / src)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
