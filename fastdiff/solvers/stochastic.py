"""Stochastic solvers: each step adds fresh noise ``c_noise z`` through the op's noise input, with ``z`` from the
loop's noise source (k-diffusion's ``noise_sampler(sigma, sigma_next)`` convention, or ``randn`` from a
generator). Their coefficient functions take the schedule as Python floats or 0-d tensors, as every solver's do;
the noise intervals are structure and come from the host schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastdiff.arguments import as_int, as_real
from fastdiff.solvers.base import OneStage, Scalar, Stage, TwoStage, _exp, _expm1, _is_zero, _sqrt
from fastdiff.solvers.single import dpm_2_coefficients, dpm_2_midpoint, euler_coefficients


def _factor(name: str, value) -> float:
    """A non-negative finite option (``eta``, ``s_noise``) as a float."""
    v = as_real(value, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def get_ancestral_step(sigma_from: Scalar, sigma_to: Scalar, eta: float = 1.0) -> tuple[Scalar, Scalar]:
    """Split an ancestral step from ``sigma_from`` to ``sigma_to`` into a deterministic step to ``sigma_down`` and
    fresh noise of standard deviation ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_to^2``::

        sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))

    ``eta = 1`` is DDPM's ancestral step, ``eta = 0`` the ODE step. Floats, or 0-d tensors. Returns
    ``(sigma_down, sigma_up)``.

    k-diffusion computes ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``, which cancels: with ``eta = 1`` and a
    small ``r = sigma_to / sigma_from`` (a short schedule's last steps) it is 0 in float32, where the true value
    is ``sigma_to r``, and a step evaluating there would call the model at sigma = 0. fastdiff uses the same
    quantity without the cancellation, ``sigma_down = sigma_to sqrt((1 - eta^2) + eta^2 r^2)`` (0 where ``eta > 1``
    leaves all of ``sigma_to`` to the noise); in float64 on ordinary schedules the two agree to rounding.
    """
    if not eta:
        return sigma_to, 0.0
    r2 = (sigma_to / sigma_from) ** 2
    up = eta * sigma_to * _sqrt(1 - r2)
    if eta > 1:
        up = torch.where(up < sigma_to, up, sigma_to) if isinstance(up, torch.Tensor) else min(sigma_to, up)
    return sigma_to * _sqrt((1 - eta**2) + eta**2 * r2), up


def _interval(sigmas: Sequence[Scalar], i: int) -> tuple[Scalar, Scalar]:
    """Step ``i``'s noise interval, as the schedule holds it (the loops take intervals from the host schedule)."""
    return sigmas[i], sigmas[i + 1]


class _Stochastic(OneStage):
    """Shared driver: one evaluation and one op application a step, the history holding the last ``keep``
    denoised estimates, newest first."""

    ode = False

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0):
        self.eta, self.s_noise = _factor("eta", eta), _factor("s_noise", s_noise)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0


def euler_ancestral_coefficients(sigmas: Sequence[Scalar], i: int, eta: float = 1.0, s_noise: float = 1.0):
    """Euler ancestral step ``i``: an Euler step to ``sigma_down``, then fresh noise of std ``sigma_up``
    (:func:`get_ancestral_step`)::

        x' = (sigma_down / sigma) x + (1 - sigma_down / sigma) D + sigma_up s_noise z

    Returns ``(a, [b_D], c)``; the step to sigma = 0 gives ``(0, [1], 0)``: ``x' = D``.
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if _is_zero(sigma_next):
        return 0.0, [1.0], 0.0
    sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
    a, b = euler_coefficients(sigma, sigma_down)
    return a, b, sigma_up * s_noise


class EulerAncestral(_Stochastic):
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``, "Euler a"). Every step that
    ends above 0 draws noise, with ``eta = 0`` too (where it is multiplied by 0), so that a seeded run draws what
    k-diffusion draws."""

    name = "euler_ancestral"

    def stages(self, sigmas, i):
        a, b, c = euler_ancestral_coefficients(sigmas, i, self.eta, self.s_noise)
        return [Stage(a, b, c_noise=c, noise=None if _is_zero(sigmas[i + 1]) else _interval(sigmas, i))]


def _sde_base(sigma: Scalar, sigma_next: Scalar, h_eta: Scalar, noise_h: Scalar, s_noise: float):
    """The first-order part shared by the DPM-Solver++ SDE steps, with ``h_eta = h + eta h``::

    x' = e^{-h_eta} x + (1 - e^{-h_eta}) D + sigma' sqrt(1 - e^{-2 eta h}) s_noise z

    (``e^{-h_eta} = (sigma'/sigma) e^{-eta h}``). Returns ``(a, b_D, c)``."""
    a = sigma_next / sigma * _exp(-noise_h)
    return a, -_expm1(-h_eta), sigma_next * _sqrt(-_expm1(-2 * noise_h)) * s_noise


def _log(v: Scalar) -> Scalar:
    return torch.log(v) if isinstance(v, torch.Tensor) else math.log(v)


def dpmpp_2m_sde_coefficients(
    sigmas: Sequence[Scalar], i: int, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint"
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022) step ``i`` over ``[D_i, D_{i-1}]``, in ``lambda = -log sigma`` with
    ``h = lambda_{i+1} - lambda_i`` and ``eta_h = eta h``::

        x' = (sigma'/sigma) e^{-eta_h} x + (1 - e^{-h - eta_h}) D_i + k (D_i - D_{i-1})
             + sigma' sqrt(1 - e^{-2 eta_h}) s_noise z

    with ``r = h_{i-1} / h`` and ``k = (1 - e^{-h - eta_h}) / (2 r)`` (``midpoint``) or
    ``k = (1 + expm1(-h - eta_h) / (h + eta_h)) / r`` (``heun``). The first step has no ``D_{i-1}`` term; the step
    to 0 returns ``D`` (``(0, [1], 0)``). ``eta = 0`` with ``midpoint`` is ``dpmpp_2m``. Returns ``(a, b, c)``.
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if _is_zero(sigma_next):
        return 0.0, [1.0], 0.0
    h = _log(sigma) - _log(sigma_next)
    a, b0, c = _sde_base(sigma, sigma_next, h + eta * h, eta * h, s_noise)
    if i == 0:
        return a, [b0], c
    r = (_log(sigmas[i - 1]) - _log(sigma)) / h
    k = 0.5 * b0 / r if solver_type == "midpoint" else (1 + _expm1(-h - eta * h) / (h + eta * h)) / r
    return a, [b0 + k, -k], c


def dpmpp_3m_sde_coefficients(sigmas: Sequence[Scalar], i: int, eta: float = 1.0, s_noise: float = 1.0):
    """DPM-Solver++(3M) SDE step ``i`` (k-diffusion's ``sample_dpmpp_3m_sde``) over ``[D_i, D_{i-1}, D_{i-2}]``.

    With ``h = lambda_{i+1} - lambda_i``, ``h_eta = (1 + eta) h``, ``phi_2 = 1 + expm1(-h_eta) / h_eta``,
    ``phi_3 = phi_2 / h_eta - 1/2``::

        x' = e^{-h_eta} x + (1 - e^{-h_eta}) D_i + [phi_2 d1 - phi_3 d2] + sigma' sqrt(1 - e^{-2 eta h}) s_noise z

    where, with two earlier estimates, ``r0 = h_{i-1}/h``, ``r1 = h_{i-2}/h``, ``d1_0 = (D_i - D_{i-1}) / r0``,
    ``d1_1 = (D_{i-1} - D_{i-2}) / r1``, ``d2 = (d1_0 - d1_1) / (r0 + r1)``, ``d1 = d1_0 + r0 d2``; with one,
    the bracket is ``phi_2 (D_i - D_{i-1}) / r0``; on the first step it is empty. The step to 0 returns ``D``.
    Returns ``(a, b, c)``.
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if _is_zero(sigma_next):
        return 0.0, [1.0], 0.0
    h = _log(sigma) - _log(sigma_next)
    h_eta = h * (eta + 1)
    a, b0, c = _sde_base(sigma, sigma_next, h_eta, eta * h, s_noise)
    if i == 0:
        return a, [b0], c
    phi_2 = _expm1(-h_eta) / h_eta + 1
    r0 = (_log(sigmas[i - 1]) - _log(sigma)) / h
    if i == 1:
        return a, [b0 + phi_2 / r0, -phi_2 / r0], c
    phi_3 = phi_2 / h_eta - 0.5
    r1 = (_log(sigmas[i - 2]) - _log(sigmas[i - 1])) / h
    # phi_2 d1 - phi_3 d2 = (phi_2 + q) d1_0 - q d1_1, q = (phi_2 r0 - phi_3) / (r0 + r1), as weights on the D's:
    q = (phi_2 * r0 - phi_3) / (r0 + r1)
    u, v = (phi_2 + q) / r0, q / r1
    return a, [b0 + u, -u - v, v], c


class DPMSolverPP2MSDE(_Stochastic):
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``; "DPM++ 2M SDE"), ``solver_type`` ``midpoint``
    or ``heun``. With ``eta = 0`` it draws no noise."""

    name = "dpmpp_2m_sde"
    keep = 1

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint"):
        super().__init__(eta, s_noise)
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.solver_type = solver_type

    def stages(self, sigmas, i):
        a, b, c = dpmpp_2m_sde_coefficients(sigmas, i, self.eta, self.s_noise, self.solver_type)
        draws = self.eta > 0 and not _is_zero(sigmas[i + 1])
        return [Stage(a, b, c_noise=c, noise=_interval(sigmas, i) if draws else None)]


class DPMSolverPP3MSDE(_Stochastic):
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``). With ``eta = 0`` it draws no noise."""

    name = "dpmpp_3m_sde"
    keep = 2

    def stages(self, sigmas, i):
        a, b, c = dpmpp_3m_sde_coefficients(sigmas, i, self.eta, self.s_noise)
        draws = self.eta > 0 and not _is_zero(sigmas[i + 1])
        return [Stage(a, b, c_noise=c, noise=_interval(sigmas, i) if draws else None)]


class DDPM(EulerAncestral):
    """DDPM's ancestral sampler on the schedule's levels (Ho et al. 2020, Algorithm 2; ComfyUI's ``sample_ddpm``),
    name ``"ddpm"``, no options.

    ComfyUI takes the step in the variance-preserving form of an eps-prediction model, with
    ``abar(sigma) = 1 / (1 + sigma^2)``, ``alpha = abar(sigma) / abar(sigma')``, ``eps = (x - D) / sigma``::

        x' = sqrt(1 + sigma'^2) [ (x / sqrt(1 + sigma^2) - (1 - alpha) eps / sqrt(1 - abar(sigma))) / sqrt(alpha)
                                  + sqrt((1 - alpha) (1 - abar(sigma')) / (1 - abar(sigma))) z ]

    and, on the step to sigma' = 0, no noise and no rescaling. In the VE form of fastdiff's denoisers that is exactly
    the ancestral step with ``eta = 1``::

        x' = (sigma'/sigma)^2 x + (1 - (sigma'/sigma)^2) D + sigma' sqrt(1 - (sigma'/sigma)^2) z

    and ``x' = D`` on the step to 0, so fastdiff runs it as :class:`EulerAncestral` with ``eta = s_noise = 1``: one
    evaluation a step, and a draw, with the interval ``(sigma_i, sigma_{i+1})``, on every step that ends above 0,
    as ComfyUI draws. ComfyUI applies this step whatever the model's ``model_sampling`` (it has no branch for flow
    models), so there is nothing model-specific to leave out.
    """

    name = "ddpm"

    def __init__(self):
        super().__init__()


def _ancestral_split(sigma: Scalar, sigma_next: Scalar, eta: float) -> tuple[Scalar | None, Scalar]:
    """:func:`get_ancestral_step`'s ``(sigma_down, sigma_up)``, with ``sigma_down`` None where it is 0 and
    k-diffusion's DPM-2 and 2S ancestral steps fall back to one Euler step (``x = D``): on the step to 0, and where
    ``eta > 1`` leaves all of ``sigma_next`` to the noise. Up to ``eta = 1``, ``sigma_down > 0`` whenever
    ``sigma_next > 0``, so that is structure and nothing is read; above, it depends on the values, which are read
    to the host (once per schedule, where a :class:`~fastdiff.Sampler` builds its table and levels; LD3, the one
    user of device-only schedules, takes solvers that draw nothing, ``eta = 0``)."""
    down, up = get_ancestral_step(sigma, sigma_next, eta)
    return (None if _is_zero(sigma_next) or (eta > 1 and float(down) == 0) else down), up


def _log_levels(sigma: Scalar, sigma_next: Scalar, r: float) -> tuple[Scalar, Scalar, Scalar]:
    """``(exp(-t), exp(-(t + r h)), exp(-t_next))`` with ``t = -log sigma``, ``t_next = -log sigma_next`` and
    ``h = t_next - t``: the levels of k-diffusion's DPM-Solver++ steps, computed as it computes them, with torch's
    ``log`` and ``exp`` (in float64 for host floats), so that the noise intervals asked of a noise sampler are
    bitwise k-diffusion's for a float64 schedule, and a Brownian tree is queried at the same times."""
    ref = next((v for v in (sigma, sigma_next) if isinstance(v, torch.Tensor)), None)
    dtype, device = (torch.float64, None) if ref is None else (ref.dtype, ref.device)
    t, t_next = (-torch.log(torch.as_tensor(v, dtype=dtype, device=device)) for v in (sigma, sigma_next))
    levels = (torch.exp(-t), torch.exp(-(t + (t_next - t) * r)), torch.exp(-t_next))
    return levels if ref is not None else tuple(v.item() for v in levels)


class _StochasticTwoStage(TwoStage, _Stochastic):
    """Stochastic steps with two evaluations, on the two-stage driver :class:`~fastdiff.solvers.base.TwoStage`: stage 0
    at ``sigma_i``, whose history entry (its ``D``) stage 1 may take, and stage 1 at ``points()[1]`` from stage 0's
    output; a step with one stage (a fallback to one Euler step) evaluates once."""


def dpm_2_ancestral_coefficients(
    sigmas: Sequence[Scalar], i: int, eta: float = 1.0, s_noise: float = 1.0
) -> list[Stage]:
    """DPM-2 ancestral step ``i`` (k-diffusion's ``sample_dpm_2_ancestral``): a DPM-Solver-2 step to
    ``sigma_down`` (:func:`~fastdiff.solvers.single.dpm_2_coefficients`: stage 0 to the log-sigma midpoint, whose
    history entry is ``D``; stage 1 over ``[D_2, D]``), then fresh noise of std ``sigma_up``
    (:func:`get_ancestral_step`) in stage 1::

        x' = DPM-2(x; sigma -> sigma_down) + sigma_up s_noise z

    Where ``sigma_down = 0`` (the step to 0, or ``eta > 1`` with ``sigma_up = sigma_next``) k-diffusion takes one
    Euler step, ``x' = D``, and draws nothing, even above 0. Otherwise stage 1 draws, at ``eta = 0`` too, with the
    interval ``(sigma_i, sigma_{i+1})``. Returns the stages.
    """
    down, up = _ancestral_split(sigmas[i], sigmas[i + 1], eta)
    if down is None:
        return [Stage(0.0, [1.0])]
    predictor, corrector = dpm_2_coefficients(sigmas[i], down)
    return [Stage(*predictor), Stage(*corrector, c_noise=up * s_noise, noise=_interval(sigmas, i))]


class DPM2Ancestral(_StochasticTwoStage):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion's ``sample_dpm_2_ancestral``, "DPM2 a"), name
    ``"dpm_2_ancestral"``: two evaluations a step, at ``sigma_i`` and at the log-sigma midpoint to ``sigma_down``
    (:func:`dpm_2_ancestral_coefficients`); one, and no draw, on a step whose ``sigma_down`` is 0. ``eta = 0``
    still draws, multiplied by 0, as k-diffusion does."""

    name = "dpm_2_ancestral"

    def points(self, sigmas, i):
        down, _ = _ancestral_split(sigmas[i], sigmas[i + 1], self.eta)
        return [i] if down is None else [i, dpm_2_midpoint(sigmas[i], down)]

    def stages(self, sigmas, i):
        return dpm_2_ancestral_coefficients(sigmas, i, self.eta, self.s_noise)


def dpmpp_2s_ancestral_coefficients(
    sigmas: Sequence[Scalar], i: int, eta: float = 1.0, s_noise: float = 1.0
) -> list[Stage]:
    """DPM-Solver++(2S) ancestral step ``i`` (k-diffusion's ``sample_dpmpp_2s_ancestral``): a singlestep
    DPM-Solver++(2S) step (Lu et al. 2022) to ``sigma_down`` through ``sigma_s = sqrt(sigma sigma_down)`` (``r =
    1/2`` in ``t = -log sigma``, :func:`_log_levels`), then fresh noise of std ``sigma_up``
    (:func:`get_ancestral_step`)::

        x_2 = (sigma_s/sigma) x + (1 - sigma_s/sigma) D                                  (stage 0)
        x'  = (sigma_down/sigma) x + (1 - sigma_down/sigma) D_2 + sigma_up s_noise z     (stage 1, over [D_2])

    (``1 - sigma_s/sigma`` is k-diffusion's ``-expm1(-r h)``). Where ``sigma_down = 0`` (``eta > 1``) it is one
    Euler step, ``x' = D + sigma_up s_noise z``. Every step that ends above 0 draws, at ``eta = 0`` too, with the
    interval ``(sigma_i, sigma_{i+1})``; the step to 0 returns ``D``. Returns the stages.
    """
    if _is_zero(sigmas[i + 1]):
        return [Stage(0.0, [1.0])]
    down, up = _ancestral_split(sigmas[i], sigmas[i + 1], eta)
    noise = {"c_noise": up * s_noise, "noise": _interval(sigmas, i)}
    if down is None:
        return [Stage(0.0, [1.0], **noise)]
    sigma_t, sigma_s, sigma_down = _log_levels(sigmas[i], down, 0.5)
    return [Stage(*euler_coefficients(sigma_t, sigma_s)), Stage(*euler_coefficients(sigma_t, sigma_down), **noise)]


class DPMSolverPP2SAncestral(_StochasticTwoStage):
    """Ancestral sampling with DPM-Solver++(2S) steps (k-diffusion's ``sample_dpmpp_2s_ancestral``, "DPM++ 2S a"),
    name ``"dpmpp_2s_ancestral"``: two evaluations a step, at ``sigma_i`` and at ``sigma_s``, one on a step whose
    ``sigma_down`` is 0 (:func:`dpmpp_2s_ancestral_coefficients`). ``eta = 0`` still draws, multiplied by 0, as
    k-diffusion does."""

    name = "dpmpp_2s_ancestral"

    def points(self, sigmas, i):
        down, _ = _ancestral_split(sigmas[i], sigmas[i + 1], self.eta)
        return [i] if down is None else [i, _log_levels(sigmas[i], down, 0.5)[1]]

    def stages(self, sigmas, i):
        return dpmpp_2s_ancestral_coefficients(sigmas, i, self.eta, self.s_noise)


def dpmpp_sde_coefficients(
    sigmas: Sequence[Scalar], i: int, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5
) -> list[Stage]:
    """DPM-Solver++ SDE step ``i`` (k-diffusion's ``sample_dpmpp_sde``): two ancestral DPM-Solver++ substeps from
    ``sigma``, in ``t = -log sigma`` with ``h = t_{i+1} - t_i``, the first to ``sigma_s = exp(-(t + r h))``::

        (down_s, up_s) = ancestral split of sigma -> sigma_s,  (down, up) = of sigma -> sigma'  (get_ancestral_step)
        x_2 = (down_s/sigma) x + (1 - down_s/sigma) D + up_s s_noise z_1                   (stage 0)
        x'  = (down/sigma) x + (1 - down/sigma) [(1 - f) D + f D_2] + up s_noise z_2,  f = 1/(2r)
                                                                                       (stage 1 over [D_2, D])

    The draws are k-diffusion's: ``z_1`` for the interval ``(sigma(t), sigma(s))`` and ``z_2`` for ``(sigma(t),
    sigma(t_{i+1}))`` (:func:`_log_levels`, so off the schedule), made at ``eta = 0`` too. The step to 0 is one
    Euler step, ``x' = D``, with no draw. Returns the stages.
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if _is_zero(sigma_next):
        return [Stage(0.0, [1.0])]
    sigma_t, sigma_s, sigma_t_next = _log_levels(sigma, sigma_next, r)
    down_s, up_s = get_ancestral_step(sigma_t, sigma_s, eta)
    down, up = get_ancestral_step(sigma_t, sigma_t_next, eta)
    a, (w,) = euler_coefficients(sigma_t, down)
    f = 1 / (2 * r)
    return [
        Stage(*euler_coefficients(sigma_t, down_s), c_noise=up_s * s_noise, noise=(sigma_t, sigma_s)),
        Stage(a, [w * f, w * (1 - f)], c_noise=up * s_noise, noise=(sigma_t, sigma_t_next)),
    ]


class DPMSolverPPSDE(_StochasticTwoStage):
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``, "DPM++ SDE"), name ``"dpmpp_sde"``: two evaluations a
    step, at ``sigma_i`` and at ``sigma_s`` a fraction ``r`` of the way to ``sigma_{i+1}`` in log sigma, one on the
    step to 0 (:func:`dpmpp_sde_coefficients`); two draws a step, at ``eta = 0`` too, multiplied by 0.

    The two draws of a step are meant as increments of one Brownian path over nested intervals, which is why
    k-diffusion's default noise here is a Brownian tree (:class:`fastdiff.k_diffusion.BrownianTreeNoiseSampler`).
    fastdiff's default noise (:class:`fastdiff.sampler.BrownianDraws`) makes the second draw the increment of the
    first's path too. Independent draws (a noise sampler that ignores its interval) give the same step rule but a
    biased sample variance at finite steps: on a three-component 2-D mixture with 96 Karras steps, 7 standard
    errors (N = 20000), against 1.6 with the Brownian tree (tests/test_solvers_statistics.py).

    Args:
        eta, s_noise: as in :func:`get_ancestral_step`; finite, >= 0.
        r: where the second evaluation sits, in (0, 1].
    """

    name = "dpmpp_sde"

    def __init__(self, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5):
        super().__init__(eta, s_noise)
        self.r = as_real(r, "r")
        if not 0 < self.r <= 1:
            raise ValueError(f"r must be in (0, 1], got {r!r}")

    def points(self, sigmas, i):
        return [i] if _is_zero(sigmas[i + 1]) else [i, _log_levels(sigmas[i], sigmas[i + 1], self.r)[1]]

    def stages(self, sigmas, i):
        return dpmpp_sde_coefficients(sigmas, i, self.eta, self.s_noise, self.r)


_ER_SDE_POINTS = 200  # ComfyUI's Riemann sums: 200 points from lambda_{i+1} toward lambda_i


def _er_sde_scaler(lam: Scalar) -> Scalar:
    """The ER-SDE noise scale function ComfyUI uses by default (the ER-SDE-Solver reference code's),
    ``psi(lambda) = lambda (e^{lambda^0.3} + 10)``. Floats, or tensors of any shape."""
    return lam * (_exp(lam**0.3) + 10.0)


def _er_sde_integrals(lam_s: Scalar, lam_t: Scalar) -> tuple[Scalar, Scalar]:
    """ComfyUI's left Riemann sums, over ``[lambda_t, lambda_s]`` (``lambda_t < lambda_s``) in 200 equal steps
    ``delta``, of ``1/psi`` and ``(lambda - lambda_s)/psi``. In the schedule's dtype (float64 for host floats;
    ComfyUI sums in float32, which moves its stage-2 and 3 weights by about 1e-7 relative). Returns ``(S, S_u)``."""
    ref = next((v for v in (lam_s, lam_t) if isinstance(v, torch.Tensor)), None)
    dtype, device = (torch.float64, None) if ref is None else (ref.dtype, ref.device)
    delta = (lam_s - lam_t) / _ER_SDE_POINTS
    lam = lam_t + torch.arange(_ER_SDE_POINTS, dtype=dtype, device=device) * delta
    psi = _er_sde_scaler(lam)
    s, s_u = (1 / psi).sum() * delta, ((lam - lam_s) / psi).sum() * delta
    return (s, s_u) if ref is not None else (s.item(), s_u.item())


def er_sde_coefficients(sigmas: Sequence[Scalar], i: int, s_noise: float = 1.0, max_stage: int = 3):
    """ER-SDE-Solver step ``i`` (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDE for
    diffusion models"; ComfyUI's ``sample_er_sde`` with its default noise scaler ``psi``, :func:`_er_sde_scaler`)
    over ``[D_i, D_{i-1}, D_{i-2}]``. For a VE model ``lambda = sigma`` and ``alpha = 1``; with ``r =
    psi(sigma')/psi(sigma)``, ``dt = sigma' - sigma`` and the sums ``S``, ``S_u`` of :func:`_er_sde_integrals`::

        x' = r x + (1 - r) D_i                                             (stage 1)
             + (dt + S psi(sigma')) d_i                                    (stage 2, from step 1)
             + (dt^2/2 + S_u psi(sigma')) (d_i - d_{i-1}) / ((sigma_i - sigma_{i-2}) / 2)   (stage 3, from step 2)
             + s_noise sqrt(sigma'^2 - r^2 sigma^2) z

    with ``d_i = (D_i - D_{i-1}) / (sigma_i - sigma_{i-1})``; stage ``k`` runs from step ``k - 1`` when
    ``max_stage >= k``. The step to 0 returns ``D``. Returns ``(a, b, c)``.
    """
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    if _is_zero(sigma_next):
        return 0.0, [1.0], 0.0
    psi_next = _er_sde_scaler(sigma_next)
    r = psi_next / _er_sde_scaler(sigma)
    c = s_noise * _sqrt(sigma_next**2 - (r * sigma) ** 2)
    stage = min(max_stage, i + 1)
    if stage == 1:
        return r, [1 - r], c
    dt = sigma_next - sigma
    s, s_u = _er_sde_integrals(sigma, sigma_next)
    g = (dt + s * psi_next) / (sigma - sigmas[i - 1])  # the weight of D_i - D_{i-1}
    if stage == 2:
        return r, [1 - r + g, -g], c
    q = (dt**2 / 2 + s_u * psi_next) * 2 / (sigma - sigmas[i - 2])
    u, v = q / (sigma - sigmas[i - 1]), q / (sigmas[i - 1] - sigmas[i - 2])  # q (d_i - d_{i-1}) on the D's
    return r, [1 - r + g + u, -g - u - v, v], c


class ERSDE(OneStage):
    """Extended reverse-time SDE solver, ER-SDE-Solver-3 (Cui et al. 2023; ComfyUI's ``sample_er_sde``), name
    ``"er_sde"``: one evaluation a step, stages up to ``max_stage`` from the history of the last two estimates
    (:func:`er_sde_coefficients`), and a draw, with the interval ``(sigma_i, sigma_{i+1})``, on every step that
    ends above 0 when ``s_noise > 0`` (none at ``s_noise = 0``, as in ComfyUI).

    fastdiff does what ComfyUI does for an eps (VE) model, whose ``lambda = sigma / alpha`` is ``sigma``, with
    ComfyUI's default noise scaler. Left out: what applies only to other model types (a flow model's
    ``lambda = sigma / (1 - sigma)``, ``alpha = 1 - sigma`` and its offset first sigma; a model's ``noise_scale``
    factor on ``s_noise``), and the ``noise_scaler`` argument of ComfyUI's SamplerER_SDE node (its reverse-time SDE
    and ODE variants and ``eta``). The integrals are summed in the schedule's precision, ComfyUI's in float32.

    Args:
        s_noise: the noise's scale, finite, >= 0.
        max_stage: the highest stage, 1, 2 or 3.
    """

    name = "er_sde"
    ode = False
    keep = 2

    def __init__(self, s_noise: float = 1.0, max_stage: int = 3):
        self.s_noise = _factor("s_noise", s_noise)
        self.max_stage = as_int(max_stage, "max_stage", 1, 3)

    @property
    def stochastic(self) -> bool:
        return self.s_noise > 0

    def stages(self, sigmas, i):
        a, b, c = er_sde_coefficients(sigmas, i, self.s_noise, self.max_stage)
        draws = self.s_noise > 0 and not _is_zero(sigmas[i + 1])
        return [Stage(a, b, c_noise=c, noise=_interval(sigmas, i) if draws else None)]


SOLVERS = (
    EulerAncestral, DPMSolverPP2MSDE, DPMSolverPP3MSDE, DPM2Ancestral, DPMSolverPP2SAncestral, DPMSolverPPSDE, DDPM,
    ERSDE,
)  # fmt: skip
__all__ = [
    "EulerAncestral", "DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "DPM2Ancestral", "DPMSolverPP2SAncestral",
    "DPMSolverPPSDE", "DDPM", "ERSDE", "get_ancestral_step", "euler_ancestral_coefficients",
    "dpmpp_2m_sde_coefficients", "dpmpp_3m_sde_coefficients", "dpm_2_ancestral_coefficients",
    "dpmpp_2s_ancestral_coefficients", "dpmpp_sde_coefficients", "er_sde_coefficients",
]  # fmt: skip
