"""``fastdiff.sample``: run a solver over a schedule, with limited-interval guidance and NFE accounting."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff import schedules, solvers
from fastdiff.guidance import Guidance
from fastdiff.solvers import Denoised, Solver

Model = Callable[..., torch.Tensor]


@dataclass
class SampleStats:
    """What a sampling run spent. ``nfe_cond``/``nfe_uncond`` count network evaluations per branch (a
    batched cond+uncond forward counts once in each); ``forward_calls`` counts model invocations."""

    steps: int = 0
    nfe_cond: int = 0
    nfe_uncond: int = 0
    forward_calls: int = 0
    guided_steps: list[int] = field(default_factory=list)

    @property
    def nfe(self) -> int:
        return self.nfe_cond + self.nfe_uncond


def count_nfe(solver: str | Solver, sigmas, guidance: Guidance | None = None) -> tuple[int, int]:
    """The ``(nfe_cond, nfe_uncond)`` a run will spend, known before it starts."""
    s = schedules.validate(sigmas).tolist()
    per_step = solvers.get(solver).evaluations(s)
    plan = guidance.plan(s) if guidance is not None else [False] * len(per_step)
    return sum(per_step), sum(n for n, g in zip(per_step, plan) if g)


def _check_output(out: Any, x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} returned {type(out).__name__}, expected a tensor D(x; sigma)")
    if out.shape != x.shape:
        raise ValueError(f"{what} returned shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
    if not out.is_floating_point():
        raise TypeError(f"{what} returned dtype {out.dtype}, expected a floating dtype")
    if out.device != x.device:
        raise ValueError(f"{what} returned a tensor on {out.device}, but x is on {x.device}")
    return out


def _batchable(cond: Mapping, uncond: Mapping, batch: int) -> bool:
    """Whether cond and uncond kwargs can be concatenated into one forward call."""
    if cond.keys() != uncond.keys():
        return False
    for k in cond:
        c, u = cond[k], uncond[k]
        if isinstance(c, torch.Tensor) and isinstance(u, torch.Tensor):
            if c.ndim == 0 or u.ndim == 0 or c.shape[0] != batch or u.shape != c.shape or u.dtype != c.dtype:
                return False
        elif isinstance(c, torch.Tensor) or isinstance(u, torch.Tensor) or c is not u and c != u:
            return False
    return True


def _cat_kwargs(cond: Mapping, uncond: Mapping) -> dict:
    return {k: torch.cat([cond[k], uncond[k]]) if isinstance(cond[k], torch.Tensor) else cond[k] for k in cond}


def _check_inputs(model, x, sigmas) -> torch.Tensor:
    if not callable(model):
        raise TypeError("model must be callable as model(x, sigma, **cond) -> D(x; sigma)")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension first, got shape {tuple(x.shape)}")
    if isinstance(sigmas, torch.Tensor) and sigmas.device.type != "cpu" and sigmas.device != x.device:
        raise ValueError(f"sigmas are on {sigmas.device} but x is on {x.device}; keep them on the CPU or x's device")
    return schedules.validate(sigmas)


def sample(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    solver: str | Solver = "dpmpp_2m",
    guidance: Guidance | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = False,
    return_stats: bool = False,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SampleStats]:
    """Solve the probability-flow ODE from noise ``x`` along ``sigmas``.

    Args:
        model: ``model(x, sigma, **cond) -> D(x; sigma)``, with ``sigma`` a ``[B]`` tensor.
        x: initial noise already scaled by ``sigmas[0]``, shape ``[B, ...]``, floating dtype.
        sigmas: ``[N + 1]`` strictly decreasing, finite, usually ending in 0 (see :mod:`fastdiff.schedules`).
        solver: a name in :data:`fastdiff.solvers.SOLVERS` or a :class:`~fastdiff.solvers.Solver`.
        guidance: :class:`~fastdiff.Guidance`, or None for the conditional model alone.
        cond, uncond: keyword arguments for the conditional and unconditional passes (``uncond`` defaults to
            no keyword arguments).
        callback: called after every step with ``{"i", "sigma", "sigma_next", "x", "x_next", "denoised"}``,
            where ``x`` is the state at the step's start and ``denoised`` the (guided) D there.
        progress: show a tqdm progress bar.
        return_stats: also return a :class:`SampleStats` with the NFE spent.
        check_finite: raise ``FloatingPointError`` as soon as the model returns NaN or Inf (one host sync
            per evaluation).

    Returns:
        The sample at ``sigmas[-1]``, shape and dtype of ``x``; with ``return_stats``, ``(sample, stats)``.
    """
    sig = _check_inputs(model, x, sigmas).tolist()
    solver = solvers.get(solver)
    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be a fastdiff.Guidance, got {type(guidance).__name__}")
    n_steps = len(sig) - 1
    plan = guidance.plan(sig) if guidance is not None else [False] * n_steps
    if any(plan) and cond is None:
        raise ValueError("guidance needs cond: the keyword arguments of the conditional pass (e.g. class labels)")
    cond = dict(cond or {})
    uncond = dict(uncond or {})
    stats = SampleStats(steps=n_steps, guided_steps=[i for i, g in enumerate(plan) if g])
    uncond_model = guidance.unconditional_model(model) if guidance is not None else model
    batched = guidance is not None and guidance.batch and uncond_model is model and _batchable(cond, uncond, x.shape[0])
    sigma_dtype = torch.promote_types(x.dtype, torch.float32)
    step_i = 0

    def call(net: Model, xin: torch.Tensor, sigma: float, kwargs: Mapping, what: str) -> torch.Tensor:
        stats.forward_calls += 1
        s = torch.full((xin.shape[0],), sigma, dtype=sigma_dtype, device=xin.device)
        out = _check_output(net(xin, s, **kwargs), xin, what)
        if check_finite and not torch.isfinite(out).all():
            raise FloatingPointError(f"{what} returned NaN or Inf at step {step_i} (sigma={sigma:g})")
        return out

    def evaluate(xi: torch.Tensor, sigma: float) -> Denoised:
        stats.nfe_cond += 1
        if not plan[step_i]:
            return Denoised(call(model, xi, sigma, cond, "model"))
        stats.nfe_uncond += 1
        if batched:
            both = call(model, torch.cat([xi, xi]), sigma, _cat_kwargs(cond, uncond), "model (cond+uncond batch)")
            d_cond, d_uncond = both.chunk(2)
        else:
            d_cond = call(model, xi, sigma, cond, "model")
            d_uncond = call(uncond_model, xi, sigma, uncond, "unconditional model")
        return Denoised(d_cond, d_uncond, guidance.scale)

    restart = guidance is not None and guidance.restart
    state, first = solver.start(), 0
    for step_i in tqdm(range(n_steps), disable=not progress, desc=f"fastdiff {solver.name}", leave=False):
        if restart and step_i > 0 and plan[step_i] != plan[step_i - 1]:
            state, first = solver.start(), step_i  # see Guidance(restart=...)
        x_next, denoised = solver.step(step_i - first, x, sig[first:], evaluate, state)
        if callback is not None:
            callback(
                {
                    "i": step_i,
                    "sigma": sig[step_i],
                    "sigma_next": sig[step_i + 1],
                    "x": x,
                    "x_next": x_next,
                    "denoised": denoised,
                }
            )
        x = x_next
    return (x, stats) if return_stats else x
