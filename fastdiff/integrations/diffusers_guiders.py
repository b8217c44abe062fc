"""Guidance limited to a noise interval, as a diffusers guider (``diffusers.guiders``).

:class:`IntervalGuidance` is diffusers' ``ClassifierFreeGuidance`` whose steps are guided only where the noise
level of the step's timestep lies in ``(sigma_lo, sigma_hi]`` (Kynkäänniemi et al. 2024). Outside the interval
its ``num_conditions`` is 1, so a modular pipeline (or any loop that asks the guider how many batches to run)
runs the conditional batch alone. The sigma of a timestep is that of the scheduler's model: VE
``sqrt((1 - alpha_bar) / alpha_bar)`` on a DDPM-family grid, ``t / (1 - t)`` for flow matching, as fastdiff's
samplers measure it, so the same interval guides the same steps in a diffusers loop and in
``sample_pipeline``/``fastdiff.Sampler`` (``to_guidance()``).
"""

from __future__ import annotations

import torch
from diffusers.guiders import ClassifierFreeGuidance

from fastdiff.guidance import Guidance
from fastdiff.integrations.diffusers import FLOW_T_MAX, FastDiffScheduler


class IntervalGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance on the steps whose noise level lies in ``interval = (sigma_lo, sigma_hi]``.

    Args:
        guidance_scale: ``w``, as diffusers' ``ClassifierFreeGuidance``.
        interval: ``(sigma_lo, sigma_hi)`` in fastdiff's (VE) sigmas; None guides every step.
        scheduler: the pipeline's scheduler (or its config), which maps a timestep to its noise level.
        start, stop, enabled, guidance_rescale, use_original_formulation: as ``ClassifierFreeGuidance``; the
            step fractions and the interval must both hold.
    """

    def __init__(
        self,
        guidance_scale: float = 7.5,
        interval: tuple[float, float] | None = None,
        *,
        scheduler=None,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         use_original_formulation=use_original_formulation, start=start, stop=stop,
                         enabled=enabled)  # fmt: skip
        self.interval = Guidance(guidance_scale, interval).interval
        if self.interval is not None and scheduler is None:
            raise ValueError("IntervalGuidance with an interval needs the pipeline's scheduler (scheduler=), which "
                             "maps a timestep to its noise level")  # fmt: skip
        config = getattr(scheduler, "config", scheduler)
        self._levels = FastDiffScheduler.from_config(dict(config), solver="euler") if config is not None else None

    def sigma_of(self, timestep) -> float:
        """The VE noise level of a network timestep of this scheduler's model."""
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[:1].cpu()
        levels = self._levels
        if levels.prediction == "flow":
            u = min(float(t) / levels.config.num_train_timesteps, FLOW_T_MAX)
            return u / (1 - u)
        if levels._edm is not None:  # EDM schedulers' timesteps are log(sigma) / 4
            return float(torch.exp(4 * t))
        return float(levels._grid.t_to_sigma(t))

    def _is_cfg_enabled(self) -> bool:
        if not super()._is_cfg_enabled():
            return False
        if self.interval is None or self._timestep is None:
            return True
        lo, hi = self.interval
        return lo < self.sigma_of(self._timestep) <= hi

    def to_guidance(self) -> Guidance:
        """The same guidance for fastdiff's loops (:class:`fastdiff.Guidance`)."""
        if self.use_original_formulation or self.guidance_rescale or not self._enabled:
            raise ValueError("to_guidance: the original formulation, guidance_rescale and a disabled guider have "
                             "no fastdiff.Guidance equivalent here (rescale: Guidance(method='rescale'))")  # fmt: skip
        if (self._start, self._stop) != (0.0, 1.0) and self.interval is not None:
            raise ValueError("to_guidance: give the guided steps as an interval or as start/stop, not both")
        fractions = None if (self._start, self._stop) == (0.0, 1.0) else (self._start, self._stop)
        return Guidance(self.guidance_scale, self.interval, fractions=fractions)
