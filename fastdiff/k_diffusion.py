"""k-diffusion-compatible samplers: code written for ``k_diffusion.sampling`` (k-diffusion 0.1.1) switches by
changing the import, and ComfyUI-style lookups ``getattr(module, "sample_" + name)`` find every sampler.

Every fixed-schedule sampler has k-diffusion's signature::

    sample_X(model, x, sigmas, extra_args=None, callback=None, disable=None, ...) -> x

* ``model(x, sigma, **extra_args) -> D(x; sigma)``, with ``x`` ``[B, ...]`` and ``sigma`` a ``[B]`` tensor;
* ``x`` ``[B, ...]``: the initial noise, already scaled by ``sigmas[0]``;
* ``sigmas`` ``[N + 1]``: decreasing, usually ending in 0 (the ``get_sigmas_*`` helpers make such schedules);
* ``callback`` receives per step ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}``: the state at the step's start
  (after any churn noise), the step index, ``sigmas[i]``, the noise level the model was evaluated at, and ``D``
  there;
* ``disable``: tqdm's ``disable`` for the progress bar (None: shown only on a terminal).

How each maps onto fastdiff: the sampler checks its k-diffusion arguments and runs :func:`fastdiff.sample` with the
fastdiff solver of the same name (``sample_lms(order=4)`` is ``solvers.get("lms", order=4)``), so each stage of a
step is one fused :func:`fastdiff.ops.guided_step` and any noise is that op's noise input:

* ``sample_euler_ancestral``, ``sample_dpm_2_ancestral``, ``sample_dpmpp_2s_ancestral``, ``sample_dpmpp_sde``,
  ``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``, ``sample_lms`` and fastdiff's extra
  ``sample_ipndm``: the solvers ``euler_ancestral``, ``dpm_2_ancestral``, ``dpmpp_2s_ancestral``, ``dpmpp_sde``,
  ``dpmpp_2m``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``, ``lms``, ``ipndm``. ``sample_dpmpp_3m_sde`` with ``eta = 0``
  runs :class:`KDiffusionDPMSolverPP3M`, fastdiff's ``dpmpp_3m`` with k-diffusion's second step.
* ``sample_euler``, ``sample_heun``, ``sample_dpm_2`` take EDM's churn (Karras et al. 2022, Algorithm 2): per step,
  noise raises the level from ``sigma`` to ``sigma_hat``, then the solver ``euler``, ``heun`` or ``dpm_2`` takes
  its step from ``sigma_hat``. That pre-step lives here, the step in the solver.
* ``sample_dpm_fast`` and ``sample_dpm_adaptive`` (DPM-Solver with its own steps, fixed or adaptive in
  ``log sigma``) run :class:`~fastdiff.solvers.adaptive.DPMSolver`, since they have no schedule.

Noise, as k-diffusion draws it, so that the same ``torch.manual_seed`` gives the same samples:

* ``torch.randn_like(x)`` from the global generator in the ancestral samplers, DPM-Solver-fast/adaptive and churn,
  including the draws k-diffusion multiplies by 0 (``eta = 0``; churn draws at every step whether or not the step
  is churned, as k-diffusion 0.1.1's ``sample_euler``, ``sample_heun`` and ``sample_dpm_2`` do);
* in the SDE samplers (``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``), torchsde's
  Brownian tree (:class:`BrownianTreeNoiseSampler`) over ``[smallest positive sigma, largest sigma]``, built as
  k-diffusion builds it (its seed drawn from the global generator, even at ``eta = 0``), so one seed gives one
  Brownian path whatever the step count;
* a ``noise_sampler`` is called with the arguments k-diffusion passes: ``(sigmas[i], sigmas[i + 1])`` as the
  schedule's own 0-d tensors, ``sample_dpmpp_sde``'s levels computed as k-diffusion computes them.

fastdiff's extensions: ``generator=`` (a ``torch.Generator`` for the normal draws) on the samplers whose default
noise is ``randn_like``; ``seed=`` (an int, or ``B`` ints for one path per batch element) on the SDE samplers;
``noise_sampler=`` for the churn noise (called only for churned steps, with ``(sigma, sigma_hat)``); ``cpu=`` on
the Brownian tree (built on the CPU, so the path is the same on every device); ``sample_ipndm``.

Differences from k-diffusion, all deliberate:

* the model is called with ``sigma`` in ``x``'s dtype promoted to at least float32, and the linear updates run in
  at least float32 with coefficients computed in float64 (k-diffusion computes in the schedule's and ``x``'s
  dtype), so float32 results agree to float32 rounding (a few 1e-6 relative), float64 ones to about 1e-14;
  DPM-Solver-fast/adaptive compute their times in float64, k-diffusion in torch's default dtype;
* the schedule helpers compute in float64 and return torch's default dtype;
* ``sample_lms`` takes ``order`` 1 to 4 (the op keeps three earlier derivatives), and integrates its weights
  exactly rather than with ``scipy.integrate.quad``;
* ``log_likelihood`` (an ODE likelihood estimate with torchdiffeq, not a sampler) is not provided;
* bad input raises a ``ValueError``/``TypeError`` that names the problem (fastdiff's checks), where k-diffusion
  may fail later or return NaN.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import torch
import torchsde
from tqdm.auto import tqdm, trange

from fastdiff import schedules, solvers
from fastdiff.arguments import as_int, as_real
from fastdiff.sampler import (
    _check_inputs,
    _check_output,
    _check_state,
    _noise_source,
    _sigma_batch,
    fresh_normals,
    sample,
)
from fastdiff.solvers import Denoised
from fastdiff.solvers.adaptive import DPMSolver, PIDStepSizeController
from fastdiff.solvers.base import _is_zero
from fastdiff.solvers.multistep import lagrange_integrals
from fastdiff.solvers.stochastic import (
    _factor,
    dpmpp_2m_sde_coefficients,
    dpmpp_3m_sde_coefficients,
    euler_ancestral_coefficients,
    get_ancestral_step,
)

__all__ = [
    "BatchedBrownianTree",
    "BrownianTreeNoiseSampler",
    "DPMSolver",
    "KDiffusionDPMSolverPP3M",
    "PIDStepSizeController",
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
    "linear_multistep_coeff",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_ipndm",
    "sample_lms",
    "to_d",
]

Model = Callable[..., torch.Tensor]
NoiseSampler = Callable[[Any, Any], torch.Tensor]  # (sigma, sigma_next) -> unit normal noise shaped like x
Callback = Callable[[dict], Any]


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
    """``log(sigma)`` polynomial in the step (:func:`fastdiff.schedules.polyexponential`): ``log sigma_j = log
    sigma_min + u_j^rho (log sigma_max - log sigma_min)`` with ``u`` running uniformly from 1 to 0, then 0. ``rho =
    1`` is :func:`get_sigmas_exponential`. ``[n + 1]``."""
    return _schedule_out(schedules.polyexponential(n, sigma_min, sigma_max, rho), device)


def get_sigmas_vp(
    n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3, device="cpu"
) -> torch.Tensor:
    """The continuous VP-SDE (Song et al. 2021) with ``beta(t) = beta_min + beta_d t`` at ``n`` times uniform from 1
    to ``eps_s``: ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``, then 0. ``[n + 1]``."""
    n = as_int(n, "the number of steps n", 1)
    beta_d, beta_min, eps_s = as_real(beta_d, "beta_d"), as_real(beta_min, "beta_min"), as_real(eps_s, "eps_s")
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


def churn_gamma(sigma, n_steps: int, s_churn: float, s_tmin: float = 0.0, s_tmax: float = math.inf) -> float:
    """EDM's churn (Karras et al. 2022, Algorithm 2): the step at ``sigma`` first raises the noise level to
    ``sigma (1 + gamma)`` with ``gamma = min(s_churn / n_steps, sqrt(2) - 1)`` when ``s_tmin <= sigma <= s_tmax``,
    else ``gamma = 0``. ``sigma`` a float or a 0-d tensor (compared in its dtype, as k-diffusion compares)."""
    return min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


def linear_multistep_coeff(order: int, t: Sequence[float], i: int, j: int) -> float:
    """The weight of the derivative at ``t[i - j]`` in the linear multistep step from ``t[i]`` to ``t[i + 1]``
    that integrates the Lagrange interpolant through ``t[i], ..., t[i - order + 1]`` (what ``sample_lms`` uses;
    ``t`` a sequence, array or 1-D tensor of sigmas). Exact, where k-diffusion integrates numerically."""
    order, i, j = as_int(order, "order", 1), as_int(i, "i", 0), as_int(j, "j", 0)
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    if j >= order:
        raise ValueError(f"j must be below the order {order}, got {j}")
    s0 = float(t[i])
    return float(lagrange_integrals([float(t[i - k]) - s0 for k in range(order)], float(t[i + 1]) - s0)[j])


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Fresh, independent standard normal noise shaped like ``x`` at every call, whatever the interval (as
    k-diffusion's; fastdiff's own default noise composes nested intervals, :class:`fastdiff.sampler.BrownianDraws`):
    from torch's global generator (as k-diffusion, so a run seeded with ``torch.manual_seed`` draws the same
    numbers), or with ``seed`` from a generator of its own on ``x``'s device."""
    _check_state(x)
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(as_int(seed, "seed", 0))
    draw = fresh_normals(x, generator)
    return lambda sigma, sigma_next: draw()


def _seeds(seed, batch: int) -> tuple[list[int], bool]:
    """``seed`` as a list of tree seeds and whether it is one per batch element."""
    if seed is None:  # one draw from the global generator, as k-diffusion makes it
        seed = torch.randint(0, 2**63 - 1, []).item()
    if (seed.ndim if isinstance(seed, torch.Tensor) else np.ndim(seed)) == 1:
        seeds = [as_int(s, "seed", 0) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"a list of seeds needs one per batch element ({batch}), got {len(seeds)}")
        return seeds, True
    return [as_int(seed, "seed", 0)], False


class BatchedBrownianTree:
    """torchsde Brownian trees over ``[t0, t1]`` (either order) for a batch ``x`` ``[B, ...]``: one tree of ``x``'s
    shape, or with ``B`` seeds one tree per batch element (element ``b``'s path depends only on ``seed[b]``).

    ``seed`` None draws one from torch's global generator (``torch.randint(0, 2**63 - 1, [])``, as k-diffusion).
    ``cpu=True`` builds the trees on the CPU and moves their increments to ``x``'s device, so that the path does
    not depend on the device. ``kwargs`` (``w0``, ``tol``, ``pool_size``...) go to ``torchsde.BrownianTree``.
    Calling it with ``(t0, t1)`` gives the increment ``W(t1) - W(t0)`` ``[B, ...]`` in ``x``'s dtype.
    """

    def __init__(self, x: torch.Tensor, t0, t1, seed: int | Sequence[int] | None = None, cpu: bool = False, **kwargs):
        _check_state(x)
        t0, t1, self.sign = self.sort(t0, t1)
        seeds, self.batched = _seeds(seed, x.shape[0])
        self.device, self.cpu = x.device, cpu
        w0 = kwargs.pop("w0", None)
        if w0 is None:
            w0 = torch.zeros_like(x, device="cpu" if cpu else x.device)
        if self.batched:
            w0 = w0[0]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s, **kwargs) for s in seeds]

    @staticmethod
    def sort(a, b):
        """``(low, high, sign)``: the two times in increasing order, and -1 when they were swapped."""
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1) -> torch.Tensor:
        t0, t1, sign = self.sort(t0, t1)
        w = torch.stack([tree(t0, t1) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w.to(self.device) if self.cpu else w


def _identity(t):
    return t


class BrownianTreeNoiseSampler:
    """Brownian-tree noise for the SDE samplers: ``noise(sigma, sigma_next) = (W(t') - W(t)) / sqrt(|t' - t|)``
    with ``t = transform(sigma)``, unit normal like ``x`` ``[B, ...]``, and every step's noise an increment of one
    Brownian path (:class:`BatchedBrownianTree` over ``[transform(sigma_min), transform(sigma_max)]``), so runs with
    different step counts follow the same path. ``seed``: an int, ``B`` ints (one path per batch element), or None
    for one drawn from torch's global generator. The same seed gives k-diffusion's numbers."""

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min,
        sigma_max,
        seed: int | Sequence[int] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] = _identity,
        cpu: bool = False,
    ):
        self.transform = transform
        t0, t1 = self.transform(torch.as_tensor(sigma_min)), self.transform(torch.as_tensor(sigma_max))
        self.tree = BatchedBrownianTree(x, t0, t1, seed, cpu=cpu)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0, t1 = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()


# ------------------------------------------------------------------------------------- shared sampler plumbing


def _progress(disable: bool | None) -> bool:
    """tqdm's ``disable`` as fastdiff's ``progress``: None shows the bar only on a terminal, as tqdm does."""
    return disable is False or (disable is None and sys.stderr.isatty())


def _user_sigmas(sigmas) -> torch.Tensor:
    """The schedule as the caller gave it, for the callback's and the noise sampler's sigmas (k-diffusion passes
    ``sigmas[i]``)."""
    return sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float64)


def _check_common(extra_args, callback) -> dict:
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a dict of the model's keyword arguments, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable with one dict argument")
    return dict(extra_args or {})


def _steps(user: torch.Tensor) -> Callable[[int], Iterable[tuple]]:
    """The arguments k-diffusion passes to a noise sampler at step ``i``: ``(sigmas[i], sigmas[i + 1])``."""
    return lambda i: repeat((user[i], user[i + 1]))


def _relay_noise(noise_sampler: NoiseSampler, solver: solvers.Solver, sig: list[float], kd_args) -> NoiseSampler:
    """``noise_sampler`` as :func:`fastdiff.sample` calls it (with a stage's noise interval, host floats), calling
    it with k-diffusion's arguments for that draw: ``kd_args(i)`` lists them for step ``i``'s drawing stages."""
    table = {}
    for i in range(len(sig) - 1):
        table.update(zip([st.noise for st in solver.stages(sig, i) if st.noise is not None], kd_args(i)))
    return lambda sigma, sigma_next: noise_sampler(*table.get((sigma, sigma_next), (sigma, sigma_next)))


def _run(
    solver: solvers.Solver,
    model: Model,
    x: torch.Tensor,
    sigmas,
    extra_args,
    callback,
    disable,
    noise_sampler: NoiseSampler | None = None,
    generator: torch.Generator | None = None,
    kd_args: Callable[[int], Iterable[tuple]] | None = None,
) -> torch.Tensor:
    """:func:`fastdiff.sample` with ``solver``, k-diffusion's callback dict and noise sampler arguments
    (``kd_args``, default ``(sigmas[i], sigmas[i + 1])``)."""
    extra = _check_common(extra_args, callback)
    sig = _check_inputs(model, x, sigmas).tolist()
    user = _user_sigmas(sigmas)

    def relay(info: dict) -> None:
        i = info["i"]
        callback({"x": info["x"], "i": i, "sigma": user[i], "sigma_hat": user[i], "denoised": info["denoised"]})

    if noise_sampler is not None:
        noise_sampler = _relay_noise(noise_sampler, solver, sig, kd_args or _steps(user))
    return sample(
        model, x, sigmas, solver=solver, cond=extra, callback=relay if callback is not None else None,
        progress=_progress(disable), noise_sampler=noise_sampler, generator=generator,
    )  # fmt: skip


def _brownian_default(x, sigmas, noise_sampler, seed) -> NoiseSampler:
    """The SDE samplers' noise: ``noise_sampler``, or k-diffusion's default, a :class:`BrownianTreeNoiseSampler`
    over ``[smallest positive sigma, largest sigma]`` seeded with ``seed``, built before the first step (so that a
    None seed is drawn from the global generator when k-diffusion draws it, also at ``eta = 0``)."""
    if noise_sampler is not None:
        if seed is not None:
            raise ValueError("give either noise_sampler or seed, not both")
        return noise_sampler
    _check_state(x)
    schedules.validate(sigmas)
    user = _user_sigmas(sigmas)
    return BrownianTreeNoiseSampler(x, user[user > 0].min(), user.max(), seed=seed)


def _denoise(model: Model, x: torch.Tensor, sigma: float, extra_args: Mapping) -> torch.Tensor:
    return _check_output(model(x, _sigma_batch(sigma, x), **extra_args), x, "model")


def _churn_run(
    solver: solvers.Solver, model, x, sigmas, extra_args, callback, disable, churn, noise_sampler, generator
) -> torch.Tensor:
    """EDM's churn around a single-step solver (Euler, Heun, DPM-2): per step, with ``gamma`` of
    :func:`churn_gamma`, raise the noise level from ``sigma`` to ``sigma_hat = sigma (1 + gamma)`` by adding
    ``sqrt(sigma_hat^2 - sigma^2) s_noise z``, then take the solver's step from ``sigma_hat`` to the next sigma.

    As k-diffusion, ``z`` is drawn at every step, churned or not (with the default noise or ``generator``), and
    ``sigma_hat`` and the churn test are computed in the schedule's dtype; a ``noise_sampler`` is asked only for
    churned steps, with ``(sigma, sigma_hat)``."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    s_churn, s_noise = _factor("s_churn", s_churn), _factor("s_noise", s_noise)
    s_tmin, s_tmax = as_real(s_tmin, "s_tmin", finite=False), as_real(s_tmax, "s_tmax", finite=False)
    if not s_tmin <= s_tmax:
        raise ValueError(f"need s_tmin <= s_tmax, got s_tmin={s_tmin}, s_tmax={s_tmax}")
    sig = _check_inputs(model, x, sigmas).tolist()
    extra = _check_common(extra_args, callback)
    user = _user_sigmas(sigmas)
    noise = _noise_source(x, noise_sampler, generator)
    evaluate = lambda xi, s: Denoised(_denoise(model, xi, s, extra))  # noqa: E731
    for i in trange(len(sig) - 1, disable=disable):
        gamma = churn_gamma(user[i], len(sig) - 1, s_churn, s_tmin, s_tmax)
        sigma_hat = user[i] * (1 + gamma)
        z = noise((user[i], sigma_hat)) if gamma > 0 or noise_sampler is None else None
        if gamma > 0:
            x = x + z * (s_noise * float((sigma_hat**2 - user[i] ** 2).sqrt()))
        x_next, d = solver.step(0, x, [float(sigma_hat), sig[i + 1]], evaluate, solver.start())
        if callback is not None:
            callback({"x": x, "i": i, "sigma": user[i], "sigma_hat": sigma_hat, "denoised": d})
        x = x_next
    return x


# -------------------------------------------------------------------------------------------------- samplers


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
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 with churn): the solver
    ``euler`` from ``sigma_hat`` (:func:`_churn_run`).

    ``x`` ``[B, ...]`` scaled by ``sigmas[0]``; ``sigmas`` ``[N + 1]``; returns the sample ``[B, ...]``. With
    ``s_churn > 0`` each step whose sigma lies in ``[s_tmin, s_tmax]`` first adds noise ``sqrt(sigma_hat^2 -
    sigma^2) s_noise z`` to reach ``sigma_hat = sigma (1 + gamma)`` (:func:`churn_gamma`). ``z``: by default
    ``torch.randn_like(x)`` from the global generator, drawn at every step as k-diffusion does; or drawn with
    ``generator``; or ``noise_sampler(sigma, sigma_hat)`` on churned steps.
    """
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churn_run(solvers.get("euler"), model, x, sigmas, extra_args, callback, disable, churn, noise_sampler,
                      generator)  # fmt: skip


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
    """Ancestral sampling with Euler steps: the solver ``euler_ancestral``
    (:func:`~fastdiff.solvers.stochastic.euler_ancestral_coefficients`).

    ``x`` ``[B, ...]`` scaled by ``sigmas[0]``; ``sigmas`` ``[N + 1]``; returns ``[B, ...]``. The noise is
    ``noise_sampler(sigma, sigma_next)``, or drawn with ``generator``, or by default ``torch.randn_like(x)`` from the
    global generator, one draw per step that ends above 0 (as k-diffusion, ``eta = 0`` included). ``eta = 0`` is
    Euler's method. The step to 0 returns ``D``.
    """
    solver = solvers.get("euler_ancestral", eta=eta, s_noise=s_noise)
    return _run(solver, model, x, sigmas, extra_args, callback, disable, noise_sampler, generator)


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
    """Heun's second-order method (Karras et al. 2022, Algorithm 1; with churn, Algorithm 2): the solver ``heun``
    from ``sigma_hat``. Two model evaluations a step, one on the step to sigma = 0 (an Euler step there). Shapes,
    churn and noise as :func:`sample_euler`; the callback's ``denoised`` is the step's first evaluation.
    """
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churn_run(solvers.get("heun"), model, x, sigmas, extra_args, callback, disable, churn, noise_sampler,
                      generator)  # fmt: skip


@torch.no_grad()
def sample_dpm_2(
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
    """DPM-Solver-2 in the sigma form of Karras et al. (2022), with EDM's churn: the solver ``dpm_2``
    (:func:`~fastdiff.solvers.single.dpm_2_coefficients`) from ``sigma_hat``, evaluating at ``x`` and at the
    log-sigma midpoint; one Euler step on the step to 0. Shapes, churn and noise as :func:`sample_euler`."""
    churn = (s_churn, s_tmin, s_tmax, s_noise)
    return _churn_run(solvers.get("dpm_2"), model, x, sigmas, extra_args, callback, disable, churn, noise_sampler,
                      generator)  # fmt: skip


@torch.no_grad()
def sample_dpm_2_ancestral(
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
    """Ancestral sampling with DPM-Solver-2 steps: the solver ``dpm_2_ancestral``
    (:func:`~fastdiff.solvers.stochastic.dpm_2_ancestral_coefficients`). Shapes and noise as
    :func:`sample_euler_ancestral`; a step whose ``sigma_down`` is 0 is one Euler step and draws nothing."""
    solver = solvers.get("dpm_2_ancestral", eta=eta, s_noise=s_noise)
    return _run(solver, model, x, sigmas, extra_args, callback, disable, noise_sampler, generator)


@torch.no_grad()
def sample_lms(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    order: int = 4,
) -> torch.Tensor:
    """The linear multistep method in sigma of order up to ``order`` (1-4), warming up from first order: the solver
    ``lms`` (:func:`~fastdiff.solvers.multistep.lms_coefficients`, :func:`linear_multistep_coeff`). The step to 0
    is the same rule. Shapes as :func:`sample_euler`."""
    return _run(solvers.get("lms", order=order), model, x, sigmas, extra_args, callback, disable)


def _dpm_solver(model, x, sigma_min, sigma_max, extra_args, callback, bar) -> tuple[DPMSolver, float, float]:
    """The :class:`DPMSolver` of ``sample_dpm_fast``/``sample_dpm_adaptive``, counting evaluations on ``bar``, its
    callback relaying k-diffusion's dict (with ``sigma`` and ``sigma_hat``), and the times of ``sigma_max`` and
    ``sigma_min``."""
    _check_state(x)
    extra = _check_common(extra_args, callback)
    lo, hi = as_real(sigma_min, "sigma_min"), as_real(sigma_max, "sigma_max")
    if lo <= 0 or hi <= 0:
        raise ValueError(f"sigma_min and sigma_max must be positive, got {lo} and {hi}")
    solver = DPMSolver(model, extra, eps_callback=bar.update)
    if callback is not None:
        solver.info_callback = lambda info: callback(
            {"sigma": solver.sigma(info["t"]), "sigma_hat": solver.sigma(info["t_up"]), **info}
        )
    return solver, solver.t(hi), solver.t(lo)


@torch.no_grad()
def sample_dpm_fast(
    model: Model,
    x: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    n: int,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver-fast (Lu et al. 2022): ``n`` model evaluations in steps of order 3 (then 2 or 1) uniform in
    ``log sigma`` from ``sigma_max`` to ``sigma_min`` (:meth:`~fastdiff.solvers.adaptive.DPMSolver.dpm_solver_fast`).

    ``x`` ``[B, ...]`` scaled by ``sigma_max``; returns ``[B, ...]`` at ``sigma_min`` (no final denoising step).
    ``eta > 0`` makes each step ancestral, with noise ``noise_sampler(sigma, sigma_next)`` (default
    ``torch.randn_like(x)``, drawn every step as k-diffusion does). The callback gets ``{'x', 'i', 't', 't_up',
    'sigma', 'sigma_hat', 'denoised'}``.
    """
    n = as_int(n, "n", 1)
    with tqdm(total=n, disable=disable) as bar:
        solver, t_start, t_end = _dpm_solver(model, x, sigma_min, sigma_max, extra_args, callback, bar)
        return solver.dpm_solver_fast(x, t_start, t_end, n, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(
    model: Model,
    x: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """DPM-Solver-12 (``order=2``) or -23 (``order=3``) with adaptive step size (Lu et al. 2022, Appendix C;
    :meth:`~fastdiff.solvers.adaptive.DPMSolver.dpm_solver_adaptive`) from ``sigma_max`` to ``sigma_min``.

    ``x`` ``[B, ...]`` scaled by ``sigma_max``; returns ``[B, ...]`` at ``sigma_min``, and with ``return_info``
    also ``{'steps', 'nfe', 'n_accept', 'n_reject'}``. ``rtol``, ``atol`` set the error tolerance, ``h_init`` the
    first step in ``log sigma``, ``pcoeff``, ``icoeff``, ``dcoeff``, ``accept_safety`` the
    :class:`PIDStepSizeController`. Noise as :func:`sample_dpm_fast`, one draw per accepted step. The callback
    also gets ``'error'``, ``'h'`` and the counts.
    """
    with tqdm(disable=disable) as bar:
        solver, t_start, t_end = _dpm_solver(model, x, sigma_min, sigma_max, extra_args, callback, bar)
        x, info = solver.dpm_solver_adaptive(x, t_start, t_end, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff,
                                             accept_safety, eta, s_noise, noise_sampler)  # fmt: skip
    return (x, info) if return_info else x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
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
    """Ancestral sampling with DPM-Solver++(2S) steps: the solver ``dpmpp_2s_ancestral``
    (:func:`~fastdiff.solvers.stochastic.dpmpp_2s_ancestral_coefficients`). Shapes and noise as
    :func:`sample_euler_ancestral`."""
    solver = solvers.get("dpmpp_2s_ancestral", eta=eta, s_noise=s_noise)
    return _run(solver, model, x, sigmas, extra_args, callback, disable, noise_sampler, generator)


def _dpmpp_sde_args(user: torch.Tensor, r: float) -> Callable[[int], list[tuple]]:
    """The arguments ``sample_dpmpp_sde`` passes to its noise sampler at step ``i``, computed as k-diffusion
    computes them, in the schedule's dtype (``sigma(t) = exp(-t)``, ``t = -log sigma``): ``(sigma(t), sigma(t + r
    h))`` and ``(sigma(t), sigma(t_{i+1}))``. A Brownian tree queried at times one float32 rounding apart gives
    other increments, so they must be these values, not the solver's float64 ones."""

    def args(i: int) -> list[tuple]:
        t, t_next = user[i].log().neg(), user[i + 1].log().neg()
        return [(t.neg().exp(), (t + (t_next - t) * r).neg().exp()), (t.neg().exp(), t_next.neg().exp())]

    return args


@torch.no_grad()
def sample_dpmpp_sde(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r: float = 1 / 2,
    seed: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++ SDE ("DPM++ SDE"): the solver ``dpmpp_sde``
    (:func:`~fastdiff.solvers.stochastic.dpmpp_sde_coefficients`), two evaluations and two draws a step, the
    second evaluation a fraction ``r`` of the step along in ``log sigma``.

    ``x`` ``[B, ...]`` scaled by ``sigmas[0]``; ``sigmas`` ``[N + 1]``; returns ``[B, ...]``. The noise is
    ``noise_sampler(sigma, sigma_next)``, by default a :class:`BrownianTreeNoiseSampler` seeded with ``seed`` (an
    int, ``B`` ints, or None for a seed from torch's global generator, as k-diffusion). Draws are made at
    ``eta = 0`` too (multiplied by 0), as k-diffusion makes them.
    """
    solver = solvers.get("dpmpp_sde", eta=eta, s_noise=s_noise, r=r)
    noise = _brownian_default(x, sigmas, noise_sampler, seed)
    args = _dpmpp_sde_args(_user_sigmas(sigmas), solver.r)
    return _run(solver, model, x, sigmas, extra_args, callback, disable, noise, kd_args=args)


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), midpoint form: the solver ``dpmpp_2m``. First order on the first step and
    on the step to 0. ``x`` ``[B, ...]``, ``sigmas`` ``[N + 1]``; returns ``[B, ...]``."""
    return _run(solvers.get("dpmpp_2m"), model, x, sigmas, extra_args, callback, disable)


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
    """DPM-Solver++(2M) SDE: the solver ``dpmpp_2m_sde`` (:func:`dpmpp_2m_sde_coefficients`), ``solver_type``
    ``'midpoint'`` or ``'heun'``.

    ``x`` ``[B, ...]`` scaled by ``sigmas[0]``; ``sigmas`` ``[N + 1]``; returns ``[B, ...]``. Noise as
    :func:`sample_dpmpp_sde`; none is drawn with ``eta = 0``, which with ``midpoint`` is :func:`sample_dpmpp_2m`.
    """
    solver = solvers.get("dpmpp_2m_sde", eta=eta, s_noise=s_noise, solver_type=solver_type)
    noise = _brownian_default(x, sigmas, noise_sampler, seed)
    return _run(solver, model, x, sigmas, extra_args, callback, disable, noise)


class KDiffusionDPMSolverPP3M(solvers.DPMSolverPP3M):
    """DPM-Solver++(3M) as k-diffusion's ``sample_dpmpp_3m_sde`` computes it with ``eta = 0``: fastdiff's
    ``dpmpp_3m`` except on the second step, which (with one earlier ``D``) uses the exponential-integrator
    weight ``phi_2(h) = 1 + expm1(-h) / h`` on ``(D_i - D_{i-1}) / r`` (:func:`dpmpp_3m_sde_coefficients` at
    ``eta = 0``) instead of the 2M midpoint weight ``(1 - e^{-h}) / 2``. The two differ by ``O(h^3)`` there."""

    name = "dpmpp_3m_kdiffusion"

    def coefficients(self, sigmas, i):
        if i != 1 or _is_zero(sigmas[2]):
            return super().coefficients(sigmas, i)
        a, b, _ = dpmpp_3m_sde_coefficients(sigmas, i, eta=0.0)
        return a, b


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
    """DPM-Solver++(3M) SDE: the solver ``dpmpp_3m_sde`` (:func:`dpmpp_3m_sde_coefficients`); noise as
    :func:`sample_dpmpp_sde`, none drawn with ``eta = 0``, where it runs :class:`KDiffusionDPMSolverPP3M`
    (fastdiff's ``dpmpp_3m`` with k-diffusion's second step). ``x`` ``[B, ...]``, ``sigmas`` ``[N + 1]``; returns
    ``[B, ...]``.
    """
    solver = solvers.get("dpmpp_3m_sde", eta=eta, s_noise=s_noise)
    noise = _brownian_default(x, sigmas, noise_sampler, seed)
    if not solver.stochastic:
        solver = KDiffusionDPMSolverPP3M()
    return _run(solver, model, x, sigmas, extra_args, callback, disable, noise)


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
    sigma``, warming up from first order: fastdiff's ``ipndm`` solver (not in k-diffusion 0.1.1). Shapes as
    :func:`sample_dpmpp_2m`."""
    return _run(solvers.get("ipndm", max_order=max_order), model, x, sigmas, extra_args, callback, disable)
