"""Single-step ODE solvers: each step starts afresh from the state, with no history across steps."""

from __future__ import annotations

from fastdiff.solvers.base import Coefficients, Scalar, Solver, Stage, TwoStage, _apply, _exp, _is_zero, _lam


def euler_coefficients(s0: float, s1: float) -> Coefficients:
    """``x' = (s1/s0) x + (1 - s1/s0) D``: Euler in sigma, which is also DDIM (eta = 0) in this form."""
    r = s1 / s0
    return r, [1.0 - r]


class Euler(Solver):
    """First-order Euler step of the probability-flow ODE in sigma (k-diffusion ``sample_euler``)."""

    name = "euler"

    def stages(self, sigmas, i):
        return [Stage(*euler_coefficients(sigmas[i], sigmas[i + 1]))]

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        stages = stages or self.stages(sigmas, i)
        (p,) = self._points(sigmas, i, points)
        return _apply(x, evaluate(x, p), [], stages[0], noise)


class DDIM(Euler):
    """Deterministic DDIM (eta = 0). In the VE data-prediction form its update equals Euler's exactly
    (Song et al. 2021; Karras et al. 2022), so it shares Euler's coefficients."""

    name = "ddim"


def heun_coefficients(s0: float, s1: float) -> tuple[Coefficients, Coefficients]:
    """EDM Heun: predictor ``x~ = Euler(x, D)``; corrector over ``[D~, D]`` (D~ = D(x~; s1))::

    x' = x + (s1 - s0) / 2 * (d + d~),  d = (x - D)/s0,  d~ = (x~ - D~)/s1
       = (s1/s0) x - (s1 - s0)/(2 s1) D~ + (s1 - s0)/2 * (1/s1 - 2/s0) D
    """
    predictor = euler_coefficients(s0, s1)
    dt = s1 - s0
    corrector = (s1 / s0, [-dt / (2 * s1), dt / 2 * (1 / s1 - 2 / s0)])
    return predictor, corrector


def heun_flow_coefficients(s0: float, s1: float) -> tuple[Coefficients, Coefficients]:
    """Heun's trapezoid in flow time on the flow state (diffusers' ``FlowMatchHeunDiscreteScheduler``): with
    ``t = s / (1 + s)``, ``x_t = x / (1 + s)``, velocity ``v = (x_t - D) / t`` and ``h = t1 - t0``, the predictor
    is Euler (the same step as in sigma) and the corrector ``x_t' = x_t + h (v + v~) / 2``, i.e. in the VE state::

        x' = (s1/s0) x - (1 + s1) h / (2 t1) D~ + (1 + s1) (h / (2 t1) - h / t0) D

    A different second-order method from :func:`heun_coefficients` (the trapezoid in sigma), finite from the
    flow schedule's start ``t = 1``. Returns ``(predictor, corrector)``, the corrector over ``[D~, D]``."""
    t0, t1 = s0 / (1 + s0), s1 / (1 + s1)
    h = t1 - t0
    corrector = (s1 / s0, [-(1 + s1) * h / (2 * t1), (1 + s1) * (h / (2 * t1) - h / t0)])
    return euler_coefficients(s0, s1), corrector


class Heun(TwoStage):
    """EDM's second-order Heun method (Karras et al. 2022, Algorithm 1): two evaluations a step, one on the
    step to sigma = 0. Both evaluations of a step use the guidance decision of its start sigma.

    Args:
        time: ``"sigma"``, the trapezoid in sigma (EDM, k-diffusion, diffusers' Heun scheduler), or ``"flow"``,
            the trapezoid in flow time on the flow state (diffusers' flow-matching Heun scheduler;
            :func:`heun_flow_coefficients`).
    """

    name = "heun"

    def __init__(self, time: str = "sigma"):
        if time not in ("sigma", "flow"):
            raise ValueError(f"heun: time must be 'sigma' or 'flow', got {time!r}")
        self.time = time

    def points(self, sigmas, i):
        return [i] if _is_zero(sigmas[i + 1]) else [i, i + 1]

    def stages(self, sigmas, i):
        s0, s1 = sigmas[i], sigmas[i + 1]
        if _is_zero(s1):
            return [Stage(*euler_coefficients(s0, s1))]
        coefficients = heun_coefficients if self.time == "sigma" else heun_flow_coefficients
        return [Stage(*c) for c in coefficients(s0, s1)]


def dpm_2_midpoint(s0: Scalar, s1: Scalar) -> Scalar:
    """DPM-Solver-2's intermediate level, the midpoint in log sigma: ``exp((log s0 + log s1) / 2)``, i.e.
    ``sqrt(s0 s1)``. Floats, or 0-d tensors."""
    return _exp(-(_lam(s0) + _lam(s1)) / 2)


def dpm_2_coefficients(s0: Scalar, s1: Scalar) -> tuple[Coefficients, Coefficients]:
    """k-diffusion's ``sample_dpm_2`` step from ``s0`` to ``s1 > 0`` (Lu et al. 2022's DPM-Solver-2 in the
    sigma form of Karras et al. 2022), with ``m = dpm_2_midpoint(s0, s1)``: an Euler step to ``m`` gives
    ``x~ = (m/s0) x + (1 - m/s0) D``; the step to ``s1`` takes the derivative at ``x~``
    (``D~ = D(x~; m)``)::

        x' = x + (s1 - s0) (x~ - D~) / m
           = (s1/s0) x - c D~ + c (1 - m/s0) D,  c = (s1 - s0) / m

    Returns ``(predictor, corrector)``, the corrector over ``[D~, D]``. Floats, or 0-d tensors.
    """
    m = dpm_2_midpoint(s0, s1)
    c = (s1 - s0) / m
    return euler_coefficients(s0, m), (s1 / s0, [-c, c * (1 - m / s0)])


class DPM2(TwoStage):
    """k-diffusion's ``sample_dpm_2`` without churn ("DPM2"): a second-order step evaluating the model at ``x``
    and at the log-sigma midpoint (:func:`dpm_2_coefficients`); the step to sigma = 0 is one Euler step, which
    returns ``D``. Both evaluations of a step use the guidance decision of its start sigma.

    k-diffusion 0.1.1's ``sample_dpm_2`` draws ``randn_like(x)`` every step even without churn and discards it
    (as its ``sample_euler`` and ``sample_heun`` do, and ComfyUI's no longer does); fastdiff draws nothing, so
    the result is the same but a global generator shared with later draws advances differently.
    """

    name = "dpm_2"

    def points(self, sigmas, i):
        s0, s1 = sigmas[i], sigmas[i + 1]
        return [i] if _is_zero(s1) else [i, dpm_2_midpoint(s0, s1)]

    def stages(self, sigmas, i):
        s0, s1 = sigmas[i], sigmas[i + 1]
        return [Stage(*euler_coefficients(s0, s1))] if _is_zero(s1) else [Stage(*c) for c in dpm_2_coefficients(s0, s1)]


SOLVERS = (Euler, Heun, DDIM, DPM2)
__all__ = [
    "Euler", "Heun", "DDIM", "DPM2", "euler_coefficients", "heun_coefficients", "heun_flow_coefficients",
    "dpm_2_midpoint",
    "dpm_2_coefficients",
]  # fmt: skip
