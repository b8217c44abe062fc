"""Multistep ODE solvers: each step reuses the denoised estimates (or derivatives) of the steps before it, kept in
the run's history, newest first. The history restarts where a loop says so (interval guidance's switches)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff.solvers.base import (
    Coefficients,
    Denoised,
    OneStage,
    Scalar,
    Solver,
    Stage,
    _apply,
    _expm1,
    _hx,
    _is_zero,
    _lam,
)
from fastdiff.solvers.single import euler_coefficients


def dpmpp_2m_coefficients(sigmas: Sequence[float], i: int) -> Coefficients:
    """DPM-Solver++(2M), midpoint form (Lu et al. 2022; k-diffusion ``sample_dpmpp_2m``), over ``[D_i, D_{i-1}]``.

    ``x' = (s1/s0) x - expm1(-h) D~`` with ``D~ = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}``, ``r = h_{i-1}/h``.
    The first step and the step to 0 are first order.
    """
    s0, s1 = sigmas[i], sigmas[i + 1]
    if i == 0 or _is_zero(s1):
        return euler_coefficients(s0, s1)
    h = _lam(s1) - _lam(s0)
    r = (_lam(s0) - _lam(sigmas[i - 1])) / h
    c = -_expm1(-h)
    return s1 / s0, [c * (1 + 1 / (2 * r)), -c / (2 * r)]


def dpmpp_3m_coefficients(sigmas: Sequence[float], i: int, corrected: bool = False) -> Coefficients:
    """DPM-Solver++(3M) (Lu et al. 2022) over ``[D_i, D_{i-1}, D_{i-2}]``. Warm start: first order at step 0,
    2M at step 1; the step to 0 is first order.

    With ``D(lambda)`` expanded to second order, the exact exponential integrator needs the second divided
    difference ``d2 ~ h^2 D''`` with weight ``-phi_3``. The multistep update published in DPM-Solver, diffusers
    (``multistep_dpm_solver_third_order_update``) and k-diffusion (``sample_dpmpp_3m_sde``) puts
    ``(d1_0 - d1_1) / (r0 + r1) ~ h^2 D'' / 2`` there, half the term, so it integrates a quadratic ``D`` only
    half right and its local error is ``O(h^3)`` (tests/test_solvers.py measures both). fastdiff follows the
    published update by default, so that it reproduces what users run today; ``corrected=True`` uses the full
    term (local error ``O(h^4)``). On the Gaussian-mixture benchmark the published update is the more accurate
    of the two at every NFE up to 64 (BENCHMARKS.md).
    """
    s0, s1 = sigmas[i], sigmas[i + 1]
    if i < 2 or _is_zero(s1):
        return dpmpp_2m_coefficients(sigmas, i)
    lam0 = _lam(s0)
    h = _lam(s1) - lam0
    r0 = (lam0 - _lam(sigmas[i - 1])) / h
    r1 = (_lam(sigmas[i - 1]) - _lam(sigmas[i - 2])) / h
    # Divided differences as coefficient vectors over [D_i, D_{i-1}, D_{i-2}].
    d1_0 = [1 / r0, -1 / r0, 0.0]
    d1_1 = [0.0, 1 / r1, -1 / r1]
    diff = [p - q for p, q in zip(d1_0, d1_1)]
    d1 = [p + q * r0 / (r0 + r1) for p, q in zip(d1_0, diff)]
    d2 = [(2 if corrected else 1) * q / (r0 + r1) for q in diff]
    phi_1 = -_expm1(-h)
    phi_2 = _expm1(-h) / h + 1
    phi_3 = phi_2 / h - 0.5
    b = [phi_2 * p - phi_3 * q for p, q in zip(d1, d2)]
    b[0] += phi_1
    return s1 / s0, b


class _Multistep(OneStage):
    """Shared driver of solvers whose history holds their last few denoised estimates, newest first."""

    def coefficients(self, sigmas: Sequence[float], i: int) -> Coefficients:
        raise NotImplementedError

    def stages(self, sigmas, i):
        return [Stage(*self.coefficients(sigmas, i))]


class DPMSolverPP2M(_Multistep):
    """DPM-Solver++(2M), data prediction, midpoint form."""

    name = "dpmpp_2m"
    keep = 1

    def coefficients(self, sigmas, i):
        return dpmpp_2m_coefficients(sigmas, i)


class DPMSolverPP3M(_Multistep):
    """DPM-Solver++(3M), data prediction, as published (diffusers, k-diffusion); ``corrected=True`` for the
    full second-order term (see :func:`dpmpp_3m_coefficients`)."""

    name = "dpmpp_3m"
    keep = 2

    def __init__(self, corrected: bool = False):
        self.corrected = corrected

    def coefficients(self, sigmas, i):
        return dpmpp_3m_coefficients(sigmas, i, self.corrected)


# Adams-Bashforth weights by order, newest derivative first.
IPNDM_WEIGHTS = {
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


def ipndm_coefficients(sigmas: Sequence[float], i: int, max_order: int = 4) -> Coefficients:
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth in x with derivatives ``d_j = (x_j - D_j)/sigma_j``::

        x' = x + (s1 - s0) * sum_j c_j d_{i-j}

    Coefficients over ``[D_i, d_{i-1}, d_{i-2}, ...]`` (the new D, then the stored derivatives); the order
    warms up from 1 and is ``min(max_order, i + 1)``.
    """
    s0, s1 = sigmas[i], sigmas[i + 1]
    c = IPNDM_WEIGHTS[min(max_order, i + 1)]
    dt = s1 - s0
    return 1 + dt * c[0] / s0, [-dt * c[0] / s0] + [dt * cj for cj in c[1:]]


class IPNDM(Solver):
    """Improved PNDM with lower-order warm start (k-diffusion ``sample_ipndm``)."""

    name = "ipndm"

    def __init__(self, max_order: int = 4):
        if max_order not in IPNDM_WEIGHTS:
            raise ValueError(f"ipndm max_order must be 1, 2, 3 or 4, got {max_order}")
        self.max_order = max_order

    def stages(self, sigmas, i):
        # The history entry is the derivative d_i = (x - D) / s0, produced by the same pass.
        return [Stage(*ipndm_coefficients(sigmas, i, self.max_order), 1 / sigmas[i], -1 / sigmas[i])]

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        (p,) = self._points(sigmas, i, points)
        x_next, d_i = _apply(x, evaluate(x, p), hist, stages[0], noise)
        state["history"] = [d_i] + hist[: max(self.max_order - 2, 0)]
        return x_next, x - d_i / _hx(stages[0])  # D = x - sigma_i d_i, with sigma_i = 1 / hx of the coefficients


def _unipc_terms(lams: Sequence[float], s0: int, t: int, order: int, variant: str):
    """Shared algebra of UniP and UniC between lambda indices ``s0`` and ``t`` (Zhao et al. 2023, B(h) form).

    Returns ``(h_phi_1, B_h, rks, R, b)`` as in diffusers' ``multistep_uni_*_bh_update`` with
    ``predict_x0=True``, where ``rks[k-1] = (lam_{s0-k} - lam_{s0}) / h`` for ``k = 1 .. order-1``.
    """
    h = lams[t] - lams[s0]
    hh = -h
    h_phi_1 = _expm1(hh)
    b_h = hh if variant == "bh1" else _expm1(hh)
    rks = [(lams[s0 - k] - lams[s0]) / h for k in range(1, order)] + [1.0]
    R = [[rk ** (j - 1) for rk in rks] for j in range(1, order + 1)]
    b = []
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, rks, R, b


def _solve(R: list[list[Scalar]], b: list[Scalar]) -> list[Scalar]:
    if isinstance(b[0], torch.Tensor):  # keep the graph: stack, do not copy into a new tensor
        A = torch.stack(
            [torch.stack([torch.as_tensor(v, dtype=b[0].dtype, device=b[0].device) for v in row]) for row in R]
        )
        # solve_ex: solve() would read its error flag back to the host, a sync for a schedule on a GPU.
        return list(torch.linalg.solve_ex(A, torch.stack(b))[0].unbind())
    return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def unipc_predictor_coefficients(sigmas: Sequence[float], i: int, order: int, variant: str = "bh2") -> Coefficients:
    """UniP-``order`` from ``x^c_i`` over ``[D_i, D_{i-1}, ..., D_{i-order+1}]``; first order into sigma = 0."""
    s0, s1 = sigmas[i], sigmas[i + 1]
    if _is_zero(s1) or order == 1:
        return euler_coefficients(s0, s1)
    lams = [_lam(s) for s in sigmas[: i + 2]]
    h_phi_1, b_h, rks, R, b = _unipc_terms(lams, i, i + 1, order, variant)
    rhos = [0.5] if order == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    # x' = (s1/s0) x - h_phi_1 D_i - B_h * sum_k rho_k (D_{i-k} - D_i) / r_k
    coeffs = [-h_phi_1] + [0.0] * (order - 1)
    for k, (rho, rk) in enumerate(zip(rhos, rks[:-1]), start=1):
        coeffs[k] -= b_h * rho / rk
        coeffs[0] += b_h * rho / rk
    return s1 / s0, coeffs


def unipc_corrector_coefficients(sigmas: Sequence[float], i: int, order: int, variant: str = "bh2") -> Coefficients:
    """UniC-``order`` at step ``i >= 1``: corrects ``x_i`` from ``x^c_{i-1}`` using the new ``D_i``, over
    ``[D_i, D_{i-1}, ..., D_{i-order}]``. It reuses the evaluation at the predicted point: no extra NFE."""
    s0, s1 = sigmas[i - 1], sigmas[i]
    lams = [_lam(s) for s in sigmas[: i + 1]]
    h_phi_1, b_h, rks, R, b = _unipc_terms(lams, i - 1, i, order, variant)
    rhos = [0.5] if order == 1 else _solve(R, b)
    # x_i^c = (s1/s0) x - h_phi_1 D_{i-1} - B_h * (sum_k rho_k (D_{i-1-k} - D_{i-1}) / r_k + rho_last (D_i - D_{i-1}))
    coeffs = [-b_h * rhos[-1], -h_phi_1 + b_h * rhos[-1]] + [0.0] * (order - 1)
    for k, (rho, rk) in enumerate(zip(rhos[:-1], rks[:-1]), start=1):
        coeffs[k + 1] -= b_h * rho / rk
        coeffs[1] += b_h * rho / rk
    return s1 / s0, coeffs


class UniPC(Solver):
    """UniPC (Zhao et al. 2023) with data prediction, variants ``bh1`` and ``bh2``, as diffusers'
    ``UniPCMultistepScheduler``: UniP-``order`` predictor, UniC corrector at every step after the first,
    orders warming up from 1 and, with ``lower_order_final``, lowered over the last steps."""

    name = "unipc"

    def __init__(self, order: int = 2, variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
        self.order, self.variant, self.corrector, self.lower_order_final = order, variant, corrector, lower_order_final

    def predictor_order(self, i: int, n_steps: int) -> int:
        order = min(self.order, n_steps - i) if self.lower_order_final else self.order
        return min(order, i + 1)

    def start(self):
        return {"history": [], "base": None}

    def stages(self, sigmas, i):
        """``[corrector, predictor]``, or ``[predictor]`` on the first step (or with ``corrector=False``)."""
        n = len(sigmas) - 1
        predictor = Stage(*unipc_predictor_coefficients(sigmas, i, self.predictor_order(i, n), self.variant))
        if i == 0 or not self.corrector:
            return [predictor]
        c_order = self.predictor_order(i - 1, n)
        return [Stage(*unipc_corrector_coefficients(sigmas, i, c_order, self.variant)), predictor]

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        (p,) = self._points(sigmas, i, points)
        den = evaluate(x, p)
        if len(stages) == 2:  # correct x_i from the previous corrected state, reusing this evaluation
            x, d = _apply(state["base"], den, hist, stages[0], noise)
            den = Denoised(d)
        x_next, d = _apply(x, den, hist, stages[-1], noise)
        state["base"] = x
        state["history"] = [d] + hist[: self.order - 1]
        return x_next, d


SOLVERS = (DPMSolverPP2M, DPMSolverPP3M, IPNDM, UniPC)
__all__ = [
    "DPMSolverPP2M", "DPMSolverPP3M", "IPNDM", "UniPC", "IPNDM_WEIGHTS", "dpmpp_2m_coefficients",
    "dpmpp_3m_coefficients", "ipndm_coefficients", "unipc_predictor_coefficients", "unipc_corrector_coefficients",
]  # fmt: skip
