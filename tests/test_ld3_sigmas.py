"""LD3's timestep map: the Triton kernel (forward and backward) against the torch reference, and its op."""

import math

import pytest
import torch

from fastdiff import ops, schedules, solvers

BACKENDS = ["torch"] + (["triton"] if "triton" in ops.available_backends() else [])
LOG_RANGE = (math.log(0.002), math.log(80.0))


def _xi(n, dtype=torch.float64, seed=0):
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 5, 17, 130])
@pytest.mark.parametrize("logsnr", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_the_float64_reference(monkeypatch, backend, n, logsnr, dtype):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    lo, hi = LOG_RANGE if logsnr else (0.002, 80.0)
    xi = _xi(n, dtype)
    want = ops.ld3_sigmas_reference(xi.double(), lo, hi, logsnr)
    rel = lambda s: ((s.double() - want) / want).abs().max().item()  # noqa: E731
    got = ops.ld3_sigmas(xi, lo, hi, logsnr)
    assert got.dtype == dtype and got.shape == (n,)
    # Twice the same-dtype reference's error, floored at 16 ulp per summed term: in float64 the reference is
    # the oracle itself, while the kernel sums in another order (a suffix sum, not cumsum-then-flip), and the
    # log-space map multiplies an error in u by log(sigma_max / sigma_min) ~ 10.6.
    assert rel(got) <= 2 * rel(ops.ld3_sigmas_reference(xi, lo, hi, logsnr)) + 16 * n * torch.finfo(dtype).eps
    assert got[0].item() == pytest.approx(80.0, rel=4 * torch.finfo(dtype).eps)
    assert got[-1].item() == pytest.approx(0.002, rel=1e3 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("logsnr", [True, False])
def test_backward_passes_gradcheck(monkeypatch, backend, logsnr):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    lo, hi = LOG_RANGE if logsnr else (0.002, 80.0)
    xi = _xi(11).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ops.ld3_sigmas(v, lo, hi, logsnr), (xi,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_reference_autograd(monkeypatch, backend):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    xi, g = _xi(40).requires_grad_(), _xi(40, seed=1)
    (got,) = torch.autograd.grad(ops.ld3_sigmas(xi, *LOG_RANGE, True), xi, g)
    (want,) = torch.autograd.grad(ops.ld3_sigmas_reference(xi, *LOG_RANGE, True), xi, g)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_opcheck():
    xi = _xi(9).requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.ld3_sigmas.default, (xi, *LOG_RANGE, True))
    torch.library.opcheck(
        torch.ops.fastdiff.ld3_sigmas_backward.default, (xi.detach(), _xi(9, seed=2), 0.1, 5.0, False)
    )


def test_compiles_without_graph_breaks():
    xi = _xi(9)
    f = torch.compile(lambda v: schedules.ld3_sigmas(v, 0.002, 80.0, append_zero=True) * 2, fullgraph=True)
    torch.testing.assert_close(f(xi), schedules.ld3_sigmas(xi, 0.002, 80.0, append_zero=True) * 2)


def test_forced_triton_without_triton_raises(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("triton runs CUDA tensors here")
    with pytest.raises(RuntimeError, match="FASTDIFF_BACKEND=triton cannot run ld3_sigmas"):
        ops.ld3_sigmas(_xi(4), *LOG_RANGE, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_learned_schedule_to_coefficients_is_differentiable(monkeypatch, backend):
    # xi -> sigmas -> every step's packed coefficients, the device-side path LD3 trains through.
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    solver = solvers.get("unipc", order=3)
    weights = torch.randn(6, 2, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def loss(v):
        table, _ = solver.coefficient_tensor(schedules.ld3_sigmas(v, 0.05, 20.0, append_zero=True), final_zero=True)
        return (table * weights).sum()

    assert torch.autograd.gradcheck(loss, (_xi(6).requires_grad_(),))
