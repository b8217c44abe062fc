"""k-diffusion-compatible samplers: code written for ``k_diffusion.sampling`` switches by changing the import.

Every sampler has k-diffusion's signature::

    sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None, ...) -> x

* ``model(x, sigma, **extra_args) -> D(x; sigma)``, with ``x`` ``[B, ...]`` and ``sigma`` a ``[B]`` tensor;
* ``x`` ``[B, ...]``: the initial noise, already scaled by ``sigmas[0]``;
* ``sigmas`` ``[N + 1]``: decreasing, usually ending in 0 (the helpers below make such schedules);
* ``callback`` receives per step ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}``: the state at the step's start
  (after any churn noise), the step index, ``sigmas[i]``, the noise level the model was evaluated at, and ``D``
  there;
* ``disable``: tqdm's ``disable`` for the progress bar (None: shown only on a terminal).

The deterministic samplers (``sample_euler``, ``sample_heun``, ``sample_dpmpp_2m``, ``sample_ipndm``, and
``sample_dpmpp_3m_sde`` with ``eta=0``) run :func:`fastdiff.sample` with the matching fastdiff solver, so every
step is one fused :func:`fastdiff.ops.guided_step`. With churn (``s_churn > 0``) Euler and Heun inject noise before
each step and then take the fastdiff solver's step from the raised noise level.

The stochastic samplers (``sample_euler_ancestral``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``) take
exactly one :func:`fastdiff.ops.guided_step` per step, with the noise as the op's noise input::

    x' = a x + b_0 D + sum_k b_k D_{i-k} + c z

The coefficients ``(a, [b_0, ...], c)`` come from pure functions of the schedule (floats in, floats out):
:func:`euler_ancestral_coefficients`, :func:`dpmpp_2m_sde_coefficients`, :func:`dpmpp_3m_sde_coefficients`.

``sample_dpmpp_3m_sde`` with ``eta=0`` is k-diffusion's 3M, which is not quite fastdiff's ``dpmpp_3m``: on its
second step (one earlier ``D``) k-diffusion weights ``(D_i - D_{i-1}) / r`` with the exponential-integrator
``phi_2(h)``, where fastdiff's ``dpmpp_3m`` (like diffusers) warms up with the 2M midpoint step; every other step
is the same. It runs through fastdiff's 3M solver with that one step changed (:class:`KDiffusionDPMSolverPP3M`).

Differences from k-diffusion, all deliberate:

* the SDE samplers' default noise is fastdiff's :class:`~fastdiff.brownian.BrownianTreeNoiseSampler`, seeded by
  the ``seed`` keyword: the same distribution and the same consistency across step counts as k-diffusion's
  torchsde tree, not the same numbers for the same seed (Euler ancestral and churn draw ``torch.randn_like(x)``
  from the global generator as k-diffusion does, so a seeded run draws the same normals);
* the model is called with ``sigma`` in ``x``'s dtype promoted to at least float32, and the linear update runs in
  at least float32 (k-diffusion computes in ``x``'s dtype); the schedule helpers compute in float64 and return
  torch's default dtype, as k-diffusion's;
* bad input raises a ``ValueError``/``TypeError`` that names the problem (fastdiff's checks).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import trange

from fastdiff import ops, schedules, solvers
from fastdiff.brownian import BrownianTreeNoiseSampler
from fastdiff.sampler import _check_inputs, _check_output, _sigma_batch, sample
from fastdiff.solvers import Denoised
from fastdiff.solvers.base import _expm1, _is_zero, _lam

__all__ = [
    "BrownianTreeNoiseSampler",
    "KDiffusionDPMSolverPP3M",
    "append_zero",
    "churn_gamma",
    "default_noise_sampler",
    "dpmpp_2m_sde_coefficients",
    "dpmpp_3m_sde_coefficients",
    "euler_ancestral_coefficients",
    "get_ancestral_step",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_polyexponential",
    "get_sigmas_vp",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_ipndm",
    "to_d",
]

Model = Callable[..., torch.Tensor]
NoiseSampler = Callable[[Any, Any], torch.Tensor]  # (sigma, sigma_next) -> unit normal noise shaped like x
Callback = Callable[[dict], Any]
StepCoefficients = tuple[float, list[float], float]  # (a, [b_0, b_1, ...], c): x' = a x + sum_k b_k D_k + c z


# ------------------------------------------------------------------------------------------------- schedules


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n]`` with a 0 appended: ``[n + 1]``."""
    return torch.cat([x, x.new_zeros([1])])


def _schedule_out(sigmas: torch.Tensor, device) -> torch.Tensor:
    """A float64 schedule as k-diffusion returns it: torch's default dtype, on ``device``."""
    return sigmas.to(device=device, dtype=torch.get_default_dtype())


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """Karras et al. (2022): ``n`` sigmas uniform in ``sigma ** (1 / rho)`` from ``sigma_max`` to ``sigma_min``, then
    0. ``[n + 1]`` in torch's default dtype (computed in float64)."""
    return _schedule_out(schedules.karras(n, sigma_min, sigma_max, rho), device)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> torch.Tensor:
    """``n`` sigmas uniform in ``log(sigma)`` from ``sigma_max`` to ``sigma_min``, then 0. ``[n + 1]``."""
    return _schedule_out(schedules.logsnr_uniform(n, sigma_min, sigma_max), device)


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device="cpu"
) -> torch.Tensor:
    """``log(sigma)`` polynomial in the step: ``log sigma_j = log sigma_min + u_j^rho (log sigma_max - log
    sigma_min)`` with ``u`` running uniformly from 1 to 0, then 0. ``rho = 1`` is :func:`get_sigmas_exponential`.
    ``[n + 1]``."""
    schedules._check_range(n, sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    u = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _schedule_out(append_zero((lo + u * (hi - lo)).exp()), device)


def get_sigmas_vp(
    n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, device="cpu"
) -> torch.Tensor:
    """The continuous VP-SDE (Song et al. 2021) with ``beta(t) = beta_min + beta_d t`` at ``n`` times uniform from 1
    to ``eps_s``: ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``, then 0. ``[n + 1]``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of steps n must be a positive integer, got {n!r}")
    if not 0 < eps_s < 1:
        raise ValueError(f"eps_s must lie in (0, 1), got {eps_s}")
    if not (beta_d > 0 and beta_min >= 0):
        raise ValueError(f"need beta_d > 0 and beta_min >= 0, got beta_d={beta_d}, beta_min={beta_min}")
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    return _schedule_out(append_zero(schedules.vp_t_to_sigma(t, beta_min, beta_min + beta_d)), device)


# --------------------------------------------------------------------------------------------------- helpers


def to_d(x: torch.Tensor, sigma: torch.Tensor | float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative ``dx/dsigma = (x - D) / sigma``. ``x``, ``denoised`` ``[B, ...]``;
    ``sigma`` a scalar or ``[B]``."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim > 0:
        sigma = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
    return (x - denoised) / sigma


def _sqrt(v):
    return v.clamp(min=0).sqrt() if isinstance(v, torch.Tensor) else math.sqrt(max(v, 0.0))


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """Split an ancestral step from ``sigma_from`` to ``sigma_to`` into a deterministic step to ``sigma_down`` and
    fresh noise of standard deviation ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_to^2``::

        sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))

    ``eta = 1`` is DDPM's ancestral step, ``eta = 0`` the ODE step. Floats, or 0-d tensors as k-diffusion passes
    them. Returns ``(sigma_down, sigma_up)``.
    """
    if not eta:
        return sigma_to, 0.0
    up = eta * _sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    tensors = isinstance(up, torch.Tensor) or isinstance(sigma_to, torch.Tensor)
    up = torch.where(up < sigma_to, up, sigma_to) if tensors else min(sigma_to, up)
    return _sqrt(sigma_to**2 - up**2), up


def churn_gamma(sigma: float, n_steps: int, s_churn: float, s_tmin: float = 0.0, s_tmax: float = math.inf) -> float:
    """EDM's churn (Karras et al. 2022, Algorithm 2): the step at ``sigma`` first raises the noise level to
    ``sigma (1 + gamma)`` with ``gamma = min(s_churn / n_steps, sqrt(2) - 1)`` when ``s_tmin <= sigma <= s_tmax``,
    else ``gamma = 0``."""
    return min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Fresh standard normal noise shaped like ``x`` at every call: from torch's global generator (as k-diffusion,
    so a run seeded with ``torch.manual_seed`` draws the same numbers), or with ``seed`` from a generator of its own
    on ``x``'s device."""
    if seed is None:
        return lambda sigma, sigma_next: torch.randn_like(x)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return _generator_noise(x, generator)


def _generator_noise(x: torch.Tensor, generator: torch.Generator) -> NoiseSampler:
    def draw(sigma, sigma_next):
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
        return z.to(x.device)

    return draw


def _noise_source(x: torch.Tensor, noise_sampler: NoiseSampler | None, generator: torch.Generator | None):
    if noise_sampler is not None and generator is not None:
        raise ValueError("give either noise_sampler or generator, not both")
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError("noise_sampler must be callable as noise_sampler(sigma, sigma_next) -> noise like x")
        return noise_sampler
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return _generator_noise(x, generator)
    return default_noise_sampler(x)


def _draw(noise: NoiseSampler, sigma, sigma_next, x: torch.Tensor) -> torch.Tensor:
    z = noise(sigma, sigma_next)
    if not isinstance(z, torch.Tensor) or z.shape != x.shape or not z.is_floating_point():
        got = f"shape {tuple(z.shape)} {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"noise_sampler returned {got}; expected a floating tensor of x's shape {tuple(x.shape)}")
    return z.to(device=x.device, dtype=x.dtype)


def _progress(disable: bool | None) -> bool:
    """tqdm's ``disable`` as fastdiff's ``progress``: None shows the bar only on a terminal, as tqdm does."""
    return disable is False or (disable is None and sys.stderr.isatty())


def _user_sigmas(sigmas) -> torch.Tensor:
    """The schedule as the caller gave it, for the callback's ``sigma`` (k-diffusion passes ``sigmas[i]``)."""
    return sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float64)


def _check_common(extra_args, callback) -> dict:
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a dict of the model's keyword arguments, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable with one dict argument")
    return dict(extra_args or {})


def _check_factor(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def _denoise(model: Model, x: torch.Tensor, sigma: float, extra_args: Mapping) -> torch.Tensor:
    return _check_output(model(x, _sigma_batch(sigma, x), **extra_args), x, "model")


# ----------------------------------------------------------------------------------------- deterministic path


def _run_solver(solver, model, x, sigmas, extra_args, callback, disable) -> torch.Tensor:
    """:func:`fastdiff.sample` with k-diffusion's callback dict."""
    extra = _check_common(extra_args, callback)
    user = _user_sigmas(sigmas)

    def relay(info: dict) -> None:
        i = info["i"]
        callback({"x": info["x"], "i": i, "sigma": user[i], "sigma_hat": user[i], "denoised": info["denoised"]})

    return sample(
        model, x, sigmas, solver=solver, cond=extra, callback=relay if callback is not None else None,
        progress=_progress(disable),
    )  # fmt: skip


def _churn_run(
    solver: solvers.Solver, model, x, sigmas, extra_args, callback, disable, churn, noise_sampler, generator
):
    """Euler or Heun with EDM's churn: per step, raise the noise level from ``sigma`` to ``sigma_hat`` with fresh
    noise, then take the fastdiff solver's step from ``sigma_hat`` to the next sigma. Without any churn step this
    is :func:`fastdiff.sample`."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    s_churn, s_noise = _check_factor("s_churn", s_churn), _check_factor("s_noise", s_noise)
    if not s_tmin <= s_tmax:
        raise ValueError(f"need s_tmin <= s_tmax, got s_tmin={s_tmin}, s_tmax={s_tmax}")
    sig = _check_inputs(model, x, sigmas).tolist()
    gammas = [churn_gamma(s, len(sig) - 1, s_churn, s_tmin, s_tmax) for s in sig[:-1]]
    if not any(g > 0 for g in gammas):
        return _run_solver(solver, model, x, sigmas, extra_args, callback, disable)
    extra = _check_common(extra_args, callback)
    user = _user_sigmas(sigmas)
    noise = _noise_source(x, noise_sampler, generator)
    state = solver.start()
    evaluate = lambda xi, s: Denoised(_denoise(model, xi, s, extra))  # noqa: E731
    for i in trange(len(sig) - 1, disable=disable):
        sigma_hat = sig[i] * (1 + gammas[i])
        if gammas[i] > 0:
            z = _draw(noise, user[i], sigma_hat, x)
            x = x + z * (s_noise * math.sqrt(sigma_hat**2 - sig[i] ** 2))
        x_next, d = solver.step(0, x, [sigma_hat, sig[i + 1]], evaluate, state)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": user[i], "sigma_hat": user[i] * (1 + gammas[i]), "denoised": d})
        x = x_next
    return x


@torch.no_grad()
def sample_euler(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with churn).

    ``x`` ``[B, ...]`` scaled by ``sigmas[0]``; ``sigmas`` ``[N + 1]``; returns the sample ``[B, ...]``. Without
    churn it is fastdiff's ``euler`` solver. With ``s_churn > 0`` each step whose sigma lies in ``[s_tmin,
    s_tmax]`` first adds noise ``sqrt(sigma_hat^2 - sigma^2) s_noise z`` to reach ``sigma_hat = sigma (1 + gamma)``
    (:func:`churn_gamma`) and steps from there. The churn noise ``z`` is ``noise_sampler(sigma, sigma_hat)``, or
    drawn with ``generator``, or by default ``torch.randn_like(x)`` from the global generator (as k-diffusion).
    """
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churn_run(solvers.Euler(), model, x, sigmas, extra_args, callback, disable, churn, noise_sampler, generator)


@torch.no_grad()
def sample_heun(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1; with churn, Algorithm 2).

    Two model evaluations a step, one on the step to sigma = 0 (an Euler step there). Shapes and the churn
    options as :func:`sample_euler`; the callback's ``denoised`` is the first evaluation of the step. Without churn
    it is fastdiff's ``heun`` solver.
    """
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churn_run(solvers.Heun(), model, x, sigmas, extra_args, callback, disable, churn, noise_sampler, generator)


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), midpoint form: fastdiff's ``dpmpp_2m`` solver. First order on the first
    step and on the step to 0. ``x`` ``[B, ...]``, ``sigmas`` ``[N + 1]``; returns ``[B, ...]``."""
    return _run_solver(solvers.DPMSolverPP2M(), model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_ipndm(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    max_order: int = 4,
) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023): Adams-Bashforth of order up to ``max_order`` (1-4) on ``(x - D) /
    sigma``, warming up from first order: fastdiff's ``ipndm`` solver. Shapes as :func:`sample_dpmpp_2m`."""
    return _run_solver(solvers.IPNDM(max_order), model, x, sigmas, extra_args, callback, disable)


class KDiffusionDPMSolverPP3M(solvers.DPMSolverPP3M):
    """DPM-Solver++(3M) as k-diffusion's ``sample_dpmpp_3m_sde`` computes it with ``eta = 0``: fastdiff's
    ``dpmpp_3m`` except on the second step, which (with one earlier ``D``) uses the exponential-integrator
    weight ``phi_2(h) = 1 + expm1(-h) / h`` on ``(D_i - D_{i-1}) / r`` instead of the 2M midpoint weight
    ``(1 - e^{-h}) / 2`` (:func:`dpmpp_3m_sde_coefficients`). The two differ by ``O(h^3)`` on that step."""

    name = "dpmpp_3m_kdiffusion"

    def coefficients(self, sigmas, i):
        if i != 1 or _is_zero(sigmas[2]):
            return super().coefficients(sigmas, i)
        # Floats or 0-d tensors (fastdiff.Sampler's device-resident, differentiable coefficient table).
        lam0, lam1, lam2 = (_lam(s) for s in sigmas[:3])
        h = lam2 - lam1
        k = (_expm1(-h) / h + 1) * h / (lam1 - lam0)  # phi_2(h) / r
        return sigmas[2] / sigmas[1], [-_expm1(-h) + k, -k]


# -------------------------------------------------------------------------------------- stochastic samplers


def euler_ancestral_coefficients(
    sigmas: Sequence[float], i: int, eta: float = 1.0, s_noise: float = 1.0
) -> StepCoefficients:
    """Euler ancestral step ``i``: an Euler step to ``sigma_down``, then fresh noise of std ``sigma_up``
    (:func:`get_ancestral_step`)::

        x' = x + (x - D) / sigma (sigma_down - sigma) + sigma_up s_noise z
           = (sigma_down / sigma) x + (1 - sigma_down / sigma) D + sigma_up s_noise z

    Returns ``(a, [b_D], c)``; the step to sigma = 0 gives ``(0, [1], 0)``: ``x' = D``.
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
    a, b = solvers.euler_coefficients(sigma, sigma_down)
    return a, b, sigma_up * s_noise


def _sde_base(sigma: float, sigma_next: float, h_eta: float, noise_h: float, s_noise: float):
    """The first-order part shared by the DPM-Solver++ SDE steps, with ``h_eta = h + eta h``::

    x' = e^{-h_eta} x + (1 - e^{-h_eta}) D + sigma' sqrt(1 - e^{-2 eta h}) s_noise z

    (``e^{-h_eta} = (sigma'/sigma) e^{-eta h}``). Returns ``(a, b_D, c)``."""
    a = sigma_next / sigma * math.exp(-noise_h)
    return a, -math.expm1(-h_eta), sigma_next * math.sqrt(-math.expm1(-2 * noise_h)) * s_noise


def dpmpp_2m_sde_coefficients(
    sigmas: Sequence[float], i: int, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint"
) -> StepCoefficients:
    """DPM-Solver++(2M) SDE (Lu et al. 2022) step ``i`` over ``[D_i, D_{i-1}]``, in ``lambda = -log sigma`` with
    ``h = lambda_{i+1} - lambda_i`` and ``eta_h = eta h``::

        x' = (sigma'/sigma) e^{-eta_h} x + (1 - e^{-h - eta_h}) D_i + k (D_i - D_{i-1})
             + sigma' sqrt(1 - e^{-2 eta_h}) s_noise z

    with ``r = h_{i-1} / h`` and ``k = (1 - e^{-h - eta_h}) / (2 r)`` (``midpoint``) or
    ``k = (1 + expm1(-h - eta_h) / (h + eta_h)) / r`` (``heun``: the exact integral of a linear ``D(lambda)``
    against the step's weight). The first step has no ``D_{i-1}`` term; the step to 0 returns ``D``
    (``(0, [1], 0)``). ``eta = 0`` with ``midpoint`` is fastdiff's ``dpmpp_2m``. Returns ``(a, b, c)``.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if sigma_next == 0:
        return 0.0, [1.0], 0.0
    h = math.log(sigma) - math.log(sigma_next)
    a, b0, c = _sde_base(sigma, sigma_next, h + eta * h, eta * h, s_noise)
    if i == 0:
        return a, [b0], c
    r = (math.log(sigmas[i - 1]) - math.log(sigma)) / h
    k = 0.5 * b0 / r if solver_type == "midpoint" else (1 + math.expm1(-h - eta * h) / (h + eta * h)) / r
    return a, [b0 + k, -k], c


def dpmpp_3m_sde_coefficients(
    sigmas: Sequence[float], i: int, eta: float = 1.0, s_noise: float = 1.0
) -> StepCoefficients:
    """DPM-Solver++(3M) SDE step ``i`` (k-diffusion's ``sample_dpmpp_3m_sde``) over ``[D_i, D_{i-1}, D_{i-2}]``.

    With ``h = lambda_{i+1} - lambda_i``, ``h_eta = (1 + eta) h``, ``phi_2 = 1 + expm1(-h_eta) / h_eta``,
    ``phi_3 = phi_2 / h_eta - 1/2``::

        x' = e^{-h_eta} x + (1 - e^{-h_eta}) D_i + [phi_2 d1 - phi_3 d2] + sigma' sqrt(1 - e^{-2 eta h}) s_noise z

    where, with two earlier estimates, ``r0 = h_{i-1}/h``, ``r1 = h_{i-2}/h``, ``d1_0 = (D_i - D_{i-1}) / r0``,
    ``d1_1 = (D_{i-1} - D_{i-2}) / r1``, ``d2 = (d1_0 - d1_1) / (r0 + r1)``, ``d1 = d1_0 + r0 d2``; with one,
    the bracket is ``phi_2 (D_i - D_{i-1}) / r0``; on the first step it is empty. The step to 0 returns ``D``.
    With ``eta = 0`` and two earlier estimates this is fastdiff's ``dpmpp_3m`` step. Returns ``(a, b, c)``.
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if sigma_next == 0:
        return 0.0, [1.0], 0.0
    h = math.log(sigma) - math.log(sigma_next)
    h_eta = h * (eta + 1)
    a, b0, c = _sde_base(sigma, sigma_next, h_eta, eta * h, s_noise)
    if i == 0:
        return a, [b0], c
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    r0 = (math.log(sigmas[i - 1]) - math.log(sigma)) / h
    if i == 1:
        return a, [b0 + phi_2 / r0, -phi_2 / r0], c
    phi_3 = phi_2 / h_eta - 0.5
    r1 = (math.log(sigmas[i - 2]) - math.log(sigmas[i - 1])) / h
    # phi_2 d1 - phi_3 d2 = (phi_2 + q) d1_0 - q d1_1, q = (phi_2 r0 - phi_3) / (r0 + r1), as weights on the D's:
    q = (phi_2 * r0 - phi_3) / (r0 + r1)
    u, v = (phi_2 + q) / r0, q / r1
    return a, [b0 + u, -u - v, v], c


def _stochastic_run(
    model: Model,
    x: torch.Tensor,
    sigmas,
    sig: list[float],
    extra_args,
    callback,
    disable,
    coefficients: Callable[[list[float], int], StepCoefficients],
    noise: Callable[[], NoiseSampler],
    noisy: bool,
) -> torch.Tensor:
    """The loop of the stochastic samplers: per step one model call and one :func:`fastdiff.ops.guided_step` with
    the noise as its noise input. ``sig`` is the checked schedule on the host. ``noise()`` makes the noise
    sampler on first use; it is called for every step that ends above 0 when ``noisy``."""
    extra = _check_common(extra_args, callback)
    user = _user_sigmas(sigmas)
    history: list[torch.Tensor] = []
    sampler = None
    for i in trange(len(sig) - 1, disable=disable):
        d = _denoise(model, x, sig[i], extra)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": user[i], "sigma_hat": user[i], "denoised": d})
        a, b, c = coefficients(sig, i)
        z = None
        if noisy and sig[i + 1] > 0:
            sampler = sampler or noise()
            z = _draw(sampler, user[i], user[i + 1], x)
        x, e = ops.guided_step(x, d, None, history[: len(b) - 1], a=a, b=b, noise=z if c else None, c_noise=c)
        history = [e, *history[:1]]
    return x


def _sde_run(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, coefficients):
    """The DPM-Solver++ SDE samplers: ``coefficients(sigmas, i, eta, s_noise)``, and noise from ``noise_sampler``
    or, by default, a Brownian tree over ``[smallest positive sigma, largest sigma]`` (made on first use: no noise
    is drawn with ``eta = 0``)."""
    eta, s_noise = _check_factor("eta", eta), _check_factor("s_noise", s_noise)
    sig = _check_inputs(model, x, sigmas).tolist()
    if noise_sampler is not None:
        given = _noise_source(x, noise_sampler, None)
        noise = lambda: given  # noqa: E731
    else:
        positive = [s for s in sig if s > 0]
        noise = lambda: BrownianTreeNoiseSampler(x, min(positive), max(positive), seed=seed)  # noqa: E731
    step = functools.partial(coefficients, eta=eta, s_noise=s_noise)
    return _stochastic_run(model, x, sigmas, sig, extra_args, callback, disable, step, noise, eta > 0)


@torch.no_grad()
def sample_euler_ancestral(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral sampling with Euler steps (:func:`euler_ancestral_coefficients`).

    ``x`` ``[B, ...]`` scaled by ``sigmas[0]``; ``sigmas`` ``[N + 1]``; returns ``[B, ...]``. The noise is
    ``noise_sampler(sigma, sigma_next)``, or drawn with ``generator``, or by default ``torch.randn_like(x)`` from the
    global generator, one draw per step that ends above 0 (as k-diffusion, so ``torch.manual_seed`` reproduces its
    draws). ``eta = 0`` is Euler's method. The step to 0 returns ``D``.
    """
    eta, s_noise = _check_factor("eta", eta), _check_factor("s_noise", s_noise)
    sig = _check_inputs(model, x, sigmas).tolist()
    noise = _noise_source(x, noise_sampler, generator)
    step = functools.partial(euler_ancestral_coefficients, eta=eta, s_noise=s_noise)
    return _stochastic_run(model, x, sigmas, sig, extra_args, callback, disable, step, lambda: noise, True)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    solver_type: str = "midpoint",
    seed: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (:func:`dpmpp_2m_sde_coefficients`), ``solver_type`` ``'midpoint'`` or ``'heun'``.

    ``x`` ``[B, ...]`` scaled by ``sigmas[0]``; ``sigmas`` ``[N + 1]``; returns ``[B, ...]``. The noise is
    ``noise_sampler(sigma, sigma_next)``, by default a :class:`~fastdiff.brownian.BrownianTreeNoiseSampler` over
    ``[smallest positive sigma, largest sigma]`` seeded with ``seed`` (an int, ``B`` ints for one path per batch
    element, or None for a seed from torch's global generator), so that runs with different step counts follow
    one Brownian path. k-diffusion's torchsde tree has the same law but gives other numbers for the same seed.
    No noise is drawn with ``eta = 0``; ``eta = 0`` with ``midpoint`` is :func:`sample_dpmpp_2m`.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    coefficients = functools.partial(dpmpp_2m_sde_coefficients, solver_type=solver_type)
    return _sde_run(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, coefficients)


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    seed: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (:func:`dpmpp_3m_sde_coefficients`); noise as :func:`sample_dpmpp_2m_sde`.

    With ``eta = 0`` it is deterministic and runs :func:`fastdiff.sample` with :class:`KDiffusionDPMSolverPP3M`
    (fastdiff's ``dpmpp_3m`` with k-diffusion's second step). ``x`` ``[B, ...]``, ``sigmas`` ``[N + 1]``; returns
    ``[B, ...]``.
    """
    if _check_factor("eta", eta) == 0:
        return _run_solver(KDiffusionDPMSolverPP3M(), model, x, sigmas, extra_args, callback, disable)
    coefficients = dpmpp_3m_sde_coefficients
    return _sde_run(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, seed, coefficients)
