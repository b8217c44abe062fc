"""The one place that chooses a backend for fastdiff's ops.

Every deterministic solver step is a linear combination (DESIGN.md)::

    D      = d_uncond + w * (d_cond - d_uncond)      (D = d_cond when d_uncond is None)
    x_next = a * x + b[0] * D + sum_k b[k] * history[k - 1]
    E      = hx * x + hd * D                           (the new history entry)

E is D itself for the data-prediction solvers (hx=0, hd=1) and the derivative (x - D) / sigma for iPNDM.

:func:`guided_step_reference` is the pure-torch reference that every kernel is checked against.
:func:`guided_step` dispatches to a compiled kernel where one fits the inputs, else to the reference.

Backends: ``torch`` (the reference, always there), ``cpu`` (C++/OpenMP in ``fastdiff._C``) and ``cuda``
(plain CUDA in ``fastdiff._C`` when it was built with CUDA). ``FASTDIFF_BACKEND`` forces one; a forced backend
that cannot run the call raises instead of falling back.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence

import torch

log = logging.getLogger("fastdiff")

BACKENDS = ("torch", "cpu", "cuda")
MAX_HISTORY = 3  # csrc/step_math.h: kMaxHistory

try:
    _C = importlib.import_module("fastdiff._C")

    _EXT_ERROR: str | None = None
except ImportError as exc:  # a build with FASTDIFF_SKIP_EXT=1, or a broken one
    _C = None
    _EXT_ERROR = str(exc)
_warned_missing = False


def extension_available() -> bool:
    """True when the compiled extension ``fastdiff._C`` imported."""
    return _C is not None


def available_backends() -> list[str]:
    """The backends that can run on this machine, in the order ``auto`` prefers them for their devices."""
    out = ["torch"]
    if _C is not None:
        out.append("cpu")
        if _C.with_cuda and torch.cuda.is_available():
            out.append("cuda")
    return out


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch guided solver step, the reference for every kernel.

    Args:
        x: state, any shape ``[B, ...]``, floating dtype.
        d_cond: conditional denoised estimate, same shape as ``x``; any floating dtype.
        d_uncond: unconditional estimate (same shape), or None outside the guidance interval.
        history: up to 3 earlier history entries, same shape.
        a, b, w, hx, hd: scalars; ``len(b) == len(history) + 1``.

    Returns:
        ``(x_next, E)``: ``x_next`` in ``x.dtype``; ``E = hx * x + hd * D`` in the promoted dtype of ``x`` and
        ``d_cond``. Arithmetic runs in at least float32.
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
    e = d if (hx == 0 and hd == 1) else hx * xc + hd * d
    return acc.to(x.dtype), e.to(torch.promote_types(x.dtype, d_cond.dtype))


def _check_args(x, d_cond, d_uncond, history, b) -> None:
    if len(history) > MAX_HISTORY:
        raise ValueError(f"guided_step: at most {MAX_HISTORY} history tensors, got {len(history)}")
    if len(b) != len(history) + 1:
        raise ValueError(f"guided_step: need len(b) == len(history) + 1, got {len(b)} and {len(history)}")
    for name, t in [("d_cond", d_cond), ("d_uncond", d_uncond)] + [(f"history[{k}]", h) for k, h in enumerate(history)]:
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"guided_step: {name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"guided_step: {name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"guided_step: {name} must be a floating tensor, got {t.dtype}")


def _kernel_backend_for(tensors: list[torch.Tensor]) -> str | None:
    """The compiled backend whose kernel fits these tensors, or None when only the reference does."""
    x = tensors[0]
    if x.dtype not in (torch.float32, torch.float64) or any(t.dtype != x.dtype for t in tensors):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None  # the compiled ops have no backward yet; the reference is differentiable
    return x.device.type if x.device.type in ("cpu", "cuda") else None


def _built(backend: str) -> bool:
    return _C is not None and (backend == "cpu" or bool(_C.with_cuda))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused guided solver step; same contract as :func:`guided_step_reference`.

    Shapes: every tensor ``[B, ...]`` like ``x``. Returns ``(x_next, E)``.
    """
    history = list(history)
    _check_args(x, d_cond, d_uncond, history, b)
    tensors = [x, d_cond] + ([d_uncond] if d_uncond is not None else []) + history
    forced = os.environ.get("FASTDIFF_BACKEND", "").strip().lower() or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"FASTDIFF_BACKEND={forced!r} is not a backend; choose one of {BACKENDS}")
    if forced == "torch":
        return guided_step_reference(x, d_cond, d_uncond, history, a, b, w, hx, hd)

    backend = _kernel_backend_for(tensors)
    if forced is not None and (backend != forced or not _built(forced)):
        if _C is None:
            why = f"fastdiff._C is not available: {_EXT_ERROR}"
        elif backend != forced:
            why = (
                f"this call (x: {x.dtype} on {x.device}) needs the {backend or 'torch'} backend; the compiled "
                "kernels take one float32/float64 dtype for all inputs, tensors on their device, and no autograd"
            )
        else:
            why = "fastdiff._C was built without CUDA"
        raise RuntimeError(f"FASTDIFF_BACKEND={forced} cannot run: {why}")
    if backend is not None and not _built(backend):
        _say_missing_once()
        backend = None
    if backend is None:
        return guided_step_reference(x, d_cond, d_uncond, history, a, b, w, hx, hd)

    xc = x.contiguous()
    x_out = torch.empty_like(xc)
    e_out = torch.empty_like(xc)
    _C.guided_step(
        xc,
        d_cond.contiguous(),
        d_uncond.contiguous() if d_uncond is not None else None,
        [h.contiguous() for h in history],
        float(a),
        [float(v) for v in b],
        float(w),
        float(hx),
        float(hd),
        x_out,
        e_out,
    )
    return x_out, e_out
