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


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's training schedule, ``[1000]`` float64: ``scaled_linear`` betas from 0.00085 to 0.012
    (the timesteps of the SD 1.x/2.x/XL models that TCD and LCM distil)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class TCD(OneStage):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024; diffusers'
    ``TCDScheduler``), name ``"tcd"``: one evaluation a step, whose estimates are carried back to the earlier
    training timestep ``s = floor((1 - gamma) t_{i+1})`` (``t_{i+1}`` the timestep of ``sigma_{i+1}``) and then
    noised forward to ``sigma_{i+1}``::

        x' = D + sigma_s (x - D) / sigma_i + sqrt(sigma_{i+1}^2 - sigma_s^2) z

    ``gamma = 0`` is DDIM; ``gamma = 1`` is multistep consistency sampling (``s = 0``). The timesteps are the
    model's training grid, given by its ``alphas_cumprod`` (default: Stable Diffusion's, :func:`sd_alphas_cumprod`;
    see :meth:`sigma_s` for levels off the grid); the step to sigma = 0 has no noise term. With ``gamma > 0`` each
    step jumps back a fixed fraction of the timesteps whatever their number, so it is a sampler for few-step
    distilled models, not one that converges as the steps grow.

    Args:
        gamma: in [0, 1] (diffusers passes it as ``eta``).
        alphas_cumprod: ``[T]``, the model's training schedule.
    """

    name = "tcd"
    ode = False

    def __init__(self, gamma: float = 0.3, alphas_cumprod: Sequence[float] | torch.Tensor | None = None):
        self.gamma = _factor("gamma", gamma)
        if self.gamma > 1:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
        from fastdiff.denoisers import VPDenoiser

        ab = sd_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self._grids = {torch.device("cpu"): VPDenoiser(None, ab)}

    @property
    def stochastic(self) -> bool:
        return self.gamma > 0

    def __repr__(self) -> str:
        return f"TCD(gamma={self.gamma!r})"

    def sigma_s(self, sigma_next: Scalar) -> Scalar:
        """The level the estimates are carried back to: the grid sigma of ``floor((1 - gamma) t)``, ``t`` the
        training timestep of ``sigma_next`` (clamped to the grid; between grid timesteps ``(1 - gamma) t``
        without the floor), and never above ``sigma_next``; on ``sigma_next``'s device, in its type."""
        device = sigma_next.device if isinstance(sigma_next, torch.Tensor) else torch.device("cpu")
        grid = self._grids.get(device)
        if grid is None:
            grid = self._grids[device] = self._grids[torch.device("cpu")].to(device)
        s = torch.as_tensor(sigma_next, dtype=torch.float64, device=device)
        t = grid.sigma_to_t(s.clamp(grid.sigma_min, grid.sigma_max))
        # On a grid timestep TCD's integer floor; between them, the same fraction of the continuous timestep.
        on_grid = (t - t.round()).abs() < 1e-6
        t_s = torch.where(on_grid, torch.floor((1 - self.gamma) * t.round()), (1 - self.gamma) * t)
        out = torch.minimum(grid.t_to_sigma(t_s), s)  # below the grid: DDIM
        return out.to(sigma_next.dtype) if isinstance(sigma_next, torch.Tensor) else float(out)

    def stages(self, sigmas, i):
        s0, s1 = sigmas[i], sigmas[i + 1]
        if _is_zero(s1):
            return [Stage(0.0, [1.0])]
        s_s = self.sigma_s(s1)
        r = s_s / s0
        c = _sqrt((s1**2 - s_s**2).clamp_min(0) if isinstance(s_s, torch.Tensor) else max(s1**2 - s_s**2, 0.0))
        draws = self.gamma > 0 and (isinstance(c, torch.Tensor) or c > 0)
        return [Stage(r, [1 - r], c_noise=c if draws else 0.0, noise=(s0, s1) if draws else None)]


SOLVERS = (LCM, TCD)
__all__ = ["LCM", "TCD", "consistency_scalings", "lcm_coefficients", "sd_alphas_cumprod"]
