"""GPU checks of the step kernels: run with `pytest -m gpu` on a machine with CUDA; skipped elsewhere.

Every test forces the backend it names and proves that backend ran (tests/_backends.py), and a GPU machine whose
build lacks a backend fails rather than skips. They mirror the CPU tests in test_ops.py on CUDA tensors, with one
tolerance per output as there.
"""

import functools

import pytest
import torch
from _backends import ran_on

import fastdiff
from fastdiff import ops, schedules

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPE_PAIRS = [(tx, td) for tx, tds in ops.KERNEL_DTYPES.items() for td in tds]
GPU_BACKENDS = ["cuda", "triton"]


def _from(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t`` itself, or its flattened view from element ``offset`` on (an address the vector path cannot use)."""
    return t.flatten()[offset:] if offset else t


def test_the_build_has_every_gpu_backend():
    assert ops.extension_available(), "fastdiff._C did not import"
    assert ops._C.with_cuda, "fastdiff._C was built without CUDA (torch without CUDA, or no nvcc at build time)"
    assert set(GPU_BACKENDS) <= set(ops.available_backends()), ops.available_backends()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (97,), (1025,), (4, 3, 17, 19), (64, 3, 256, 256)], ids=str)
@pytest.mark.parametrize("tx,td", DTYPE_PAIRS, ids=str)
def test_gpu_kernels_match_reference(backend, shape, tx, td, monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda dt: torch.randn(shape, device="cuda", generator=g, dtype=torch.float64).to(dt)  # noqa: E731
    x, dc, du, nz = make(tx), make(td), make(td), make(tx)
    hist = [make(tx) for _ in range(3)]
    kw = dict(a=0.7, b=[0.3, -0.2, 0.15, 0.05], w=2.5, hx=0.4, hd=-0.4, noise=nz, c_noise=0.35)
    args = (kw["a"], kw["b"], kw["w"], kw["hx"], kw["hd"])
    f64 = lambda t: t.double()  # noqa: E731
    ref = ops.guided_step_reference(f64(x), f64(dc), f64(du), [f64(h) for h in hist], *args, f64(nz), 0.35)
    same = ops.guided_step_reference(x, dc, du, hist, *args, nz, 0.35)  # the reference in the inputs' dtypes
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    for offset in (0, 1):  # aligned tensors (the 128-bit path), and views one element in (the unaligned path)
        if offset and x.numel() < 2:
            continue
        cut = functools.partial(_from, offset=offset)
        with ran_on(backend):
            got = ops.guided_step(cut(x), cut(dc), cut(du), [cut(h) for h in hist], **{**kw, "noise": cut(nz)})
        for out, r, s in zip(got, ref, same):  # x_next, then E: one tolerance per output
            r, s = cut(r), cut(s)
            tol = 2 * (s.double() - r).abs().max().item() + torch.finfo(tx).eps * r.abs().max().item()
            assert (out.double() - r).abs().max().item() <= tol, (backend, offset)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("solver", sorted(fastdiff.ODE_SOLVERS))
def test_gpu_sampling_matches_the_cpu(gmm, solver, backend, monkeypatch):
    x = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = schedules.karras(8, 0.002, 80.0)
    g = fastdiff.Guidance(2.0, interval=(0.3, 20.0))
    cond = {"class_labels": torch.arange(256) % 4}
    ref = fastdiff.sample(gmm, x, s, solver=solver, guidance=g, cond=cond)
    gmm_cuda = type(gmm)(gmm.means, gmm.variances.sqrt(), gmm.log_weights.exp(), gmm.classes).to("cuda")
    cond_cuda = {"class_labels": cond["class_labels"].cuda()}
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    with ran_on(backend, at_least=8):
        out = fastdiff.sample(gmm_cuda, x.cuda(), s, solver=solver, guidance=g, cond=cond_cuda)
    with ran_on(backend, at_least=8):
        device_loop = fastdiff.Sampler(gmm_cuda, solver=solver, sigmas=s, guidance=g).sample(x.cuda(), cond_cuda)
    assert torch.allclose(out.cpu(), ref, atol=1e-10)
    assert torch.allclose(device_loop.cpu(), ref, atol=1e-10)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_gradients_match_the_reference(backend, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    x, dc, du, h, nz = (
        torch.randn(7, device="cuda", generator=g, dtype=torch.float64).requires_grad_() for _ in range(5)
    )
    coef = torch.tensor([0.7, 2.5, 0.4, -0.3, 0.35, 0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def f(x, dc, du, h, nz, coef):
        return ops.guided_step_coef(x, dc, du, [h], coef, noise=nz)

    with ran_on(backend):
        assert torch.autograd.gradcheck(f, (x, dc, du, h, nz, coef))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_step_under_cuda_graph_capture_reads_device_coefficients(backend, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x, dc, du = (torch.randn(1 << 20, device="cuda") for _ in range(3))
    coef = torch.tensor([0.9, 2.0, 0.0, 1.0, 0.0, 0.1], device="cuda")
    with ran_on(backend):
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


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_host_coefficients_need_no_sync(backend, monkeypatch):
    """Host coefficients reach both kernels as launch arguments: no host-to-device copy, so no stream sync."""
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x, dc, du, h = (torch.randn(4097, device="cuda") for _ in range(4))
    with ran_on(backend, at_least=2):
        ops.guided_step(x, dc, du, [h], a=0.9, b=[0.1, 0.2], w=2.0)  # warm up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ops.guided_step(x, dc, du, [h], a=0.8, b=[0.1, 0.3], w=1.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("tx,td", DTYPE_PAIRS, ids=str)
def test_gpu_backward_kernels_match_reference_autograd(backend, tx, td, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(3)
    make = lambda dt: torch.randn(3, 5, 999, device="cuda", generator=g).to(dt)  # noqa: E731
    x, dc, du, h0, h1, gx, ge = make(tx), make(td), make(td), make(tx), make(tx), make(tx), make(tx)
    coef = torch.tensor([0.7, 2.5, 0.4, -0.3, 0.0, 0.3, -0.2, 0.1], device="cuda", dtype=torch.float64)
    with ran_on(backend):
        got = ops._guided_step_backward_op(x, dc, du, [h0, h1], None, coef, gx, ge)
    ref = ops._backward_reference(*(t.double() for t in (x, dc, du)), [h0.double(), h1.double()], None, coef,
                                  gx.double(), ge.double())  # fmt: skip
    ref = [ref[0], ref[1], ref[2], *ref[3], ref[5]]
    for k, (a, b) in enumerate(zip(got, ref)):
        scale = b.abs().max().item()
        rtol = 1e-12 if tx == torch.float64 else (1e-5 if tx == torch.float32 and td == torch.float32 else 1e-2)
        assert (a.double() - b).abs().max().item() <= rtol * max(scale, 1.0), (backend, k)


def test_gpu_ld3_sigmas_kernel_matches_reference(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    assert ops._ld3_backend(torch.empty(1, device="cuda")) == "triton"
    xi = torch.randn(33, device="cuda", dtype=torch.float64, requires_grad=True)
    got = schedules.ld3_sigmas(xi, 0.002, 80.0)
    want = ops.ld3_sigmas_reference(xi, *torch.tensor([0.002, 80.0], dtype=torch.float64).log().tolist(), True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)  # float64 ends: a float32 lo/hi misses by 1e-7
    gs = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, xi, gs)[0], torch.autograd.grad(want, xi, gs)[0])
