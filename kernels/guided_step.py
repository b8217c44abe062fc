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
