"""Stochastic solvers: each step adds fresh noise ``c_noise z`` through the op's noise input, with ``z`` from the
loop's noise source (k-diffusion's ``noise_sampler(sigma, sigma_next)`` convention, or ``randn`` from a
generator). Their coefficient functions take the schedule as Python floats or 0-d tensors, as every solver's do;
the noise intervals are structure and come from the host schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fastdiff.arguments import as_real
from fastdiff.solvers.base import OneStage, Scalar, Stage, _exp, _expm1, _is_zero, _sqrt
from fastdiff.solvers.single import euler_coefficients


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
    """
    if not eta:
        return sigma_to, 0.0
    up = eta * _sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    tensors = isinstance(up, torch.Tensor) or isinstance(sigma_to, torch.Tensor)
    up = torch.where(up < sigma_to, up, sigma_to) if tensors else min(sigma_to, up)
    return _sqrt(sigma_to**2 - up**2), up


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


SOLVERS = (EulerAncestral, DPMSolverPP2MSDE, DPMSolverPP3MSDE)
__all__ = [
    "EulerAncestral", "DPMSolverPP2MSDE", "DPMSolverPP3MSDE", "get_ancestral_step",
    "euler_ancestral_coefficients", "dpmpp_2m_sde_coefficients", "dpmpp_3m_sde_coefficients",
]  # fmt: skip
