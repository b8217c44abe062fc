"""The sampling loops people run today, the baselines of the end-to-end benchmark (``fastdiff bench sample``).

Two families, written here in the style of the code they stand for (our own code, no copies):

* **k-diffusion style**: a model wrapper that does classifier-free guidance by concatenating the conditional and
  unconditional inputs at every step (as k-diffusion's examples and ComfyUI do), and samplers that do per-step
  torch arithmetic on ``x`` with the schedule held as a tensor and read with ``sigmas[i]``. Branches such as
  ``if sigmas[i + 1] == 0`` read a device value back to the host on a GPU, as the originals do.
* **diffusers style**: the scheduler loop of a diffusers pipeline, ``set_timesteps``, ``scale_model_input``,
  cond and uncond concatenated into one batch, the network, ``step(...).prev_sample``, with guidance at every step.

Models follow fastdiff's convention ``model(x, sigma, **cond) -> D(x; sigma)``; the diffusers loop drives the raw
network ``net(x_in, t, **cond)`` as a pipeline does. All tensors are ``[B, ...]``; ``sigmas`` is ``[N + 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from fastdiff.bench import peers
from fastdiff.denoisers import discrete_sigmas, network_output
from fastdiff.sampler import _cat_kwargs

Model = Callable[..., torch.Tensor]

__all__ = [
    "CFGDenoiser",
    "KDIFF_SAMPLERS",
    "cat_cond",
    "leading_timesteps",
    "diffusers_loop",
    "edm_scheduler",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
    "scheduler_sigmas",
    "sd_alphas_cumprod",
    "vp_scheduler",
    "vp_sigmas",
]


def cat_cond(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict:
    """Cond and uncond keyword arguments as one batch: tensors concatenated along dim 0, cond first."""
    if cond.keys() != uncond.keys():
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    return _cat_kwargs(cond, uncond)


class CFGDenoiser:
    """Classifier-free guidance the k-diffusion/ComfyUI way: every call runs cond and uncond in one ``2B`` batch.

    Called as ``cfg(x, sigma, cond=..., uncond=...)`` with ``x`` ``[B, ...]`` and ``sigma`` ``[B]``; returns the
    guided ``D = D_u + scale * (D_c - D_u)``, shape of ``x``. There is no interval: the unconditional half is
    computed at every step, which is what the baseline is meant to show.
    """

    def __init__(self, model: Model, scale: float):
        self.model = model
        self.scale = scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping, uncond: Mapping) -> torch.Tensor:
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        d_cond, d_uncond = self.model(x_in, sigma_in, **cat_cond(cond, uncond)).chunk(2)
        return d_uncond + (d_cond - d_uncond) * self.scale


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Mapping | None = None):
    """Euler on the probability-flow ODE, k-diffusion style.

    Args:
        model: ``model(x, sigma, **extra_args) -> D``, ``sigma`` a ``[B]`` tensor.
        x: ``[B, ...]`` noise scaled by ``sigmas[0]``.
        sigmas: ``[N + 1]`` tensor, decreasing, ending in 0 (on x's device, as k-diffusion keeps it).
        extra_args: keyword arguments for the model (e.g. ``cond``/``uncond`` for :class:`CFGDenoiser`).

    Returns:
        ``[B, ...]``, the sample at ``sigmas[-1]``.
    """
    extra_args = dict(extra_args or {})
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        d = _to_d(x, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Mapping | None = None):
    """Heun's method (EDM Algorithm 1, deterministic), k-diffusion style: the step to sigma = 0 is one Euler step.

    Shapes as in :func:`sample_euler`; ``2N - 1`` model calls for ``N`` steps ending at 0.
    """
    extra_args = dict(extra_args or {})
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:  # a host read of a device value on a GPU, as in the original
            x = x + d * dt
        else:
            x_pred = x + d * dt
            denoised_2 = model(x_pred, sigmas[i + 1] * ones, **extra_args)
            d_2 = _to_d(x_pred, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Mapping | None = None):
    """DPM-Solver++(2M) (Lu et al. 2022), k-diffusion style, in ``t = -log(sigma)``.

    The first step and the step to sigma = 0 are first order; the others extrapolate with the previous D
    (the midpoint form, as diffusers' ``solver_type="midpoint"``). Shapes as in :func:`sample_euler`.
    """
    extra_args = dict(extra_args or {})
    ones = x.new_ones([x.shape[0]])
    t_of = lambda s: s.log().neg()  # noqa: E731
    sigma_of = lambda t: t.neg().exp()  # noqa: E731
    prev = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        t, t_next = t_of(sigmas[i]), t_of(sigmas[i + 1])  # t_next = inf at sigma = 0: sigma_of(inf) = 0
        h = t_next - t
        if prev is None or sigmas[i + 1] == 0:
            x = (sigma_of(t_next) / sigma_of(t)) * x - torch.expm1(-h) * denoised
        else:
            r = (t - t_of(sigmas[i - 1])) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * prev
            x = (sigma_of(t_next) / sigma_of(t)) * x - torch.expm1(-h) * d
        prev = denoised
    return x


KDIFF_SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m}


# --- diffusers ------------------------------------------------------------------------------------------------

# Stable Diffusion's training schedule; the schedulers of the diffusers-network rows use it.
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
_VP_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                  "dpmpp_2m": "DPMSolverMultistepScheduler"}  # fmt: skip
_EDM_SCHEDULERS = {"euler": "EDMEulerScheduler", "dpmpp_2m": "EDMDPMSolverMultistepScheduler"}


def sd_alphas_cumprod() -> torch.Tensor:
    """``[1000]`` float32: Stable Diffusion's ``alphas_cumprod`` (:data:`SD_BETAS`), computed as diffusers computes
    it, without diffusers."""
    n = SD_BETAS["num_train_timesteps"]
    betas = torch.linspace(SD_BETAS["beta_start"] ** 0.5, SD_BETAS["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(solver: str, steps: int) -> torch.Tensor:
    """``[steps]`` int64: the timesteps the scheduler of :func:`vp_scheduler` steps through (``timestep_spacing=
    "leading"``, ``steps_offset=1``), computed without diffusers. ``DPMSolverMultistepScheduler`` spaces
    ``steps + 1`` points and drops the last; Euler's and Heun's schedulers space ``steps`` (Heun repeats each but
    the first, one step per pair)."""
    n = SD_BETAS["num_train_timesteps"]
    if solver == "dpmpp_2m":
        return (torch.arange(steps + 1) * (n // (steps + 1))).flip(0)[:-1] + 1
    return (torch.arange(steps) * (n // steps)).flip(0) + 1


def vp_sigmas(solver: str, steps: int) -> torch.Tensor:
    """``[steps + 1]`` float64: the VE sigmas :func:`vp_scheduler` steps through, then 0 (diffusers not needed)."""
    return discrete_sigmas(sd_alphas_cumprod(), leading_timesteps(solver, steps))


def vp_scheduler(solver: str):
    """The diffusers scheduler for an eps-prediction network on SD's schedule that runs ``solver``'s update.

    ``timestep_spacing="leading"`` with ``steps_offset=1`` (SD's setting) gives integer timesteps, so
    :func:`scheduler_sigmas` reproduces its schedule exactly for fastdiff. Raises :class:`~fastdiff.bench.peers.
    PeerMissing` without diffusers.
    """
    diffusers = peers.diffusers()

    if solver not in _VP_SCHEDULERS:
        raise ValueError(f"no diffusers VP scheduler for solver {solver!r}; choose from {sorted(_VP_SCHEDULERS)}")
    extra = dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero") if solver == "dpmpp_2m" else {}
    cls = getattr(diffusers, _VP_SCHEDULERS[solver])
    return cls(**SD_BETAS, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, **extra)


def edm_scheduler(solver: str, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                  rho: float = 7.0):  # fmt: skip
    """diffusers' EDM scheduler for ``solver`` (Karras schedule, step to 0), or None where diffusers has none
    (there is no EDM Heun scheduler in diffusers). Raises :class:`~fastdiff.bench.peers.PeerMissing` without
    diffusers."""
    diffusers = peers.diffusers()

    if solver not in _EDM_SCHEDULERS:
        return None
    extra = dict(algorithm_type="dpmsolver++", solver_order=2) if solver == "dpmpp_2m" else {}
    cls = getattr(diffusers, _EDM_SCHEDULERS[solver])
    return cls(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, rho=rho, sigma_schedule="karras",
               prediction_type="epsilon", final_sigmas_type="zero", **extra)  # fmt: skip


def scheduler_sigmas(scheduler, steps: int) -> torch.Tensor:
    """The ``[steps + 1]`` VE sigmas (float64, ending in 0) a scheduler steps through after ``set_timesteps(steps)``,
    in fastdiff's form: EDM schedulers hold them directly; discrete VP schedulers through their timesteps (Heun's
    repeated timesteps collapse to one per step)."""
    scheduler.set_timesteps(steps)
    if type(scheduler).__name__.startswith("EDM"):
        return scheduler.sigmas.double()
    return discrete_sigmas(scheduler.alphas_cumprod, scheduler.timesteps.round().long().unique_consecutive())


@torch.no_grad()
def diffusers_loop(
    net: Callable[..., Any],
    scheduler,
    x: torch.Tensor,
    steps: int,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """A diffusers pipeline's denoising loop with classifier-free guidance at every step.

    Args:
        net: the raw network, ``net(x_in, t, **cond)`` with ``t`` a ``[B]`` tensor of the scheduler's timesteps
            (EDM schedulers: ``c_noise = log(sigma) / 4``); returns a tensor or an object with ``.sample``.
        scheduler: a diffusers scheduler (its state is reset by ``set_timesteps``).
        x: ``[B, ...]`` initial latents, already scaled by ``scheduler.init_noise_sigma``, on the device.
        steps: the number of inference steps given to ``set_timesteps``.
        cond, uncond: keyword arguments of the conditional and unconditional passes.
        scale: the guidance scale; None runs the conditional pass alone.

    Returns:
        ``[B, ...]``, the final latents (float32, as diffusers' schedulers upcast).
    """
    cond = dict(cond or {})
    guided = scale is not None
    kwargs = cat_cond(cond, dict(uncond or {})) if guided else cond
    scheduler.set_timesteps(steps, device=x.device)
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guided else x
        x_in = scheduler.scale_model_input(x_in, t)
        out = network_output(net(x_in, t.expand(x_in.shape[0]), **kwargs))
        if guided:
            out_cond, out_uncond = out.chunk(2)
            out = out_uncond + scale * (out_cond - out_uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x
