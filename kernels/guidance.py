"""Triton kernels of the per-sample guidance ops (same contracts as ``fastdiff.ops.guidance_sums_reference`` and
``fastdiff.ops.guided_step_per_sample_reference``).

Both kernels run one program per block of one sample: program ``pid`` handles block ``pid % blocks`` of sample
``pid // blocks``, where ``blocks = cdiv(n // B, BLOCK)``, so each program reads its sample's weights as scalars and
no element index is divided. A sample whose size is not a multiple of BLOCK leaves its last block partly masked.

``guidance_sums`` is deterministic and uses no atomics: each program writes the five sums of its block to one row of a
``[B, blocks, 5]`` scratch tensor in the accumulation dtype, which ``torch.sum`` then reduces over the blocks in a
fixed order (with one block per sample the kernel writes ``out`` itself). Nothing is read back to the host, so both
ops can be captured in a CUDA graph.

``guided_step_per_sample`` is :mod:`fastdiff.kernels.guided_step`'s step with the guided estimate
``D = guide[b, 0] x + guide[b, 1] D_c + guide[b, 2] D_u``; it takes the coefficients as that kernel does (float64
scalar arguments, or a tensor on x's device read by the kernel; ``w`` unused). Arithmetic runs in float64 for a
float64 state, else in float32. Inference only: there is no backward.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdiff import ops
from fastdiff.kernels.guided_step import _coefficient_args, _finish_step

BLOCK = 1024
_NO_COEF = [0.0] * 6  # guidance_sums takes no coefficients; ops._check_launch checks its tensors with these


@triton.jit
def _sample_block(per_sample, blocks, BLOCK: tl.constexpr):
    """``(b, offs, mask)``: this program's sample and the flat offsets of its block within that sample."""
    pid = tl.program_id(0)
    b = pid // blocks
    within = (pid % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return b, b.to(tl.int64) * per_sample + within, within < per_sample


@triton.jit
def _guidance_sums_kernel(
    x_ptr, dc_ptr, du_ptr, mix_ptr, partial_ptr, per_sample, blocks, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, offs, mask = _sample_block(per_sample, blocks, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dc = tl.load(dc_ptr + offs, mask=mask, other=0.0).to(ACC)
    du = tl.load(du_ptr + offs, mask=mask, other=0.0).to(ACC)
    m = mix_ptr + b * 6
    u = tl.load(m).to(ACC) * x + tl.load(m + 1).to(ACC) * dc + tl.load(m + 2).to(ACC) * du
    v = tl.load(m + 3).to(ACC) * x + tl.load(m + 4).to(ACC) * dc + tl.load(m + 5).to(ACC) * du
    row = partial_ptr + tl.program_id(0).to(tl.int64) * 5  # row b * blocks + block of [B, blocks, 5]
    tl.store(row, tl.sum(u, axis=0))
    tl.store(row + 1, tl.sum(v, axis=0))
    tl.store(row + 2, tl.sum(u * u, axis=0))
    tl.store(row + 3, tl.sum(v * v, axis=0))
    tl.store(row + 4, tl.sum(u * v, axis=0))


@triton.jit
def _guided_step_per_sample_kernel(
    x_ptr, dc_ptr, du_ptr, h0_ptr, h1_ptr, h2_ptr, noise_ptr, coef_ptr, guide_ptr,
    a0: tl.float64, w0: tl.float64, hx0: tl.float64, hd0: tl.float64, cn0: tl.float64,
    b00: tl.float64, b10: tl.float64, b20: tl.float64, b30: tl.float64,
    x_out_ptr, e_out_ptr, per_sample, blocks,
    N_HIST: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_E: tl.constexpr, COEF_PTR: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, offs, mask = _sample_block(per_sample, blocks, BLOCK)
    g = guide_ptr + b * 3
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    d = tl.load(g).to(ACC) * x + tl.load(g + 1).to(ACC) * tl.load(dc_ptr + offs, mask=mask).to(ACC)
    d += tl.load(g + 2).to(ACC) * tl.load(du_ptr + offs, mask=mask).to(ACC)
    _finish_step(
        x, d, offs, mask, h0_ptr, h1_ptr, h2_ptr, noise_ptr, coef_ptr, a0, hx0, hd0, cn0, b00, b10, b20, b30,
        x_out_ptr, e_out_ptr, N_HIST, HAS_NOISE, WRITE_E, COEF_PTR, ACC,
    )  # fmt: skip


def _per_sample_layout(what: str, x, d_uncond, weights, inputs, outputs) -> tuple[int, int]:
    """What the launchers check beyond :func:`fastdiff.ops._check_launch`: ``d_uncond`` given, x batched, each of
    ``weights`` (``(name, tensor, width)``) a contiguous ``[B, width]`` tensor in x's accumulation dtype on its
    device, and no output (``(name, tensor)``) overlapping one of ``inputs`` (``(name, tensor)``). Returns
    ``(per_sample, blocks)``, the sample size and the blocks of one sample."""
    if d_uncond is None:
        raise ValueError(f"{what}: d_uncond is required")
    if x.ndim == 0:
        raise ValueError(f"{what}: x must be batched, [B, ...]; got a 0-d tensor")
    for name, t, width in weights:
        ops._check_per_sample(name, t, width, x)
        if not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous")
    for name, out in outputs:
        for other, t in inputs:
            if ops._overlaps(out, t):
                raise ValueError(f"{what}: {name} overlaps {other}; an output must not alias or overlap an input")
    per_sample = x.numel() // x.shape[0]
    return per_sample, triton.cdiv(per_sample, BLOCK)


def guidance_sums(
    x: torch.Tensor, d_cond: torch.Tensor, d_uncond: torch.Tensor, mix: torch.Tensor, out: torch.Tensor
) -> None:
    """Launch the sums kernel. ``x``, ``d_cond``, ``d_uncond`` contiguous ``[B, ...]`` in a dtype pair the kernels
    take; ``mix`` ``[B, 6]`` and ``out`` ``[B, 5]`` (written) contiguous, in the accumulation dtype on x's device.
    Checked here, not trusted."""
    ops._check_launch(x, d_cond, d_uncond, [], None, _NO_COEF)
    inputs = [("x", x), ("d_cond", d_cond), ("d_uncond", d_uncond), ("mix", mix)]
    weights = [("mix", mix, 6), ("out", out, ops.N_SUMS)]
    per_sample, blocks = _per_sample_layout("guidance_sums", x, d_uncond, weights, inputs, [("out", out)])
    partial = out if blocks == 1 else torch.empty(x.shape[0], blocks, ops.N_SUMS, dtype=out.dtype, device=x.device)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    _guidance_sums_kernel[(x.shape[0] * blocks,)](
        x, d_cond, d_uncond, mix, partial, per_sample, blocks, ACC=acc, BLOCK=BLOCK
    )
    if blocks > 1:
        torch.sum(partial, dim=1, out=out)


def guided_step_per_sample(
    x: torch.Tensor,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    history: list[torch.Tensor],
    noise: torch.Tensor | None,
    coef: torch.Tensor | list[float],
    guide: torch.Tensor,
    x_out: torch.Tensor,
    e_out: torch.Tensor | None,
) -> None:
    """Launch the per-sample step kernel. Tensors and ``coef`` as :func:`fastdiff.kernels.guided_step.guided_step`
    takes them, ``d_uncond`` required; ``guide`` a contiguous ``[B, 3]`` tensor in the accumulation dtype on x's
    device. Checked here, not trusted."""
    outputs = [("x_out", x_out)] + ([("e_out", e_out)] if e_out is not None else [])
    ops._check_launch(x, d_cond, d_uncond, history, noise, coef, outputs)
    what = "guided_step_per_sample"
    per_sample, blocks = _per_sample_layout(what, x, d_uncond, [("guide", guide, 3)], [("guide", guide)], outputs)
    hist = list(history) + [x] * (3 - len(history))  # unused slots are never read
    coef_ptr, scalars, coef_in_memory, acc = _coefficient_args(coef, x)
    _guided_step_per_sample_kernel[(x.shape[0] * blocks,)](
        x, d_cond, d_uncond, hist[0], hist[1], hist[2], noise if noise is not None else x, coef_ptr, guide,
        *scalars, x_out, e_out if e_out is not None else x_out, per_sample, blocks,
        N_HIST=len(history), HAS_NOISE=noise is not None, WRITE_E=e_out is not None, COEF_PTR=coef_in_memory,
        ACC=acc, BLOCK=BLOCK,
    )  # fmt: skip
