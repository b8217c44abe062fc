"""The extension is built by `pip install` and its CUDA sources compile with nvcc where it exists."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastdiff import ops

ROOT = Path(__file__).resolve().parents[1]


def test_extension_is_built():
    assert ops.extension_available(), "fastdiff._C did not import; was the package installed with its extension?"
    assert "cpu" in ops.available_backends()


def test_extension_op_matches_reference():
    from fastdiff import _C

    g = torch.Generator().manual_seed(3)
    x, dc, du, h = (torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(4))
    x_out, e_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))  # poison
    _C.guided_step(x, dc, du, [h], 0.9, [0.05, 0.05], 1.7, 0.0, 1.0, x_out, e_out)
    rx, rd = ops.guided_step_reference(x, dc, du, [h], 0.9, [0.05, 0.05], 1.7)
    assert torch.allclose(x_out, rx, rtol=0, atol=1e-14)
    assert torch.allclose(e_out, rd, rtol=0, atol=1e-14)


def test_extension_rejects_mismatched_tensors():
    from fastdiff import _C

    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="d_cond has dtype"):
        _C.guided_step(x, x.double(), None, [], 1.0, [0.0], 1.0, 0.0, 1.0, torch.empty_like(x), None)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_with_nvcc(tmp_path):
    # The flags torch's extension build passes: no implicit half/bfloat16 conversions.
    flags = [
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-std=c++17",
        "-O3",
    ]
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        res = subprocess.run(
            ["nvcc", *flags, "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
