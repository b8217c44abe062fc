"""Triton kernel of the fused guided solver step (same contract as ``fastdiff.ops.guided_step_reference``).

One pass over memory: reads x, D_c, D_u (inside the guidance interval only), up to three history entries and
an optional noise tensor; writes x_next and the new history entry E = hx * x + hd * D.

The coefficients ``[a, w, hx, hd, c_noise, b0, ..., bK]`` arrive in one of two ways, as the CUDA kernels take
them: as float64 scalar arguments (host values: no host-to-device copy, which would synchronise the stream and
could not be captured in a CUDA graph), or from a small tensor on x's device in the accumulation dtype, read by
the kernel itself, so a device-resident schedule needs no host round trip and a captured graph replays new
coefficients written in place. Arithmetic runs in float64 for a float64 state, else in float32.

Every float scalar argument is annotated ``tl.float64``: Triton types an unannotated Python float as float32
when it compiles for a GPU (the interpreter keeps doubles, so CPU tests cannot see the difference).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff import ops

BLOCK = 1024
N_COEF_MAX = 9  # a, w, hx, hd, c_noise, b0..b3


@triton.jit
def _coefficient(coef_ptr, k: tl.constexpr, value, COEF_PTR: tl.constexpr, ACC: tl.constexpr):
    """Coefficient ``k`` of the layout above in the accumulation dtype: read from memory, or the scalar argument."""
    if COEF_PTR:
        return tl.load(coef_ptr + k).to(ACC)
    else:
        # Not tl.cast(value, ACC): the interpreter passes `value` as a Python float, which a cast types float32
        # first; added to a zero of ACC it keeps its double precision there, and compiles to the same conversion.
        return (tl.zeros((), ACC) + value).to(ACC)


@triton.jit
def _finish_step(
    x, d, offs, mask, h0_ptr, h1_ptr, h2_ptr, noise_ptr, coef_ptr, a0, hx0, hd0, cn0, b00, b10, b20, b30,
    x_out_ptr, e_out_ptr,
    N_HIST: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_E: tl.constexpr, COEF_PTR: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """The step from the state ``x`` and the guided estimate ``d`` of a block on: ``x_next = a x + b0 d + history +
    noise`` and ``E = hx x + hd d``, stored (shared by the plain and the per-sample kernels)."""
    acc = _coefficient(coef_ptr, 0, a0, COEF_PTR, ACC) * x + _coefficient(coef_ptr, 5, b00, COEF_PTR, ACC) * d
    if N_HIST >= 1:
        acc += _coefficient(coef_ptr, 6, b10, COEF_PTR, ACC) * tl.load(h0_ptr + offs, mask=mask).to(ACC)
    if N_HIST >= 2:
        acc += _coefficient(coef_ptr, 7, b20, COEF_PTR, ACC) * tl.load(h1_ptr + offs, mask=mask).to(ACC)
    if N_HIST >= 3:
        acc += _coefficient(coef_ptr, 8, b30, COEF_PTR, ACC) * tl.load(h2_ptr + offs, mask=mask).to(ACC)
    if HAS_NOISE:
        acc += _coefficient(coef_ptr, 4, cn0, COEF_PTR, ACC) * tl.load(noise_ptr + offs, mask=mask).to(ACC)
    if WRITE_E:
        e = _coefficient(coef_ptr, 2, hx0, COEF_PTR, ACC) * x + _coefficient(coef_ptr, 3, hd0, COEF_PTR, ACC) * d
        tl.store(e_out_ptr + offs, e.to(e_out_ptr.dtype.element_ty), mask=mask)
    tl.store(x_out_ptr + offs, acc.to(x_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _guided_step_kernel(
    x_ptr, dc_ptr, du_ptr, h0_ptr, h1_ptr, h2_ptr, noise_ptr, coef_ptr,
    a0: tl.float64, w0: tl.float64, hx0: tl.float64, hd0: tl.float64, cn0: tl.float64,
    b00: tl.float64, b10: tl.float64, b20: tl.float64, b30: tl.float64,
    x_out_ptr, e_out_ptr, n,
    HAS_UNCOND: tl.constexpr, N_HIST: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_E: tl.constexpr,
    COEF_PTR: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    d = tl.load(dc_ptr + offs, mask=mask).to(ACC)
    if HAS_UNCOND:
        du = tl.load(du_ptr + offs, mask=mask).to(ACC)
        d = du + _coefficient(coef_ptr, 1, w0, COEF_PTR, ACC) * (d - du)
    _finish_step(
        x, d, offs, mask, h0_ptr, h1_ptr, h2_ptr, noise_ptr, coef_ptr, a0, hx0, hd0, cn0, b00, b10, b20, b30,
        x_out_ptr, e_out_ptr, N_HIST, HAS_NOISE, WRITE_E, COEF_PTR, ACC,
    )  # fmt: skip


def _coefficient_args(coef: torch.Tensor | list[float], x: torch.Tensor) -> tuple:
    """``(coef_ptr, scalars, COEF_PTR, ACC)`` for a launch: a device tensor is read by the kernel (the scalars are
    unused), host values travel as float64 scalar arguments (the pointer is unused and never read)."""
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if isinstance(coef, torch.Tensor):
        return coef, [0.0] * N_COEF_MAX, True, acc
    scalars = [float(c) for c in coef] + [0.0] * (N_COEF_MAX - len(coef))
    return x, scalars, False, acc


def guided_step(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: list[torch.Tensor],
    noise: torch.Tensor | None,
    coef: torch.Tensor | list[float],
    x_out: torch.Tensor,
    e_out: torch.Tensor | None,
) -> None:
    """Launch the kernel. All tensors contiguous, shaped like ``x`` on its device; ``x``, ``history``, ``noise`` and
    the outputs share the state dtype. ``coef``: ``[6 + len(history)]`` host floats, or a tensor on x's device in
    the accumulation dtype (float64 for a float64 state, else float32). Checked here, not trusted: the kernel reads
    every pointer at x's offsets, so a shorter tensor would be read out of bounds."""
    outputs = [("x_out", x_out)] + ([("e_out", e_out)] if e_out is not None else [])
    ops._check_launch(x, d_cond, d_uncond, history, noise, coef, outputs)
    n = x.numel()
    hist = list(history) + [x] * (3 - len(history))  # unused slots are never read
    coef_ptr, scalars, coef_in_memory, acc = _coefficient_args(coef, x)
    _guided_step_kernel[(triton.cdiv(n, BLOCK),)](
        x, d_cond, d_uncond if d_uncond is not None else x, hist[0], hist[1], hist[2],
        noise if noise is not None else x, coef_ptr, *scalars, x_out, e_out if e_out is not None else x_out, n,
        HAS_UNCOND=d_uncond is not None, N_HIST=len(history), HAS_NOISE=noise is not None,
        WRITE_E=e_out is not None, COEF_PTR=coef_in_memory, ACC=acc, BLOCK=BLOCK,
    )  # fmt: skip


@triton.jit
def _guided_step_backward_kernel(
    x_ptr, dc_ptr, du_ptr, h0_ptr, h1_ptr, h2_ptr, noise_ptr, coef_ptr,
    a0: tl.float64, w0: tl.float64, hx0: tl.float64, hd0: tl.float64, cn0: tl.float64,
    b00: tl.float64, b10: tl.float64, b20: tl.float64, b30: tl.float64,
    gx_ptr, ge_ptr, grad_x_ptr, grad_dc_ptr, grad_du_ptr, grad_h0_ptr, grad_h1_ptr, grad_h2_ptr, grad_noise_ptr,
    partial_ptr, n,
    HAS_UNCOND: tl.constexpr, N_HIST: tl.constexpr, HAS_NOISE: tl.constexpr, COEF_PTR: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # The step is linear: tensor gradients are scaled g_x/g_e, coefficient gradients are dot products, summed
    # here per block (one row of `partial` per program) so no per-element product is written to memory.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = _coefficient(coef_ptr, 0, a0, COEF_PTR, ACC)
    hd = _coefficient(coef_ptr, 3, hd0, COEF_PTR, ACC)
    row = partial_ptr + pid * (6 + N_HIST)
    gx = tl.load(gx_ptr + offs, mask=mask, other=0.0).to(ACC)
    ge = tl.load(ge_ptr + offs, mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    d = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(ACC)
    gd = _coefficient(coef_ptr, 5, b00, COEF_PTR, ACC) * gx + hd * ge
    grad_x = a * gx + _coefficient(coef_ptr, 2, hx0, COEF_PTR, ACC) * ge
    tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if HAS_UNCOND:
        w = _coefficient(coef_ptr, 1, w0, COEF_PTR, ACC)
        du = tl.load(du_ptr + offs, mask=mask, other=0.0).to(ACC)
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
        nz = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(row + 4, tl.sum(gx * nz, axis=0))
        grad_noise = _coefficient(coef_ptr, 4, cn0, COEF_PTR, ACC) * gx
        tl.store(grad_noise_ptr + offs, grad_noise.to(grad_noise_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(row + 4, tl.sum(gx * 0, axis=0))
    if N_HIST >= 1:
        h = tl.load(h0_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(row + 6, tl.sum(gx * h, axis=0))
        grad_h = _coefficient(coef_ptr, 6, b10, COEF_PTR, ACC) * gx
        tl.store(grad_h0_ptr + offs, grad_h.to(grad_h0_ptr.dtype.element_ty), mask=mask)
    if N_HIST >= 2:
        h = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(row + 7, tl.sum(gx * h, axis=0))
        grad_h = _coefficient(coef_ptr, 7, b20, COEF_PTR, ACC) * gx
        tl.store(grad_h1_ptr + offs, grad_h.to(grad_h1_ptr.dtype.element_ty), mask=mask)
    if N_HIST >= 3:
        h = tl.load(h2_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(row + 8, tl.sum(gx * h, axis=0))
        grad_h = _coefficient(coef_ptr, 8, b30, COEF_PTR, ACC) * gx
        tl.store(grad_h2_ptr + offs, grad_h.to(grad_h2_ptr.dtype.element_ty), mask=mask)


def guided_step_backward(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor | None,
    history: list[torch.Tensor],
    noise: torch.Tensor | None,
    coef: torch.Tensor | list[float],
    g_x: torch.Tensor,
    g_e: torch.Tensor,
):
    """Backward of :func:`guided_step`; same layout rules and coefficient forms. Returns ``(grad_x, grad_d_cond,
    grad_d_uncond, grad_history, grad_noise, grad_coef)``, the last a float64 tensor of ``6 + len(history)`` values
    on x's device. Checked here, as :func:`guided_step` checks."""
    ops._check_launch(x, d_cond, d_uncond, history, noise, coef, grads=(g_x, g_e))
    n = x.numel()
    blocks = triton.cdiv(n, BLOCK)
    grad_x, grad_dc = torch.empty_like(x), torch.empty_like(d_cond)
    grad_du = torch.empty_like(d_uncond) if d_uncond is not None else None
    grad_h = [torch.empty_like(h) for h in history]
    grad_noise = torch.empty_like(noise) if noise is not None else None
    coef_ptr, scalars, coef_in_memory, acc = _coefficient_args(coef, x)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty(blocks, 6 + len(history), dtype=acc_dtype, device=x.device)
    hist = list(history) + [x] * (3 - len(history))
    ghist = grad_h + [grad_x] * (3 - len(history))  # unused slots are never written
    _guided_step_backward_kernel[(blocks,)](
        x, d_cond, d_uncond if d_uncond is not None else x, hist[0], hist[1], hist[2],
        noise if noise is not None else x, coef_ptr, *scalars, g_x, g_e,
        grad_x, grad_dc, grad_du if grad_du is not None else grad_dc, ghist[0], ghist[1], ghist[2],
        grad_noise if grad_noise is not None else grad_x, partial, n,
        HAS_UNCOND=d_uncond is not None, N_HIST=len(history), HAS_NOISE=noise is not None,
        COEF_PTR=coef_in_memory, ACC=acc, BLOCK=BLOCK,
    )  # fmt: skip
    return grad_x, grad_dc, grad_du, grad_h, grad_noise, partial.double().sum(0)
