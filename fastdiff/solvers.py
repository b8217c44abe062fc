"""ODE solvers for the probability-flow ODE, in data-prediction form.

A model gives ``D(x; sigma)``; every solver step is a linear combination of the state and denoised estimates
(DESIGN.md), applied by the one op :func:`fastdiff.ops.guided_step`. Each solver is a pure function from the
schedule to step coefficients (the ``*_coefficients`` functions and :meth:`Solver.stages`, on Python floats
or on 0-d tensors) plus a few lines that feed them to the op; :meth:`Solver.coefficient_table` evaluates a
whole schedule at once.

Final step to sigma = 0, as each method's authors do it:

* euler, ddim, dpmpp_2m, dpmpp_3m, unipc: the step to 0 returns the last denoised estimate, ``x_N = D``.
  For Euler/DDIM this is the plain update with ``sigma' = 0``; DPM-Solver++ and UniPC drop to first order
  there (diffusers' ``final_sigmas_type="zero"``, k-diffusion's ``sigma_next == 0`` branch).
* heun: EDM's Algorithm 1 skips the corrector on the step to 0, so that step is one Euler step.
* ipndm: the Adams-Bashforth step is applied unchanged, as in k-diffusion's ``sample_ipndm`` and DEIS.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch

from fastdiff import ops


class Denoised(NamedTuple):
    """One model evaluation: conditional estimate, unconditional one (None outside the guidance interval)
    and the guidance scale. The guided estimate is ``uncond + w * (cond - uncond)``."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    w: float = 1.0


# evaluate(x, level) -> Denoised. ``level`` is whatever the loop passed as ``sigmas[i]``: a noise level, or (in
# fastdiff's sampling loops) its index in the run's schedule, which the loop's evaluator maps to the noise level.
Evaluate = Callable[[torch.Tensor, object], Denoised]
Scalar = float | torch.Tensor
Row = torch.Tensor | list[float]  # one stage's op coefficients [a, w, hx, hd, c_noise, b0, ..., bK]
Coefficients = tuple[Scalar, list[Scalar]]  # (a, b): x_next = a * x + sum_k b[k] * term_k

# The coefficient functions take sigmas as Python floats (the sampler's host path) or as 0-d tensors (a
# schedule on a device, differentiable, as LD3 needs); these helpers serve both.


def _expm1(v: Scalar) -> Scalar:
    return torch.expm1(v) if isinstance(v, torch.Tensor) else math.expm1(v)


def _lam(sigma: Scalar) -> Scalar:
    return -torch.log(sigma) if isinstance(sigma, torch.Tensor) else -math.log(sigma)


def _is_zero(sigma: Scalar) -> bool:
    """Whether a step ends at sigma = 0. Only a Python float can be 0: :meth:`Solver.coefficient_table` passes
    a schedule's final 0 as ``0.0`` and its positive sigmas as tensors, so no branch reads a device value."""
    return not isinstance(sigma, torch.Tensor) and sigma == 0


class Stage(NamedTuple):
    """One application of the step op: ``x' = a x + sum_k b[k] term_k`` and history entry ``hx x + hd D``."""

    a: Scalar
    b: list[Scalar]
    hx: Scalar = 0.0
    hd: Scalar = 1.0


def _apply(x: torch.Tensor, den: Denoised, history: Sequence[torch.Tensor], stage: Stage | Row):
    """One op application. ``stage`` is a :class:`Stage`, or a row ``[6 + K]`` of :meth:`Solver.coefficient_tensor`
    (K history terms, w included): a tensor, which stays on its device (that is how a captured loop reads its
    schedule), or its host values. Rows come from a sampling loop, whose inputs are valid by construction."""
    if not isinstance(stage, Stage):
        return ops.loop_step(x, den.cond, den.uncond, list(history[: len(stage) - 6]), stage)
    return ops.guided_step(
        x, den.cond, den.uncond, list(history[: len(stage.b) - 1]), a=stage.a, b=stage.b, w=den.w, hx=stage.hx,
        hd=stage.hd,
    )  # fmt: skip


class Solver:
    """Base class. A solver is stateless; per-run state lives in the dict made by :meth:`start`."""

    name: ClassVar[str] = ""

    def evaluations(self, sigmas: Sequence[float]) -> list[int]:
        """Model evaluations each step spends (before guidance doubles any of them)."""
        return [1] * (len(sigmas) - 1)

    def start(self) -> dict:
        return {"history": []}

    def stages(self, sigmas: Sequence[Scalar], i: int) -> list[Stage]:
        """The op applications of step ``i``, in order (pure function of the schedule)."""
        raise NotImplementedError

    def coefficient_table(
        self, sigmas: Sequence[Scalar] | torch.Tensor, final_zero: bool | None = None
    ) -> list[list[Stage]]:
        """Every step's stages for a whole schedule. With a float tensor of sigmas (on any device) the
        coefficients are 0-d tensors on that device that carry gradients back to the sigmas, e.g. from
        :func:`fastdiff.schedules.ld3_sigmas`; nothing is read back to the host except, when ``final_zero`` is
        None, whether the schedule ends in 0 (a valid schedule has no other 0)."""
        if not isinstance(sigmas, torch.Tensor):
            return [self.stages(list(sigmas), i) for i in range(len(sigmas) - 1)]
        sig: list[Scalar] = list(sigmas.unbind())
        if final_zero is None:
            final_zero = bool(sigmas[-1] == 0)
        if final_zero:
            sig[-1] = 0.0
        return [self.stages(sig, i) for i in range(len(sig) - 1)]

    def coefficient_tensor(
        self, sigmas: torch.Tensor, w: float = 1.0, final_zero: bool | None = None
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """The whole schedule's op coefficients packed on ``sigmas``' device, for device-resident sampling.

        Returns ``(table, n_history)``: ``table`` ``[N, S, 6 + MAX_HISTORY]`` in ``sigmas``' dtype, where row
        ``[i, j]`` is stage ``j`` of step ``i`` in :func:`fastdiff.ops.guided_step_coef`'s layout ``[a, w, hx,
        hd, c_noise, b0, ..., bK]`` (zero-padded), and ``n_history[i][j]`` is that stage's history count ``K``,
        so ``table[i, j, : 6 + K]`` is the stage's ``coef``. Differentiable with respect to ``sigmas``.
        """
        table = self.coefficient_table(sigmas, final_zero)
        n_stages = max(len(stages) for stages in table)
        width = 6 + ops.MAX_HISTORY

        def entry(c: Scalar) -> torch.Tensor:  # a fill, not a host-to-device copy, for Python constants
            return c if isinstance(c, torch.Tensor) else sigmas.new_full((), c)

        def row(st: Stage) -> torch.Tensor:
            coef = [entry(c) for c in (st.a, w, st.hx, st.hd, 0.0, *st.b)]
            return torch.cat([torch.stack(coef), sigmas.new_zeros(width - len(coef))])

        rows = []
        for stages in table:
            rows.append(torch.stack([row(st) for st in stages] + [sigmas.new_zeros(width)] * (n_stages - len(stages))))
        return torch.stack(rows), [[len(st.b) - 1 for st in stages] for stages in table]

    def step(
        self,
        i: int,
        x: torch.Tensor,
        sigmas: Sequence[Scalar] | torch.Tensor,
        evaluate: Evaluate,
        state: dict,
        stages: Sequence[Stage | torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance ``x`` from ``sigmas[i]`` to ``sigmas[i + 1]``; returns ``(x_next, D_i)``.

        ``stages`` are step ``i``'s coefficients, :meth:`stages` by default. When they are given, a step does no
        arithmetic with ``sigmas``: it only passes ``sigmas[i]`` (and ``sigmas[i + 1]``) to ``evaluate``, so a loop
        may pass the levels' indices instead (fastdiff's loops do). A device-resident run passes ``stages`` as rows
        of :meth:`coefficient_tensor`, so that nothing in the step is read back to the host.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


# ----------------------------------------------------------------------------------------------- first order


def euler_coefficients(s0: float, s1: float) -> Coefficients:
    """``x' = (s1/s0) x + (1 - s1/s0) D``: Euler in sigma, which is also DDIM (eta = 0) in this form."""
    r = s1 / s0
    return r, [1.0 - r]


class Euler(Solver):
    """First-order Euler step of the probability-flow ODE in sigma (k-diffusion ``sample_euler``)."""

    name = "euler"

    def stages(self, sigmas, i):
        return [Stage(*euler_coefficients(sigmas[i], sigmas[i + 1]))]

    def step(self, i, x, sigmas, evaluate, state, stages=None):
        stages = stages or self.stages(sigmas, i)
        return _apply(x, evaluate(x, sigmas[i]), [], stages[0])


class DDIM(Euler):
    """Deterministic DDIM (eta = 0). In the VE data-prediction form its update equals Euler's exactly
    (Song et al. 2021; Karras et al. 2022), so it shares Euler's coefficients."""

    name = "ddim"


# ------------------------------------------------------------------------------------------------------ Heun


def heun_coefficients(s0: float, s1: float) -> tuple[Coefficients, Coefficients]:
    """EDM Heun: predictor ``x~ = Euler(x, D)``; corrector over ``[D~, D]`` (D~ = D(x~; s1))::

    x' = x + (s1 - s0) / 2 * (d + d~),  d = (x - D)/s0,  d~ = (x~ - D~)/s1
       = (s1/s0) x - (s1 - s0)/(2 s1) D~ + (s1 - s0)/2 * (1/s1 - 2/s0) D
    """
    predictor = euler_coefficients(s0, s1)
    dt = s1 - s0
    corrector = (s1 / s0, [-dt / (2 * s1), dt / 2 * (1 / s1 - 2 / s0)])
    return predictor, corrector


class Heun(Solver):
    """EDM's second-order Heun method (Karras et al. 2022, Algorithm 1): two evaluations a step, one on the
    step to sigma = 0. Both evaluations of a step use the guidance decision of its start sigma."""

    name = "heun"

    def evaluations(self, sigmas):
        return [1 if _is_zero(s1) else 2 for s1 in sigmas[1:]]

    def stages(self, sigmas, i):
        s0, s1 = sigmas[i], sigmas[i + 1]
        return [Stage(*euler_coefficients(s0, s1))] if _is_zero(s1) else [Stage(*c) for c in heun_coefficients(s0, s1)]

    def step(self, i, x, sigmas, evaluate, state, stages=None):
        stages = stages or self.stages(sigmas, i)
        x_pred, d = _apply(x, evaluate(x, sigmas[i]), [], stages[0])
        if len(stages) == 1:
            return x_pred, d
        x_next, _ = _apply(x, evaluate(x_pred, sigmas[i + 1]), [d], stages[1])
        return x_next, d


# ------------------------------------------------------------------------------------------- DPM-Solver++


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


class _Multistep(Solver):
    """Shared driver of solvers whose history holds their last few denoised estimates, newest first."""

    keep: ClassVar[int] = 1

    def coefficients(self, sigmas: Sequence[float], i: int) -> Coefficients:
        raise NotImplementedError

    def stages(self, sigmas, i):
        return [Stage(*self.coefficients(sigmas, i))]

    def step(self, i, x, sigmas, evaluate, state, stages=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        x_next, d = _apply(x, evaluate(x, sigmas[i]), hist, stages[0])
        state["history"] = [d] + hist[: self.keep - 1]
        return x_next, d


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


# ------------------------------------------------------------------------------------------------------ iPNDM

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

    def step(self, i, x, sigmas, evaluate, state, stages=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        x_next, d_i = _apply(x, evaluate(x, sigmas[i]), hist, stages[0])
        state["history"] = [d_i] + hist[: max(self.max_order - 2, 0)]
        return x_next, x - d_i / stages[0][2]  # D = x - sigma_i d_i, with sigma_i = 1 / hx of the coefficients


# ------------------------------------------------------------------------------------------------------ UniPC


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

    def step(self, i, x, sigmas, evaluate, state, stages=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        den = evaluate(x, sigmas[i])
        if len(stages) == 2:  # correct x_i from the previous corrected state, reusing this evaluation
            x, d = _apply(state["base"], den, hist, stages[0])
            den = Denoised(d)
        x_next, d = _apply(x, den, hist, stages[-1])
        state["base"] = x
        state["history"] = [d] + hist[: self.order - 1]
        return x_next, d


SOLVERS: dict[str, type[Solver]] = {
    cls.name: cls for cls in (Euler, Heun, DDIM, DPMSolverPP2M, DPMSolverPP3M, IPNDM, UniPC)
}


def get(solver: str | Solver, **options) -> Solver:
    """A solver by name (``euler``, ``heun``, ``ddim``, ``dpmpp_2m``, ``dpmpp_3m``, ``ipndm``, ``unipc``)
    with its options, or a :class:`Solver` instance passed through."""
    if isinstance(solver, Solver):
        if options:
            raise ValueError("solver options go to the constructor when passing a Solver instance")
        return solver
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    cls = SOLVERS[solver]
    params = inspect.signature(cls.__init__).parameters.values()
    accepted = [p.name for p in params if p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"solver {solver!r} has no option {', '.join(unknown)}; its options: {accepted or 'none'}")
    return cls(**options)
