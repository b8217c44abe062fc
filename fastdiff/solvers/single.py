"""Single-step ODE solvers: each step starts afresh from the state, with no history across steps."""

from __future__ import annotations

from fastdiff.solvers.base import Coefficients, Solver, Stage, _apply, _is_zero


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


class Heun(Solver):
    """EDM's second-order Heun method (Karras et al. 2022, Algorithm 1): two evaluations a step, one on the
    step to sigma = 0. Both evaluations of a step use the guidance decision of its start sigma."""

    name = "heun"

    def points(self, sigmas, i):
        return [i] if _is_zero(sigmas[i + 1]) else [i, i + 1]

    def stages(self, sigmas, i):
        s0, s1 = sigmas[i], sigmas[i + 1]
        return [Stage(*euler_coefficients(s0, s1))] if _is_zero(s1) else [Stage(*c) for c in heun_coefficients(s0, s1)]

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        stages = stages or self.stages(sigmas, i)
        points = self._points(sigmas, i, points)
        x_pred, d = _apply(x, evaluate(x, points[0]), [], stages[0], noise)
        if len(stages) == 1:
            return x_pred, d
        x_next, _ = _apply(x, evaluate(x_pred, points[1]), [d], stages[1], noise)
        return x_next, d


SOLVERS = (Euler, Heun, DDIM)
__all__ = ["Euler", "Heun", "DDIM", "euler_coefficients", "heun_coefficients"]
