"""Multistep ODE solvers: each step reuses the denoised estimates (or derivatives) of the steps before it, kept in
the run's history, newest first. The history restarts where a loop says so (interval guidance's switches)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from fastdiff.arguments import as_int, as_real
from fastdiff.solvers.base import (
    Coefficients,
    Denoised,
    OneStage,
    Scalar,
    Solver,
    Stage,
    _apply,
    _draw,
    _exp,
    _expm1,
    _hx,
    _is_zero,
    _lam,
    _sqrt,
)
from fastdiff.solvers.single import euler_coefficients
from fastdiff.solvers.stochastic import dpmpp_2m_sde_coefficients


def dpmpp_2m_coefficients(sigmas: Sequence[float], i: int) -> Coefficients:
    """DPM-Solver++(2M), midpoint form (Lu et al. 2022; k-diffusion ``sample_dpmpp_2m``), over ``[D_i, D_{i-1}]``.

    ``x' = (s1/s0) x - expm1(-h) D~`` with ``D~ = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}``, ``r = h_{i-1}/h``.
    The first step and the step to 0 are first order.
    """
    s0, s1 = sigmas[i], sigmas[i + 1]
    if i == 0 or _is_zero(s1):
        return euler_coefficients(s0, s1)
    h = _lam(s1) - _lam(s0)
    r = (_lam(s0) - _lam(sigmas[i - 1])) / h
    c = -_expm1(-h)
    return s1 / s0, [c * (1 + 1 / (2 * r)), -c / (2 * r)]


def dpmpp_3m_coefficients(sigmas: Sequence[float], i: int, corrected: bool = False) -> Coefficients:
    """DPM-Solver++(3M) (Lu et al. 2022) over ``[D_i, D_{i-1}, D_{i-2}]``. Warm start: first order at step 0,
    2M at step 1; the step to 0 is first order.

    With ``D(lambda)`` expanded to second order, the exact exponential integrator needs the second divided
    difference ``d2 ~ h^2 D''`` with weight ``-phi_3``. The multistep update published in DPM-Solver, diffusers
    (``multistep_dpm_solver_third_order_update``) and k-diffusion (``sample_dpmpp_3m_sde``) puts
    ``(d1_0 - d1_1) / (r0 + r1) ~ h^2 D'' / 2`` there, half the term, so it integrates a quadratic ``D`` only
    half right and its local error is ``O(h^3)`` (tests/test_solvers.py measures both). fastdiff follows the
    published update by default, so that it reproduces what users run today; ``corrected=True`` uses the full
    term (local error ``O(h^4)``). On the Gaussian-mixture benchmark the published update is the more accurate
    of the two at every NFE up to 64 (BENCHMARKS.md).
    """
    s0, s1 = sigmas[i], sigmas[i + 1]
    if i < 2 or _is_zero(s1):
        return dpmpp_2m_coefficients(sigmas, i)
    lam0 = _lam(s0)
    h = _lam(s1) - lam0
    r0 = (lam0 - _lam(sigmas[i - 1])) / h
    r1 = (_lam(sigmas[i - 1]) - _lam(sigmas[i - 2])) / h
    # Divided differences as coefficient vectors over [D_i, D_{i-1}, D_{i-2}].
    d1_0 = [1 / r0, -1 / r0, 0.0]
    d1_1 = [0.0, 1 / r1, -1 / r1]
    diff = [p - q for p, q in zip(d1_0, d1_1)]
    d1 = [p + q * r0 / (r0 + r1) for p, q in zip(d1_0, diff)]
    d2 = [(2 if corrected else 1) * q / (r0 + r1) for q in diff]
    phi_1 = -_expm1(-h)
    phi_2 = _expm1(-h) / h + 1
    phi_3 = phi_2 / h - 0.5
    b = [phi_2 * p - phi_3 * q for p, q in zip(d1, d2)]
    b[0] += phi_1
    return s1 / s0, b


class _Multistep(OneStage):
    """Shared driver of solvers whose history holds their last few denoised estimates, newest first."""

    def coefficients(self, sigmas: Sequence[float], i: int) -> Coefficients:
        raise NotImplementedError

    def stages(self, sigmas, i):
        return [Stage(*self.coefficients(sigmas, i))]


# diffusers' DPM-Solver schedulers lower the order of their last steps below this many steps
# (``lower_order_final``): the last step first order, and (3M) the one before it second order.
LOWER_ORDER_FINAL_BELOW = 15


def _final_order(sigmas: Sequence[Scalar], i: int, lower_order_final: bool) -> int | None:
    """The order diffusers' ``lower_order_final`` caps step ``i`` at (1 for the last step, 2 for the one before
    it) on a schedule of fewer than 15 steps; None where it does not."""
    n = len(sigmas) - 1
    if not lower_order_final or n >= LOWER_ORDER_FINAL_BELOW or i < n - 2:
        return None
    return 1 if i == n - 1 else 2


class DPMSolverPP2M(_Multistep):
    """DPM-Solver++(2M), data prediction, midpoint form.

    Args:
        lower_order_final: as diffusers' ``DPMSolverMultistepScheduler`` (where it is the default): on a
            schedule of fewer than 15 steps the last step is first order even when it ends above 0
            (``final_sigmas_type="sigma_min"``). The step to 0 always is.
    """

    name = "dpmpp_2m"
    keep = 1

    def __init__(self, lower_order_final: bool = False):
        self.lower_order_final = lower_order_final

    def coefficients(self, sigmas, i):
        if _final_order(sigmas, i, self.lower_order_final) == 1:
            return euler_coefficients(sigmas[i], sigmas[i + 1])
        return dpmpp_2m_coefficients(sigmas, i)


class DPMSolverPP3M(_Multistep):
    """DPM-Solver++(3M), data prediction, as published (diffusers, k-diffusion); ``corrected=True`` for the
    full second-order term (see :func:`dpmpp_3m_coefficients`).

    Args:
        corrected: the full second-order term.
        lower_order_final: as diffusers' ``DPMSolverMultistepScheduler`` (where it is the default): on a
            schedule of fewer than 15 steps the second-to-last step is second order and the last first order.
    """

    name = "dpmpp_3m"
    keep = 2

    def __init__(self, corrected: bool = False, lower_order_final: bool = False):
        self.corrected = corrected
        self.lower_order_final = lower_order_final

    def coefficients(self, sigmas, i):
        order = _final_order(sigmas, i, self.lower_order_final)
        if order == 1:
            return euler_coefficients(sigmas[i], sigmas[i + 1])
        if order == 2:
            return dpmpp_2m_coefficients(sigmas, i)
        return dpmpp_3m_coefficients(sigmas, i, self.corrected)


def singlestep_orders(steps: int, order: int, lower_order_final: bool = True, final_zero: bool = True) -> list[int]:
    """The order of each of ``steps`` steps of singlestep DPM-Solver(++) (diffusers' ``get_order_list``): groups
    of steps of orders ``1, 2, ..., order``, each group one singlestep update from its first level; with
    ``lower_order_final`` the last group is shortened to fit ``steps``, and the step to sigma = 0 is first order.
    As in diffusers, ``lower_order_final`` is taken on where ``steps`` is not a multiple of ``order`` or the last
    step goes to 0 (diffusers also sets it in its config then, for the calls after)."""
    if lower_order_final or final_zero or steps % order:
        k, rem = divmod(steps, order)
        if order == 3:
            orders = [1, 2, 3] * (k - 1) + [1, 2, 1] if rem == 0 else [1, 2, 3] * k + [1, 2][:rem]
        elif order == 2:
            orders = [1, 2] * (k - 1) + [1, 1] if rem == 0 else [1, 2] * k + [1]
        else:
            orders = [1] * steps
    else:
        orders = list(range(1, order + 1)) * (steps // order)
    if final_zero:
        orders[-1] = 1
    return orders[:steps]


def _singlestep_update(sigmas: Sequence[Scalar], j: int, order: int, solver_type: str) -> tuple[Scalar, list]:
    """Singlestep DPM-Solver++ from the group's first level ``g = j - order + 1`` to ``sigma_{j+1}`` (diffusers'
    ``singlestep_dpm_solver_{first,second,third}_order_update``), in the VE state: ``(alpha, [beta_g, ...,
    beta_j])`` with ``x_{j+1} = alpha x_g + sum_m beta_m D_{g+m}``."""
    g, t = j - order + 1, sigmas[j + 1]
    if _is_zero(t):
        return 0.0, [1.0] + [0.0] * (order - 1)
    lam_g = _lam(sigmas[g])
    h = _lam(t) - lam_g
    phi_1 = -_expm1(-h)
    psi = _expm1(-h) / h + 1
    alpha = t / sigmas[g]
    if order == 1:
        return alpha, [phi_1]
    r0 = (_lam(sigmas[j]) - lam_g) / h
    if order == 2:
        k = 0.5 * phi_1 if solver_type == "midpoint" else psi
        return alpha, [phi_1 - k / r0, k / r0]
    r1 = (_lam(sigmas[g + 1]) - lam_g) / h
    d1_0 = [-1 / r1, 1 / r1, 0.0]  # (D_{g+1} - D_g) / r1, over [D_g, D_{g+1}, D_j]
    d1_1 = [-1 / r0, 0.0, 1 / r0]  # (D_j - D_g) / r0
    if solver_type == "midpoint":
        terms = [psi * q for q in d1_1]
    else:
        d1 = [(r0 * p - r1 * q) / (r0 - r1) for p, q in zip(d1_0, d1_1)]
        d2 = [2 * (q - p) / (r0 - r1) for p, q in zip(d1_0, d1_1)]
        chi = (_expm1(-h) + h) / h**2 - 0.5
        terms = [psi * p - chi * q for p, q in zip(d1, d2)]
    terms[0] = terms[0] + phi_1
    return alpha, terms


def dpmpp_singlestep_coefficients(sigmas: Sequence[Scalar], i: int, order: int = 2, solver_type: str = "midpoint",
                                  lower_order_final: bool = True) -> Coefficients:  # fmt: skip
    """Step ``i`` of singlestep DPM-Solver++ (Lu et al. 2022; diffusers' ``DPMSolverSinglestepScheduler``) as a
    step from the current state over ``[D_i, D_{i-1}, ...]``. Its update starts from the group's first state
    ``x_g``, which the current state determines: ``x_i = alpha' x_g + sum gamma_m D_{g+m}`` (the group's previous
    step), so ``x_{i+1} = (alpha / alpha') x_i + sum (beta_m - (alpha / alpha') gamma_m) D_{g+m}``."""
    k = singlestep_orders(len(sigmas) - 1, order, lower_order_final, _is_zero(sigmas[-1]))[i]
    alpha, beta = _singlestep_update(sigmas, i, k, solver_type)
    if k > 1:
        prev_alpha, gamma = _singlestep_update(sigmas, i - 1, k - 1, solver_type)
        a = alpha / prev_alpha
        beta = [b - a * c for b, c in zip(beta, [*gamma, 0.0])]
        alpha = a
    return alpha, beta[::-1]


class DPMSolverPPSinglestep(_Multistep):
    """Singlestep DPM-Solver++ (diffusers' ``DPMSolverSinglestepScheduler``, ``algorithm_type="dpmsolver++"``),
    name ``"dpmpp_singlestep"``: groups of steps of orders 1, 2, ... ``order`` (:func:`singlestep_orders`), each
    step of a group a higher-order update from the group's first level through the levels evaluated since
    (:func:`dpmpp_singlestep_coefficients`).

    Args:
        order: 1, 2 or 3.
        solver_type: ``"midpoint"`` or ``"heun"``, as diffusers.
        lower_order_final: shorten the last group to fit the step count (taken on where it must be: see
            :func:`singlestep_orders`).
    """

    name = "dpmpp_singlestep"

    def __init__(self, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = True):
        self.order = as_int(order, "dpmpp_singlestep order")
        if self.order not in (1, 2, 3):
            raise ValueError(f"dpmpp_singlestep: order must be 1, 2 or 3, got {order!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final

    @property
    def keep(self) -> int:
        return max(self.order - 1, 1)

    def coefficients(self, sigmas, i):
        return dpmpp_singlestep_coefficients(sigmas, i, self.order, self.solver_type, self.lower_order_final)


def res_multistep_coefficients(sigmas: Sequence[Scalar], i: int) -> Coefficients:
    """RES's second-order multistep step (Zhang et al. 2023, "Improved order analysis and design of exponential
    integrator for diffusion models"; ComfyUI's ``sample_res_multistep``) over ``[D_i, D_{i-1}]``: with
    ``h = lambda_{i+1} - lambda_i``, ``r = h_{i-1}/h`` and ``phi_1(-h) = (1 - e^{-h})/h``,
    ``phi_2(-h) = (1 - phi_1(-h))/h``, the node ``c2 = -r`` of ``D_{i-1}`` gives::

        x' = e^{-h} x + h phi_1 D_i + (h phi_2 / r) (D_i - D_{i-1})

    which is DPM-Solver++(2M) SDE with ``eta = 0`` and its ``heun`` solver type, so the one implementation is
    :func:`~fastdiff.solvers.stochastic.dpmpp_2m_sde_coefficients`. The first step is Euler and the step to sigma = 0
    returns ``D``. Floats, or 0-d tensors.
    """
    a, b, _ = dpmpp_2m_sde_coefficients(sigmas, i, eta=0.0, solver_type="heun")
    return a, b


class ResMultistep(_Multistep):
    """ComfyUI's ``sample_res_multistep`` (RES 2M, deterministic: ``eta = 0``, without CFG++), see
    :func:`res_multistep_coefficients`. ComfyUI draws noise on every step above 0 and multiplies it by
    ``sigma_up = 0``; fastdiff draws none, so its result is the same but a shared noise sampler is not advanced.
    The ancestral variants and CFG++ are left out."""

    name = "res_multistep"
    keep = 1

    def coefficients(self, sigmas, i):
        return res_multistep_coefficients(sigmas, i)


def _order(name: str, value) -> int:
    """An order option in 1..4: the op takes at most three earlier history terms."""
    v = as_int(value, name)
    if not 1 <= v <= 4:
        raise ValueError(f"{name} must be 1, 2, 3 or 4, got {value!r}")
    return v


def _derivative_step(s0: Scalar, weights: Sequence[Scalar]) -> Coefficients:
    """A linear multistep step in x, ``x' = x + sum_j w_j d_{i-j}`` with derivatives ``d_j = (x_j - D_j) /
    sigma_j``, as coefficients over ``[D_i, d_{i-1}, d_{i-2}, ...]`` (the new D, then the stored derivatives)."""
    return 1 + weights[0] / s0, [-weights[0] / s0, *weights[1:]]


class _DerivativeMultistep(Solver):
    """Shared driver of the linear multistep methods in x (iPNDM, LMS, DEIS, gradient estimation), whose history
    holds the last ``keep`` derivatives ``d_j = (x_j - D_j) / sigma_j``, newest first: each step's op pass
    produces its ``d_i`` as the history entry (``hx = 1/sigma_i``, ``hd = -1/sigma_i``). An order-``n`` method
    keeps ``n - 1``."""

    max_order: int = 2

    @property
    def keep(self) -> int:
        return max(self.max_order - 1, 1)

    def coefficients(self, sigmas: Sequence[Scalar], i: int) -> Coefficients:
        raise NotImplementedError

    def stages(self, sigmas, i):
        return [Stage(*self.coefficients(sigmas, i), 1 / sigmas[i], -1 / sigmas[i])]

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        (p,) = self._points(sigmas, i, points)
        x_next, d_i = _apply(x, evaluate(x, p), hist, stages[0], noise)
        state["history"] = [d_i, *hist][: self.keep]
        return x_next, x - d_i / _hx(stages[0])  # D = x - sigma_i d_i, with sigma_i = 1 / hx of the coefficients


# Adams-Bashforth weights by order, newest derivative first.
IPNDM_WEIGHTS = {
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


def ipndm_coefficients(sigmas: Sequence[Scalar], i: int, max_order: int = 4) -> Coefficients:
    """iPNDM (Zhang & Chen 2023): Adams-Bashforth in x with the equal-step weights, whatever the steps::

        x' = x + (s1 - s0) * sum_j c_j d_{i-j}

    Coefficients over ``[D_i, d_{i-1}, d_{i-2}, ...]``; the order warms up from 1 and is ``min(max_order, i + 1)``.
    """
    dt = sigmas[i + 1] - sigmas[i]
    return _derivative_step(sigmas[i], [dt * c for c in IPNDM_WEIGHTS[min(max_order, i + 1)]])


class IPNDM(_DerivativeMultistep):
    """Improved PNDM with lower-order warm start (k-diffusion ``sample_ipndm``)."""

    name = "ipndm"

    def __init__(self, max_order: int = 4):
        self.max_order = _order("ipndm max_order", max_order)

    def coefficients(self, sigmas, i):
        return ipndm_coefficients(sigmas, i, self.max_order)


def _lagrange_basis(nodes: Sequence[Scalar]) -> list[list[Scalar]]:
    """The monomial coefficients (lowest degree first) of each Lagrange basis polynomial ``l_j`` on ``nodes``:
    ``prod_{k != j} (u - u_k) / (u_j - u_k)`` multiplied out. Floats, or 0-d tensors (differentiable)."""
    basis = []
    for j, uj in enumerate(nodes):
        poly: list[Scalar] = [1.0]
        scale: Scalar = 1.0
        for k, uk in enumerate(nodes):
            if k != j:  # poly *= (u - u_k)
                poly = [p - uk * q for p, q in zip([0.0, *poly], [*poly, 0.0])]
                scale = scale * (uj - uk)
        basis.append([c / scale for c in poly])
    return basis


def lagrange_integrals(nodes: Sequence[Scalar], h: Scalar) -> list[Scalar]:
    """``int_0^h l_j(u) du`` for each Lagrange basis polynomial ``l_j`` on ``nodes``, exactly, term by term.
    Floats, or 0-d tensors (differentiable)."""
    return [sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly)) for poly in _lagrange_basis(nodes)]


def lagrange_exp_integrals(nodes: Sequence[Scalar], h: Scalar) -> list[Scalar]:
    """``int_0^h l_j(u) e^u du`` for each Lagrange basis polynomial ``l_j`` on ``nodes``, exactly: the
    antiderivative of ``p(u) e^u`` is ``e^u (p - p' + p'' - ...)(u)``. Floats, or 0-d tensors (differentiable)."""
    out = []
    for poly in _lagrange_basis(nodes):
        q, d = [0.0] * len(poly), list(poly)
        for k in range(len(poly)):  # q += (-1)^k p^(k)
            q = [a + (-1) ** k * b for a, b in zip(q, d + [0.0] * (len(q) - len(d)))]
            d = [m * c for m, c in enumerate(d)][1:]
        value_h = sum(c * h**m for m, c in enumerate(q))
        out.append(_exp(h) * value_h - q[0])
    return out


def lms_coefficients(sigmas: Sequence[Scalar], i: int, order: int = 4) -> Coefficients:
    """k-diffusion's ``sample_lms`` step ``i``: the linear multistep method in sigma whose weights integrate the
    Lagrange interpolant of the derivatives over the step::

        x' = x + sum_j w_j d_{i-j},  w_j = int_{sigma_i}^{sigma_{i+1}} l_j(s) ds

    with ``l_j`` the Lagrange basis on ``sigma_i, ..., sigma_{i-n+1}``, ``n = min(order, i + 1)``. k-diffusion
    integrates with ``scipy.integrate.quad``; the weights are integrals of polynomials, taken here exactly (in
    ``u = s - sigma_i``, which keeps the terms small). The step to sigma = 0 is the same rule. Coefficients over
    ``[D_i, d_{i-1}, ...]``; floats, or 0-d tensors.
    """
    s0 = sigmas[i]
    nodes = [sigmas[i - k] - s0 for k in range(min(order, i + 1))]
    return _derivative_step(s0, lagrange_integrals(nodes, sigmas[i + 1] - s0))


class LMS(_DerivativeMultistep):
    """k-diffusion's linear multistep sampler ``sample_lms`` ("LMS"), ``order`` 1 to 4 (k-diffusion takes any;
    fastdiff's op keeps at most three earlier derivatives), warming up from first order.

    ComfyUI's ``sample_lms`` returns ``D`` on the step to sigma = 0; k-diffusion 0.1.1, which fastdiff follows,
    applies the multistep rule there too (:func:`lms_coefficients`).
    """

    name = "lms"

    def __init__(self, order: int = 4):
        self.order = _order("lms order", order)

    @property
    def max_order(self) -> int:
        return self.order

    def coefficients(self, sigmas, i):
        return lms_coefficients(sigmas, i, self.order)


# DEIS's "tab" mode (ComfyUI's deis.py, from zju-pi/diff-sampler) takes its time variable from one fixed VP-SDE,
# sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1, fitted to sigma(1e-3) = 0.002 and sigma(1) = 80 whatever the
# schedule.
_DEIS_EPS, _DEIS_SIGMA_MIN, _DEIS_SIGMA_MAX = 1e-3, 0.002, 80.0
_DEIS_BETA_D = 2 * (math.log1p(_DEIS_SIGMA_MIN**2) / _DEIS_EPS - math.log1p(_DEIS_SIGMA_MAX**2)) / (_DEIS_EPS - 1)
_DEIS_BETA_MIN = math.log1p(_DEIS_SIGMA_MAX**2) - _DEIS_BETA_D / 2
# Gauss-Legendre nodes and weights on [0, 1]. The DEIS weights have no closed form; their integrands are analytic
# on every step between positive sigmas, where 64 nodes reach rounding (tests/test_solvers_ode.py checks them
# against adaptive quadrature, down to steps that end at 1e-8).
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(64)
_GL_NODES, _GL_WEIGHTS = (_GL_NODES + 1) / 2, _GL_WEIGHTS / 2


@functools.cache
def _gauss_legendre_on(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gauss-Legendre nodes and weights on a device, copied there once: a copy from the host is a sync on a
    GPU, and LD3 rebuilds its coefficients every iteration."""
    nodes, weights = (torch.as_tensor(v, dtype=dtype, device=device) for v in (_GL_NODES, _GL_WEIGHTS))
    return nodes, weights


def deis_time(sigma: Scalar | np.ndarray) -> Scalar | np.ndarray:
    """DEIS's time ``t`` of a noise level: the inverse of ``sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1``.
    A float, a NumPy array, or a tensor."""
    lib = torch if isinstance(sigma, torch.Tensor) else np
    return (lib.sqrt(_DEIS_BETA_MIN**2 + 2 * _DEIS_BETA_D * lib.log1p(sigma**2)) - _DEIS_BETA_MIN) / _DEIS_BETA_D


def deis_coefficients(sigmas: Sequence[Scalar], i: int, max_order: int = 3) -> Coefficients:
    """DEIS with its "tab" (time Adams-Bashforth) weights (Zhang & Chen 2023; ComfyUI's ``sample_deis``): the
    derivatives ``d = (x - D)/sigma`` (the model's epsilon) interpolated by a polynomial in DEIS's time ``t``
    (:func:`deis_time`) through the last ``n = min(max_order, i + 1)`` steps, and integrated over sigma::

        x' = x + sum_j w_j d_{i-j},  w_j = int_{sigma_i}^{sigma_{i+1}} l_j(t(s)) ds

    (``l_j`` the Lagrange basis on ``t_i, ..., t_{i-n+1}``). ComfyUI writes ``w_j`` as ``int l_j(t) sigma'(t) dt``
    and sums it over 10,000 points in t, a Riemann sum good to O(1e-4) (2e-5 relative on a 12-step Karras
    schedule); the integral has no closed form, and fastdiff takes it in sigma by 64-point Gauss-Legendre, to
    rounding. The first step and the step to sigma = 0 are Euler steps. Coefficients over ``[D_i, d_{i-1}, ...]``;
    floats, or 0-d tensors (differentiable).
    """
    s0, s1 = sigmas[i], sigmas[i + 1]
    n = 1 if _is_zero(s1) else min(max_order, i + 1)
    if n == 1:
        return _derivative_step(s0, [s1 - s0])
    nodes, weights = (
        _gauss_legendre_on(s0.dtype, s0.device) if isinstance(s0, torch.Tensor) else (_GL_NODES, _GL_WEIGHTS)
    )
    ts = [deis_time(sigmas[i - k]) for k in range(n)]
    t = deis_time(s0 + (s1 - s0) * nodes)
    w = []
    for j in range(n):
        integrand = (s1 - s0) * weights
        for k in range(n):
            if k != j:
                integrand = integrand * (t - ts[k]) / (ts[j] - ts[k])
        w.append(integrand.sum() if isinstance(integrand, torch.Tensor) else float(integrand.sum()))
    return _derivative_step(s0, w)


def deis_logrho_coefficients(sigmas: Sequence[Scalar], i: int, max_order: int = 3) -> Coefficients:
    """DEIS in log-rho (Zhang & Chen 2023; diffusers' ``DEISMultistepScheduler``, ``solver_type="logrho"``): the
    derivatives ``d = (x - D)/sigma`` (epsilon) interpolated by a polynomial in ``log sigma`` (``rho`` is the VE
    sigma) through the last ``n = min(max_order, i + 1)`` steps, and integrated over sigma, exactly::

        x' = x + sum_j w_j d_{i-j},  w_j = int_{sigma_i}^{sigma_{i+1}} l_j(log s) ds
                                        = sigma_i int_0^h l_j(u) e^u du,  u = log(s / sigma_i), h = log(s1 / s0)

    (:func:`lagrange_exp_integrals`). The first step, first order, is DDIM; so is the step to sigma = 0.
    Coefficients over ``[D_i, d_{i-1}, ...]``; floats, or 0-d tensors (differentiable)."""
    s0, s1 = sigmas[i], sigmas[i + 1]
    n = 1 if _is_zero(s1) else min(max_order, i + 1)
    if n == 1:
        return _derivative_step(s0, [s1 - s0])
    lam0 = _lam(s0)
    nodes = [lam0 - _lam(sigmas[i - k]) for k in range(n)]
    return _derivative_step(s0, [s0 * w for w in lagrange_exp_integrals(nodes, lam0 - _lam(s1))])


DEIS_MODES = {"tab": deis_coefficients, "logrho": deis_logrho_coefficients}


class DEIS(_DerivativeMultistep):
    """DEIS (Zhang & Chen 2023): ``max_order`` 1 to 4, warming up from first order, in one of two forms:

    * ``deis_mode="tab"`` (default): ComfyUI's ``sample_deis``, the weights of :func:`deis_coefficients`
      (computed to rounding where ComfyUI sums them to O(1e-4));
    * ``deis_mode="logrho"``: diffusers' ``DEISMultistepScheduler`` (orders 1-3 there),
      :func:`deis_logrho_coefficients`.

    ComfyUI's other mode, ``"rhoab"`` (Adams-Bashforth in sigma with exact integrals, which is the method of
    ``lms``), is refused: for ``max_order >= 2`` its coefficient lists stop matching the step's order once the
    warm-up is over, so it fails there or reuses stale weights.

    Args:
        max_order: the highest order, reached after the warm-up.
        deis_mode: ``"tab"`` or ``"logrho"``.
        lower_order_final: as diffusers' schedulers: on a schedule of fewer than 15 steps the last step is first
            order and the one before it at most second order.
    """

    name = "deis"

    def __init__(self, max_order: int = 3, deis_mode: str = "tab", lower_order_final: bool = False):
        self.max_order = _order("deis max_order", max_order)
        if deis_mode not in DEIS_MODES:
            raise ValueError(f"deis_mode must be 'tab' or 'logrho' (for 'rhoab', Adams-Bashforth in sigma, use "
                             f"'lms'), got {deis_mode!r}")  # fmt: skip
        self.deis_mode = deis_mode
        self.lower_order_final = lower_order_final

    def coefficients(self, sigmas, i):
        cap = _final_order(sigmas, i, self.lower_order_final)
        return DEIS_MODES[self.deis_mode](sigmas, i, min(self.max_order, cap or self.max_order))


def gradient_estimation_coefficients(sigmas: Sequence[Scalar], i: int, ge_gamma: float = 2.0) -> Coefficients:
    """Gradient estimation (Permenter & Yuan 2024; ComfyUI's ``sample_gradient_estimation``): an Euler step
    along ``d_i + (ge_gamma - 1)(d_i - d_{i-1})``, the denoiser's gradient extrapolated from the last two steps::

        x' = x + (s1 - s0) (ge_gamma d_i - (ge_gamma - 1) d_{i-1})

    The first step is Euler and the step to sigma = 0 returns ``D``. Coefficients over ``[D_i, d_{i-1}]``.
    """
    dt = sigmas[i + 1] - sigmas[i]
    weights = [dt] if i == 0 or _is_zero(sigmas[i + 1]) else [ge_gamma * dt, (1 - ge_gamma) * dt]
    return _derivative_step(sigmas[i], weights)


class GradientEstimation(_DerivativeMultistep):
    """The gradient-estimation sampler of Permenter & Yuan (2024) as ComfyUI's ``sample_gradient_estimation``
    (without CFG++), ``ge_gamma`` the extrapolation factor (1: Euler)."""

    name = "gradient_estimation"

    def __init__(self, ge_gamma: float = 2.0):
        self.ge_gamma = as_real(ge_gamma, "ge_gamma")

    def coefficients(self, sigmas, i):
        return gradient_estimation_coefficients(sigmas, i, self.ge_gamma)


def _unipc_terms(lams: Sequence[float], s0: int, t: int, order: int, variant: str):
    """Shared algebra of UniP and UniC between lambda indices ``s0`` and ``t`` (Zhao et al. 2023, B(h) form).

    Returns ``(h_phi_1, B_h, rks, R, b)`` as in diffusers' ``multistep_uni_*_bh_update`` with
    ``predict_x0=True``, where ``rks[k-1] = (lam_{s0-k} - lam_{s0}) / h`` for ``k = 1 .. order-1``.
    """
    h = lams[t] - lams[s0]
    hh = -h
    h_phi_1 = _expm1(hh)
    b_h = hh if variant == "bh1" else _expm1(hh)
    rks = [(lams[s0 - k] - lams[s0]) / h for k in range(1, order)] + [1.0]
    R = [[rk ** (j - 1) for rk in rks] for j in range(1, order + 1)]
    b = []
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, rks, R, b


def _solve(R: list[list[Scalar]], b: list[Scalar]) -> list[Scalar]:
    if isinstance(b[0], torch.Tensor):  # keep the graph: stack, do not copy into a new tensor
        A = torch.stack(
            [torch.stack([torch.as_tensor(v, dtype=b[0].dtype, device=b[0].device) for v in row]) for row in R]
        )
        # solve_ex: solve() would read its error flag back to the host, a sync for a schedule on a GPU.
        return list(torch.linalg.solve_ex(A, torch.stack(b))[0].unbind())
    return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def unipc_predictor_coefficients(sigmas: Sequence[float], i: int, order: int, variant: str = "bh2") -> Coefficients:
    """UniP-``order`` from ``x^c_i`` over ``[D_i, D_{i-1}, ..., D_{i-order+1}]``; first order into sigma = 0."""
    s0, s1 = sigmas[i], sigmas[i + 1]
    if _is_zero(s1) or order == 1:
        return euler_coefficients(s0, s1)
    lams = [_lam(s) for s in sigmas[: i + 2]]
    h_phi_1, b_h, rks, R, b = _unipc_terms(lams, i, i + 1, order, variant)
    rhos = [0.5] if order == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    # x' = (s1/s0) x - h_phi_1 D_i - B_h * sum_k rho_k (D_{i-k} - D_i) / r_k
    coeffs = [-h_phi_1] + [0.0] * (order - 1)
    for k, (rho, rk) in enumerate(zip(rhos, rks[:-1]), start=1):
        coeffs[k] -= b_h * rho / rk
        coeffs[0] += b_h * rho / rk
    return s1 / s0, coeffs


def unipc_corrector_coefficients(sigmas: Sequence[float], i: int, order: int, variant: str = "bh2") -> Coefficients:
    """UniC-``order`` at step ``i >= 1``: corrects ``x_i`` from ``x^c_{i-1}`` using the new ``D_i``, over
    ``[D_i, D_{i-1}, ..., D_{i-order}]``. It reuses the evaluation at the predicted point: no extra NFE."""
    s0, s1 = sigmas[i - 1], sigmas[i]
    lams = [_lam(s) for s in sigmas[: i + 1]]
    h_phi_1, b_h, rks, R, b = _unipc_terms(lams, i - 1, i, order, variant)
    rhos = [0.5] if order == 1 else _solve(R, b)
    # x_i^c = (s1/s0) x - h_phi_1 D_{i-1} - B_h * (sum_k rho_k (D_{i-1-k} - D_{i-1}) / r_k + rho_last (D_i - D_{i-1}))
    coeffs = [-b_h * rhos[-1], -h_phi_1 + b_h * rhos[-1]] + [0.0] * (order - 1)
    for k, (rho, rk) in enumerate(zip(rhos[:-1], rks[:-1]), start=1):
        coeffs[k + 1] -= b_h * rho / rk
        coeffs[1] += b_h * rho / rk
    return s1 / s0, coeffs


class UniPC(Solver):
    """UniPC (Zhao et al. 2023) with data prediction, variants ``bh1`` and ``bh2``, as diffusers'
    ``UniPCMultistepScheduler``: UniP-``order`` predictor, UniC corrector at every step after the first,
    orders warming up from 1 and, with ``lower_order_final``, lowered over the last steps."""

    name = "unipc"

    def __init__(self, order: int = 2, variant: str = "bh2", corrector: bool = True, lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
        if variant not in ("bh1", "bh2"):
            raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
        self.order, self.variant, self.corrector, self.lower_order_final = order, variant, corrector, lower_order_final

    def predictor_order(self, i: int, n_steps: int) -> int:
        order = min(self.order, n_steps - i) if self.lower_order_final else self.order
        return min(order, i + 1)

    def start(self):
        return {"history": [], "base": None}

    def stages(self, sigmas, i):
        """``[corrector, predictor]``, or ``[predictor]`` on the first step (or with ``corrector=False``)."""
        n = len(sigmas) - 1
        predictor = Stage(*unipc_predictor_coefficients(sigmas, i, self.predictor_order(i, n), self.variant))
        if i == 0 or not self.corrector:
            return [predictor]
        c_order = self.predictor_order(i - 1, n)
        return [Stage(*unipc_corrector_coefficients(sigmas, i, c_order, self.variant)), predictor]

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        (p,) = self._points(sigmas, i, points)
        den = evaluate(x, p)
        if len(stages) == 2:  # correct x_i from the previous corrected state, reusing this evaluation
            x, d = _apply(state["base"], den, hist, stages[0], noise)
            den = Denoised(d)
        x_next, d = _apply(x, den, hist, stages[-1], noise)
        state["base"] = x
        state["history"] = [d] + hist[: self.order - 1]
        return x_next, d


def _sa_update(lams: Sequence[Scalar], s: int, t: int, nodes: Sequence[int], tau: float, predictor: bool):
    """SA-Solver's data-prediction update from lambda index ``s`` to ``t`` through the estimates at ``nodes``
    (Xue et al. 2023, with diffusers' order-2 adjustment), in the VE state::

        x_t = e^{-tau^2 h} (sigma_t / sigma_s) x_s + e^{-(1 + tau^2) h} sum_k I_k D_k
              + sigma_t sqrt(1 - e^{-2 tau^2 h}) z

    with ``h = lam_t - lam_s``, ``I_k = int_0^{(1 + tau^2) h} l_k(u) e^u du`` (Lagrange basis on
    ``(1 + tau^2)(lam_k - lam_s)``). Returns ``(a, [b_k per node], c)``."""
    k2 = 1 + tau**2
    h = lams[t] - lams[s]
    a = _exp(-(tau**2) * h) * _exp(lams[s] - lams[t])
    scale = _exp(-k2 * h)
    b = [scale * w for w in lagrange_exp_integrals([k2 * (lams[n] - lams[s]) for n in nodes], k2 * h)]
    if len(nodes) == 2:  # diffusers' adjustment at order 2 ("similar to UniPC"; it keeps the order)
        core = (h * k2 - 1 + _exp(-k2 * h)) / k2**2
        delta = k2 * ((h**2 / 2 - core) / (lams[s] - lams[s - 1]) if predictor else h / 2 - core / h)
        b = [b[0] + delta, b[1] - delta]
    c = _exp(-lams[t]) * _sqrt(-_expm1(-2 * tau**2 * h))
    return a, b, c


class SASolver(Solver):
    """SA-Solver (Xue et al. 2023; diffusers' ``SASolverScheduler``, data prediction), name ``"sa_solver"``: a
    stochastic Adams predictor of ``predictor_order`` and, from the second step, a stochastic Adams-Moulton
    corrector of ``corrector_order`` that corrects the state with the new evaluation and the previous step's noise
    (no extra evaluation), both warming up from low order and, with ``lower_order_final``, lowered over the last
    steps. ``tau`` sets the stochasticity (0: an ODE solver); it applies where the step's start sigma lies in
    ``tau_interval`` (``[lo, hi]``, default everywhere; diffusers' default is timesteps 200-800). The step to
    sigma = 0 returns ``D`` (diffusers' scheduler ends at the model's smallest sigma instead).

    Args:
        predictor_order, corrector_order: 1-3 and 1-4, as diffusers allows.
        tau: >= 0.
        tau_interval: ``(lo, hi)`` sigmas, or None.
        lower_order_final: as diffusers.
    """

    name = "sa_solver"
    ode = False

    def __init__(self, predictor_order: int = 2, corrector_order: int = 2, tau: float = 1.0,
                 tau_interval: tuple[float, float] | None = None, lower_order_final: bool = True):  # fmt: skip
        self.predictor_order = as_int(predictor_order, "predictor_order")
        self.corrector_order = as_int(corrector_order, "corrector_order")
        if not (1 <= self.predictor_order <= 3 and 1 <= self.corrector_order <= 4):
            raise ValueError(f"sa_solver: predictor_order must be 1-3 and corrector_order 1-4, got "
                             f"{predictor_order!r} and {corrector_order!r}")  # fmt: skip
        self.tau = as_real(tau, "tau")
        if self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau!r}")
        self.tau_interval = None if tau_interval is None else tuple(float(v) for v in tau_interval)
        self.lower_order_final = lower_order_final

    @property
    def stochastic(self) -> bool:
        return self.tau > 0

    @property
    def keep(self) -> int:
        return max(self.predictor_order, self.corrector_order) - 1

    def _tau(self, sigma: Scalar) -> float:
        if self.tau_interval is None:
            return self.tau
        lo, hi = self.tau_interval
        s = float(sigma)  # the schedule's host value: the loops build stages from host sigmas
        return self.tau if lo * (1 - 1e-6) <= s <= hi * (1 + 1e-6) else 0.0

    def orders(self, i: int, n: int) -> tuple[int, int]:
        """``(predictor order of step i, corrector order the next step uses)``, as diffusers computes them."""
        p, c = self.predictor_order, self.corrector_order
        if self.lower_order_final:
            p, c = min(p, n - i), min(c, n - i + 1)
        warm = min(i, max(self.predictor_order, self.corrector_order - 1))
        return min(p, warm + 1), min(c, warm + 2)

    def start(self):
        return {"history": [], "base": None, "z": None}

    def stages(self, sigmas, i):
        """``[corrector, predictor]``, or ``[predictor]`` on the first step. Each stage's ``b`` is over the
        history, newest first; the corrector's noise is the previous step's draw, which :meth:`step` passes it."""
        n = len(sigmas) - 1
        lams = [_lam(s) for s in sigmas[: i + 1]]
        if _is_zero(sigmas[i + 1]):  # the step to 0 returns D (diffusers' SA-Solver ends at its smallest sigma)
            predictor = Stage(0.0, [1.0])
        else:
            lams.append(_lam(sigmas[i + 1]))
            p, _ = self.orders(i, n)
            a, b, c = _sa_update(lams, i, i + 1, [i - k for k in range(p)], self._tau(sigmas[i]), predictor=True)
            # A draw on every step, where tau is 0 too (as diffusers draws), unless the solver never draws.
            predictor = Stage(a, b, c_noise=c, noise=(sigmas[i], sigmas[i + 1]) if self.tau > 0 else None)
        if i == 0:
            return [predictor]
        _, c_order = self.orders(i - 1, n)
        a, b, c = _sa_update(lams, i - 1, i, [i - k for k in range(c_order)], self._tau(sigmas[i - 1]), False)
        return [Stage(a, b, c_noise=c, noise=(sigmas[i - 1], sigmas[i]) if self.tau > 0 else None), predictor]

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        (p,) = self._points(sigmas, i, points)
        den = evaluate(x, p)
        if len(stages) == 2:  # correct x_i from the previous state with the new estimate and the previous noise
            z = state["z"]
            x, d = _apply(state["base"], den, hist, stages[0], lambda interval: z)
            den = Denoised(d)
        drawn = [None]

        def recorded(interval):
            drawn[0] = _draw(noise, interval)
            return drawn[0]

        x_next, d = _apply(x, den, hist, stages[-1], recorded)
        state["base"], state["z"] = x, drawn[0]
        state["history"] = [d] + hist[: self.keep - 1]
        return x_next, d


SOLVERS = (DPMSolverPP2M, DPMSolverPP3M, DPMSolverPPSinglestep, IPNDM, UniPC, LMS, DEIS, ResMultistep,
           GradientEstimation, SASolver)  # fmt: skip
__all__ = [
    "DPMSolverPP2M", "DPMSolverPP3M", "DPMSolverPPSinglestep", "IPNDM", "UniPC", "LMS", "DEIS", "ResMultistep",
    "GradientEstimation", "SASolver", "singlestep_orders", "dpmpp_singlestep_coefficients",
    "IPNDM_WEIGHTS", "dpmpp_2m_coefficients", "dpmpp_3m_coefficients", "ipndm_coefficients",
    "unipc_predictor_coefficients", "unipc_corrector_coefficients", "lms_coefficients", "deis_time",
    "deis_coefficients", "deis_logrho_coefficients", "res_multistep_coefficients", "gradient_estimation_coefficients",
    "lagrange_integrals", "lagrange_exp_integrals",
]  # fmt: skip
