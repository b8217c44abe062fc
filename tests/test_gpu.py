"""GPU checks of the step kernels: run with `pytest -m gpu` on a machine with CUDA; skipped elsewhere.

Not yet run: the sessions that wrote them had no GPU. They mirror the CPU tests in test_ops.py on CUDA tensors.
"""

import pytest
import torch

import fastdiff
from fastdiff import ops, schedules

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPE_PAIRS = [(tx, td) for tx, tds in ops.KERNEL_DTYPES.items() for td in tds]


def _backends():
    return [b for b in ("cuda", "triton") if b in ops.available_backends()]


@pytest.mark.parametrize("shape", [(1,), (97,), (1025,), (4, 3, 17, 19), (64, 3, 256, 256)], ids=str)
@pytest.mark.parametrize("tx,td", DTYPE_PAIRS, ids=str)
def test_gpu_kernels_match_reference(shape, tx, td, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda dt: torch.randn(shape, device="cuda", generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    x, dc, du, nz = make(tx), make(td), make(td), make(tx)
    hist = [make(tx) for _ in range(3)]
    kw = dict(a=0.7, b=[0.3, -0.2, 0.15, 0.05], w=2.5, hx=0.4, hd=-0.4, noise=nz, c_noise=0.35)
    f64 = lambda t: t.double()  # noqa: E731
    ref_x, ref_e = ops.guided_step_reference(f64(x), f64(dc), f64(du), [f64(h) for h in hist], 0.7,
                                             kw["b"], 2.5, 0.4, -0.4, f64(nz), 0.35)  # fmt: skip
    same_x, _ = ops.guided_step_reference(x, dc, du, hist, 0.7, kw["b"], 2.5, 0.4, -0.4, nz, 0.35)
    assert _backends(), "no GPU backend available: was fastdiff._C built with CUDA, or is triton installed?"
    for backend in _backends():
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
        got_x, got_e = ops.guided_step(x, dc, du, hist, **kw)
        tol = 2 * (same_x.double() - ref_x).abs().max().item() + torch.finfo(tx).eps * ref_x.abs().max().item()
        assert (got_x.double() - ref_x).abs().max().item() <= tol, backend
        assert torch.allclose(got_e.double(), ref_e, rtol=0, atol=tol), backend


@pytest.mark.parametrize("solver", sorted(fastdiff.SOLVERS))
def test_gpu_sampling_matches_the_cpu(gmm, solver, monkeypatch):
    x = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = schedules.karras(8, 0.002, 80.0)
    g = fastdiff.Guidance(2.0, interval=(0.3, 20.0))
    cond = {"class_labels": torch.arange(256) % 4}
    ref = fastdiff.sample(gmm, x, s, solver=solver, guidance=g, cond=cond)
    gmm_cuda = gmm.to("cuda")
    cond_cuda = {"class_labels": cond["class_labels"].cuda()}
    for backend in _backends():
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
        out = fastdiff.sample(gmm_cuda, x.cuda(), s, solver=solver, guidance=g, cond=cond_cuda)
        assert torch.allclose(out.cpu(), ref, atol=1e-10), backend


def _need(backend):
    if backend not in ops.available_backends():
        pytest.skip(f"{backend} backend not available here")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_gradients_match_the_reference(backend, monkeypatch):
    _need(backend)
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    x, dc, du, h, nz = (
        torch.randn(7, device="cuda", generator=g, dtype=torch.float64).requires_grad_() for _ in range(5)
    )
    coef = torch.tensor([0.7, 2.5, 0.4, -0.3, 0.35, 0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def f(x, dc, du, h, nz, coef):
        return ops.guided_step_coef(x, dc, du, [h], coef, noise=nz)

    assert torch.autograd.gradcheck(f, (x, dc, du, h, nz, coef))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_step_under_cuda_graph_capture_reads_device_coefficients(backend, monkeypatch):
    _need(backend)
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x, dc, du = (torch.randn(1 << 20, device="cuda") for _ in range(3))
    coef = torch.tensor([0.9, 2.0, 0.0, 1.0, 0.0, 0.1], device="cuda")
    ops.guided_step_coef(x, dc, du, [], coef)  # warm up (compiles the Triton kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = ops.guided_step_coef(x, dc, du, [], coef)
    for a, w in [(0.9, 2.0), (0.5, 3.0)]:  # new inputs and new coefficients, written in place between replays
        x.copy_(torch.randn_like(x))
        coef[0], coef[1] = a, w
        graph.replay()
        torch.cuda.synchronize()
        expected, _ = ops.guided_step_reference(x, dc, du, [], a, [0.1], w)
        assert torch.allclose(out, expected, atol=1e-6), (a, w)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("tx,td", DTYPE_PAIRS, ids=str)
def test_gpu_backward_kernels_match_reference_autograd(backend, tx, td, monkeypatch):
    _need(backend)
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(3)
    make = lambda dt: torch.randn(3, 5, 999, device="cuda", generator=g).to(dt)  # noqa: E731
    x, dc, du, h0, h1, gx, ge = make(tx), make(td), make(td), make(tx), make(tx), make(tx), make(tx)
    coef = torch.tensor([0.7, 2.5, 0.4, -0.3, 0.0, 0.3, -0.2, 0.1], device="cuda", dtype=torch.float64)
    got = ops._guided_step_backward_op(x, dc, du, [h0, h1], None, coef, gx, ge)
    ref = ops._backward_reference(*(t.double() for t in (x, dc, du)), [h0.double(), h1.double()], None, coef,
                                  gx.double(), ge.double())  # fmt: skip
    ref = [ref[0], ref[1], ref[2], *ref[3], ref[5]]
    for k, (a, b) in enumerate(zip(got, ref)):
        scale = b.abs().max().item()
        rtol = 1e-12 if tx == torch.float64 else (1e-5 if tx == torch.float32 and td == torch.float32 else 1e-2)
        assert (a.double() - b).abs().max().item() <= rtol * max(scale, 1.0), (backend, k)


def test_gpu_ld3_sigmas_kernel_matches_reference(monkeypatch):
    _need("triton")
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    xi = torch.randn(33, device="cuda", dtype=torch.float64, requires_grad=True)
    got = schedules.ld3_sigmas(xi, 0.002, 80.0)
    want = ops.ld3_sigmas_reference(xi, *torch.tensor([0.002, 80.0]).log().tolist(), True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    gs = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, xi, gs)[0], torch.autograd.grad(want, xi, gs)[0])
