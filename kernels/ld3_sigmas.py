"""Triton kernels of LD3's timestep map, forward and backward (same contract as
``fastdiff.schedules.ld3_sigmas``, the pure-torch reference).

``xi [n]`` -> ``p = softmax(xi)`` -> ``r = reverse(cumsum(p))`` -> ``u = (r - r[-1]) / (r[0] - r[-1])`` ->
sigmas ``exp(lo + u (hi - lo))`` (logSNR space: lo, hi = log sigma_min, log sigma_max) or ``lo + u (hi - lo)``
(time space: lo, hi = sigma_min, sigma_max). A schedule has a few to a few hundred entries, so one program
holds the whole vector. Both kernels work on the reversed vector ``q[j] = p[n-1-j]``, where the reversed
cumulative sum is a plain suffix sum, ``r[j] = sum_{m >= j} q[m]``.

``lo`` and ``hi`` are annotated ``tl.float64``: Triton types an unannotated Python float as float32 when it compiles
for a GPU (the interpreter keeps doubles), which would move the schedule's endpoints by about 1e-7 relative.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff import ops


@triton.jit
def _reversed_softmax(xi_ptr, n, BLOCK: tl.constexpr):
    j = tl.arange(0, BLOCK)
    mask = j < n
    v = tl.load(xi_ptr + (n - 1 - j), mask=mask, other=-float("inf")).to(tl.float64)
    e = tl.exp(v - tl.max(v, axis=0))
    e = tl.where(mask, e, 0.0)
    return j, mask, e / tl.sum(e, axis=0)


@triton.jit
def _normalised(j, mask, q, n):
    """``(u, r_first, r_last)``: the suffix sums normalised onto [0, 1] and the two ends they were scaled by."""
    r = tl.sum(q, axis=0) - tl.cumsum(q, axis=0) + q
    r_first = tl.sum(tl.where(j == 0, r, 0.0), axis=0)
    r_last = tl.sum(tl.where(j == n - 1, r, 0.0), axis=0)
    return (r - r_last) / (r_first - r_last), r_first, r_last


@triton.jit
def _ld3_sigmas_kernel(xi_ptr, out_ptr, n, lo: tl.float64, hi: tl.float64, LOGSNR: tl.constexpr, BLOCK: tl.constexpr):
    j, mask, q = _reversed_softmax(xi_ptr, n, BLOCK)
    u, _, _ = _normalised(j, mask, q, n)
    s = lo + u * (hi - lo)
    if LOGSNR:
        s = tl.exp(s)
    tl.store(out_ptr + j, s.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ld3_sigmas_backward_kernel(
    xi_ptr, g_ptr, grad_ptr, n, lo: tl.float64, hi: tl.float64, LOGSNR: tl.constexpr, BLOCK: tl.constexpr
):
    j, mask, q = _reversed_softmax(xi_ptr, n, BLOCK)
    u, r_first, r_last = _normalised(j, mask, q, n)
    g = tl.load(g_ptr + j, mask=mask, other=0.0).to(tl.float64)
    g_u = g * (hi - lo)
    if LOGSNR:
        g_u = g_u * tl.exp(lo + u * (hi - lo))
    g_u = tl.where(mask, g_u, 0.0)
    # u = (r - r_last) / span: each r[j] directly, plus the two ends through the normalisation.
    span = r_first - r_last
    g_r = g_u / span
    g_r += tl.where(j == 0, -tl.sum(g_u * u, axis=0) / span, 0.0)
    g_r += tl.where(j == n - 1, tl.sum(g_u * (u - 1.0), axis=0) / span, 0.0)
    # r[j] = sum_{m >= j} q[m], so dL/dq[m] = sum_{j <= m} dL/dr[j]; then the softmax Jacobian.
    g_q = tl.cumsum(g_r, axis=0)
    grad = q * (g_q - tl.sum(q * g_q, axis=0))
    tl.store(grad_ptr + (n - 1 - j), grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_args(xi: torch.Tensor, lo: float, hi: float, logsnr: bool) -> dict:
    return dict(n=xi.numel(), lo=lo, hi=hi, LOGSNR=logsnr, BLOCK=max(16, triton.next_power_of_2(xi.numel())))


def ld3_sigmas(xi: torch.Tensor, lo: float, hi: float, logsnr: bool) -> torch.Tensor:
    """Sigmas ``[n]`` (xi's dtype and device) from contiguous ``xi [n]``; ``lo``/``hi`` as in the module
    docstring. Arithmetic runs in float64: a schedule is tiny and its sigmas span orders of magnitude. Checked here,
    not trusted: the kernel reads ``xi.numel()`` consecutive values."""
    ops._check_ld3(xi, contiguous=True)
    out = torch.empty_like(xi)
    _ld3_sigmas_kernel[(1,)](xi, out, **_launch_args(xi, lo, hi, logsnr))
    return out


def ld3_sigmas_backward(xi: torch.Tensor, grad_sigmas: torch.Tensor, lo: float, hi: float, logsnr: bool):
    """``dL/dxi [n]`` from ``dL/dsigmas [n]`` (both contiguous, on one device); checked as :func:`ld3_sigmas`."""
    ops._check_ld3(xi, grad_sigmas, contiguous=True)
    grad = torch.empty_like(xi)
    _ld3_sigmas_backward_kernel[(1,)](xi, grad_sigmas, grad, **_launch_args(xi, lo, hi, logsnr))
    return grad
