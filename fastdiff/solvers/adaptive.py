"""DPM-Solver with a fixed step in ``lambda`` or an adaptive one (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver
for Diffusion Probabilistic Model Sampling in Around 10 Steps", Algorithms 1-2, Section 3.4 and Appendix C): the
solvers behind k-diffusion's ``sample_dpm_fast`` and ``sample_dpm_adaptive``.

They choose their noise levels as they go (the adaptive one from each step's error estimate), so they do not run
on a fixed schedule in fastdiff's sampling loops and are not in :data:`fastdiff.SOLVERS`. Each update is still one
application of :func:`fastdiff.ops.guided_step`.

Time is ``t = lambda = -log sigma``, ``sigma(t) = e^{-t}``. With the noise prediction
``eps(x, t) = (x - D(x; sigma(t))) / sigma(t)`` and ``h = t' - t``, a DPM-Solver step evaluates ``eps`` at ``t``
and, for orders 2 and 3, at ``s1 = t + r1 h`` and ``s2 = t + r2 h``::

    order 1:   x' = x - sigma(t') expm1(h) eps_0
    order 2:   u1 = x - sigma(s1) expm1(r1 h) eps_0
               x' = x - sigma(t') expm1(h) eps_0 - sigma(t') expm1(h) / (2 r1) (eps_1 - eps_0)
    order 3:   u2 = x - sigma(s2) expm1(r2 h) eps_0 - sigma(s2) (r2 / r1) (expm1(r2 h) / (r2 h) - 1) (eps_1 - eps_0)
               x' = x - sigma(t') expm1(h) eps_0 - sigma(t') / r2 (expm1(h) / h - 1) (eps_2 - eps_0)

with ``eps_k`` evaluated at ``u_k`` (``u_0 = x``). Every line is ``x`` plus a weighted sum of the ``eps``
(:func:`dpm_solver_weights`): one op application, with ``eps_k`` in the op's ``D`` input and the earlier ``eps`` as
its history.

Times are Python floats (float64). k-diffusion computes them in torch's default dtype, so where that is float32 the
two differ by float32 rounding (and the adaptive solver's accept decisions agree except in borderline cases).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fastdiff import ops
from fastdiff.arguments import as_int, as_real
from fastdiff.sampler import _check_output, _noise_source, _sigma_batch
from fastdiff.solvers.base import _sqrt
from fastdiff.solvers.stochastic import _factor, get_ancestral_step

__all__ = ["DPMSolver", "PIDStepSizeController", "dpm_solver_weights", "fast_orders"]

NoiseSampler = Callable[[Any, Any], torch.Tensor]  # (sigma, sigma_next) -> standard normal noise like x
EpsCache = dict[str, torch.Tensor]
_KEYS = ("eps", "eps_r1", "eps_r2")  # the cache keys of eps_0, eps_1, eps_2 (k-diffusion's)


def _sigma(t: float) -> float:
    return math.exp(-t)


def _time(sigma: float) -> float:
    return math.inf if sigma == 0 else -math.log(sigma)


def _as_time(t, name: str) -> float:
    return as_real(t, name)


def _r1(order: int) -> float:
    """The first intermediate time's fraction of the step: 1/2 for a second-order method, 1/3 where a third-order
    one is involved (its own first stage, and in the adaptive solver the second-order estimate beside it, which
    then shares that evaluation)."""
    return 0.5 if order == 2 else 1 / 3


def _ratio(r, name: str) -> float:
    v = as_real(r, name)
    if not 0 < v <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {r!r}")
    return v


def dpm_solver_weights(
    t: float, t_next: float, order: int, r1: float = 0.5, r2: float = 2 / 3
) -> tuple[list[float], list[list[float]]]:
    """One DPM-Solver step of ``order`` 1, 2 or 3 from time ``t`` to ``t_next`` (module docstring), as stages.

    Returns ``(times, weights)``: stage ``k`` evaluates ``eps_k`` at ``times[k]`` (``times[0] = t``) and produces
    ``x + sum_j weights[k][j] eps_{k-j}`` (newest first): the state at which stage ``k + 1`` evaluates or, from the
    last stage, ``x'``. ``r1`` (orders 2 and 3) and ``r2`` (order 3) place the intermediate times.
    """
    h = t_next - t
    first = -_sigma(t_next) * math.expm1(h)  # the first-order weight of eps_0
    if order == 1:
        return [t], [[first]]
    s1 = t + r1 * h
    to_s1 = [-_sigma(s1) * math.expm1(r1 * h)]
    if order == 2:
        k = first / (2 * r1)
        return [t, s1], [to_s1, [k, first - k]]
    s2 = t + r2 * h
    q = -_sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
    p = -_sigma(t_next) / r2 * (math.expm1(h) / h - 1)
    return [t, s1, s2], [to_s1, [q, -_sigma(s2) * math.expm1(r2 * h) - q], [p, 0.0, first - p]]


def fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's step orders for ``nfe >= 1`` evaluations (Lu et al. 2022, Section 3.4): third-order steps,
    the remainder as one lower-order step, or, when 3 divides ``nfe``, a second- and a first-order step in place of
    the last third-order one."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


class PIDStepSizeController:
    """A PID controller of an adaptive solver's step size (Söderlind 2003, "Digital filters in adaptive
    time-stepping") with the arctan limiter of Söderlind & Wang 2006; k-diffusion's ``PIDStepSizeController``.

    With ``e_n = 1 / (error_n + eps)`` (errors scaled so that 1 is the tolerance) for this step and the last two
    accepted ones, a proposal scales ``h`` by ``limiter(e_n^b1 e_{n-1}^b2 e_{n-2}^b3)``, where ``b1 = (P + I + D) /
    order``, ``b2 = -(P + 2 D) / order``, ``b3 = D / order`` and ``limiter(f) = 1 + atan(f - 1)``, and accepts the
    step when that factor is at least ``accept_safety``. ``I = 1`` alone is the classic ``(1 / error)^(1/order)``.
    """

    def __init__(
        self,
        h: float,
        pcoeff: float,
        icoeff: float,
        dcoeff: float,
        order: float = 1,
        accept_safety: float = 0.81,
        eps: float = 1e-8,
    ):
        p, i, d = as_real(pcoeff, "pcoeff"), as_real(icoeff, "icoeff"), as_real(dcoeff, "dcoeff")
        order = as_real(order, "order")
        if order <= 0:
            raise ValueError(f"order must be positive, got {order!r}")
        self.h = as_real(h, "h")
        self.b1, self.b2, self.b3 = (p + i + d) / order, -(p + 2 * d) / order, d / order
        self.accept_safety = as_real(accept_safety, "accept_safety")
        self.eps = as_real(eps, "eps")
        self.errs: list[float] = []  # [e_n, e_{n-1}, e_{n-2}]; the first error fills all three

    def limiter(self, x: float) -> float:
        return 1 + math.atan(x - 1)

    def propose_step(self, error: float | torch.Tensor) -> bool:
        """Scale ``h`` by the controller's factor for a step with this ``error``; returns whether to accept it."""
        inv = 1 / (float(error) + self.eps)
        self.errs = [inv, *(self.errs[1:] or [inv, inv])]
        factor = self.limiter(self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3)
        accept = factor >= self.accept_safety
        if accept:  # a rejected step's error is not history
            self.errs = [inv, inv, self.errs[1]]
        self.h *= factor
        return accept


class DPMSolver(torch.nn.Module):
    """DPM-Solver (Lu et al. 2022) on a denoiser, with k-diffusion's ``DPMSolver`` interface.

    ``model(x, sigma, **extra_args) -> D(x; sigma)``, ``x`` ``[B, ...]`` and ``sigma`` ``[B]``. ``eps_callback()``
    runs after every model evaluation (a progress bar's ``update``), ``info_callback(dict)`` at every step. Times
    ``t = -log sigma`` are floats or 0-d tensors. ``eps_cache`` maps ``'eps'``, ``'eps_r1'``, ``'eps_r2'`` to the
    noise predictions of a step's stages, so that steps from the same ``x`` and ``t`` (and ``r1``) share them.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        extra_args: Mapping[str, Any] | None = None,
        eps_callback: Callable[[], Any] | None = None,
        info_callback: Callable[[dict], Any] | None = None,
    ):
        super().__init__()
        if not callable(model):
            raise TypeError("model must be callable as model(x, sigma, **extra_args) -> D(x; sigma)")
        if extra_args is not None and not isinstance(extra_args, Mapping):
            raise TypeError(
                f"extra_args must be a dict of the model's keyword arguments, got {type(extra_args).__name__}"
            )
        self.model = model
        self.extra_args = dict(extra_args or {})
        self.eps_callback = eps_callback
        self.info_callback = info_callback

    def t(self, sigma):
        """``-log sigma``: a float, or a tensor for a tensor."""
        return -sigma.log() if isinstance(sigma, torch.Tensor) else _time(float(sigma))

    def sigma(self, t):
        """``exp(-t)``: a float, or a tensor for a tensor."""
        return t.neg().exp() if isinstance(t, torch.Tensor) else _sigma(float(t))

    def eps(self, eps_cache: EpsCache, key: str, x: torch.Tensor, t, *args, **kwargs) -> tuple[torch.Tensor, EpsCache]:
        """The noise prediction ``(x - D(x; sigma(t))) / sigma(t)`` ``[B, ...]``, from ``eps_cache[key]`` when it is
        there; returns it and the cache with it."""
        if key in eps_cache:
            return eps_cache[key], eps_cache
        sigma = _sigma(_as_time(t, "t"))
        denoised = _check_output(self.model(x, _sigma_batch(sigma, x), *args, **self.extra_args, **kwargs), x, "model")
        eps = (x - denoised) / sigma
        if self.eps_callback is not None:
            self.eps_callback()
        return eps, {**eps_cache, key: eps}

    def _step(
        self,
        x: torch.Tensor,
        t,
        t_next,
        order: int,
        r1: float = 0.5,
        r2: float = 2 / 3,
        eps_cache: EpsCache | None = None,
        noise: Callable[[], torch.Tensor] | None = None,
        c_noise: float = 0.0,
    ) -> tuple[torch.Tensor, EpsCache]:
        """One step of :func:`dpm_solver_weights`, each stage one op application. ``noise()``, called after the
        step's last evaluation, gives noise that the last stage adds with weight ``c_noise``."""
        cache = dict(eps_cache or {})
        times, weights = dpm_solver_weights(_as_time(t, "t"), _as_time(t_next, "t_next"), order, r1, r2)
        eps: list[torch.Tensor] = []  # newest first
        u = x
        for k, (tk, w) in enumerate(zip(times, weights)):
            e, cache = self.eps(cache, _KEYS[k], u, tk)
            eps.insert(0, e)
            z = noise() if noise is not None and k == order - 1 else None
            u, _ = ops.guided_step(x, e, None, eps[1:], a=1.0, b=w, noise=z, c_noise=c_noise if z is not None else 0.0)
        return u, cache

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        """First-order step (DDIM): ``x`` ``[B, ...]`` from time ``t`` to ``t_next``; returns ``(x', eps_cache)``."""
        return self._step(x, t, t_next, 1, eps_cache=eps_cache)

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        """Second-order step with its intermediate time at ``t + r1 h``; returns ``(x', eps_cache)``."""
        return self._step(x, t, t_next, 2, r1=_ratio(r1, "r1"), eps_cache=eps_cache)

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        """Third-order step with intermediate times ``t + r1 h`` and ``t + r2 h``; returns ``(x', eps_cache)``."""
        return self._step(x, t, t_next, 3, r1=_ratio(r1, "r1"), r2=_ratio(r2, "r2"), eps_cache=eps_cache)

    def _ancestral(self, t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
        """A step from ``t`` to ``t_next`` with ``eta > 0`` is ancestral: the ODE step goes to ``sigma_down``
        (:func:`~fastdiff.solvers.stochastic.get_ancestral_step`; no further than ``t_end``), then noise of std
        ``sqrt(sigma(t_next)^2 - sigma(target)^2)`` is added. Returns ``(target, std)``; ``(t_next, 0)`` at
        ``eta = 0``."""
        if not eta:
            return t_next, 0.0
        sigma_down, _ = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        target = min(t_end, _time(sigma_down))
        return target, _sqrt(_sigma(t_next) ** 2 - _sigma(target) ** 2)

    def _info(self, **info) -> None:
        if self.info_callback is not None:
            self.info_callback(info)

    def dpm_solver_fast(
        self,
        x: torch.Tensor,
        t_start,
        t_end,
        nfe: int,
        eta: float = 0.0,
        s_noise: float = 1.0,
        noise_sampler: NoiseSampler | None = None,
    ) -> torch.Tensor:
        """DPM-Solver-fast: ``nfe`` model evaluations in steps uniform in ``t`` from ``t_start`` to ``t_end``
        (:func:`fast_orders`). ``x`` ``[B, ...]`` at ``sigma(t_start)``; returns ``[B, ...]`` at ``sigma(t_end)``.

        With ``eta > 0`` every step is ancestral (:meth:`_ancestral`), with noise ``noise_sampler(sigma(t),
        sigma(t_next)) s_noise`` (default ``torch.randn_like(x)``). Every step draws, with ``eta = 0`` too (the
        draw is then multiplied by 0), as k-diffusion does.
        """
        nfe = as_int(nfe, "nfe", 1)
        t_start, t_end = _as_time(t_start, "t_start"), _as_time(t_end, "t_end")
        eta, s_noise = _factor("eta", eta), _factor("s_noise", s_noise)
        if eta and not t_end > t_start:
            raise ValueError("eta must be 0 for reverse sampling (t_end <= t_start)")
        draw = _noise_source(x, noise_sampler, None)
        orders = fast_orders(nfe)
        ts = torch.linspace(t_start, t_end, len(orders) + 1, dtype=torch.float64).tolist()
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            target, sigma_up = self._ancestral(t, t_next, t_end, eta)
            eps, cache = self.eps({}, "eps", x, t)
            self._info(x=x, i=i, t=_scalar(t), t_up=_scalar(t), denoised=x - _sigma(t) * eps)
            interval = (_scalar(_sigma(t)), _scalar(_sigma(t_next)))
            x, _ = self._step(x, t, target, order, _r1(order), eps_cache=cache,
                              noise=functools.partial(draw, interval), c_noise=sigma_up * s_noise)  # fmt: skip
        return x

    def dpm_solver_adaptive(
        self,
        x: torch.Tensor,
        t_start,
        t_end,
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
    ) -> tuple[torch.Tensor, dict]:
        """DPM-Solver-12 (``order=2``) or -23 (``order=3``) with adaptive steps (Lu et al. 2022, Appendix C).

        Each attempt from ``s`` to ``s + h`` computes a lower- and a higher-order solution sharing evaluations
        (orders 1 and 2, or 2 with ``r1 = 1/3`` and 3), and the error ``||(x_low - x_high) / delta||_RMS`` with
        ``delta = max(atol, rtol max(|x_low|, |x_low of the last accepted step|))`` feeds a
        :class:`PIDStepSizeController` (order ``1.5`` with ``eta > 0``) that accepts or rejects and scales ``h``
        (starting from ``h_init``). An accepted step moves to ``x_high`` plus, with ``eta > 0``, ancestral noise as
        in :meth:`dpm_solver_fast` (one draw per accepted step, with ``eta = 0`` too). The solve ends within 1e-5
        of ``t_end``. ``x`` ``[B, ...]``; returns ``(x, info)`` with the counts ``steps``, ``nfe``, ``n_accept``,
        ``n_reject``.
        """
        order = as_int(order, "order")
        if order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {order}")
        t_start, t_end = _as_time(t_start, "t_start"), _as_time(t_end, "t_end")
        rtol, atol = _factor("rtol", rtol), _factor("atol", atol)
        if not (rtol or atol):
            raise ValueError("rtol and atol cannot both be 0")
        eta, s_noise = _factor("eta", eta), _factor("s_noise", s_noise)
        forward = t_end > t_start
        if eta and not forward:
            raise ValueError("eta must be 0 for reverse sampling (t_end <= t_start)")
        h_init = abs(as_real(h_init, "h_init")) * (1 if forward else -1)
        if h_init == 0:
            raise ValueError("h_init must not be 0")
        draw = _noise_source(x, noise_sampler, None)
        pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        s, x_prev = t_start, x
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            t = min(t_end, s + pid.h) if forward else max(t_end, s + pid.h)
            target, sigma_up = self._ancestral(s, t, t_end, eta)
            eps, cache = self.eps({}, "eps", x, s)
            denoised = x - _sigma(s) * eps
            x_low, cache = self._step(x, s, target, order - 1, _r1(order), eps_cache=cache)
            x_high, cache = self._step(x, s, target, order, _r1(order), eps_cache=cache)
            delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if not math.isfinite(float(error)):  # the controller would shrink the step forever
                raise FloatingPointError(f"DPM-Solver's error estimate is {float(error)} at sigma = {_sigma(s):g}: "
                                         "did the model return NaN or Inf?")  # fmt: skip
            if pid.propose_step(error):
                # The noise is added after the error estimate, so apart from the step's last op.
                x_prev = x_low
                x = x_high + sigma_up * s_noise * draw((_scalar(_sigma(s)), _scalar(_sigma(t))))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            self._info(x=x, i=info["steps"] - 1, t=_scalar(s), t_up=_scalar(s), denoised=denoised, error=error,
                       h=pid.h, **info)  # fmt: skip
        return x, info


def _scalar(v: float) -> torch.Tensor:
    """A time or noise level as the 0-d tensor that callbacks and noise samplers get (k-diffusion's type)."""
    return torch.tensor(v, dtype=torch.float64)
