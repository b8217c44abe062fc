"""Consistency solvers: multistep consistency sampling of consistency-distilled models (CoDi students, LCMs).

A consistency model maps a noisy ``x`` at level ``sigma`` straight to the data, ``f(x, sigma)``. Multistep
sampling (Song et al. 2023, Algorithm 1) alternates that jump with re-noising to the next, lower level, so each
step is one evaluation and one application of the step op, the re-noising as its noise input::

    x' = c_skip(sigma_i) x + c_out(sigma_i) D(x; sigma_i) + sqrt(sigma_{i+1}^2 - sigma_min^2) z

where ``(c_skip, c_out)`` are LCM's boundary scalings (:func:`consistency_scalings`) and the step to sigma = 0
returns ``f`` and draws nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastdiff.arguments import as_real
from fastdiff.solvers.base import OneStage, Scalar, Stage, _is_zero, _sqrt
from fastdiff.solvers.stochastic import _factor


def consistency_scalings(sigma: Scalar, sigma_min: float, sigma_data: float = 0.5, scale: float = 10.0):
    """LCM's boundary scalings ``(c_skip, c_out)`` at ``sigma`` (Luo et al. 2023; CoDi trains with them)::

        u = scale (sigma - sigma_min),  c_skip = sd^2 / (u^2 + sd^2),  c_out = u / sqrt(u^2 + sd^2)

    so that ``f = c_skip x + c_out D`` is ``x`` exactly at ``sigma_min`` (``(1, 0)``) and tends to ``D`` far above
    it. ``scale = inf`` is that limit at every ``sigma > sigma_min``: ``(0, 1)``, for models whose output already
    is the consistency output (LCM-distilled networks carry their scalings inside). ``sigma``: a float, or a
    tensor of any shape (a 0-d one from a device schedule, ``[B, 1, ...]`` in training), whose shape and dtype the
    scalings take."""
    if math.isinf(scale):
        return 0.0, 1.0
    u = scale * (sigma - sigma_min)
    return sigma_data**2 / (u**2 + sigma_data**2), u / _sqrt(u**2 + sigma_data**2)


def lcm_coefficients(sigmas: Sequence[Scalar], i: int, sigma_min: float = 0.0, boundary_scale: float = math.inf,
                     sigma_data: float = 0.5) -> tuple[Scalar, list[Scalar], Scalar]:  # fmt: skip
    """Multistep consistency sampling step ``i``: the consistency output at ``sigma_i`` re-noised to
    ``sigma_{i+1}``::

        x' = c_skip x + c_out D + sqrt(sigma_{i+1}^2 - sigma_min^2) z

    (:func:`consistency_scalings`); the step to sigma = 0 has no noise term. Returns ``(a, [b_D], c)``."""
    c_skip, c_out = consistency_scalings(sigmas[i], sigma_min, sigma_data, boundary_scale)
    sigma_next = sigmas[i + 1]
    c = 0.0 if _is_zero(sigma_next) else _sqrt(sigma_next**2 - sigma_min**2)
    return c_skip, [c_out], c


class LCM(OneStage):
    """Multistep consistency sampling, name ``"lcm"``: one evaluation a step at ``sigma_i``, the consistency output
    ``f = c_skip x + c_out D`` and, where ``sigma_{i+1} > 0``, fresh noise ``sqrt(sigma_{i+1}^2 - sigma_min^2) z``
    (:func:`lcm_coefficients`). Noise is drawn exactly on the steps that end above 0.

    The defaults are ComfyUI's ``sample_lcm`` for LCM-distilled models (``x = D``, then ``x + sigma_{i+1} z``):
    ``boundary_scale = inf`` makes ``(c_skip, c_out) = (0, 1)`` and ``sigma_min = 0`` re-noises to
    ``sigma_{i+1}`` itself. A CoDi student's output is the denoised estimate, so its sampler applies the
    scalings it was trained with: ``sigma_min`` and ``boundary_scale`` of its :class:`~fastdiff.train.codi.CoDiConfig`
    (0.002 and 10 by default) and the student's ``sigma_data``; :func:`fastdiff.train.codi.student_solver` builds
    that solver, and ``fastdiff sample`` passes them for a student file.

    Args:
        sigma_min: the consistency boundary, ``f(x, sigma_min) = x``; finite, >= 0. No step may evaluate below it.
        boundary_scale: ``scale`` of :func:`consistency_scalings`, > 0; ``inf`` for ``(0, 1)``.
        sigma_data: the data's standard deviation in the scalings, finite, > 0.
    """

    name = "lcm"
    ode = False

    def __init__(self, sigma_min: float = 0.0, boundary_scale: float = math.inf, sigma_data: float = 0.5):
        self.sigma_min = _factor("sigma_min", sigma_min)
        self.boundary_scale = as_real(boundary_scale, "boundary_scale", finite=False)
        if not self.boundary_scale > 0:
            raise ValueError(f"boundary_scale must be > 0 (inf: no scalings), got {boundary_scale!r}")
        self.sigma_data = as_real(sigma_data, "sigma_data")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")

    @property
    def stochastic(self) -> bool:
        # Every step but the one to 0 re-noises: only a one-step schedule draws nothing, and that is the
        # schedule's choice, not the solver's.
        return True

    def stages(self, sigmas, i):
        sigma = sigmas[i]
        # On the host values (a device schedule's were checked when its run's plan was made from them), with room
        # for a schedule's rounding at its lowest level.
        if not isinstance(sigma, torch.Tensor) and sigma < self.sigma_min * (1 - 1e-6):
            raise ValueError(f"lcm evaluates at sigma={sigma:g}, below its sigma_min={self.sigma_min:g}, where the "
                             "consistency function is not defined: end the schedule's positive levels at sigma_min "
                             "or above")  # fmt: skip
        a, b, c = lcm_coefficients(sigmas, i, self.sigma_min, self.boundary_scale, self.sigma_data)
        noise = None if _is_zero(sigmas[i + 1]) else (sigmas[i], sigmas[i + 1])
        return [Stage(a, b, c_noise=c, noise=noise)]


SOLVERS = (LCM,)
__all__ = ["LCM", "consistency_scalings", "lcm_coefficients"]
