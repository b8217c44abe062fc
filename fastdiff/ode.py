"""High-accuracy reference solves of the probability-flow ODE, the oracle the solvers are tested against.

The ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` is integrated in ``lambda = -log(sigma)``, where it reads
``dx/dlambda = D(x; e^-lambda) - x`` and has no singularity, by an adaptive Dormand-Prince RK5(4) in float64.
A solve to sigma = 0 integrates to ``sigma_floor`` and returns ``D(x; sigma_floor)``, whose error is
``O(sigma_floor^2)`` (about 1e-10 at the default floor for unit-scale data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from fastdiff import schedules
from fastdiff.guidance import Guidance, guided_estimate

# Dormand-Prince 5(4) tableau.
_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_B5 = _A[6] + [0.0]
_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def solve_pf_ode(
    denoise: Denoise,
    x: torch.Tensor,
    sigma_from: float,
    sigma_to: float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    sigma_floor: float = 1e-5,
    max_steps: int = 100_000,
) -> torch.Tensor:
    """Integrate from ``sigma_from`` down to ``sigma_to`` (which may be 0). ``x``: ``[B, ...]``; returns float64.

    ``denoise(x, sigma)`` takes a float64 batch and a float sigma. The step size is shared by the batch and
    controlled by the largest scaled error of any element.
    """
    if not sigma_from > sigma_to >= 0:
        raise ValueError(f"need sigma_from > sigma_to >= 0, got {sigma_from}, {sigma_to}")
    to_zero = sigma_to < sigma_floor
    lam, lam_end = -math.log(sigma_from), -math.log(sigma_floor if to_zero else sigma_to)
    x = x.to(torch.float64)

    def f(lam_: float, x_: torch.Tensor) -> torch.Tensor:
        return denoise(x_, math.exp(-lam_)).to(torch.float64) - x_

    h = min(0.05, lam_end - lam)
    k1 = f(lam, x)
    for _ in range(max_steps):
        if lam >= lam_end:
            break
        h = min(h, lam_end - lam)
        ks = [k1]
        for j in range(1, 7):
            xj = x + h * sum(a * k for a, k in zip(_A[j], ks) if a != 0.0)
            ks.append(f(lam + _C[j] * h, xj))
        x_new = x + h * sum(b * k for b, k in zip(_B5, ks) if b != 0.0)
        err = h * sum((b5 - b4) * k for b5, b4, k in zip(_B5, _B4, ks))
        scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        e = float((err.abs() / scale).max())
        if e <= 1.0:
            lam, x, k1 = lam + h, x_new, ks[6]  # first-same-as-last: k7 is f at the new point
        h *= min(5.0, max(0.2, 0.9 * (e if e > 0 else 1e-10) ** -0.2))
    else:
        raise RuntimeError(f"reference solve did not reach sigma={sigma_to} in {max_steps} steps")
    return denoise(x, sigma_floor).to(torch.float64) if to_zero else x


def reference_sample(
    model: Callable,
    x: torch.Tensor,
    sigmas,
    *,
    guidance: Guidance | None = None,
    cond: Mapping | None = None,
    uncond: Mapping | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """The exact answer that :func:`fastdiff.sample` approximates on this schedule, in float64.

    Guidance switches exactly where the sampler's plan switches it: a run of guided steps ``a..b`` is guided
    on ``[sigmas[b+1], sigmas[a]]``, so the reference solves the same piecewise ODE that the solvers do.
    """
    sig = schedules.validate(sigmas).tolist()
    plan = guidance.plan(sig) if guidance is not None else [False] * (len(sig) - 1)
    cond, uncond = dict(cond or {}), dict(uncond or {})
    uncond_model = guidance.unconditional_model(model) if guidance is not None else model

    def plain(x_, s):
        return model(x_, torch.full((x_.shape[0],), s, dtype=torch.float64, device=x_.device), **cond)

    if guidance is not None and guidance.step_dependent:
        raise ValueError("reference_sample solves an ODE in (x, sigma); APG's momentum, CFG-Zero*'s zero-init "
                         "and CFG++ depend on the steps a sampler takes")  # fmt: skip

    def guided(x_, s):
        sb = torch.full((x_.shape[0],), s, dtype=torch.float64, device=x_.device)
        dc, du = model(x_, sb, **cond), uncond_model(x_, sb, **uncond)
        return guided_estimate(guidance, x_, s, dc, du, {})

    start = 0
    out = x.to(torch.float64)
    for i in range(1, len(plan) + 1):
        if i == len(plan) or plan[i] != plan[start]:
            out = solve_pf_ode(guided if plan[start] else plain, out, sig[start], sig[i], rtol=rtol, atol=atol)
            start = i
    return out
