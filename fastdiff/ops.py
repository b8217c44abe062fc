"""The one place that chooses a backend for fastdiff's ops.

Every solver step is a linear combination (DESIGN.md)::

    D      = d_uncond + w * (d_cond - d_uncond)      (D = d_cond when d_uncond is None)
    x_next = a * x + b[0] * D + sum_k b[k] * history[k - 1]  (+ c_noise * noise)
    E      = hx * x + hd * D                           (the new history entry)

E is D itself for the data-prediction solvers (hx=0, hd=1) and the derivative (x - D) / sigma for iPNDM.
:func:`guided_step_reference` is the pure-torch reference that every kernel is checked against.
:func:`guided_step` dispatches to a compiled kernel where one fits the inputs, else to the reference.

Backends:

* ``torch``: the reference, always there, differentiable;
* ``cpu``: C++/OpenMP in ``fastdiff._C``, for CPU tensors;
* ``cuda``: plain CUDA in ``fastdiff._C`` when it was built with CUDA;
* ``triton``: ``fastdiff.kernels.guided_step``, for CUDA tensors, and for CPU tensors under
  ``TRITON_INTERPRET=1`` (how the tests run it).

The kernels take the state (x, history, noise, outputs) in float32, float16, bfloat16 or float64 and the
model outputs in the state dtype or, for a float32 state, in float16/bfloat16. Strided inputs are copied to
contiguous ones first. ``FASTDIFF_BACKEND`` forces a backend; a forced backend that cannot run the call
raises instead of falling back. Without a forced backend, CUDA tensors prefer ``cuda`` over ``triton``.

Every entry point checks its arguments (:func:`_check_args`), the registered ops and their fake kernels included,
except :func:`loop_step`, the sampling loop's form; the kernels' launchers check again before they touch memory
(:func:`_check_launch` for Triton, TORCH_CHECK in ``csrc/bindings.cpp``). No backend returns an input, or a view
of one, as an output.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import math
import os
from collections.abc import Sequence

import torch

log = logging.getLogger("fastdiff")

BACKENDS = ("torch", "cpu", "cuda", "triton")
MAX_HISTORY = 3  # csrc/step_math.h: kMaxHistory
KERNEL_DTYPES = {  # state dtype -> model-output dtypes the kernels take with it
    torch.float32: (torch.float32, torch.float16, torch.bfloat16),
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
    torch.float64: (torch.float64,),
}


def _shadowed_install() -> str | None:
    """Where an installed fastdiff with its compiled extension lives, when the fastdiff imported here is another
    folder (a checkout's ``./fastdiff`` on ``sys.path`` ahead of a non-editable install), else None."""
    from importlib import metadata

    here = os.path.dirname(os.path.abspath(__file__))
    # Every distribution of that name: inside a checkout the first found is the build's own fastdiff.egg-info.
    for dist in metadata.distributions(name="fastdiff"):
        for f in dist.files or []:
            if f.name.startswith("_C.") and f.parent.name == "fastdiff":
                installed = os.path.dirname(os.path.abspath(str(f.locate())))
                if installed != here and os.path.exists(str(f.locate())):
                    return installed
    return None


try:
    _C = importlib.import_module("fastdiff._C")
    _EXT_ERROR: str | None = None
except ImportError as exc:  # a build with FASTDIFF_SKIP_EXT=1, or a broken one
    _C = None
    _EXT_ERROR = str(exc)
    _shadowed = _shadowed_install()
    if _shadowed is not None:
        # The commonest way to lose the kernels: python started in the checkout after `pip install .`.
        import warnings

        _EXT_ERROR = (f"the fastdiff imported here ({os.path.dirname(os.path.abspath(__file__))}) is a source folder "
                      f"that shadows the installed one with its compiled kernels ({_shadowed}): run from outside "
                      "the checkout, or install with pip install --no-build-isolation -e .")  # fmt: skip
        warnings.warn(f"fastdiff runs on its pure-torch reference ops: {_EXT_ERROR}", stacklevel=2)
_warned_missing = False


@functools.cache
def _triton_kernels(name: str = "guided_step"):
    """A Triton launchers' module (``guided_step``: ``guided_step``, ``guided_step_backward``; ``ld3_sigmas``:
    ``ld3_sigmas``, ``ld3_sigmas_backward``), or the ImportError text when triton cannot be used here."""
    try:
        return importlib.import_module(f"fastdiff.kernels.{name}")
    except ImportError as exc:
        return str(exc)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_available() -> bool:
    """True when the compiled extension ``fastdiff._C`` imported."""
    return _C is not None


def available_backends() -> list[str]:
    """The backends that can run on this machine."""
    out = ["torch"]
    if _C is not None:
        out.append("cpu")
        if _C.with_cuda and torch.cuda.is_available():
            out.append("cuda")
    if not isinstance(_triton_kernels(), str) and (torch.cuda.is_available() or _triton_interpreting()):
        out.append("triton")
    return out


def _forced_backend() -> str | None:
    """The backend named by ``FASTDIFF_BACKEND``, or None; raises for a name that is not a backend."""
    forced = os.environ.get("FASTDIFF_BACKEND")
    if not forced:
        return None
    forced = forced.strip().lower() or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"FASTDIFF_BACKEND={forced!r} is not a backend; choose one of {BACKENDS}")
    return forced


def _say_missing_once() -> None:
    global _warned_missing
    if not _warned_missing:
        _warned_missing = True
        why = _EXT_ERROR if _C is None else "built without CUDA"
        log.warning("fastdiff._C is not available (%s); using the pure-torch reference ops", why)


def guided_step_reference(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: Sequence[torch.Tensor],
    a: float,
    b: Sequence[float],
    w: float = 1.0,
    hx: float = 0.0,
    hd: float = 1.0,
    noise: torch.Tensor | None = None,
    c_noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch guided solver step, the reference for every kernel.

    Args:
        x: state, any shape ``[B, ...]``, floating dtype.
        d_cond: conditional denoised estimate, same shape as ``x``; any floating dtype.
        d_uncond: unconditional estimate (same shape), or None outside the guidance interval.
        history: up to 3 earlier history entries, same shape.
        a, b, w, hx, hd: scalars; ``len(b) == len(history) + 1``.
        noise, c_noise: an optional noise tensor (same shape) added with weight ``c_noise``.

    Returns:
        ``(x_next, E)``: ``x_next`` in ``x.dtype``; ``E = hx * x + hd * D`` in the promoted dtype of ``x`` and
        ``d_cond``; both new tensors, never an input. Arithmetic runs in at least float32.
    """
    ct = torch.promote_types(torch.promote_types(x.dtype, d_cond.dtype), torch.float32)
    d = d_cond.to(ct)
    if d_uncond is not None:
        du = d_uncond.to(ct)
        d = du + w * (d - du)
    xc = x.to(ct)
    acc = a * xc + b[0] * d
    for bk, h in zip(b[1:], history):
        acc = acc + bk * h.to(ct)
    if noise is not None:
        acc = acc + c_noise * noise.to(ct)
    plain = not isinstance(hx, torch.Tensor) and hx == 0 and hd == 1  # E = D; no branch on device values
    e = (d if plain else hx * xc + hd * d).to(torch.promote_types(x.dtype, d_cond.dtype))
    if e is d_cond:
        # E = D returned as d_cond itself would make a sampler's history alias the model's output buffer, which a
        # model may overwrite on its next call.
        e = e.clone(memory_format=torch.contiguous_format)
    return acc.to(x.dtype), e


# The dtypes any backend takes, for the state and for the model outputs: the reference computes in at least float32,
# which torch cannot promote a float8 to, and an integer or bool state would be truncated.
FLOAT_DTYPES = frozenset(KERNEL_DTYPES)
_F32_MAX = torch.finfo(torch.float32).max
_COEF_LIMIT = {torch.float64: torch.finfo(torch.float64).max}  # the largest coefficient; float32's for other states


def _check_args(x, d_cond, d_uncond, history, noise, n_coef: int, grads=()) -> None:
    """The argument checks of every entry point that reaches a kernel, except :func:`loop_step` (whose inputs are
    valid by construction): history and coefficient counts, and every tensor shaped like x, on x's device, in a
    dtype of :data:`FLOAT_DTYPES`. ``grads``: the backward's ``(g_x, g_e)``. One cheap pass on valid inputs."""
    if len(history) > MAX_HISTORY:
        raise ValueError(f"guided_step: at most {MAX_HISTORY} history tensors, got {len(history)}")
    if n_coef != len(history) + 6:
        raise ValueError(
            f"guided_step: need len(b) == len(history) + 1 (6 + len(history) coefficients), got "
            f"len(b) = {n_coef - 5} with {len(history)} history tensors"
        )
    if x.dtype not in FLOAT_DTYPES:
        _check_dtypes(x, d_cond, d_uncond, history, noise, grads)
    if x.numel() == 0:
        raise ValueError(f"guided_step: x is empty (shape {tuple(x.shape)})")
    shape, device = x.shape, x.device  # read once: each .device access builds a new object
    for t in (d_cond, d_uncond, noise, *history, *grads):
        if t is not None and (t.shape != shape or t.device != device or t.dtype not in FLOAT_DTYPES):
            _raise_bad_input(x, d_cond, d_uncond, history, noise, grads)


def _named(x, d_cond, d_uncond, history, noise, grads=()):
    """``(name, tensor)`` of every input, as the error messages name them."""
    yield from (("x", x), ("d_cond", d_cond), ("d_uncond", d_uncond), ("noise", noise))
    yield from ((f"history[{k}]", h) for k, h in enumerate(history))
    yield from zip(("g_x", "g_e"), grads)


def _check_dtypes(x, d_cond, d_uncond, history, noise, grads=()) -> None:
    """Raises a TypeError naming the first input whose dtype no backend takes."""
    for name, t in _named(x, d_cond, d_uncond, history, noise, grads):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"guided_step: {name} must be a floating tensor of dtype float16, bfloat16, float32 or "
                f"float64, got {t.dtype}"
            )


def _raise_bad_input(x, d_cond, d_uncond, history, noise, grads=()):
    """The error for the first input that does not match x (the slow path of :func:`_check_args`)."""
    for name, t in _named(x, d_cond, d_uncond, history, noise, grads):
        if t is None or t is x:
            continue
        if t.shape != x.shape:
            raise ValueError(f"guided_step: {name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"guided_step: {name} is on {t.device} but x is on {x.device}")
    _check_dtypes(x, d_cond, d_uncond, history, noise, grads)


def _check_coef(coef: torch.Tensor, x: torch.Tensor) -> None:
    """A coefficient tensor's own checks (its count is :func:`_check_args`'s): 1-D, a float dtype every backend
    takes, and holding values: a tensor on the meta device is only accepted beside a meta x."""
    if coef.ndim != 1 or coef.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"guided_step: coef must be a 1-D float tensor (float16, bfloat16, float32 or float64), got "
            f"{coef.dtype} {tuple(coef.shape)}"
        )
    if coef.device.type == "meta" and x.device.type != "meta":
        raise ValueError(
            f"guided_step: coef is on meta but x is on {x.device}; a meta tensor holds no values: put "
            "the coefficients on x's device or the CPU"
        )


def _check_host_coefficients(coef: list[float], x: torch.Tensor) -> None:
    """Host coefficients must be finite and, for a state that accumulates in float32, fit in float32: 1e300 is a
    finite double, but an infinite float32 coefficient (every output inf or NaN)."""
    # One pass on valid values (this runs every step of a sampling loop): the sum of the magnitudes is NaN for a NaN,
    # inf for an inf, and above the limit for a value above it. Only then is each value looked at.
    if sum(map(abs, coef)) <= _COEF_LIMIT.get(x.dtype, _F32_MAX):
        return
    if not all(map(math.isfinite, coef)):
        raise ValueError(f"guided_step: coefficients must be finite, got {coef}")
    if x.dtype != torch.float64 and max(map(abs, coef)) > _F32_MAX:
        raise ValueError(
            f"guided_step: coefficients must fit in float32 (|c| <= {_F32_MAX:.4g}), the accumulation "
            f"dtype of a {x.dtype} state; got {coef}"
        )


def _check_launch(x, d_cond, d_uncond, history, noise, coef, outputs=(), grads=()) -> None:
    """What a kernel launcher checks before it touches memory (the Triton launchers call this; csrc/bindings.cpp
    checks the same in C++): :func:`_check_args`, then what the kernels assume beyond it. A dtype pair they take,
    contiguous tensors, coefficients they can read (a tensor on x's device; host values in range), and
    ``outputs``, ``(name, tensor)`` pairs, like x and overlapping no input or each other."""
    n_coef = coef.numel() if isinstance(coef, torch.Tensor) else len(coef)
    _check_args(x, d_cond, d_uncond, history, noise, n_coef, grads)
    if not _kernel_fits(x, d_cond, d_uncond, history, noise, grads):
        got = ", ".join(
            f"{name} {t.dtype}" for name, t in _named(x, d_cond, d_uncond, history, noise, grads) if t is not None
        )
        raise TypeError(
            f"guided_step: the kernels take {_dtype_help()} (history, noise and gradients in the state "
            f"dtype); got {got}"
        )
    inputs = [(name, t) for name, t in _named(x, d_cond, d_uncond, history, noise, grads) if t is not None]
    if isinstance(coef, torch.Tensor):
        _check_coef(coef, x)
        if coef.device != x.device:
            raise ValueError(f"guided_step: the kernel reads coef on x's device, {x.device}; it is on {coef.device}")
        inputs.append(("coef", coef))
    else:
        _check_host_coefficients(coef, x)
    for name, t in inputs:
        if not t.is_contiguous():
            raise ValueError(f"guided_step: {name} must be contiguous")
    seen = list(inputs)
    for name, out in outputs:
        if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
            raise ValueError(
                f"guided_step: {name} must be a contiguous {x.dtype} tensor of x's shape "
                f"{tuple(x.shape)} on {x.device}; got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        for other, t in seen:
            if _overlaps(out, t):
                raise ValueError(
                    f"guided_step: {name} overlaps {other}; the outputs must not alias or overlap an "
                    "input or each other"
                )
        seen.append((name, out))


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous tensors share a byte of memory."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    pa, pb = a.data_ptr(), b.data_ptr()
    return pa < pb + b.numel() * b.element_size() and pb < pa + a.numel() * a.element_size()


def _kernel_fits(x, d_cond, d_uncond, history, noise, grads=()) -> bool:
    """Whether the kernels take these dtypes."""
    td = d_cond.dtype
    if td not in KERNEL_DTYPES.get(x.dtype, ()) or (d_uncond is not None and d_uncond.dtype != td):
        return False
    tx = x.dtype
    if noise is not None and noise.dtype != tx:
        return False
    for t in history:
        if t.dtype != tx:
            return False
    for t in grads:
        if t.dtype != tx:
            return False
    return True


def _usable(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run tensors on ``device`` here, else the reason it cannot."""
    if backend in ("cpu", "cuda"):
        if backend != device.type:
            return f"the {backend} backend takes {backend} tensors, these are on {device}"
        if _C is None:
            return f"fastdiff._C is not available: {_EXT_ERROR}"
        if backend == "cuda" and not _C.with_cuda:
            return "fastdiff._C was built without CUDA"
        return None
    if backend == "triton":
        kernels = _triton_kernels()
        if isinstance(kernels, str):
            return f"triton cannot be imported: {kernels}"
        if device.type == "cpu" and not _triton_interpreting():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run tensors on {device}"
        return None
    return None


def _backend(x, d_cond, d_uncond, history, noise, device: torch.device, grads=(), what: str = "this call") -> str:
    """The backend that runs a pass over these tensors: the forced one (which must fit, else this raises), else the
    compiled kernel for the device (C++ on the CPU; CUDA, else Triton, on a GPU) where the dtypes fit, else
    ``torch``, the reference. Dtypes that no backend takes raise a TypeError; that check runs only where the kernels'
    dtypes do not fit, off the hot path (the kernels' pairs are all floating)."""
    forced = _forced_backend()
    fits = forced != "torch" and _kernel_fits(x, d_cond, d_uncond, history, noise, grads)
    if not fits:
        _check_dtypes(x, d_cond, d_uncond, history, noise, grads)
        if forced == "torch":
            return "torch"
    if forced is not None:
        why = _usable(forced, device)
        if why is None and not fits:
            why = f"x is {x.dtype} and d_cond {d_cond.dtype}; the kernels take {_dtype_help()}"
        if why is not None:
            raise RuntimeError(f"FASTDIFF_BACKEND={forced} cannot run {what}: {why}")
        return forced
    if not fits:
        return "torch"
    if device.type == "cpu":
        if _C is None:
            _say_missing_once()
            return "torch"
        return "cpu"
    backend = next((bk for bk in ("cuda", "triton") if _usable(bk, device) is None), None)
    if backend is None:
        if device.type == "cuda":
            _say_missing_once()
        return "torch"
    return backend


# Passes each backend ran in this process, forward and backward: lets a test prove that the backend it names did
# the work (a GPU test that silently ran the reference would prove nothing).
calls: collections.Counter = collections.Counter()


def _coefficients(coef: torch.Tensor | list[float], x: torch.Tensor, device: torch.device):
    """The coefficients as the kernels take them: a tensor on x's (non-CPU) device stays there, in the
    accumulation dtype, for the kernel to read; anything else becomes host floats, checked finite and in range (a
    CPU tensor is read without a sync; a tensor on another device is read back)."""
    if isinstance(coef, torch.Tensor):
        if device.type != "cpu" and coef.device == device:
            return coef if coef.dtype == acc_dtype(x) else coef.to(acc_dtype(x))
        _check_coef(coef, x)  # before reading it: a meta tensor cannot be read, a 2-D one reads as nested lists
        coef = coef.tolist()
    _check_host_coefficients(coef, x)
    return coef


def _forward(
    x, d_cond, d_uncond, history, noise, coef: list[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward pass on the chosen backend. ``coef = [a, w, hx, hd, c_noise, b0, ..., bK]``: Python floats,
    or a tensor. A tensor on x's device, when that is not the CPU, stays there and the kernel (or the reference)
    reads it: no host round trip, so it can be captured in a CUDA graph, and it is not checked for NaN. Any other
    is read on the host, and host values reach every kernel as scalar arguments (no host-to-device copy).
    Outputs are contiguous, on every backend."""
    device = x.device  # read once: each .device access builds a new object
    coef = _coefficients(coef, x, device)
    backend = _backend(x, d_cond, d_uncond, history, noise, device)
    calls[backend] += 1
    if backend == "torch":
        a, w, hx, hd, c_noise, *b = coef.unbind() if isinstance(coef, torch.Tensor) else coef
        x_out, e_out = guided_step_reference(x, d_cond, d_uncond, history, a, b, w, hx, hd, noise, c_noise)
        return x_out.contiguous(), e_out.contiguous()
    args = _contiguous(x, d_cond, d_uncond, history, noise)
    x_out = torch.empty_like(args[0])
    e_out = torch.empty_like(args[0])
    if backend == "triton":
        _triton_kernels().guided_step(*args, coef, x_out, e_out)
    else:
        _C.guided_step(*args, coef, x_out, e_out)
    return x_out, e_out


def _contiguous(x, d_cond, d_uncond, history, noise):
    """The step's inputs as the kernels take them (strided inputs are copied)."""
    maybe = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return x.contiguous(), d_cond.contiguous(), maybe(d_uncond), [h.contiguous() for h in history], maybe(noise)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels accumulate a state ``x`` in, and take coefficients in: float64 for float64, else
    float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------- torch.library registration


@torch.library.custom_op("fastdiff::guided_step", mutates_args=())
def _guided_step_op(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: list[torch.Tensor],
    noise: torch.Tensor | None,
    coef: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    history = list(history)
    _check_op_args(x, d_cond, d_uncond, history, noise, coef)
    return _forward(x, d_cond, d_uncond, history, noise, coef)


def _check_op_args(x, d_cond, d_uncond, history, noise, coef, grads=()) -> None:
    """The registered ops check as the public functions do: a caller of ``torch.ops.fastdiff.*`` reaches the
    kernels directly. Their fake kernels check too, so torch.compile and the meta device refuse the same calls
    (and a call that mixes meta and real tensors, which the dispatcher sends to the fake, is refused there)."""
    _check_coef(coef, x)
    _check_args(x, d_cond, d_uncond, history, noise, coef.numel(), grads)


@_guided_step_op.register_fake
def _(x, d_cond, d_uncond, history, noise, coef):
    _check_op_args(x, d_cond, d_uncond, list(history), noise, coef)
    # Contiguous, as every backend returns them (empty_like would keep a channels_last x's strides).
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, d_cond.dtype))


def _setup_context(ctx, inputs, output):
    x, d_cond, d_uncond, history, noise, coef = inputs
    ctx.has_uncond, ctx.has_noise, ctx.n_history = d_uncond is not None, noise is not None, len(history)
    saved = [x, d_cond, coef] + ([d_uncond] if d_uncond is not None else []) + list(history)
    ctx.save_for_backward(*saved, *([noise] if noise is not None else []))


def _backward(ctx, g_x, g_e):
    x, d_cond, coef, *rest = ctx.saved_tensors
    d_uncond = rest.pop(0) if ctx.has_uncond else None
    history, noise = rest[: ctx.n_history], (rest[ctx.n_history] if ctx.has_noise else None)
    g_x = torch.zeros_like(x) if g_x is None else g_x
    g_e = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, d_cond.dtype)) if g_e is None else g_e
    flat = list(torch.ops.fastdiff.guided_step_backward(x, d_cond, d_uncond, history, noise, coef, g_x, g_e))
    grad_x, grad_dc = flat.pop(0), flat.pop(0)
    grad_du = flat.pop(0) if d_uncond is not None else None
    grad_h = [flat.pop(0) for _ in history]
    grad_noise = flat.pop(0) if noise is not None else None
    return grad_x, grad_dc, grad_du, grad_h, grad_noise, flat.pop(0)


@torch.library.custom_op("fastdiff::guided_step_backward", mutates_args=())
def _guided_step_backward_op(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: list[torch.Tensor],
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    g_x: torch.Tensor,
    g_e: torch.Tensor,
) -> list[torch.Tensor]:
    """The backward of the linear step: tensors get scaled gradients, coefficients get dot products.

    Returns ``[grad_x, grad_d_cond, (grad_d_uncond), *grad_history, (grad_noise), grad_coef]``, the bracketed
    entries only when those inputs are given.
    """
    history = list(history)
    _check_op_args(x, d_cond, d_uncond, history, noise, coef, (g_x, g_e))
    device = x.device
    backend = _backend(x, d_cond, d_uncond, history, noise, device, (g_x, g_e), "the backward")
    calls[backend] += 1
    if backend == "torch":
        grads = _backward_reference(x, d_cond, d_uncond, history, noise, coef, g_x, g_e)
    else:
        args = _contiguous(x, d_cond, d_uncond, history, noise)
        coef_k = _coefficients(coef, x, device)
        kernel = _C.guided_step_backward if backend in ("cpu", "cuda") else _triton_kernels().guided_step_backward
        grads = kernel(*args, coef_k, g_x.contiguous(), g_e.contiguous())
    grad_x, grad_dc, grad_du, grad_h, grad_noise, grad_coef = grads
    optional = lambda t: [] if t is None else [t]  # noqa: E731
    grad_coef = grad_coef.to(device=coef.device, dtype=coef.dtype)
    tensor_grads = [grad_x, grad_dc, *optional(grad_du), *grad_h, *optional(grad_noise)]
    return [t.contiguous() for t in tensor_grads] + [grad_coef]  # contiguous on every backend, as the fake says


@_guided_step_backward_op.register_fake
def _(x, d_cond, d_uncond, history, noise, coef, g_x, g_e):
    _check_op_args(x, d_cond, d_uncond, list(history), noise, coef, (g_x, g_e))
    like = [x, d_cond] + ([d_uncond] if d_uncond is not None else []) + list(history)
    like += [noise] if noise is not None else []
    return [t.new_empty(t.shape) for t in like] + [torch.empty_like(coef)]


def _backward_reference(x, d_cond, d_uncond, history, noise, coef, g_x, g_e):
    """The backward in torch: the reference for the backward kernels."""
    ct = torch.promote_types(torch.promote_types(x.dtype, d_cond.dtype), torch.float32)
    c = coef.to(device=x.device, dtype=ct)
    a, w, hx, hd, c_noise, b = c[0], c[1], c[2], c[3], c[4], c[5:]
    g_x, g_e = g_x.to(ct), g_e.to(ct)
    xc, dc = x.to(ct), d_cond.to(ct)
    diff = dc - d_uncond.to(ct) if d_uncond is not None else None
    d = dc if diff is None else d_uncond.to(ct) + w * diff
    g_d = b[0] * g_x + hd * g_e

    def dot(u, v):
        # Summed in float64, as the kernels sum: a float32 sum would depend on the order the inputs' memory layout
        # (contiguous or channels_last) gives it.
        return (u.double() * v.double()).sum() if v is not None else u.new_zeros((), dtype=torch.float64)

    g_coef = torch.stack(
        [dot(g_x, xc), dot(g_d, diff), dot(g_e, xc), dot(g_e, d), dot(g_x, None if noise is None else noise.to(ct)),
         dot(g_x, d), *(dot(g_x, h.to(ct)) for h in history)]
    )  # fmt: skip
    return (
        (a * g_x + hx * g_e).to(x.dtype),
        (g_d if diff is None else w * g_d).to(d_cond.dtype),
        None if diff is None else ((1 - w) * g_d).to(d_uncond.dtype),
        [(bk * g_x).to(h.dtype) for bk, h in zip(b[1:], history)],
        None if noise is None else (c_noise * g_x).to(noise.dtype),
        g_coef,
    )


_guided_step_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------ learned timesteps (LD3)


def ld3_sigmas_reference(xi: torch.Tensor, lo: float, hi: float, logsnr: bool) -> torch.Tensor:
    """LD3's timestep map in torch, the reference of the Triton kernel: ``xi [n]`` -> softmax -> cumulative sum
    -> reverse -> min-max normalised ``u`` running from 1 to 0 -> ``exp(lo + u (hi - lo))`` when ``logsnr``
    (``lo``, ``hi`` are log sigmas), else ``lo + u (hi - lo)``. Returns ``[n]`` in xi's dtype."""
    r = torch.cumsum(torch.softmax(xi, dim=0), dim=0).flip(0)
    u = (r - r[-1]) / (r[0] - r[-1])  # r decreases from 1 to softmax(xi)[0]
    s = lo + u * (hi - lo)
    return torch.exp(s) if logsnr else s


def _ld3_backend(xi: torch.Tensor) -> str:
    """``triton`` where its kernel can run on xi's device (and is not forced off), else ``torch``. The map has no
    C++ or CUDA kernel, so forcing ``cpu`` or ``cuda`` selects the reference for it."""
    forced = _forced_backend()
    usable = _usable("triton", xi.device) is None and not isinstance(_triton_kernels("ld3_sigmas"), str)
    if forced == "triton" and not usable:
        raise RuntimeError(f"FASTDIFF_BACKEND=triton cannot run ld3_sigmas: {_usable('triton', xi.device)}")
    return "triton" if usable and forced in (None, "triton") else "torch"


def _check_ld3(xi: torch.Tensor, grad_sigmas: torch.Tensor | None = None, contiguous: bool = False) -> None:
    """The checks of LD3's map, in its registered ops (and their fakes) and its Triton launchers: ``xi`` a 1-D float
    tensor of at least 2 values (one value normalises 0 by 0), ``grad_sigmas`` like it; ``contiguous`` for a
    launcher, whose kernel reads ``n`` consecutive values of each."""
    named = [("xi", xi)] + ([("grad_sigmas", grad_sigmas)] if grad_sigmas is not None else [])
    for name, t in named:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"ld3_sigmas: {name} must be a floating tensor of dtype float16, bfloat16, float32 or "
                f"float64, got {t.dtype}"
            )
    if xi.ndim != 1 or xi.numel() < 2:
        raise ValueError(f"ld3_sigmas: xi must be a 1-D tensor of at least 2 values, got shape {tuple(xi.shape)}")
    if grad_sigmas is not None:
        if grad_sigmas.shape != xi.shape:
            raise ValueError(
                f"ld3_sigmas: grad_sigmas has shape {tuple(grad_sigmas.shape)} but xi has {tuple(xi.shape)}"
            )
        if grad_sigmas.device != xi.device:
            raise ValueError(f"ld3_sigmas: grad_sigmas is on {grad_sigmas.device} but xi is on {xi.device}")
    for name, t in named if contiguous else ():
        if not t.is_contiguous():
            raise ValueError(f"ld3_sigmas: {name} must be contiguous")


@torch.library.custom_op("fastdiff::ld3_sigmas", mutates_args=())
def _ld3_sigmas_op(xi: torch.Tensor, lo: float, hi: float, logsnr: bool) -> torch.Tensor:
    _check_ld3(xi)
    if _ld3_backend(xi) == "triton":
        return _triton_kernels("ld3_sigmas").ld3_sigmas(xi.contiguous(), lo, hi, logsnr)
    return ld3_sigmas_reference(xi, lo, hi, logsnr)


@_ld3_sigmas_op.register_fake
def _(xi, lo, hi, logsnr):
    _check_ld3(xi)
    return torch.empty_like(xi)


@torch.library.custom_op("fastdiff::ld3_sigmas_backward", mutates_args=())
def _ld3_sigmas_backward_op(
    xi: torch.Tensor, grad_sigmas: torch.Tensor, lo: float, hi: float, logsnr: bool
) -> torch.Tensor:
    _check_ld3(xi, grad_sigmas)
    if _ld3_backend(xi) == "triton":
        return _triton_kernels("ld3_sigmas").ld3_sigmas_backward(
            xi.contiguous(), grad_sigmas.contiguous(), lo, hi, logsnr
        )
    return _ld3_sigmas_backward_reference(xi, grad_sigmas, lo, hi, logsnr)


def _ld3_sigmas_backward_reference(xi, grad_sigmas, lo, hi, logsnr):
    """The map's backward in torch, written out (a custom op's body runs below autograd), the reference of the
    backward kernel: through the exp, the normalisation (each r_j directly, plus its two ends), the reversed
    cumulative sum and the softmax."""
    p = torch.softmax(xi, dim=0)
    r = torch.cumsum(p, dim=0).flip(0)
    span = r[0] - r[-1]
    u = (r - r[-1]) / span
    g_u = grad_sigmas * (hi - lo)
    if logsnr:
        g_u = g_u * torch.exp(lo + u * (hi - lo))
    g_r = g_u / span
    g_r[0] -= (g_u * u).sum() / span
    g_r[-1] += (g_u * (u - 1)).sum() / span
    g_p = torch.cumsum(g_r, dim=0).flip(0)  # r_j = c_{n-1-j}, and dL/dp_k = sum_{m >= k} dL/dc_m
    return p * (g_p - (p * g_p).sum())


@_ld3_sigmas_backward_op.register_fake
def _(xi, grad_sigmas, lo, hi, logsnr):
    _check_ld3(xi, grad_sigmas)
    return torch.empty_like(xi)


def _ld3_setup_context(ctx, inputs, output):
    xi, ctx.lo, ctx.hi, ctx.logsnr = inputs
    ctx.save_for_backward(xi)


def _ld3_backward(ctx, grad_sigmas):
    (xi,) = ctx.saved_tensors
    return torch.ops.fastdiff.ld3_sigmas_backward(xi, grad_sigmas, ctx.lo, ctx.hi, ctx.logsnr), None, None, None


_ld3_sigmas_op.register_autograd(_ld3_backward, setup_context=_ld3_setup_context)


def ld3_sigmas(xi: torch.Tensor, lo: float, hi: float, logsnr: bool) -> torch.Tensor:
    """LD3's timestep map as one fused op on xi's device (Triton where it runs, else the torch reference),
    differentiable with respect to ``xi``; see :func:`ld3_sigmas_reference` for the math and
    :func:`fastdiff.schedules.ld3_sigmas` for the checked public form. ``xi`` ``[n]`` float; returns ``[n]``."""
    return torch.ops.fastdiff.ld3_sigmas(xi, float(lo), float(hi), bool(logsnr))


# ---------------------------------------------------------------------------------------------- public API


def guided_step_coef(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: Sequence[torch.Tensor],
    coef: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided step with its coefficients as a tensor, differentiable with respect to every input.

    ``coef``: ``[6 + len(history)]`` float tensor ``[a, w, hx, hd, c_noise, b0, ..., bK]``. This is the form
    LD3 learns timesteps through (via the registered op ``torch.ops.fastdiff.guided_step``, which autograd and
    ``torch.compile`` see), and the form a device-resident loop uses: a coefficient tensor on x's GPU is read by
    the kernel, so a captured CUDA graph replays coefficients written in place. Returns ``(x_next, E)`` as
    :func:`guided_step_reference`.
    """
    history = list(history)
    _check_op_args(x, d_cond, d_uncond, history, noise, coef)
    return loop_step(x, d_cond, d_uncond, history, coef, noise)


def loop_step(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: list[torch.Tensor],
    coef: torch.Tensor | list[float],
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step for a sampling loop whose inputs are valid by construction (model outputs checked as they arrive,
    history entries made by this op, coefficients from the solver): :func:`guided_step_coef` without its argument
    checks, with ``coef`` as host floats too. It goes through the registered op only where autograd or
    ``torch.compile`` needs it; otherwise the forward runs directly, which saves the op's dispatch (about 50 us a
    call on the CPU) and, on a process's first call, the import of ``torch._dynamo`` that dispatching a custom op
    triggers (seconds). What it still checks costs nothing on a valid call: host coefficients (finite, in range),
    and dtypes no backend takes (only where the kernels' dtypes do not fit, on the way to the reference)."""
    if _needs_op(x, d_cond, d_uncond, history, noise, coef):
        if not isinstance(coef, torch.Tensor):
            coef = torch.tensor(coef, dtype=torch.float64)
        return torch.ops.fastdiff.guided_step(x, d_cond, d_uncond, history, noise, coef)
    return _forward(x, d_cond, d_uncond, history, noise, coef)


def _needs_op(x, d_cond, d_uncond, history, noise, coef) -> bool:
    """Whether a call must go through the registered op: under ``torch.compile``, or for autograd."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in (x, d_cond, d_uncond, noise, coef, *history))


def guided_step(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None = None,
    history: Sequence[torch.Tensor] = (),
    *,
    a: float,
    b: Sequence[float],
    w: float = 1.0,
    hx: float = 0.0,
    hd: float = 1.0,
    noise: torch.Tensor | None = None,
    c_noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused guided solver step with scalar coefficients; same contract as :func:`guided_step_reference`.

    Shapes: every tensor ``[B, ...]`` like ``x``. Returns ``(x_next, E)``. Differentiable with respect to the
    tensors; :func:`guided_step_coef` also with respect to the coefficients.
    """
    history = list(history)
    coef = [float(v) for v in (a, w, hx, hd, c_noise, *b)]
    _check_args(x, d_cond, d_uncond, history, noise, len(coef))
    return loop_step(x, d_cond, d_uncond, history, coef, noise)


def _dtype_help() -> str:
    return "; ".join(f"{s} state with {'/'.join(map(str, d))}" for s, d in KERNEL_DTYPES.items())


# ----------------------------------------------------------------------------- per-sample guidance methods
#
# The guidance methods other than plain CFG (fastdiff.guidance) make the guided estimate a per-sample linear
# combination D = g0 x + g1 D_c + g2 U (U: D_u, or APG's running average) whose weights come from per-sample sums
# over two other such combinations. Two ops serve every method: guidance_sums (one reduction pass) and
# guided_step_per_sample (the fused step with the weights read on the device). Inference only: with autograd on, the
# references run (they are differentiable).

N_SUMS = 5  # sum u, sum v, sum u^2, sum v^2, sum u v


def guidance_sums_reference(
    x: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """Per-sample sums of two combinations of the inputs, the reduction every guidance method needs.

    Args:
        x, d_cond, d_uncond: ``[B, ...]``, as :func:`guided_step_reference` takes them (``d_uncond`` required).
        mix: ``[B, 6]`` weights in :func:`acc_dtype`: ``u = mix[:, 0] x + mix[:, 1] D_c + mix[:, 2] D_u`` and
            ``v = mix[:, 3] x + mix[:, 4] D_c + mix[:, 5] D_u``, element by element within each sample.

    Returns ``[B, 5]`` in the accumulation dtype: ``sum u, sum v, sum u^2, sum v^2, sum u v`` over each sample's
    elements (the vectors are formed before they are squared, so no cancellation between the inputs).
    """
    ct = acc_dtype(x)
    inputs = torch.stack([t.to(ct).flatten(1) for t in (x, d_cond, d_uncond)], 1)  # [B, 3, n]
    m = mix.to(ct)
    u = (m[:, :3, None] * inputs).sum(1)
    v = (m[:, 3:, None] * inputs).sum(1)
    return torch.stack([u.sum(1), v.sum(1), (u * u).sum(1), (v * v).sum(1), (u * v).sum(1)], 1)


def guided_step_per_sample_reference(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    history: Sequence[torch.Tensor],
    coef: torch.Tensor | Sequence[float],
    guide: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided step with a per-sample guided estimate ``D = guide[:, 0] x + guide[:, 1] D_c + guide[:, 2] D_u``
    (``guide`` ``[B, 3]``), then as :func:`guided_step_reference` with ``coef = [a, w, hx, hd, c_noise, b0, ...,
    bK]`` (``w`` unused). Returns ``(x_next, E)`` as that reference does."""
    ct = torch.promote_types(torch.promote_types(x.dtype, d_cond.dtype), torch.float32)
    g = guide.to(ct).reshape(-1, 3, *([1] * (x.ndim - 1)))
    d = g[:, 0] * x.to(ct) + g[:, 1] * d_cond.to(ct) + g[:, 2] * d_uncond.to(ct)
    a, _, hx, hd, c_noise, *b = coef.unbind() if isinstance(coef, torch.Tensor) else coef
    x_out, e_out = guided_step_reference(x, d, None, history, a, b, 1.0, hx, hd, noise, c_noise)
    return x_out.contiguous(), e_out.to(torch.promote_types(x.dtype, d_cond.dtype)).contiguous()


def _check_per_sample(name: str, t: torch.Tensor, width: int, x: torch.Tensor) -> None:
    """A per-sample weight or sum tensor: ``[B, width]`` in x's accumulation dtype on x's device, B dividing x."""
    b = t.shape[0] if t.ndim == 2 else 0
    if t.ndim != 2 or t.shape[1] != width or b == 0 or x.shape[0] != b:
        raise ValueError(f"{name} must be [B, {width}] with B = x.shape[0] = {x.shape[0]}, got {tuple(t.shape)}")
    if t.dtype != acc_dtype(x) or t.device != x.device:
        raise ValueError(f"{name} must be {acc_dtype(x)} on {x.device} (x's accumulation dtype and device), got "
                         f"{t.dtype} on {t.device}")  # fmt: skip


def _per_sample_backend(x, d_cond, d_uncond, history, noise, *weights) -> str:
    """The backend of a per-sample op: the reference under autograd, else as :func:`_backend` chooses."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, d_cond, d_uncond, noise,
                                                                                   *history, *weights)):  # fmt: skip
        return "torch"
    return _backend(x, d_cond, d_uncond, history, noise, x.device, what="a per-sample guidance op")


def guidance_sums(x: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """:func:`guidance_sums_reference` on the chosen backend: one pass over the three inputs, no host sync.
    Returns ``[B, 5]`` in :func:`acc_dtype`."""
    _check_args(x, d_cond, d_uncond, [], None, 6)
    _check_per_sample("mix", mix, 6, x)
    backend = _per_sample_backend(x, d_cond, d_uncond, [], None, mix)
    calls[backend] += 1
    if backend == "torch":
        return guidance_sums_reference(x, d_cond, d_uncond, mix)
    x, d_cond, d_uncond, _, _ = _contiguous(x, d_cond, d_uncond, [], None)
    out = torch.empty(x.shape[0], N_SUMS, dtype=acc_dtype(x), device=x.device)
    if backend == "triton":
        _triton_kernels("guidance").guidance_sums(x, d_cond, d_uncond, mix.contiguous(), out)
    else:
        _C.guidance_sums(x, d_cond, d_uncond, mix.contiguous(), out)
    return out


def guided_step_per_sample(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    history: Sequence[torch.Tensor],
    coef: torch.Tensor | list[float],
    guide: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`guided_step_per_sample_reference` on the chosen backend, in one pass over memory: the per-sample
    weights ``guide`` ``[B, 3]`` (:func:`acc_dtype`, on x's device) are read by the kernel, so a loop of these
    steps needs no host sync and can be captured. ``coef`` as :func:`loop_step` takes it."""
    history = list(history)
    n_coef = coef.numel() if isinstance(coef, torch.Tensor) else len(coef)
    _check_args(x, d_cond, d_uncond, history, noise, n_coef)
    _check_per_sample("guide", guide, 3, x)
    coef_tensor = coef if isinstance(coef, torch.Tensor) else None
    backend = _per_sample_backend(x, d_cond, d_uncond, history, noise, guide, coef_tensor)
    calls[backend] += 1
    if backend == "torch":
        return guided_step_per_sample_reference(x, d_cond, d_uncond, history, coef, guide, noise)
    coef = _coefficients(coef, x, x.device)
    args = _contiguous(x, d_cond, d_uncond, history, noise)
    x_out = torch.empty_like(args[0])
    e_out = torch.empty_like(args[0])
    if backend == "triton":
        _triton_kernels("guidance").guided_step_per_sample(*args, coef, guide.contiguous(), x_out, e_out)
    else:
        _C.guided_step_per_sample(*args, coef, guide.contiguous(), x_out, e_out)
    return x_out, e_out
