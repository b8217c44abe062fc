"""Triton kernel of the fused guided solver step (same contract as ``fastdiff.ops.guided_step_reference``).

One pass over memory: reads x, D_c, D_u (inside the guidance interval only), up to three history entries and
an optional noise tensor; writes x_next and the new history entry E = hx * x + hd * D. Coefficients come from
a small tensor on x's device, ``[a, w, hx, hd, c_noise, b0, ..., bK]``, in the accumulation dtype (float64 for
float64 state, else float32), so a device-resident schedule needs no host round trip.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _guided_step_kernel(
    x_ptr, dc_ptr, du_ptr, h0_ptr, h1_ptr, h2_ptr, noise_ptr, coef_ptr, x_out_ptr, e_out_ptr, n,
    HAS_UNCOND: tl.constexpr, N_HIST: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_E: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(coef_ptr)
    acc_t = a.dtype
    x = tl.load(x_ptr + offs, mask=mask).to(acc_t)
    d = tl.load(dc_ptr + offs, mask=mask).to(acc_t)
    if HAS_UNCOND:
        du = tl.load(du_ptr + offs, mask=mask).to(acc_t)
        d = du + tl.load(coef_ptr + 1) * (d - du)
    acc = a * x + tl.load(coef_ptr + 5) * d
    if N_HIST >= 1:
        acc += tl.load(coef_ptr + 6) * tl.load(h0_ptr + offs, mask=mask).to(acc_t)
    if N_HIST >= 2:
        acc += tl.load(coef_ptr + 7) * tl.load(h1_ptr + offs, mask=mask).to(acc_t)
    if N_HIST >= 3:
        acc += tl.load(coef_ptr + 8) * tl.load(h2_ptr + offs, mask=mask).to(acc_t)
    if HAS_NOISE:
        acc += tl.load(coef_ptr + 4) * tl.load(noise_ptr + offs, mask=mask).to(acc_t)
    if WRITE_E:
        e = tl.load(coef_ptr + 2) * x + tl.load(coef_ptr + 3) * d
        tl.store(e_out_ptr + offs, e.to(e_out_ptr.dtype.element_ty), mask=mask)
    tl.store(x_out_ptr + offs, acc.to(x_out_ptr.dtype.element_ty), mask=mask)


def guided_step(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: list[torch.Tensor],
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    x_out: torch.Tensor,
    e_out: torch.Tensor | None,
) -> None:
    """Launch the kernel. All tensors contiguous with ``x.numel()`` elements on one device; ``coef`` as in the
    module docstring. ``x``, ``history``, ``noise`` and the outputs share the state dtype."""
    n = x.numel()
    if n == 0:
        return
    hist = list(history) + [x] * (3 - len(history))  # unused slots are never read
    _guided_step_kernel[(triton.cdiv(n, BLOCK),)](
        x, d_cond, d_uncond if d_uncond is not None else x, hist[0], hist[1], hist[2],
        noise if noise is not None else x, coef, x_out, e_out if e_out is not None else x_out, n,
        HAS_UNCOND=d_uncond is not None, N_HIST=len(history), HAS_NOISE=noise is not None,
        WRITE_E=e_out is not None, BLOCK=BLOCK,
    )  # fmt: skip


@triton.jit
def _guided_step_backward_kernel(
    x_ptr, dc_ptr, du_ptr, h0_ptr, h1_ptr, h2_ptr, noise_ptr, coef_ptr, gx_ptr, ge_ptr,
    grad_x_ptr, grad_dc_ptr, grad_du_ptr, grad_h0_ptr, grad_h1_ptr, grad_h2_ptr, grad_noise_ptr, partial_ptr, n,
    HAS_UNCOND: tl.constexpr, N_HIST: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # The step is linear: tensor gradients are scaled g_x/g_e, coefficient gradients are dot products, summed
    # here per block (one row of `partial` per program) so no per-element product is written to memory.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(coef_ptr)
    acc_t = a.dtype
    row = partial_ptr + pid * (6 + N_HIST)
    gx = tl.load(gx_ptr + offs, mask=mask, other=0.0).to(acc_t)
    ge = tl.load(ge_ptr + offs, mask=mask, other=0.0).to(acc_t)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
    d = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(acc_t)
    gd = tl.load(coef_ptr + 5) * gx + tl.load(coef_ptr + 3) * ge
    tl.store(grad_x_ptr + offs, (a * gx + tl.load(coef_ptr + 2) * ge).to(grad_x_ptr.dtype.element_ty), mask=mask)
    if HAS_UNCOND:
        w = tl.load(coef_ptr + 1)
        du = tl.load(du_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(row + 1, tl.sum(gd * (d - du), axis=0))
        tl.store(grad_dc_ptr + offs, (w * gd).to(grad_dc_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_du_ptr + offs, ((1 - w) * gd).to(grad_du_ptr.dtype.element_ty), mask=mask)
        d = du + w * (d - du)
    else:
        tl.store(row + 1, tl.sum(gd * 0, axis=0))
        tl.store(grad_dc_ptr + offs, gd.to(grad_dc_ptr.dtype.element_ty), mask=mask)
    tl.store(row, tl.sum(gx * x, axis=0))
    tl.store(row + 2, tl.sum(ge * x, axis=0))
    tl.store(row + 3, tl.sum(ge * d, axis=0))
    tl.store(row + 5, tl.sum(gx * d, axis=0))
    if HAS_NOISE:
        nz = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(row + 4, tl.sum(gx * nz, axis=0))
        tl.store(grad_noise_ptr + offs, (tl.load(coef_ptr + 4) * gx).to(grad_noise_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(row + 4, tl.sum(gx * 0, axis=0))
    if N_HIST >= 1:
        h = tl.load(h0_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(row + 6, tl.sum(gx * h, axis=0))
        tl.store(grad_h0_ptr + offs, (tl.load(coef_ptr + 6) * gx).to(grad_h0_ptr.dtype.element_ty), mask=mask)
    if N_HIST >= 2:
        h = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(row + 7, tl.sum(gx * h, axis=0))
        tl.store(grad_h1_ptr + offs, (tl.load(coef_ptr + 7) * gx).to(grad_h1_ptr.dtype.element_ty), mask=mask)
    if N_HIST >= 3:
        h = tl.load(h2_ptr + offs, mask=mask, other=0.0).to(acc_t)
        tl.store(row + 8, tl.sum(gx * h, axis=0))
        tl.store(grad_h2_ptr + offs, (tl.load(coef_ptr + 8) * gx).to(grad_h2_ptr.dtype.element_ty), mask=mask)


def guided_step_backward(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: list[torch.Tensor],
    noise: torch.Tensor | None,
    coef: torch.Tensor,
    g_x: torch.Tensor,
    g_e: torch.Tensor,
):
    """Backward of :func:`guided_step`; same layout rules. Returns ``(grad_x, grad_d_cond, grad_d_uncond,
    grad_history, grad_noise, grad_coef)``, the last a float64 tensor of ``6 + len(history)`` values."""
    n = x.numel()
    blocks = triton.cdiv(n, BLOCK)
    grad_x, grad_dc = torch.empty_like(x), torch.empty_like(d_cond)
    grad_du = torch.empty_like(d_uncond) if d_uncond is not None else None
    grad_h = [torch.empty_like(h) for h in history]
    grad_noise = torch.empty_like(noise) if noise is not None else None
    partial = torch.empty(blocks, 6 + len(history), dtype=coef.dtype, device=x.device)
    hist = list(history) + [x] * (3 - len(history))
    ghist = grad_h + [grad_x] * (3 - len(history))  # unused slots are never written
    _guided_step_backward_kernel[(blocks,)](
        x, d_cond, d_uncond if d_uncond is not None else x, hist[0], hist[1], hist[2],
        noise if noise is not None else x, coef, g_x, g_e,
        grad_x, grad_dc, grad_du if grad_du is not None else grad_dc, ghist[0], ghist[1], ghist[2],
        grad_noise if grad_noise is not None else grad_x, partial, n,
        HAS_UNCOND=d_uncond is not None, N_HIST=len(history), HAS_NOISE=noise is not None, BLOCK=BLOCK,
    )  # fmt: skip
    return grad_x, grad_dc, grad_du, grad_h, grad_noise, partial.double().sum(0)
