"""Property tests of the guided step (issue 18) on every backend that runs here: whatever the call, either the result
equals the float64 reference within tests/test_ops.py's tolerance rule (twice the same-dtype reference's error plus
one rounding), or a ValueError, TypeError or RuntimeError names the problem. Never a crash, never a silent result.

The calls vary the shape (0-d, 1-element, empty, up to 3-D), each tensor's layout (contiguous, strided, transposed,
misaligned, broadcast by a zero stride), its dtype (every supported pair, unsupported mixes that fall back to the
reference, and integer, bool, float8 and complex tensors), the history count (0-3, and 4: too many), the coefficient
count (right, one short, one over) and form (host floats, float64 or float32 tensors), the optional d_uncond and
noise, and at most one fault: a tensor of the wrong shape, on the meta device, or of a dtype no backend takes; or
every tensor on meta. The default run is derandomized (a fixed example sequence, so CI is stable) and takes a few
seconds per backend; the ``slow`` tests run the same properties on many more examples.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from fastdiff import ops

BACKENDS = ["torch", *(b for b in ("cpu", "triton") if b in ops.available_backends())]
GOOD = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BAD = [torch.int32, torch.bool, torch.float8_e4m3fn, torch.complex64]
LAYOUTS = ["contiguous", "strided", "transposed", "misaligned", "broadcast"]
ERRORS = (ValueError, TypeError, RuntimeError)

FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
FUZZ = settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@contextlib.contextmanager
def forced(backend: str):
    before = os.environ.get("FASTDIFF_BACKEND")
    os.environ["FASTDIFF_BACKEND"] = backend
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTDIFF_BACKEND"]
        else:
            os.environ["FASTDIFF_BACKEND"] = before


@dataclass
class Spec:
    """How to make one tensor input."""

    dtype: torch.dtype
    layout: str = "contiguous"
    shape: tuple | None = None  # a wrong shape (the fault "shape"), else x's
    meta: bool = False


@dataclass
class Case:
    shape: tuple
    x: Spec
    d_cond: Spec
    d_uncond: Spec | None
    history: list[Spec]
    noise: Spec | None
    grads: list[Spec]  # the backward's g_x, g_e; empty for the forward
    values: list[float]  # [a, w, hx, hd, c_noise, b0, ...]: 5 + len(b), right when 6 + len(history)
    coef_dtype: torch.dtype  # of the coefficient tensor the tensor entry points take (the scalar API takes values)
    coef_meta: bool
    seed: int
    problems: list[str] = field(default_factory=list)  # patterns of the errors this call may raise; empty: valid


def _named_specs(c: Case):
    yield from (("x", c.x), ("d_cond", c.d_cond), ("d_uncond", c.d_uncond), ("noise", c.noise))
    yield from ((f"history[{k}]", s) for k, s in enumerate(c.history))
    yield from zip(("g_x", "g_e"), c.grads)


def _kernel_dtypes_fit(c: Case) -> bool:
    """The kernels' dtype rule (fastdiff.ops.KERNEL_DTYPES), restated: a supported (state, model output) pair, d_uncond
    like d_cond, history, noise and gradients in the state dtype."""
    tx, td = c.x.dtype, c.d_cond.dtype
    pairs = {torch.float32: (torch.float32, torch.float16, torch.bfloat16), torch.float16: (torch.float16,),
             torch.bfloat16: (torch.bfloat16,), torch.float64: (torch.float64,)}  # fmt: skip
    if td not in pairs.get(tx, ()) or (c.d_uncond is not None and c.d_uncond.dtype != td):
        return False
    return all(s.dtype == tx for s in [*c.history, *([c.noise] if c.noise else []), *c.grads])


def _problems(c: Case, backend: str, what: str, fake: bool = False, coef_tensor: bool = True) -> list[str]:
    """The error patterns a call may raise: every problem this case has (the op reports the first it checks).
    ``fake``: the call is a registered op, which the dispatcher sends to its fake kernel when x is on meta (shape
    inference, whatever the forced backend). ``coef_tensor``: the call takes the coefficient tensor (the scalar API
    takes host values)."""
    out = []
    n_hist = len(c.history)
    if n_hist > 3:
        out.append("at most 3 history")
    if len(c.values) != n_hist + 6:
        out.append(r"need len\(b\) == len\(history\) \+ 1")
    if coef_tensor and c.coef_meta and not c.x.meta:
        out.append("coef is on meta but x is on cpu")
    for name, s in _named_specs(c):
        if s is None:
            continue
        if s.dtype not in GOOD:
            out.append(rf"{re.escape(name)} must be a floating tensor of dtype float16, bfloat16, float32 or float64, "
                       rf"got {s.dtype}")  # fmt: skip
        if s.shape is not None:
            out.append(rf"{re.escape(name)} has shape {re.escape(str(s.shape))} but x has")
        if s.meta != c.x.meta:
            out.append(rf"{re.escape(name)} is on (meta|cpu) but x is on (meta|cpu)")
    if 0 in c.shape:
        out.append("x is empty")
    if not out and backend != "torch" and not (fake and c.x.meta) and (c.x.meta or not _kernel_dtypes_fit(c)):
        out.append(f"FASTDIFF_BACKEND={backend} cannot run {what}")
    return out


def _dtypes(draw, good_first: torch.dtype | None):
    """Mostly ``good_first`` (a supported choice), sometimes another supported dtype, rarely one no backend takes."""
    roll = draw(st.integers(0, 39))
    if good_first is not None and roll < 34:
        return good_first
    if roll < 38:
        return draw(st.sampled_from(GOOD))
    return draw(st.sampled_from(BAD))


@st.composite
def cases(draw, backward: bool = False) -> Case:
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    if ndim and draw(st.integers(0, 24)) == 0:
        shape = (*shape[:-1], 0)
    tx = _dtypes(draw, draw(st.sampled_from(GOOD)))
    td = _dtypes(draw, draw(st.sampled_from(ops.KERNEL_DTYPES.get(tx, GOOD))))
    layout = lambda: draw(st.sampled_from(LAYOUTS))  # noqa: E731
    x = Spec(tx, layout())
    d_cond = Spec(td, layout())
    d_uncond = Spec(_dtypes(draw, td), layout()) if draw(st.booleans()) else None
    n_hist = draw(st.sampled_from([0, 1, 2, 3, 3, 4]))
    history = [Spec(_dtypes(draw, tx), layout()) for _ in range(n_hist)]
    noise = Spec(_dtypes(draw, tx), layout()) if draw(st.booleans()) else None
    grads = [Spec(_dtypes(draw, tx), layout()) for _ in range(2)] if backward else []
    n_coef = 6 + n_hist + draw(st.sampled_from([0] * 8 + [-1, 1]))
    # Zero, or at least 1e-3 in size: a smaller one makes float32 subnormals, which a GPU (and Triton's interpreter)
    # flushes to zero and the reference keeps, a difference of no interest here.
    value = st.one_of(st.just(0.0), st.floats(1e-3, 2.5), st.floats(-2.5, -1e-3))
    values = draw(st.lists(value, min_size=n_coef, max_size=n_coef))
    case = Case(shape, x, d_cond, d_uncond, history, noise, grads, values,
                coef_dtype=draw(st.sampled_from([torch.float64, torch.float32])), coef_meta=False,
                seed=draw(st.integers(0, 2**31 - 1)))  # fmt: skip
    fault = draw(st.sampled_from([None] * 10 + ["shape", "meta", "dtype", "all_meta", "coef_meta"]))
    victims = [s for _, s in _named_specs(case) if s is not None and s is not x]
    if fault in ("shape", "meta", "dtype"):
        victim = draw(st.sampled_from(victims))
        if fault == "shape":
            victim.shape = draw(st.sampled_from([(1,), (*shape, 2), shape[1:], (2, *shape)]))
            if victim.shape == shape:
                victim.shape = (*shape, 3)
        elif fault == "meta":
            victim.meta = True
        else:
            victim.dtype = draw(st.sampled_from(BAD))
    elif fault == "all_meta":
        for _, s in _named_specs(case):
            if s is not None:
                s.meta = True
        case.coef_meta = True
    elif fault == "coef_meta":
        case.coef_meta = True
    return case


def _tensor(spec: Spec, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """Values of about unit size in the spec's dtype, laid out as the spec says (the layout is the tensor's own, not
    a copy's: the dtype is set before the view is made)."""
    shape = spec.shape if spec.shape is not None else shape
    n = 1
    for s in shape:
        n *= s
    make = lambda *size: (torch.randn(size, generator=g, dtype=torch.float64) * 2).to(spec.dtype)  # noqa: E731
    if spec.layout == "strided":
        t = make(*shape, 2)[..., 0]
    elif spec.layout == "transposed" and len(shape) >= 2:
        t = make(*reversed(shape)).permute(*reversed(range(len(shape))))
    elif spec.layout == "misaligned":
        t = make(n + 1)[1:].view(shape)
    elif spec.layout == "broadcast" and len(shape) >= 1:
        t = make(*shape[1:]).expand(shape)
    else:
        t = make(*shape)
    return t.to("meta") if spec.meta else t


def _build(c: Case):
    g = torch.Generator().manual_seed(c.seed)
    mk = lambda s: None if s is None else _tensor(s, c.shape, g)  # noqa: E731
    t = dict(x=mk(c.x), d_cond=mk(c.d_cond), d_uncond=mk(c.d_uncond), history=[mk(s) for s in c.history],
             noise=mk(c.noise))  # fmt: skip
    grads = [mk(s) for s in c.grads]
    coef = torch.tensor(c.values, dtype=c.coef_dtype)
    return t, grads, coef.to("meta") if c.coef_meta else coef


def _forward_calls(c: Case, t: dict, coef):
    """``(entry point, call)`` pairs for this case; :func:`fastdiff.ops.loop_step`, the unchecked form, only for a
    valid call."""
    a, w, hx, hd, c_noise, *b = c.values
    hist = list(t["history"])
    args = (t["x"], t["d_cond"], t["d_uncond"])
    calls = [("guided_step", lambda: ops.guided_step(*args, hist, a=a, b=b, w=w, hx=hx, hd=hd, noise=t["noise"],
                                                     c_noise=c_noise))]  # fmt: skip
    calls.append(("guided_step_coef", lambda: ops.guided_step_coef(*args, hist, coef, noise=t["noise"])))
    calls.append(("op", lambda: torch.ops.fastdiff.guided_step(*args, hist, t["noise"], coef)))
    if not c.problems:
        calls.append(("loop_step", lambda: ops.loop_step(*args, hist, c.values, t["noise"])))
        calls.append(("loop_step_tensor", lambda: ops.loop_step(*args, hist, coef, t["noise"])))
    return calls


def _reference(t: dict, values, dtype=None):
    cast = (lambda v: None if v is None else v.to(dtype)) if dtype else (lambda v: v)
    a, w, hx, hd, c_noise, *b = values
    hist = [cast(h) for h in t["history"]]
    x, dc, du, nz = (cast(t[k]) for k in ("x", "d_cond", "d_uncond", "noise"))
    return ops.guided_step_reference(x, dc, du, hist, a, b, w, hx, hd, nz, c_noise)


def _within_tolerance(got: torch.Tensor, ref: torch.Tensor, same: torch.Tensor, extra: float = 0.0) -> None:
    """tests/test_ops.py's rule: twice the error of the same-dtype reference, plus one rounding of the output."""
    scale = ref.abs().max().item()
    eps = max(torch.finfo(got.dtype).eps, torch.finfo(same.dtype).eps)
    tol = 2 * (same.double() - ref).abs().max().item() + eps * scale + extra * scale
    err = (got.double() - ref).abs().max().item()
    assert err <= tol, f"error {err} > tolerance {tol}"


def _expect_error(problems: list[str], call) -> None:
    with pytest.raises(ERRORS) as info:
        call()
    message = str(info.value)
    assert any(re.search(p, message) for p in problems), (
        f"{type(info.value).__name__}: {message!r}; expected {problems}"
    )


def _inputs(t: dict, grads=()) -> list[torch.Tensor]:
    return [v for v in (t["x"], t["d_cond"], t["d_uncond"], t["noise"], *t["history"], *grads) if v is not None]


def _no_alias(outputs, inputs) -> None:
    for out in outputs:
        for inp in inputs:
            assert out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr(), "an output aliases an input"


def check_forward(backend: str, c: Case) -> None:
    c.problems = _problems(c, backend, "this call")
    t, _, coef = _build(c)
    with forced(backend):
        for entry, call in _forward_calls(c, t, coef):
            problems = _problems(c, backend, "this call", fake=entry == "op",
                                 coef_tensor=entry not in ("guided_step", "loop_step"))  # fmt: skip
            event(f"{entry}: {'error' if problems else 'result'}")
            if problems:
                _expect_error(problems, call)
                continue
            x_out, e = call()
            tx, td = t["x"].dtype, t["d_cond"].dtype
            assert x_out.shape == e.shape == t["x"].shape, entry
            assert x_out.dtype == tx and e.dtype == torch.promote_types(tx, td), entry
            assert x_out.is_contiguous() and e.is_contiguous(), entry
            if c.x.meta:
                assert x_out.device.type == e.device.type == "meta", entry
                continue
            _no_alias((x_out, e), _inputs(t))
            # The scalar API takes the values themselves; a float32 tensor holds them rounded.
            values = c.values if entry in ("guided_step", "loop_step") else coef.tolist()
            ref = _reference(t, values, torch.float64)
            same = _reference(t, values)
            for got, r, s in zip((x_out, e), ref, same):
                _within_tolerance(got, r, s)


def check_backward(backend: str, c: Case) -> None:
    c.problems = _problems(c, backend, "the backward", fake=True)
    t, grads, coef = _build(c)
    args = (t["x"], t["d_cond"], t["d_uncond"], list(t["history"]), t["noise"], coef, *grads)
    event(f"backward: {'error' if c.problems else 'result'}")
    with forced(backend):
        if c.problems:
            _expect_error(c.problems, lambda: torch.ops.fastdiff.guided_step_backward(*args))
            return
        got = torch.ops.fastdiff.guided_step_backward(*args)
    optional = lambda v: [] if v is None else [v]  # noqa: E731
    like = [t["x"], t["d_cond"], *optional(t["d_uncond"]), *t["history"], *optional(t["noise"])]
    assert len(got) == len(like) + 1
    for g_, inp in zip(got, like):
        assert g_.shape == inp.shape and g_.dtype == inp.dtype and g_.is_contiguous()
    assert got[-1].shape == coef.shape and got[-1].dtype == coef.dtype
    if c.x.meta:
        return
    _no_alias(got, _inputs(t, grads))

    def flat(res):
        gx, gdc, gdu, gh, gnz, gcoef = res
        return [gx, gdc, *optional(gdu), *gh, *optional(gnz), gcoef]

    f64 = lambda v: None if v is None else v.double()  # noqa: E731
    ref = flat(ops._backward_reference(f64(t["x"]), f64(t["d_cond"]), f64(t["d_uncond"]),
                                       [f64(h) for h in t["history"]], f64(t["noise"]), coef.double(),
                                       *(f64(v) for v in grads)))  # fmt: skip
    same = flat(ops._backward_reference(t["x"], t["d_cond"], t["d_uncond"], list(t["history"]), t["noise"], coef,
                                        *grads))  # fmt: skip
    n = t["x"].numel()
    acc_eps = torch.finfo(torch.float64 if c.x.dtype == torch.float64 else torch.float32).eps
    for k, (g_, r, s) in enumerate(zip(got, ref, same)):
        # Three more roundings than the forward (g_d, then the scaled gradient, then its storage); a coefficient's
        # gradient sums n products, whose order differs between backends: the worst-case bound n * eps.
        extra = 3 * torch.finfo(g_.dtype).eps + (n * acc_eps if k == len(got) - 1 else 0.0)
        _within_tolerance(g_, r, s, extra)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(case=cases())
def test_forward_matches_the_reference_or_names_the_problem(backend, case):
    check_forward(backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@FAST
@given(case=cases(backward=True))
def test_backward_matches_the_reference_or_names_the_problem(backend, case):
    check_backward(backend, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@seed(18)
@given(case=cases())
def test_forward_fuzz(backend, case):
    check_forward(backend, case)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@seed(1818)
@given(case=cases(backward=True))
def test_backward_fuzz(backend, case):
    check_backward(backend, case)


def test_the_properties_can_fail():
    """The oracle is not vacuous: a result off by one part in a thousand fails the tolerance, and a call that
    should raise but returns fails too."""
    ref = torch.randn(50, dtype=torch.float64)
    with pytest.raises(AssertionError, match="tolerance"):
        _within_tolerance((ref * 1.001).float(), ref, ref.float())
    with pytest.raises(pytest.fail.Exception):
        _expect_error(["anything"], lambda: None)
    with pytest.raises(AssertionError, match="expected"):
        _expect_error(["d_cond has shape"], lambda: ops.guided_step(torch.randn(3), torch.randn(3).int(), a=1, b=[0]))
