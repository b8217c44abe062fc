"""The compiled guided step against the pure-torch reference (computed in float64)."""

import subprocess
import sys

import pytest
import torch

from fastdiff import ops

SHAPES = [(1,), (97,), (1025,), (4, 3, 17, 19)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _inputs(shape, dtype, n_hist, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(), make(), make(), [make() for _ in range(n_hist)]


def _reference64(x, dc, du, hist, a, b, w, hx=0.0, hd=1.0):
    f = lambda t: None if t is None else t.double()  # noqa: E731
    return ops.guided_step_reference(f(x), f(dc), f(du), [f(h) for h in hist], a, b, w, hx, hd)


@pytest.mark.skipif(not ops.extension_available(), reason="fastdiff._C not built")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_hist", [0, 1, 3])
@pytest.mark.parametrize("guided", [False, True])
def test_cpu_kernel_matches_reference(shape, dtype, n_hist, guided, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cpu")
    x, dc, du, hist = _inputs(shape, dtype, n_hist)
    du = du if guided else None
    a, b, w, hx, hd = 0.7, [0.3, -0.2, 0.15, 0.05][: n_hist + 1], 2.5, 0.4, -0.4
    x_next, e = ops.guided_step(x, dc, du, hist, a=a, b=b, w=w, hx=hx, hd=hd)
    rx, re = _reference64(x, dc, du, hist, a, b, w, hx, hd)
    # Tolerance: twice the error of the same-dtype torch reference against float64 (the flash-attention rule).
    tx, te = ops.guided_step_reference(x, dc, du, hist, a, b, w, hx, hd)
    tol_x = 2 * (tx.double() - rx).abs().max().item() + TOL[dtype]
    tol_e = 2 * (te.double() - re).abs().max().item() + TOL[dtype]
    assert x_next.dtype == dtype and x_next.shape == x.shape
    assert (x_next.double() - rx).abs().max().item() <= tol_x
    assert (e.double() - re).abs().max().item() <= tol_e


@pytest.mark.skipif(not ops.extension_available(), reason="fastdiff._C not built")
def test_cpu_kernel_handles_non_contiguous_views(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cpu")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, 17, 19, generator=g)
    x = base[::2].transpose(2, 3)  # strided view
    dc = torch.randn(x.shape, generator=g)
    hist = [torch.randn(19, 17, generator=g).t().expand(3, 4, 17, 19).transpose(2, 3)]
    x_next, d = ops.guided_step(x, dc, None, hist, a=0.5, b=[0.25, 0.25])
    rx, _ = _reference64(x, dc, None, hist, 0.5, [0.25, 0.25], 1.0)
    assert torch.allclose(x_next.double(), rx, atol=1e-6)
    assert torch.equal(d, dc)


def test_mixed_dtypes_use_the_reference_in_float32():
    x = torch.randn(33)
    dc = torch.randn(33).to(torch.bfloat16)
    x_next, d = ops.guided_step(x, dc, None, [], a=0.5, b=[0.5])
    assert x_next.dtype == torch.float32
    assert torch.allclose(x_next, 0.5 * x + 0.5 * dc.float())


def test_reference_is_differentiable_and_dispatch_keeps_gradients():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    dc = torch.randn(10, dtype=torch.float64)
    x_next, _ = ops.guided_step(x, dc, None, [], a=0.3, b=[0.7])
    x_next.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.3))


def test_forced_backend_errors(monkeypatch):
    x = torch.randn(8)
    monkeypatch.setenv("FASTDIFF_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND='nope' is not a backend"):
        ops.guided_step(x, x, None, [], a=1.0, b=[0.0])
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FASTDIFF_BACKEND=cuda cannot run"):
        ops.guided_step(x, x, None, [], a=1.0, b=[0.0])


def test_bad_arguments_name_the_problem():
    x = torch.randn(8)
    with pytest.raises(ValueError, match="len\\(b\\) == len\\(history\\) \\+ 1"):
        ops.guided_step(x, x, None, [x], a=1.0, b=[0.0])
    with pytest.raises(ValueError, match="at most 3 history"):
        ops.guided_step(x, x, None, [x] * 4, a=1.0, b=[0.0] * 5)
    with pytest.raises(ValueError, match="d_cond has shape"):
        ops.guided_step(x, torch.randn(9), None, [], a=1.0, b=[0.0])
    with pytest.raises(TypeError, match="must be a floating tensor"):
        ops.guided_step(x, torch.ones(8, dtype=torch.long), None, [], a=1.0, b=[0.0])


def test_missing_extension_falls_back_and_says_so_once():
    code = (
        "import sys, logging; sys.modules['fastdiff._C'] = None\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "import torch, fastdiff\n"
        "assert not fastdiff.ops.extension_available()\n"
        "x = torch.randn(5)\n"
        "for _ in range(3): y, _ = fastdiff.ops.guided_step(x, x, None, [], a=0.5, b=[0.5])\n"
        "assert torch.allclose(y, x)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.count("fastdiff._C is not available") == 1
