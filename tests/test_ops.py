"""Every backend of the guided step against the pure-torch reference computed in float64."""

import re
import subprocess
import sys

import pytest
import torch
from _backends import ran_on

import fastdiff
from fastdiff import ops, schedules

SHAPES = [(1,), (97,), (1025,), (4, 3, 17, 19)]
DTYPE_PAIRS = [(tx, td) for tx, tds in ops.KERNEL_DTYPES.items() for td in tds]
KERNEL_BACKENDS = [b for b in ("cpu", "triton") if b in ops.available_backends()]


def _make(shape, dtype, g):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)


def _case(shape, tx, td, full, seed=0):
    """Inputs of one call: the full form (guidance, 3 history entries, noise, iPNDM-style E) or the minimal one."""
    g = torch.Generator().manual_seed(seed)
    x, dc = _make(shape, tx, g), _make(shape, td, g)
    if not full:
        return dict(x=x, d_cond=dc, d_uncond=None, history=[], noise=None), dict(a=0.7, b=[0.3])
    return (
        dict(x=x, d_cond=dc, d_uncond=_make(shape, td, g), history=[_make(shape, tx, g) for _ in range(3)],
             noise=_make(shape, tx, g)),
        dict(a=0.7, b=[0.3, -0.2, 0.15, 0.05], w=2.5, hx=0.4, hd=-0.4, c_noise=0.35),
    )  # fmt: skip


def _reference(t, c, dtype=None):
    cast = (lambda v: None if v is None else v.to(dtype)) if dtype else (lambda v: v)
    return ops.guided_step_reference(
        cast(t["x"]), cast(t["d_cond"]), cast(t["d_uncond"]), [cast(h) for h in t["history"]],
        c["a"], c["b"], c.get("w", 1.0), c.get("hx", 0.0), c.get("hd", 1.0), cast(t["noise"]), c.get("c_noise", 0.0),
    )  # fmt: skip


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tx,td", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("full", [False, True], ids=["minimal", "full"])
def test_kernel_matches_reference(backend, shape, tx, td, full, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    t, c = _case(shape, tx, td, full)
    with ran_on(backend):
        x_next, e = ops.guided_step(**t, **c)
    ref_x, ref_e = _reference(t, c, torch.float64)
    same_x, same_e = _reference(t, c)  # the reference in the inputs' own dtypes
    assert x_next.dtype == tx and e.dtype == tx and x_next.shape == t["x"].shape
    for got, ref, same in [(x_next, ref_x, same_x), (e, ref_e, same_e)]:
        # Twice the error of the same-dtype reference (flash-attention's rule), plus one rounding of the output.
        tol = 2 * (same.double() - ref).abs().max().item() + torch.finfo(tx).eps * ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernels_handle_non_contiguous_views(backend, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 17, 19, generator=g)[::2].transpose(2, 3)  # strided view
    dc = torch.randn(x.shape, generator=g)
    hist = [torch.randn(19, 17, generator=g).t().expand(3, 4, 17, 19).transpose(2, 3)]
    x_next, d = ops.guided_step(x, dc, None, hist, a=0.5, b=[0.25, 0.25])
    ref, _ = ops.guided_step_reference(x.double(), dc.double(), None, [hist[0].double()], 0.5, [0.25, 0.25])
    assert torch.allclose(x_next.double(), ref, atol=1e-6)
    assert torch.equal(d, dc)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("solver", sorted(fastdiff.SOLVERS))
def test_sampling_is_the_same_on_every_backend(gmm, backend, solver, monkeypatch):
    x = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = schedules.karras(6, 0.002, 80.0)
    cond = {"class_labels": torch.arange(16) % 4}
    g = fastdiff.Guidance(2.0, interval=(0.3, 20.0))
    seeded = lambda: torch.Generator().manual_seed(3)  # noqa: E731  (the same noise for the stochastic solvers)
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    ref = fastdiff.sample(gmm, x, s, solver=solver, guidance=g, cond=cond, generator=seeded())
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    out = fastdiff.sample(gmm, x, s, solver=solver, guidance=g, cond=cond, generator=seeded())
    assert torch.allclose(out, ref, atol=1e-12)


def test_unsupported_dtype_mixes_use_the_reference():
    x = torch.randn(33, dtype=torch.float16)
    dc = torch.randn(33).to(torch.bfloat16)
    x_next, _ = ops.guided_step(x, dc, None, [], a=0.5, b=[0.5])
    assert x_next.dtype == torch.float16
    assert torch.allclose(x_next.float(), 0.5 * x.float() + 0.5 * dc.float(), atol=1e-3)


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
    with pytest.raises(RuntimeError, match="FASTDIFF_BACKEND=cuda cannot run this call: the cuda backend takes"):
        ops.guided_step(x, x, None, [], a=1.0, b=[0.0])
    monkeypatch.setenv("FASTDIFF_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match="the kernels take"):
        ops.guided_step(x.half(), x.bfloat16(), None, [], a=1.0, b=[0.0])
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
        ops.guided_step(x, x, None, [], a=1.0, b=[0.0])


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_bad_arguments_name_the_problem(backend, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x = torch.randn(8)
    with pytest.raises(ValueError, match="len\\(b\\) == len\\(history\\) \\+ 1"):
        ops.guided_step(x, x, None, [x], a=1.0, b=[0.0])
    with pytest.raises(ValueError, match="at most 3 history"):
        ops.guided_step(x, x, None, [x] * 4, a=1.0, b=[0.0] * 5)
    with pytest.raises(ValueError, match="d_cond has shape"):
        ops.guided_step(x, torch.randn(9), None, [], a=1.0, b=[0.0])
    with pytest.raises(ValueError, match="noise has shape"):
        ops.guided_step(x, x, None, [], a=1.0, b=[0.0], noise=torch.randn(7))
    with pytest.raises(TypeError, match="must be a floating tensor"):
        ops.guided_step(x, torch.ones(8, dtype=torch.long), None, [], a=1.0, b=[0.0])
    with pytest.raises(ValueError, match="coefficients must be finite"):
        ops.guided_step(x, x, None, [], a=float("nan"), b=[0.0])
    with pytest.raises(ValueError, match="x is empty"):
        ops.guided_step(x[:0], x[:0], None, [], a=1.0, b=[0.0])


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


def _grad_inputs(dtype=torch.float64, n=7, seed=4):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(n, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    x, dc, du, h0, h1, nz = (make() for _ in range(6))
    coef = torch.tensor([0.7, 2.5, 0.4, -0.3, 0.35, 0.3, -0.2, 0.15], dtype=torch.float64, requires_grad=True)
    return x, dc, du, [h0, h1], nz, coef


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_gradcheck_every_input_including_coefficients(backend, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x, dc, du, (h0, h1), nz, coef = _grad_inputs()

    def f(x, dc, du, h0, h1, nz, coef):
        return ops.guided_step_coef(x, dc, du, [h0, h1], coef, noise=nz)

    assert torch.autograd.gradcheck(f, (x, dc, du, h0, h1, nz, coef))


def test_backward_matches_autograd_through_the_reference():
    x, dc, du, hist, nz, coef = _grad_inputs(torch.float32, n=50)
    r1, r2 = torch.randn(50), torch.randn(50)
    xo, e = ops.guided_step_coef(x, dc, du, hist, coef, noise=nz)
    grads = torch.autograd.grad((xo * r1).sum() + (e * r2).sum(), [x, dc, du, *hist, nz, coef])
    a, w, hx, hd, c_noise, *b = coef.unbind()
    rx, re = ops.guided_step_reference(x, dc, du, hist, a, b, w, hx, hd, nz, c_noise)
    expected = torch.autograd.grad((rx * r1).sum() + (re * r2).sum(), [x, dc, du, *hist, nz, coef])
    for got, want in zip(grads, expected):
        assert torch.allclose(got.double(), want.double(), atol=1e-4)


def test_scalar_api_keeps_gradients_on_kernel_backends(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cpu" if "cpu" in KERNEL_BACKENDS else "torch")
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    dc = torch.randn(10, dtype=torch.float64, requires_grad=True)
    x_next, _ = ops.guided_step(x, dc, None, [], a=0.3, b=[0.7])
    x_next.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.3)) and torch.allclose(dc.grad, torch.full_like(dc, 0.7))


def test_opcheck():
    x, dc, du, hist, nz, coef = _grad_inputs(torch.float32, n=33)
    torch.library.opcheck(torch.ops.fastdiff.guided_step.default, (x, dc, du, hist, nz, coef))
    torch.library.opcheck(torch.ops.fastdiff.guided_step.default, (x, dc, None, [], None, coef[:6]))


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_opcheck_with_channels_last_inputs(backend, monkeypatch):
    """The fake kernels give the strides every backend returns (contiguous), also for a channels_last x, where
    empty_like would keep the input's strides and opcheck would report a stride mismatch."""
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator().manual_seed(8)
    make = lambda: torch.randn(2, 3, 5, 7, generator=g).to(memory_format=torch.channels_last).requires_grad_()  # noqa: E731
    x, dc, du, h = make(), make(), make(), make()
    coef = torch.tensor([0.7, 2.5, 0.4, -0.3, 0.0, 0.3, -0.2], dtype=torch.float64, requires_grad=True)
    with ran_on(backend):
        out = torch.ops.fastdiff.guided_step(x, dc, du, [h], None, coef)
    assert all(t.is_contiguous() for t in out)
    torch.library.opcheck(torch.ops.fastdiff.guided_step.default, (x, dc, du, [h], None, coef))
    g_x, g_e = torch.randn_like(x), torch.randn_like(x)
    plain = [t.detach() for t in (x, dc, du, h, coef)]  # the backward op has no backward of its own
    args = (*plain[:3], [plain[3]], None, plain[4], g_x, g_e)
    torch.library.opcheck(torch.ops.fastdiff.guided_step_backward.default, args)


def test_torch_compile_fullgraph_runs_through_the_op():
    def step(x, dc, du, h):
        return ops.guided_step(x, dc, du, [h], a=0.5, b=[0.4, 0.1], w=2.0)

    args = [torch.randn(4, 3, 17, 19) for _ in range(4)]
    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(*args), step(*args)):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_nan_coefficient_tensor_is_refused(backend, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x = torch.randn(8)
    coef = torch.tensor([1.0, float("nan"), 0.0, 1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="coefficients must be finite"):
        ops.guided_step_coef(x, x, x, [], coef)
    with pytest.raises(ValueError, match="need len\\(b\\) == len\\(history\\) \\+ 1"):
        ops.guided_step_coef(x, x, None, [], coef[:5])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("tx,td", DTYPE_PAIRS, ids=str)
def test_backward_kernels_match_the_reference(backend, tx, td, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    t, c = _case((4, 3, 17, 19), tx, td, full=True, seed=5)
    g = torch.Generator().manual_seed(6)
    g_x, g_e = (torch.randn(t["x"].shape, generator=g, dtype=torch.float64).to(tx) for _ in range(2))
    coef = torch.tensor([c["a"], c["w"], c["hx"], c["hd"], c["c_noise"], *c["b"]], dtype=torch.float64)
    args = (t["x"], t["d_cond"], t["d_uncond"], t["history"], t["noise"], coef, g_x, g_e)
    with ran_on(backend):
        got = torch.ops.fastdiff.guided_step_backward(*args)
    monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    same = torch.ops.fastdiff.guided_step_backward(*args)
    f64 = [None if v is None else v.double() for v in (t["x"], t["d_cond"], t["d_uncond"], t["noise"])]
    ref = torch.ops.fastdiff.guided_step_backward(
        f64[0], f64[1], f64[2], [h.double() for h in t["history"]], f64[3], coef, g_x.double(), g_e.double()
    )
    assert len(got) == len(ref) == 2 + 1 + 3 + 1 + 1
    n = t["x"].numel()
    for k, (gk, sk, rk) in enumerate(zip(got, same, ref)):
        assert gk.dtype == sk.dtype, k
        tol = 2 * (sk.double() - rk).abs().max().item() + 4 * torch.finfo(sk.dtype).eps * rk.abs().max().item()
        if k == len(got) - 1:  # coefficient gradients are sums of n products: the worst-case bound n * eps
            tol += n * torch.finfo(torch.float64 if tx == torch.float64 else torch.float32).eps * rk.abs().max().item()
        assert (gk.double() - rk).abs().max().item() <= tol, (k, backend)


@pytest.mark.skipif(not ops.extension_available(), reason="fastdiff._C not built")
def test_extension_takes_coefficients_as_a_list_or_a_tensor():
    t, c = _case((4, 3, 17, 19), torch.float32, torch.float32, full=True)
    coef = [c["a"], c["w"], c["hx"], c["hd"], c["c_noise"], *c["b"]]
    args = (t["x"], t["d_cond"], t["d_uncond"], t["history"], t["noise"])
    outs = []
    for form in (coef, torch.tensor(coef, dtype=torch.float64), torch.tensor(coef, dtype=torch.float32)):
        x_out, e_out = torch.full_like(t["x"], float("nan")), torch.full_like(t["x"], float("nan"))
        ops._C.guided_step(*args, form, x_out, e_out)
        outs.append(x_out)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])  # float32 coefficients round differently, nothing else
    with pytest.raises(RuntimeError, match="coefficients must be finite"):
        ops._C.guided_step(*args, torch.tensor(coef[:-1] + [float("nan")]), x_out, e_out)
    with pytest.raises(RuntimeError, match="coef must be a 1-D float tensor"):
        ops._C.guided_step(*args, torch.tensor([coef]), x_out, e_out)
    with pytest.raises(RuntimeError, match="need 6 \\+ len\\(history\\) coefficients"):
        ops._C.guided_step(*args, torch.tensor(coef[:-1]), x_out, e_out)


def test_triton_takes_host_coefficients_as_launch_arguments(monkeypatch):
    """Host coefficients reach the Triton kernel as scalar arguments, as they reach the CUDA kernel: a tensor made
    from them on a GPU would be a pageable host-to-device copy, a stream sync that a CUDA graph cannot capture."""
    assert "triton" in KERNEL_BACKENDS
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    kernels, seen = ops._triton_kernels(), []
    real = kernels._guided_step_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((kwargs["COEF_PTR"], args[8:17]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "_guided_step_kernel", Spy())
    x = torch.randn(100)
    ops.guided_step(x, x, x, [x], a=0.9, b=[0.5, 0.25], w=2.0)
    ops.guided_step_coef(x, x, None, [], torch.tensor([0.5, 1.0, 0.0, 1.0, 0.0, 0.5]))  # a CPU tensor: host values
    assert [flag for flag, _ in seen] == [False, False]
    assert seen[0][1] == (0.9, 2.0, 0.0, 1.0, 0.0, 0.5, 0.25, 0.0, 0.0)  # a, w, hx, hd, c_noise, b0..b3


# ------------------------------------------------------------------------------ issue 18: robustness of the op


def _coef(n_history, dtype=torch.float64):
    return torch.tensor([0.7, 2.5, 0.4, -0.3, 0.35, 0.3, -0.2, 0.15, 0.05][: 6 + n_history], dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_registered_op_checks_its_arguments(backend, monkeypatch):
    """``torch.ops.fastdiff.guided_step`` is an entry point of its own: on Triton a short input was read out of
    bounds (garbage, or a segfault at 30M elements), on torch a 1-element d_cond broadcast and a coefficient
    vector of the wrong length dropped terms."""
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator().manual_seed(18)
    x, one = torch.randn(4097, generator=g), torch.randn(1, generator=g)
    op = torch.ops.fastdiff.guided_step
    with pytest.raises(ValueError, match=r"d_cond has shape \(1,\) but x has \(4097,\)"):
        op(x, one, None, [], None, _coef(0))
    with pytest.raises(ValueError, match=r"d_uncond has shape \(1,\)"):
        op(x, x, one, [], None, _coef(0))
    with pytest.raises(ValueError, match=r"noise has shape \(1,\)"):
        op(x, x, None, [], one, _coef(0))
    with pytest.raises(ValueError, match=r"history\[0\] has shape \(2048,\) but x has \(4097,\)"):
        op(x, x, None, [x[:2048]], None, _coef(1))
    for n_history, coef in [(1, _coef(0)), (0, _coef(1)), (2, _coef(1))]:  # too short, too long
        with pytest.raises(ValueError, match=r"need len\(b\) == len\(history\) \+ 1"):
            op(x, x, None, [x] * n_history, None, coef)
    with pytest.raises(ValueError, match="at most 3 history"):
        op(x, x, None, [x] * 4, None, torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="coef must be a 1-D float tensor"):
        op(x, x, None, [], None, _coef(0)[None])
    bw = torch.ops.fastdiff.guided_step_backward
    for g_x, g_e, name in [(one, x, "g_x"), (x, one, "g_e"), (x, x[:-1], "g_e")]:
        with pytest.raises(ValueError, match=rf"{name} has shape \({g_x.numel() if name == 'g_x' else g_e.numel()},\)"):
            bw(x, x, None, [], None, _coef(0), g_x, g_e)
    with pytest.raises(ValueError, match=r"need len\(b\) == len\(history\) \+ 1"):
        bw(x, x, None, [x], None, _coef(0), x, x)
    with pytest.raises(TypeError, match="g_x must be a floating tensor"):
        bw(x, x, None, [], None, _coef(0), x.int(), x)


def test_registered_op_checks_under_the_fake_kernel():
    """A call that mixes meta and CPU tensors goes to the fake kernel: it returned meta tensors for CPU inputs."""
    x = torch.randn(8)
    meta = torch.empty(8, device="meta")
    with pytest.raises(ValueError, match="d_cond is on meta but x is on cpu"):
        torch.ops.fastdiff.guided_step(x, meta, None, [], None, _coef(0))
    with pytest.raises(ValueError, match="coef is on meta but x is on cpu"):
        torch.ops.fastdiff.guided_step(x, x, None, [], None, _coef(0).to("meta"))
    with pytest.raises(ValueError, match="g_e is on meta but x is on cpu"):
        torch.ops.fastdiff.guided_step_backward(x, x, None, [], None, _coef(0), x, meta)
    with pytest.raises(ValueError, match=r"d_cond has shape \(1,\)"):
        torch.ops.fastdiff.guided_step(meta, meta[:1], None, [], None, _coef(0).to("meta"))
    x_out, e = torch.ops.fastdiff.guided_step(meta, meta, None, [], None, _coef(0).to("meta"))
    assert x_out.device.type == e.device.type == "meta" and x_out.shape == (8,)


def test_compiled_op_checks_its_arguments():
    step = torch.compile(
        lambda x, dc, coef: torch.ops.fastdiff.guided_step(x, dc, None, [], None, coef), fullgraph=True
    )
    x = torch.randn(4, 5)
    torch.testing.assert_close(step(x, x, _coef(0))[0], ops.guided_step(x, x, a=0.7, b=[0.3])[0])
    with pytest.raises(Exception, match=r"d_cond has shape \(1,\) but x has \(4, 5\)"):
        step(x, torch.randn(1), _coef(0))


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="triton cannot run here")
def test_triton_launchers_check_before_launching(monkeypatch):
    """The launchers are called only from fastdiff.ops, but do not trust it: a bad call raises, nothing launches."""
    kernels = ops._triton_kernels()
    launched = []

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    monkeypatch.setattr(kernels, "_guided_step_kernel", Spy())
    monkeypatch.setattr(kernels, "_guided_step_backward_kernel", Spy())
    g = torch.Generator().manual_seed(3)
    x, one = torch.randn(4097, generator=g), torch.randn(1, generator=g)
    out, e = torch.empty_like(x), torch.empty_like(x)
    host = lambda k: _coef(k).tolist()  # noqa: E731
    bad = [
        ((x, one, None, [], None, host(0), out, e), ValueError, r"d_cond has shape \(1,\)"),
        ((x, x, None, [x[:2048]], None, host(1), out, e), ValueError, r"history\[0\] has shape \(2048,\)"),
        ((x, x, None, [x], None, host(0), out, e), ValueError, r"need len\(b\)"),
        ((x, x, None, [x], None, _coef(0).float(), out, e), ValueError, r"need len\(b\)"),
        ((x, x, None, [x] * 4, None, [0.0] * 10, out, e), ValueError, "at most 3 history"),
        ((x, x, None, [], None, host(0), out[:1], e), ValueError, "x_out must be a contiguous"),
        ((x, x, None, [], None, host(0), out, x), ValueError, "e_out overlaps x"),
        ((x, x, None, [], None, host(0), out, out), ValueError, "e_out overlaps x_out"),
        ((x, x.double(), None, [], None, host(0), out, e), TypeError, "the kernels take"),
        ((x, x, None, [x.half()], None, host(1), out, e), TypeError, "the kernels take"),
        ((x.int(), x, None, [], None, host(0), out, e), TypeError, "x must be a floating tensor"),
        ((x[::2], x[::2], None, [], None, host(0), out[:2049], e[:2049]), ValueError, "x must be contiguous"),
        ((x, x, None, [], None, [1e300, 1, 0, 1, 0, 1], out, e), ValueError, "fit in float32"),
        ((x, x, None, [], None, [float("nan"), 1, 0, 1, 0, 1], out, e), ValueError, "must be finite"),
        ((x, x, None, [], None, _coef(0).to("meta"), out, e), ValueError, "coef is on meta"),
    ]
    for args, error, message in bad:
        with pytest.raises(error, match=message):
            kernels.guided_step(*args)
    for g_x, g_e, message in [(one, x, r"g_x has shape \(1,\)"), (x, one, r"g_e has shape \(1,\)"),
                              (x, x.double(), "the kernels take")]:  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=message):
            kernels.guided_step_backward(x, x, None, [], None, host(0), g_x, g_e)
    assert launched == []
    kernels.guided_step(x, x, None, [], None, host(0), out, e)
    assert len(launched) == 1


@pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="triton cannot run here")
def test_ld3_triton_launchers_check_before_launching():
    kernels = ops._triton_kernels("ld3_sigmas")
    xi = torch.randn(9, dtype=torch.float64)
    bad_calls = [
        (xi[None], ValueError, r"xi must be a 1-D .* \(1, 9\)"),
        (xi[:1], ValueError, "at least 2"),
        (xi[::2], ValueError, "contiguous"),
        (xi.long(), TypeError, "floating"),
    ]
    for bad, error, message in bad_calls:
        with pytest.raises(error, match=message):
            kernels.ld3_sigmas(bad, 0.1, 5.0, False)
    with pytest.raises(ValueError, match=r"grad_sigmas has shape \(1,\) but xi has \(9,\)"):
        kernels.ld3_sigmas_backward(xi, xi[:1], 0.1, 5.0, False)
    with pytest.raises(ValueError, match=r"grad_sigmas has shape \(1,\) but xi has \(9,\)"):
        torch.ops.fastdiff.ld3_sigmas_backward(xi, xi[:1], 0.1, 5.0, False)
    with pytest.raises(ValueError, match="xi must be a 1-D"):
        torch.ops.fastdiff.ld3_sigmas(xi[None], 0.1, 5.0, False)


@pytest.mark.skipif(not ops.extension_available(), reason="fastdiff._C not built")
def test_extension_checks_the_backward_and_every_coefficient():
    x, one = torch.randn(4097), torch.randn(1)
    out, e = torch.empty_like(x), torch.empty_like(x)
    bw = ops._C.guided_step_backward
    bad_grads = [
        (one, x, "g_x has 1 elements"),
        (x, one, "g_e has 1 elements"),
        (x, x.double(), "g_e has dtype Double"),
        (x[::2], x[::2], "g_x has 2049 elements"),
    ]
    for g_x, g_e, message in bad_grads:
        with pytest.raises(RuntimeError, match=message):
            bw(x, x, None, [], None, _coef(0), g_x, g_e)
    with pytest.raises(RuntimeError, match=r"need 6 \+ len\(history\) coefficients, got 6 for 1"):
        bw(x, x, None, [x], None, _coef(0), x, x)
    with pytest.raises(RuntimeError, match=r"need 6 \+ len\(history\) coefficients, got 8 for 1"):
        ops._C.guided_step(x, x, None, [x], None, [0.5] * 7 + [0.1], out, e)
    for state in (torch.float32, torch.float16, torch.bfloat16):
        xs = x.to(state)
        with pytest.raises(RuntimeError, match="coefficients must fit in float32"):
            ops._C.guided_step(xs, xs, None, [], None, [1e300, 1, 0, 1, 0, 1], torch.empty_like(xs), None)
        with pytest.raises(RuntimeError, match="coefficients must fit in float32"):
            bw(xs, xs, None, [], None, torch.tensor([1, 1, 0, 1, 0, -1e39], dtype=torch.float64), xs, xs)
    xd = x.double()
    ops._C.guided_step(xd, xd, None, [], None, [1e300, 1, 0, 1, 0, 1], torch.empty_like(xd), None)  # float64: fine
    meta = torch.empty(8, device="meta")
    with pytest.raises(RuntimeError, match="the kernels take CPU or CUDA tensors"):
        ops._C.guided_step(meta, meta, None, [], None, [0.5, 1, 0, 1, 0, 0.5], torch.empty_like(meta), None)


ENTRY_POINTS = ["guided_step", "guided_step_coef", "loop_step", "loop_step_tensor", "op"]


def _call(entry, x, d_cond, d_uncond=None, history=(), noise=None, a=0.7, b=(0.3,), w=1.0, hx=0.0, hd=1.0,
          c_noise=0.0):  # fmt: skip
    """One step through the named entry point."""
    coef = [a, w, hx, hd, c_noise, *b]
    if entry == "guided_step":
        return ops.guided_step(x, d_cond, d_uncond, list(history), a=a, b=list(b), w=w, hx=hx, hd=hd, noise=noise,
                               c_noise=c_noise)  # fmt: skip
    if entry == "guided_step_coef":
        return ops.guided_step_coef(x, d_cond, d_uncond, list(history), torch.tensor(coef, dtype=torch.float64), noise)
    if entry == "loop_step":
        return ops.loop_step(x, d_cond, d_uncond, list(history), coef, noise)
    if entry == "loop_step_tensor":
        return ops.loop_step(x, d_cond, d_uncond, list(history), torch.tensor(coef, dtype=torch.float64), noise)
    return torch.ops.fastdiff.guided_step(x, d_cond, d_uncond, list(history), noise,
                                          torch.tensor(coef, dtype=torch.float64))  # fmt: skip


def _shares_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# A float32 state with float64 model outputs runs on the reference, whatever the backend (a forced kernel refuses it).
ALIAS_CASES = [(b, torch.float32) for b in [None, "torch", *KERNEL_BACKENDS]] + [(None, torch.float64)]


@pytest.mark.parametrize("backend,td", ALIAS_CASES, ids=str)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_entry_point_returns_an_alias_of_an_input(backend, td, entry, monkeypatch):
    """The reference returned d_cond itself as E = D: a sampler's history then aliased the model's output buffer."""
    if backend is not None:
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator().manual_seed(5)
    x, h, nz = (torch.randn(3, 7, generator=g) for _ in range(3))
    dc = torch.randn(3, 7, generator=g, dtype=td)
    for kw in [dict(), dict(history=[h], b=(0.3, 0.2)), dict(noise=nz, c_noise=0.1)]:
        inputs = [x, dc, *kw.get("history", ()), *([nz] if "noise" in kw else [])]
        outputs = _call(entry, x, dc, **kw)
        for out in outputs:
            assert not any(_shares_memory(out, t) for t in inputs), (entry, kw)
        torch.testing.assert_close(outputs[1], dc.to(outputs[1].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "heun", "unipc"])
@pytest.mark.parametrize("mix", ["torch_backend", "float64_outputs"])
def test_model_reusing_its_output_buffer_samples_the_same(gmm, solver, mix, monkeypatch):
    """A model may write every output into one buffer it reuses (as a captured or preallocated network does); the
    sampler's history must not alias it. Sampled on the forced torch backend, and with float64 outputs beside a
    float32 state (a dtype mix that runs on the reference on every backend)."""
    if mix == "torch_backend":
        monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
    out_dtype = torch.float64 if mix == "float64_outputs" else torch.float32
    cond = {"class_labels": torch.arange(16) % 4}
    buffer = torch.empty(16, 2, dtype=out_dtype)

    def fresh(x, sigma, **kw):
        return gmm(x.double(), sigma, **kw).to(out_dtype)

    def reusing(x, sigma, **kw):
        return buffer.copy_(fresh(x, sigma, **kw))

    x = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    s = schedules.karras(8, 0.002, 80.0)
    want = fastdiff.sample(fresh, x, s, solver=solver, cond=cond)
    got = fastdiff.sample(reusing, x, s, solver=solver, cond=cond)
    assert torch.equal(got, want), (got - want).abs().max().item()


@pytest.mark.parametrize("backend", [None, "torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("bad", [torch.int64, torch.int32, torch.bool, torch.float8_e4m3fn, torch.complex64], ids=str)
def test_unsupported_state_dtypes_are_refused_everywhere(backend, entry, bad, monkeypatch):
    """An integer or bool state was truncated on the torch path; float8 gave torch's promotion traceback."""
    if backend is not None:
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x = (torch.randn(2, 9) * 4).to(bad)
    dc = torch.randn(2, 9)
    with pytest.raises(TypeError, match=rf"guided_step: x must be a floating tensor of dtype float16, bfloat16, "
                                        rf"float32 or float64, got {bad}"):  # fmt: skip
        _call(entry, x, dc)


@pytest.mark.parametrize("backend", [None, "torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", ["d_cond", "d_uncond", "history[0]", "noise"])
@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.float8_e5m2], ids=str)
def test_unsupported_model_output_history_and_noise_dtypes_are_refused(backend, entry, name, bad, monkeypatch):
    if backend is not None:
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator().manual_seed(7)
    x, dc, du, h, nz = (torch.randn(2, 9, generator=g) for _ in range(5))
    args = dict(d_cond=dc, d_uncond=du, history=[h], noise=nz)
    key = name.split("[")[0]
    value = (torch.randn(2, 9) * 4).to(bad)
    args[key] = [value] if key == "history" else value
    with pytest.raises(
        TypeError, match=rf"guided_step: {re.escape(name)} must be a floating tensor of dtype .*, got {bad}"
    ):
        _call(entry, x, **args, b=(0.3, 0.2), w=2.0, c_noise=0.1)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("entry", ["guided_step_coef", "op"])
def test_coefficients_on_the_meta_device(backend, entry, monkeypatch):
    """A meta coefficient tensor beside a CPU x gave 'Cannot copy out of meta tensor'; beside a meta x it works (the
    sampler's no-sync tests run the loop so)."""
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x = torch.randn(4, 5)
    f = ops.guided_step_coef if entry == "guided_step_coef" else (
        lambda x, dc, du, h, coef: torch.ops.fastdiff.guided_step(x, dc, du, h, None, coef))  # fmt: skip
    with pytest.raises(ValueError, match="coef is on meta but x is on cpu"):
        f(x, x, None, [], _coef(0).to("meta"))
    meta = x.to("meta")
    if backend == "torch" or entry == "op":  # the registered op infers shapes on meta (its fake), whatever the backend
        out, e = f(meta, meta, None, [], _coef(0).to("meta"))
        assert out.device.type == "meta" and out.shape == (4, 5) and e.dtype == torch.float32
    else:
        with pytest.raises(RuntimeError, match=f"FASTDIFF_BACKEND={backend} cannot run"):
            f(meta, meta, None, [], _coef(0).to("meta"))


@pytest.mark.parametrize("backend", [None, "torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("state", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_coefficients_overflowing_float32_are_refused(backend, entry, state, monkeypatch):
    """1e300 is a finite double but an infinite float32: every output was inf for a float32-accumulating state."""
    if backend is not None:
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x = torch.randn(2, 9).to(state)
    for kw in [dict(a=1e300), dict(b=(-1e39,)), dict(w=3.5e38), dict(hd=1e300)]:
        with pytest.raises(ValueError, match="coefficients must fit in float32"):
            _call(entry, x, x, **kw)
    xd = x.double()
    out, _ = _call(entry, xd, xd, a=1e300)  # float64 accumulates it
    assert torch.isfinite(out).all()


def test_a_source_folder_shadowing_the_installed_kernels_says_so_at_import(tmp_path):
    """After a non-editable install, python started in the checkout imports ./fastdiff, which has no compiled
    extension: the import warns, naming both folders and the fix, instead of a log line on the first op call."""
    (tmp_path / "fastdiff").mkdir()
    (tmp_path / "fastdiff" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    code = (
        "import sys, pathlib, importlib.metadata as md\n"
        f"root = pathlib.Path({str(tmp_path)!r})\n"
        "class File(pathlib.PurePosixPath):\n"
        "    def locate(self): return root / self\n"
        "class Dist:\n"
        "    files = [File('fastdiff/__init__.py'), File('fastdiff/_C.cpython-311-x86_64-linux-gnu.so')]\n"
        "real = md.distributions\n"
        "md.distributions = lambda **kw: [Dist()] if kw.get('name') == 'fastdiff' else real(**kw)\n"
        "sys.modules['fastdiff._C'] = None\n"
        "import fastdiff\n"
        "assert not fastdiff.ops.extension_available()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "fastdiff runs on its pure-torch reference ops: the fastdiff imported here" in out.stderr
    assert f"shadows the installed one with its compiled kernels ({tmp_path / 'fastdiff'})" in out.stderr
    assert "pip install --no-build-isolation -e ." in out.stderr
