"""Classifier-free guidance in a limited noise interval (Kynkäänniemi et al. 2024), and the methods built on it.

The guided denoiser is ``D_u + w (D_c - D_u)`` for steps whose start sigma lies in ``(sigma_lo, sigma_hi]``
and ``D_c`` elsewhere; outside the interval the unconditional pass is not run at all. The decision is made
once per step, at the step's start sigma, and every evaluation of that step (both Heun stages) follows it.

Besides plain CFG (``method="cfg"``), a guided evaluation can combine ``D_c`` and ``D_u`` by
(:func:`guided_estimate`, the pure-torch reference of each):

* ``"rescale"`` (Lin et al. 2024, section 3.4): the CFG prediction rescaled to the conditional one's standard
  deviation, mixed by ``phi``; in the v-prediction space of its paper;
* ``"apg"`` (Sadat et al. 2024, adaptive projected guidance): the update ``D_c - D_u`` with ``momentum``, clipped
  to ``norm_threshold``, split into parts parallel and orthogonal to ``D_c``, the parallel part weighted by
  ``eta``: ``D_c + (w - 1)(dD_perp + eta dD_par)``, on the denoised estimates as in its paper;
* ``"cfg_zero_star"`` (Fan et al. 2025, CFG-Zero*): the unconditional prediction scaled by the optimised
  ``s* = <v_c, v_u> / |v_u|^2``, and zero velocity on the first ``zero_init_steps`` steps; in the flow-matching
  velocity ``v = eps - x0`` of its paper.

and ``"cfg_pp"`` (Chung et al. 2024, CFG++), which changes the solver step rather than the estimate: the step
re-noises along the unconditional direction (:mod:`fastdiff.solvers.cfg_pp`; Euler, Euler ancestral and
DPM-Solver++(2M) only). Its ``scale`` is the paper's lambda, usually in ``[0, 1]``.

Each of the others reduces to plain CFG with its neutral options (``phi=0``; ``eta=1``, no threshold, no momentum).
In a sampling loop a method's guided estimate is a per-sample combination of ``x``, ``D_c`` and ``D_u``
(:func:`method_weights`): one reduction pass gives its weights, and the fused step applies them. Nothing is read
back to the host, so the plan stays fixed and a run can be captured in a CUDA graph.

AutoGuidance (Karras et al. 2024) is plain CFG whose unconditional pass is a weaker version of the same model
(``uncond_model=``, called with the conditional keyword arguments through ``uncond=``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from fastdiff import ops
from fastdiff.arguments import as_real


class Guidance:
    """Classifier-free guidance, optionally limited to a noise interval or a range of steps.

    Args:
        scale: the guidance weight w; ``1`` means no guidance (no unconditional pass is run).
        interval: ``(sigma_lo, sigma_hi)``: guide the steps whose start sigma satisfies
            ``sigma_lo < sigma <= sigma_hi``. ``None`` guides every step (ordinary CFG).
        steps: ``(start, stop)``, inclusive step indices to guide, as the official code takes the interval.
        fractions: ``(start, stop)``, diffusers' guider form (``ClassifierFreeGuidance(start=, stop=)``): the
            steps ``i`` with ``int(start N) <= i < int(stop N)`` of ``N`` steps, ``0 <= start <= stop <= 1``.
            ``interval``, ``steps`` and ``fractions`` are three forms of one choice; give at most one
            (:func:`interval_to_steps`, :func:`steps_to_interval`, :func:`fractions_to_steps` and
            :func:`steps_to_fractions` convert between them for a schedule).
        uncond_model: a separate model for the unconditional pass (EDM2 guides with a smaller one). By default
            the sampled model is called with the ``uncond`` keyword arguments.
        batch: run the conditional and unconditional passes in one forward call of the shared model (x, sigma
            and tensor keyword arguments concatenated along the batch) where the keyword arguments allow it.
        restart: where guidance switches on or off, multistep solvers drop their history and warm up again, as
            after the first step. The guided and unguided ODEs differ, so history from the other side of a switch
            extrapolates the wrong right-hand side: without the restart DPM-Solver++(2M) and UniPC fall to first
            order under interval guidance; with it they keep their order (tests/test_guidance.py measures both).
            Single-step solvers (Euler, DDIM, Heun) are unaffected.
    """

    def __init__(
        self,
        scale: float,
        interval: tuple[float, float] | None = None,
        *,
        steps: tuple[int, int] | None = None,
        fractions: tuple[float, float] | None = None,
        uncond_model: Callable[..., torch.Tensor] | None = None,
        batch: bool = True,
        restart: bool = True,
        method: str = "cfg",
        phi: float | None = None,
        eta: float | None = None,
        norm_threshold: float | None = None,
        momentum: float | None = None,
        zero_init_steps: int | None = None,
    ):
        scale = as_real(scale, "guidance scale")
        if scale < 0:
            warnings.warn(
                f"guidance scale {scale:g} is negative: D_u + w (D_c - D_u) then steers samples away from the "
                "condition. Some research does that on purpose; 1 means no guidance, and the usual scales are above 1",
                stacklevel=2,
            )
        forms = (("interval", interval), ("steps", steps), ("fractions", fractions))
        given = [name for name, v in forms if v is not None]
        if len(given) > 1:
            raise ValueError(f"give the guided steps in one form: sigmas (interval=), step indices (steps=) or "
                             f"diffusers' step fractions (fractions=), not {' and '.join(given)}")  # fmt: skip
        if interval is not None:
            lo, hi = _pair(interval, "interval")
            if not (math.isfinite(lo) and lo >= 0 and not math.isnan(hi)):
                raise ValueError(f"guidance interval needs 0 <= sigma_lo and numbers, got ({lo}, {hi})")
            if lo > hi:
                raise ValueError(f"guidance interval has sigma_lo={lo} > sigma_hi={hi}")
            interval = (lo, hi)
        if steps is not None:
            start, stop = _pair(steps, "steps")
            if not (start.is_integer() and stop.is_integer() and start >= 0):
                raise ValueError(f"guidance steps must be non-negative integers, got {steps}")
            if start > stop:
                raise ValueError(f"guidance steps have start={int(start)} > stop={int(stop)}")
            steps = (int(start), int(stop))
        if fractions is not None:
            start, stop = _pair(fractions, "fractions")
            if not 0 <= start <= stop <= 1:
                raise ValueError(f"guidance fractions need 0 <= start <= stop <= 1, got {fractions}")
            fractions = (start, stop)
        self.method, self.options = _method_options(
            method, phi=phi, eta=eta, norm_threshold=norm_threshold, momentum=momentum, zero_init_steps=zero_init_steps
        )
        if uncond_model is not None and not callable(uncond_model):
            raise TypeError("uncond_model must be callable as model(x, sigma, **uncond)")
        self.scale = scale
        self.interval = interval
        self.steps = steps
        self.fractions = fractions
        self.uncond_model = uncond_model
        self.batch = batch
        self.restart = restart

    def plan(self, sigmas: Sequence[float] | torch.Tensor) -> list[bool]:
        """Which of the ``len(sigmas) - 1`` steps run the unconditional pass."""
        s = [float(v) for v in sigmas][:-1]
        if self.scale == 1.0 and self.method != "cfg_pp":  # CFG++ at 1 still re-noises with D_u
            return [False] * len(s)
        steps = self.steps if self.fractions is None else fractions_to_steps(self.fractions, len(s))
        if self.fractions is not None and steps is None:
            return [False] * len(s)
        if steps is not None:
            start, stop = steps
            return [start <= i <= stop for i in range(len(s))]
        if self.interval is not None:
            lo, hi = self.interval
            return [lo < v <= hi for v in s]
        return [True] * len(s)

    @property
    def plain(self) -> bool:
        """Whether every guided evaluation is plain CFG (the method is ``"cfg"``, or another with its neutral
        options, or the solver-level ``"cfg_pp"``): the fused step then forms ``D_u + w (D_c - D_u)`` itself."""
        return self.method in ("cfg", "cfg_pp") or self.options == _NEUTRAL[self.method]

    @property
    def step_dependent(self) -> bool:
        """Whether the guided sampler depends on the steps taken, so that no ODE in ``(x, sigma)`` describes it:
        APG's momentum, CFG-Zero*'s zero-init, and CFG++ (a change of the solver step)."""
        return self.method == "cfg_pp" or self.options.get("momentum") is not None or bool(
            self.options.get("zero_init_steps"))  # fmt: skip

    def unconditional_model(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The model that runs the unconditional pass: ``uncond_model`` if given, else the sampled ``model``."""
        return self.uncond_model if self.uncond_model is not None else model

    def __repr__(self) -> str:
        forms = (("interval", self.interval), ("steps", self.steps), ("fractions", self.fractions))
        where = next((f"{name}={v}" for name, v in forms if v is not None), "everywhere")
        method = (
            ""
            if self.method == "cfg"
            else f", method={self.method!r}" + "".join(f", {k}={v}" for k, v in self.options.items())
        )
        return f"Guidance(scale={self.scale}, {where}{method})"


# ------------------------------------------------------------------------------------------ guidance methods

METHODS = ("cfg", "rescale", "apg", "cfg_zero_star", "cfg_pp")
# Each method's options with their defaults (the papers'), and the options under which it is plain CFG.
_DEFAULTS = {
    "cfg": {},
    "rescale": {"phi": 0.7},
    "apg": {"eta": 0.0, "norm_threshold": None, "momentum": None},
    "cfg_zero_star": {"zero_init_steps": 0},
    "cfg_pp": {},
}
_NEUTRAL = {
    "cfg": {},
    "rescale": {"phi": 0.0},
    "apg": {"eta": 1.0, "norm_threshold": None, "momentum": None},
    "cfg_zero_star": None,  # s* never reduces to 1 in general
    "cfg_pp": None,  # a solver-level method (fastdiff.solvers.cfg_pp): its evaluations are plain CFG
}


def _method_options(method: str, **given) -> tuple[str, dict]:
    """``(method, its options with defaults)``; an option of another method, or a bad value, is refused."""
    if method not in METHODS:
        raise ValueError(f"guidance method must be one of {', '.join(METHODS)}, got {method!r}")
    options = dict(_DEFAULTS[method])
    for name, value in given.items():
        if value is None:
            continue
        if name not in options:
            owner = next(m for m, opts in _DEFAULTS.items() if name in opts)
            raise ValueError(f"guidance option {name} belongs to method={owner!r}, not method={method!r}")
        if name == "zero_init_steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"zero_init_steps must be an integer >= 0, got {value!r}")
        else:
            value = as_real(value, name)
            if name == "norm_threshold" and not value > 0:
                raise ValueError(f"norm_threshold must be > 0 (None: no threshold), got {value!r}")
        options[name] = value
    return method, options


def _sample_dims(t: torch.Tensor) -> list[int]:
    return list(range(1, t.ndim))


def _per_sample(sigma, x: torch.Tensor):
    """``sigma`` (a float, a 0-d or ``[B]`` tensor) shaped to broadcast against ``x`` ``[B, ...]``."""
    if isinstance(sigma, torch.Tensor) and sigma.ndim:
        return sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return sigma


def _v_prediction(x: torch.Tensor, sigma, d: torch.Tensor) -> torch.Tensor:
    """The VP v-prediction ``alpha eps - sigma_vp x0`` of the denoised estimate ``d`` at VE state ``x``."""
    return ((x - d) / sigma - sigma * d) / (1 + sigma**2) ** 0.5


def _from_v_prediction(x: torch.Tensor, sigma, v: torch.Tensor) -> torch.Tensor:
    return (x - sigma * (1 + sigma**2) ** 0.5 * v) / (1 + sigma**2)


def _flow_velocity(x: torch.Tensor, sigma, d: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity ``eps - x0`` of ``d`` at VE state ``x`` (``x_t = x / (1 + sigma)``)."""
    return (x - d) / sigma - d


def _from_flow_velocity(x: torch.Tensor, sigma, v: torch.Tensor) -> torch.Tensor:
    return (x - sigma * v) / (1 + sigma)


def guided_estimate(
    guidance: Guidance,
    x: torch.Tensor,
    sigma,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    state: dict,
) -> torch.Tensor:
    """The guided denoised estimate of one evaluation by ``guidance.method`` (see the module docstring).

    Args:
        x: ``[B, ...]`` the state evaluated (VE, ``x = x0 + sigma eps``); sigma: its level (float, 0-d or
            ``[B]``).
        d_cond, d_uncond: ``[B, ...]`` the conditional and unconditional estimates, ``x``'s dtype.
        state: the run's state, carried from one guided evaluation to the next (APG's momentum); start with ``{}``.

    Returns ``[B, ...]`` in ``d_cond``'s dtype. Reductions are per sample over every other dimension.
    """
    w, method, o = guidance.scale, guidance.method, guidance.options
    sigma = _per_sample(sigma, x)
    if method == "cfg":
        return d_uncond + w * (d_cond - d_uncond)
    dims = _sample_dims(x)
    if method == "rescale":
        v_c = _v_prediction(x, sigma, d_cond)
        v_cfg = _v_prediction(x, sigma, d_uncond + w * (d_cond - d_uncond))
        ratio = v_c.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True)
        v = o["phi"] * v_cfg * ratio + (1 - o["phi"]) * v_cfg
        return _from_v_prediction(x, sigma, v)
    if method == "apg":
        diff = d_cond - d_uncond
        if o["momentum"] is not None:
            previous = state.get("apg_average")
            diff = diff if previous is None else diff + o["momentum"] * previous
            state["apg_average"] = diff
        if o["norm_threshold"] is not None:
            norm = torch.linalg.vector_norm(diff, dim=dims, keepdim=True)
            diff = diff * torch.clamp(o["norm_threshold"] / norm, max=1.0)
        unit = d_cond / torch.linalg.vector_norm(d_cond, dim=dims, keepdim=True).clamp_min(1e-12)
        parallel = (diff * unit).sum(dim=dims, keepdim=True) * unit
        return d_cond + (w - 1) * (diff - parallel + o["eta"] * parallel)
    # cfg_zero_star
    v_c, v_u = _flow_velocity(x, sigma, d_cond), _flow_velocity(x, sigma, d_uncond)
    s_star = (v_c * v_u).sum(dim=dims, keepdim=True) / ((v_u * v_u).sum(dim=dims, keepdim=True) + 1e-8)
    return _from_flow_velocity(x, sigma, s_star * v_u + w * (v_c - s_star * v_u))


def method_weights(
    guidance: Guidance,
    x: torch.Tensor,
    sigma,
    d_cond: torch.Tensor,
    d_uncond: torch.Tensor,
    state: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`guided_estimate` as per-sample weights for the fused step: ``(U, guide)`` with the guided estimate
    ``D = guide[:, 0] x + guide[:, 1] d_cond + guide[:, 2] U`` (:func:`fastdiff.ops.guided_step_per_sample`).

    ``U`` is ``d_uncond``, or APG's running average under momentum (updated in ``state``); ``guide`` is ``[B, 3]``
    in x's accumulation dtype on its device. The method's reductions run in one pass of
    :func:`fastdiff.ops.guidance_sums`, the weights in a few ``[B]``-sized ops: nothing is read back to the host.
    """
    w, method, o = guidance.scale, guidance.method, guidance.options
    ct = ops.acc_dtype(x)
    batch = x.shape[0]
    s = torch.as_tensor(sigma, dtype=ct, device=x.device).reshape(-1).expand(batch)
    zero, one = torch.zeros_like(s), torch.ones_like(s)
    u = d_uncond
    if method == "rescale":
        # v(d) = p x + q d, the v-prediction of d; u = v(D_c), v = v(D_cfg)
        root = torch.sqrt(1 + s * s)
        p, q = 1 / (s * root), -root / s
        mix = torch.stack([p, q, zero, p, q * w, q * (1 - w)], 1)
    elif method == "apg":
        if o["momentum"] is not None:
            previous = state.get("apg_average")
            u = d_cond - d_uncond if previous is None else torch.add(d_cond - d_uncond, previous, alpha=o["momentum"])
            state["apg_average"] = u
            mix = torch.stack([zero, zero, one, zero, one, zero], 1)  # u: the average, v: D_c
        else:
            mix = torch.stack([zero, one, -one, zero, one, zero], 1)  # u: D_c - D_u, v: D_c
    else:  # cfg_zero_star: u = v_c, v = v_u, the flow velocities x / s - (1 + 1 / s) d
        mix = torch.stack([1 / s, -(1 + 1 / s), zero, 1 / s, zero, -(1 + 1 / s)], 1)
    su, sv, suu, svv, suv = ops.guidance_sums(x, d_cond, u, mix).unbind(1)
    if method == "rescale":
        n = x[0].numel()
        var_c = (suu - su * su / n) / (n - 1)
        var_cfg = (svv - sv * sv / n) / (n - 1)
        k = o["phi"] * torch.sqrt(var_c / var_cfg) + (1 - o["phi"])
        guide = torch.stack([(1 - k) / (1 + s * s), k * w, k * (1 - w)], 1)
    elif method == "apg":
        clip = one if o["norm_threshold"] is None else torch.clamp(o["norm_threshold"] / torch.sqrt(suu), max=1.0)
        along = suv / torch.sqrt(svv).clamp_min(1e-12) ** 2  # <diff, D_c> / |D_c|^2
        scaled = (w - 1) * clip
        if o["momentum"] is not None:  # D = D_c + (w - 1) clip (avg - (1 - eta) along D_c)
            guide = torch.stack([zero, 1 - scaled * (1 - o["eta"]) * along, scaled], 1)
        else:
            guide = torch.stack([zero, 1 + scaled * (1 - (1 - o["eta"]) * along), -scaled], 1)
    else:
        s_star = suv / (svv + 1e-8)
        guide = torch.stack([(1 - w) * (1 - s_star) / (1 + s), w * one, (1 - w) * s_star], 1)
    return u, guide


def zero_velocity_estimate(x: torch.Tensor, sigma) -> torch.Tensor:
    """CFG-Zero*'s zero-init: the estimate whose flow velocity is 0, ``x / (1 + sigma)`` (the flow state
    itself), so that a flow-matching Euler step leaves the state where it is."""
    return x / (1 + _per_sample(sigma, x))


# ------------------------------------------------------------------------------ the three forms of guided steps


def _host(sigmas: Sequence[float] | torch.Tensor) -> list[float]:
    return [float(v) for v in sigmas]


def interval_to_steps(interval: tuple[float, float], sigmas: Sequence[float] | torch.Tensor) -> tuple[int, int] | None:
    """The inclusive step range ``(start, stop)`` that the sigma interval ``(lo, hi]`` guides on ``sigmas``
    (``[N + 1]``, decreasing, ending in 0), or None when it guides no step. On a decreasing schedule the steps
    whose start sigma lies in the interval are contiguous."""
    lo, hi = Guidance(2.0, interval).interval
    guided = [i for i, s in enumerate(_host(sigmas)[:-1]) if lo < s <= hi]
    return (guided[0], guided[-1]) if guided else None


def steps_to_interval(steps: tuple[int, int], sigmas: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """A sigma interval ``(lo, hi]`` that guides exactly the steps ``start..stop`` (inclusive) of ``sigmas``:
    ``hi`` the start sigma of step ``start``, ``lo`` that of step ``stop + 1`` (0 after the last step)."""
    s = _host(sigmas)
    start, stop = Guidance(2.0, steps=steps).steps
    if stop >= len(s) - 1:
        raise ValueError(f"guidance steps {steps} go past the schedule's {len(s) - 1} steps")
    return s[stop + 1], s[start]


def fractions_to_steps(fractions: tuple[float, float], n: int) -> tuple[int, int] | None:
    """The inclusive step range that diffusers' guider fractions ``(start, stop)`` select among ``n`` steps
    (``int(start n) <= i < int(stop n)``), or None when they select none."""
    start, stop = Guidance(2.0, fractions=fractions).fractions
    first, end = int(start * n), min(int(stop * n), n)
    return (first, end - 1) if first < end else None


def steps_to_fractions(steps: tuple[int, int], n: int) -> tuple[float, float]:
    """diffusers' guider fractions that select exactly the steps ``start..stop`` (inclusive) of ``n``: each is
    placed half a step inside its bound, so that ``int(f n)`` lands on it despite rounding."""
    start, stop = Guidance(2.0, steps=steps).steps
    if stop >= n:
        raise ValueError(f"guidance steps {steps} go past the schedule's {n} steps")
    return (start + 0.5) / n, 1.0 if stop + 1 == n else (stop + 1.5) / n


def _pair(value, name: str) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"guidance {name} must be a pair (lo, hi), got {value!r}") from None
    return as_real(lo, f"guidance {name}[0]", finite=False), as_real(hi, f"guidance {name}[1]", finite=False)
