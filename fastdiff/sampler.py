"""Sampling loops: :func:`fastdiff.sample` (functional, host schedule) and :class:`fastdiff.Sampler` (built once,
schedule and coefficients on the device, no host syncs, optionally one CUDA graph for the whole loop).

Both run the same loop (:func:`_solve`) over a :class:`Plan` fixed before it starts, with limited-interval
guidance and NFE accounting."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fastdiff import cache as fastcache
from fastdiff import denoisers, ops, schedules, solvers
from fastdiff.arguments import as_int
from fastdiff.guidance import Guidance, method_weights, zero_velocity_estimate
from fastdiff.solvers import cfg_pp
from fastdiff.solvers import Denoised, Interval, Noise, Scalar, Solver, StageRow, schedule_values

Model = Callable[..., torch.Tensor]
log = logging.getLogger("fastdiff")


@dataclass
class SampleStats:
    """What a sampling run spent. ``nfe_cond``/``nfe_uncond`` count network evaluations per branch (a
    batched cond+uncond forward counts once in each); ``forward_calls`` counts model invocations."""

    steps: int = 0
    nfe_cond: int = 0
    nfe_uncond: int = 0
    forward_calls: int = 0
    guided_steps: list[int] = field(default_factory=list)
    full_evaluations: int | None = None  # with a feature cache: forward calls of the cached model in full
    cached_evaluations: int | None = None  # and those that reused cached features

    @property
    def nfe(self) -> int:
        return self.nfe_cond + self.nfe_uncond


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


def _check_model(model) -> None:
    if not callable(model):
        raise TypeError("model must be callable as model(x, sigma, **cond) -> D(x; sigma)")


def _check_state(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension first, got shape {tuple(x.shape)}")


def _check_inputs(model, x, sigmas) -> torch.Tensor:
    _check_model(model)
    _check_state(x)
    if isinstance(sigmas, torch.Tensor) and sigmas.device.type != "cpu" and sigmas.device != x.device:
        raise ValueError(f"sigmas are on {sigmas.device} but x is on {x.device}; keep them on the CPU or x's device")
    return schedules.validate(sigmas)


def _cond_kwargs(plan: Plan, cond: Mapping | None, uncond: Mapping | None, x: torch.Tensor) -> tuple[dict, dict]:
    """``cond`` and ``uncond`` as dicts, checked once per run (never per step); guided steps need ``cond``."""
    if any(plan.guided) and cond is None:
        raise ValueError("guidance needs cond: the keyword arguments of the conditional pass (e.g. class labels)")
    return _kwargs(cond, "cond", x), _kwargs(uncond, "uncond", x)


def _kwargs(given: Mapping | None, name: str, x: torch.Tensor) -> dict:
    """A model's keyword arguments: a mapping with string keys whose tensors are per sample (first dimension the
    batch of ``x``) or 0-d. Guided steps concatenate cond's and uncond's tensors with x along that dimension, and a
    tensor of another batch would otherwise fail deep inside the model, or broadcast into a silently wrong result."""
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise TypeError(f"{name} must be a dict of keyword arguments for the model (e.g. {{'class_labels': y}}), "
                        f"got {type(given).__name__}")  # fmt: skip
    batch = x.shape[0]
    for key, value in given.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be keyword names (str), got {key!r}")
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] != batch:
            raise ValueError(f"{name}[{key!r}] has shape {tuple(value.shape)}: its first dimension must be the "
                             f"batch of x ({batch}); expand a tensor the batch shares, or pass it 0-d")  # fmt: skip
    return dict(given)


def _sigma_batch(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as the ``[B]`` tensor a model takes: a fill for a host float, a view of a device scalar."""
    if isinstance(sigma, torch.Tensor):
        return sigma.expand(x.shape[0])
    return torch.full((x.shape[0],), sigma, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _preconditioned(model) -> bool:
    """Whether a loop may call ``model.denoise`` with precomputed scalings: a
    :class:`~fastdiff.denoisers.Preconditioned` whose ``forward`` is the base one (a subclass that overrides
    ``forward`` means something else by it) and that has no hooks of its own (they run only around ``forward``)."""
    return (
        isinstance(model, denoisers.Preconditioned)
        and type(model).forward is denoisers.Preconditioned.forward
        and not (model._forward_hooks or model._forward_pre_hooks)
    )


class _Levels:
    """The noise levels at which one schedule calls its models, and what a call at each needs, made once per level
    and batch size rather than at every call: the ``[n]`` sigma batch a plain model takes, or the scalings of a
    :class:`~fastdiff.denoisers.Preconditioned` denoiser, evaluated for the whole schedule in a few vectorised ops
    on the device. A loop passes a level's index where a solver passes ``sigmas[i]`` (:meth:`Solver.step`)."""

    def __init__(self, sigmas: torch.Tensor, host: Sequence[float] | None = None):
        """``sigmas`` ``[L]``: the run's evaluation levels (:func:`level_values`) on its device in
        ``promote(x.dtype, float32)``. ``host``: their values, for messages, where they are known."""
        self.sigmas, self.host = sigmas, host
        self._values = sigmas.unbind()
        self._scalings: dict[int, list] = {}  # id(model) -> its scalings, each [count] or a constant
        self._args: dict[tuple, tuple] = {}

    def value(self, j: int) -> float | torch.Tensor:
        return self.host[j] if self.host is not None else self._values[j]

    def tensor(self, j: int) -> torch.Tensor:
        """Level ``j`` as a 0-d tensor on the run's device (no host-to-device copy)."""
        return self._values[j]

    def call(self, model: Model, x: torch.Tensor, j: int, kwargs: Mapping) -> torch.Tensor:
        """``D(x; sigma_j)`` from ``model`` with the keyword arguments ``kwargs``."""
        key = (id(model), j, x.shape[0], x.ndim)
        args = self._args.get(key)
        if args is None:
            args = self._args[key] = self._arguments(model, j, x)
        return model(x, args[0], **kwargs) if len(args) == 1 else model.denoise(x, *args, **kwargs)

    def _arguments(self, model: Model, j: int, x: torch.Tensor) -> tuple:
        if not _preconditioned(model):
            return (self._values[j].expand(x.shape[0]),)
        scalings = self._scalings.get(id(model))
        if scalings is None:
            scalings = self._scalings[id(model)] = list(model.scalings(self.sigmas))
        shape = (1,) * x.ndim  # a [1, ...] tensor broadcasts and promotes like the [B, 1, ...] of a plain call
        c_skip, c_out, c_in = (v[j].reshape(shape) if isinstance(v, torch.Tensor) else v for v in scalings[:3])
        return c_skip, c_out, c_in, scalings[3][j].expand(x.shape[0])

    def refresh(self, models: Sequence[Model]) -> None:
        """Recompute the scalings after the sigmas changed in place; the cached arguments are views of them, so
        they (and a captured graph) see the new values."""
        with torch.no_grad():
            for model in models:
                old = self._scalings.get(id(model))
                if old is not None:
                    for kept, new in zip(old, model.scalings(self.sigmas)):
                        if isinstance(kept, torch.Tensor):
                            kept.copy_(new)


class _Evaluator:
    """The model calls of one run: the conditional pass alone, or both passes (one batched forward where the
    keyword arguments allow it) and the guided estimate. Counts what it spends. ``j`` is a level's index in
    ``levels``."""

    def __init__(
        self, model: Model, uncond_model: Model, guidance: Guidance | None, plan: Plan, cond: dict, uncond: dict,
        batch: int, levels: _Levels,
    ):  # fmt: skip
        self.model, self.uncond_model, self.levels = model, uncond_model, levels
        self.w = guidance.scale if guidance is not None else 1.0
        # A guidance method other than plain CFG gives per-sample weights of the guided estimate here
        # (guidance.method_weights), which the step op applies; its run state (APG's momentum) lives for one run.
        self.method = guidance if guidance is not None and not guidance.plain else None
        self.zero_init = guidance.options.get("zero_init_steps", 0) if self.method is not None else 0
        self.method_state: dict = {}
        self.cond, self.uncond = cond, uncond
        guide = any(plan.guided) and guidance.batch
        self.both = (
            _cat_kwargs(cond, uncond) if guide and uncond_model is model and _batchable(cond, uncond, batch) else None
        )
        self.check_finite = False
        self.cache_run: fastcache.CacheRun | None = None
        self.step = 0
        self.nfe_cond = self.nfe_uncond = self.calls = 0

    def _call(self, net: Model, x: torch.Tensor, j: int, kwargs: Mapping, what: str):
        self.calls += 1
        out = _check_output(self.levels.call(net, x, j, kwargs), x, what)
        if self.check_finite and not torch.isfinite(out).all():
            raise FloatingPointError(f"{what} returned NaN or Inf at step {self.step} "
                                     f"(sigma={float(self.levels.value(j)):g})")  # fmt: skip
        return out

    def _cache_at(self, k: int, passes: tuple[str, ...]) -> None:
        """Tell the run's feature cache which evaluation and passes the next call of ``model`` is."""
        if self.cache_run is not None:
            self.cache_run.at(k, passes)

    def __call__(self, x: torch.Tensor, j: int, guided: bool) -> Denoised:
        k = self.nfe_cond
        self.nfe_cond += 1
        if not guided:
            self._cache_at(k, ("cond",))
            out = Denoised(self._call(self.model, x, j, self.cond, "model"))
        else:
            self.nfe_uncond += 1
            if self.both is not None:
                self._cache_at(k, ("cond", "uncond"))
                d_cond, d_uncond = self._call(
                    self.model, torch.cat([x, x]), j, self.both, "model (cond+uncond batch)"
                ).chunk(2)
            else:
                self._cache_at(k, ("cond",))
                d_cond = self._call(self.model, x, j, self.cond, "model")
                if self.uncond_model is self.model:  # a separate unconditional model has no cache
                    self._cache_at(k, ("uncond",))
                d_uncond = self._call(self.uncond_model, x, j, self.uncond, "unconditional model")
            if self.method is None:
                return Denoised(d_cond, d_uncond, self.w)
            u, guide = method_weights(self.method, x, self.levels.tensor(j), d_cond, d_uncond, self.method_state)
            out = Denoised(d_cond, u, self.w, guide)
        if self.step < self.zero_init:  # CFG-Zero*: the first steps' estimates have zero velocity
            return Denoised(zero_velocity_estimate(x, self.levels.value(j)).to(out.cond.dtype))
        return out


@dataclass(frozen=True)
class Plan:
    """The structure of a run, fixed before it starts, so that no branch in the loop reads a device value.

    ``guided[i]``: step ``i`` runs the unconditional pass. ``starts[i]``: the step at which step ``i``'s solver
    history began (0, or where guidance switched on or off under ``Guidance(restart=True)``).
    ``evaluations[i]``: model evaluations of step ``i`` per branch. ``final_zero``: the schedule ends in 0.
    ``points[i]``: the evaluation levels of step ``i`` (see :func:`level_values`): schedule entry ``k`` is level
    ``k``, and the solver's points between entries (DPM-Solver-2's midpoints) are the levels after the schedule's.
    ``draws[i][j]``: stage ``j`` of step ``i`` draws noise.
    """

    guided: tuple[bool, ...]
    starts: tuple[int, ...]
    evaluations: tuple[int, ...]
    final_zero: bool
    points: tuple[tuple[int, ...], ...] = ()
    draws: tuple[tuple[bool, ...], ...] = ()

    @property
    def steps(self) -> int:
        return len(self.guided)

    @property
    def nfe(self) -> tuple[int, int]:
        """``(nfe_cond, nfe_uncond)`` of one run."""
        return sum(self.evaluations), sum(n for n, g in zip(self.evaluations, self.guided) if g)

    @property
    def scheduled(self) -> int:
        """How many of the schedule's entries are evaluation levels: all but a final 0."""
        return self.steps + (0 if self.final_zero else 1)

    @property
    def noisy(self) -> bool:
        """Whether any stage draws noise."""
        return any(any(d) for d in self.draws)


def make_plan(solver: str | Solver, sigmas: Sequence[float], guidance: Guidance | None = None) -> Plan:
    """The :class:`Plan` of a run over the host values of a schedule."""
    solver, sig = solvers.get(solver), [float(v) for v in sigmas]
    guided = guidance.plan(sig) if guidance is not None else [False] * (len(sig) - 1)
    restart = guidance is not None and guidance.restart
    starts, first = [], 0
    for i in range(len(guided)):
        if restart and i > 0 and guided[i] != guided[i - 1]:
            first = i  # see Guidance(restart=...)
        starts.append(first)
    scheduled = len(guided) + (0 if sig[-1] == 0 else 1)
    points, draws, extra = [], [], 0
    for i, first in enumerate(starts):
        ids = []
        for p in solver.points(sig[first:], i - first):
            if isinstance(p, int):
                ids.append(p + first)
            else:
                ids.append(scheduled + extra)
                extra += 1
        points.append(tuple(ids))
        draws.append(tuple(st.noise is not None for st in solver.stages(sig[first:], i - first)))
    evaluations = tuple(len(p) for p in points)
    return Plan(tuple(guided), tuple(starts), evaluations, sig[-1] == 0, tuple(points), tuple(draws))


def level_values(solver: Solver, plan: Plan, model_sigmas: Sequence[Scalar]) -> list[Scalar]:
    """The run's evaluation levels in :class:`Plan` order: the schedule's model sigmas but a final 0, then the
    solver's points between them, computed from the model sigmas (host floats, or 0-d tensors of a device schedule
    with its final 0 as ``0.0``, :func:`fastdiff.solvers.schedule_values`)."""
    levels = list(model_sigmas[: plan.scheduled])
    for i, first in enumerate(plan.starts):
        levels += [p for p in solver.points(model_sigmas[first:], i - first) if not isinstance(p, int)]
    return levels


def _level_tensor(solver: Solver, plan: Plan, model_sigmas: torch.Tensor) -> torch.Tensor:
    """:func:`level_values` of a schedule tensor, as one tensor on its device (differentiable with respect to it)."""
    values = level_values(solver, plan, schedule_values(model_sigmas, plan.final_zero))
    return torch.stack([v if isinstance(v, torch.Tensor) else model_sigmas.new_full((), v) for v in values])


def noise_intervals(solver: Solver, plan: Plan, sigmas: Sequence[float]) -> list[list[Interval | None]]:
    """Per step and stage, the interval a drawing stage asks the noise source for (host values)."""
    return [[st.noise for st in solver.stages(sigmas[first:], i - first)] for i, first in enumerate(plan.starts)]


def count_nfe(solver: str | Solver, sigmas, guidance: Guidance | None = None) -> tuple[int, int]:
    """The ``(nfe_cond, nfe_uncond)`` a run will spend, known before it starts."""
    return make_plan(solver, schedules.validate(sigmas).tolist(), guidance).nfe


def plan_coefficients(
    solver: Solver, sigmas: torch.Tensor, plan: Plan, w: float = 1.0
) -> tuple[torch.Tensor, list[list[int]]]:
    """Every step's op coefficients for a run, on ``sigmas``' device, differentiable with respect to them.

    Returns ``(table, n_history)`` as :meth:`Solver.coefficient_tensor`, ``table`` ``[N, S, 6 + MAX_HISTORY]``,
    with each history segment of ``plan`` (see :class:`Plan`) solved from its own start, as the host path does.
    """
    tables, n_history = [], []
    for first in sorted(set(plan.starts)):
        count = plan.starts.count(first)
        table, nh = solver.coefficient_tensor(sigmas[first:], w, plan.final_zero)
        tables.append(table[:count])
        n_history += nh[:count]
    width = max(t.shape[1] for t in tables)
    tables = [torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in tables]
    return torch.cat(tables), n_history


def _solve(
    solver: Solver,
    plan: Plan,
    x: torch.Tensor,
    stages_of: Callable[[int], Sequence],
    evaluate: _Evaluator,
    noise: Noise | None,
    progress: bool = False,
    on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The loop both sampling paths share: host :class:`Stage` s, or :class:`StageRow` s of a device table. The
    solver evaluates at the plan's level indices (the evaluator maps them to noise levels) and draws its noise from
    ``noise``. Its only branches are on ``plan``."""
    state: dict = {}
    steps = range(plan.steps)
    for i in tqdm(steps, disable=not progress, desc=f"fastdiff {solver.name}", leave=False) if progress else steps:
        first = plan.starts[i]
        if first == i:
            state = solver.start()
        evaluate.step = i
        guided = plan.guided[i]
        x_next, d = solver.step(
            i - first, x, None, lambda xi, j, g=guided: evaluate(xi, j, g), state, stages_of(i), plan.points[i], noise
        )
        if on_step is not None:
            on_step(i, x, x_next, d)
        x = x_next
    return x


def _rows(
    table: torch.Tensor, n_history: list[list[int]], intervals: list[list[Interval | None]]
) -> list[list[StageRow]]:
    """Every stage's coefficients ``table[i, j, : 6 + K]`` (:func:`plan_coefficients`) with its noise interval, made
    once per table: views on a device (the kernel reads them there; a captured graph replays values written in
    place), host values for a CPU table that needs no gradient (the CPU kernel takes them as they are)."""
    if table.device.type == "cpu" and not table.requires_grad:
        host = table.tolist()
        coef = lambda i, j, k: host[i][j][: 6 + k]  # noqa: E731
    else:
        coef = lambda i, j, k: table[i, j, : 6 + k]  # noqa: E731
    return [[StageRow(coef(i, j, k), intervals[i][j]) for j, k in enumerate(nh)] for i, nh in enumerate(n_history)]


class BrownianDraws:
    """Standard normal noise for a run's noise intervals, k-diffusion's ``noise_sampler(sigma, sigma_next)``, from
    fresh draws ``fresh() -> tensor``: where an interval extends the one drawn just before from the same start
    (DPM-Solver++ SDE asks for ``(sigma, sigma_s)``, then ``(sigma, sigma_next)``), its noise is the normalised
    increment of the same Brownian path in sigma, as a Brownian tree gives it::

        z = (sqrt(|s - a|) z_prev + sqrt(|b - s|) z_fresh) / sqrt(|b - a|)   for (a, s) then (a, b)

    Every other interval gets a fresh draw, so one draw per call, in call order, as ``torch.randn_like`` would
    give them. The intervals are host values, so the arithmetic is a fixed sequence of device ops (capturable)."""

    def __init__(self, fresh: Callable[[], torch.Tensor]):
        self.fresh = fresh
        self.last: tuple[float, float, torch.Tensor] | None = None

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        z = self.fresh()
        if self.last is not None:
            start, s, prev = self.last
            if start == a and (b - s) * (s - a) > 0:  # s lies strictly between a and b
                z = (abs(s - a) ** 0.5 * prev + abs(b - s) ** 0.5 * z) / abs(b - a) ** 0.5
        self.last = (a, b, z)
        return z


def _noise_source(x: torch.Tensor, noise_sampler: Callable | None, generator: torch.Generator | None) -> Noise:
    """What the drawing stages of a run take their noise from: ``noise_sampler(sigma, sigma_next)`` (k-diffusion's
    convention; a tensor like x), or standard normals drawn on x's device from ``generator`` (torch's global
    generator when None: the draws of ``torch.randn_like(x)``, as k-diffusion makes them), made increments of one
    Brownian path where a step's intervals nest (:class:`BrownianDraws`)."""
    if noise_sampler is not None and generator is not None:
        raise ValueError("give either noise_sampler or generator, not both")
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError("noise_sampler must be callable as noise_sampler(sigma, sigma_next) -> noise like x")

        def sampled(interval: Interval) -> torch.Tensor:
            z = noise_sampler(*interval)
            if not isinstance(z, torch.Tensor) or z.shape != x.shape or not z.is_floating_point():
                got = f"shape {tuple(z.shape)} {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
                raise ValueError(f"noise_sampler returned {got}; expected a floating tensor of x's shape "
                                 f"{tuple(x.shape)}")  # fmt: skip
            return z.to(device=x.device, dtype=x.dtype)

        return sampled
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator is on {generator.device} but x is on {x.device}; draw on x's device")
    draws = BrownianDraws(fresh_normals(x, generator))
    return lambda interval: draws(*interval)


def fresh_normals(x: torch.Tensor, generator: torch.Generator | None = None) -> Callable[[], torch.Tensor]:
    """Independent standard normal draws shaped like ``x`` on its device and dtype, from ``generator`` (torch's
    global generator when None, so each draw is ``torch.randn_like(x)``'s)."""
    shape, dtype, device = x.shape, x.dtype, x.device
    return lambda: torch.randn(shape, generator=generator, dtype=dtype, device=device)


def _check_schedule_for(model: Model, sigmas: Sequence[float]) -> None:
    """Let a model refuse a schedule before sampling starts (``VPDenoiser`` has a bounded timestep grid)."""
    check = getattr(model, "check_sigmas", None)
    if callable(check):
        check(sigmas)


@torch.no_grad()
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
    cuda_graph: bool = False,
    compile: bool | dict = False,
    eval_sigmas: torch.Tensor | None = None,
    noise_sampler: Callable[[Any, Any], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    cache: str | fastcache.Cache | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SampleStats]:
    """Solve the probability-flow ODE, or its stochastic counterpart, from noise ``x`` along ``sigmas``.

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
        cuda_graph: run the whole loop as one captured CUDA graph (see :class:`Sampler`; CUDA tensors only).
        compile: ``torch.compile`` the model (a dict gives ``torch.compile``'s options); see :class:`Sampler`.
        eval_sigmas: ``[N + 1]`` noise levels at which the model is called, when they differ from the ones the
            solver's coefficients use (LD3's decoupled evaluation times; :func:`fastdiff.ld3.load_schedule`).
        noise_sampler: for a stochastic solver, ``noise_sampler(sigma, sigma_next)`` returns the standard normal
            noise of a step, a tensor like ``x`` (k-diffusion's convention; the sigmas arrive as host floats), e.g.
            a Brownian tree's increments.
        generator: for a stochastic solver without ``noise_sampler``, the ``torch.Generator`` (on x's device) the
            noise is drawn from; by default torch's global generator, whose draws are ``torch.randn_like(x)``'s,
            so a run seeded with ``torch.manual_seed`` draws what k-diffusion draws.
        cache: a feature cache (:mod:`fastdiff.cache`: an object, or a spec such as ``"deepcache:3"``); a
            calibrated first-block cache calibrates on the first samples of ``x`` first (seeded noise of its own).

    Returns:
        The sample at ``sigmas[-1]``, shape and dtype of ``x``; with ``return_stats``, ``(sample, stats)``.

    Sampling is inference: nothing is recorded for autograd, whatever the model's parameters require. For a loop
    that is differentiable with respect to the noise, the schedule or the coefficients, use :meth:`Sampler.run`.
    """
    if cuda_graph or compile:
        if callback is not None or check_finite:
            raise ValueError("callback and check_finite read every step on the host; they cannot run with "
                             "cuda_graph=True or compile=")  # fmt: skip
        sampler = Sampler(
            model, solver=solver, sigmas=sigmas, guidance=guidance, cuda_graph=cuda_graph, compile=compile,
            eval_sigmas=eval_sigmas, cache=cache,
        )  # fmt: skip
        out = sampler.sample(x, cond, uncond, noise_sampler=noise_sampler, generator=generator)
        return (out, sampler.stats()) if return_stats else out

    sig_t = _check_inputs(model, x, sigmas)
    sig = sig_t.tolist()
    sig_model = sig if eval_sigmas is None else schedules.check_eval_sigmas(eval_sigmas, sig_t).tolist()
    _check_guidance(guidance)
    solver = cfg_pp.for_guidance(solvers.get(solver), guidance)
    _check_schedule_for(model, sig_model)
    plan = make_plan(solver, sig, guidance)
    uncond_model = guidance.unconditional_model(model) if guidance is not None else model
    host_levels = [float(v) for v in level_values(solver, plan, sig_model)]
    level_sigmas = torch.tensor(host_levels, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    levels = _Levels(level_sigmas, host_levels)
    evaluate = _Evaluator(model, uncond_model, guidance, plan, *_cond_kwargs(plan, cond, uncond, x), x.shape[0], levels)
    evaluate.check_finite = check_finite
    noise = _noise_source(x, noise_sampler, generator)

    def on_step(i, x, x_next, d):
        callback({"i": i, "sigma": sig[i], "sigma_next": sig[i + 1], "x": x, "x_next": x_next, "denoised": d})

    def stages_of(i):
        return solver.stages(sig[plan.starts[i] :], i - plan.starts[i])

    cache = fastcache.parse(cache)
    if fastcache.needs_calibration(cache, sum(plan.evaluations)):
        xs, cs, us = fastcache.calibration_inputs(cache, x, evaluate.cond, evaluate.uncond)
        cache.calibrate(lambda: sample(
            model, xs, sigmas, solver=solver, guidance=guidance, cond=cs, uncond=us, eval_sigmas=eval_sigmas,
            cache=cache, generator=_calibration_generator(x),
        ))  # fmt: skip
    blocks = fastcache.adapter_for(model, cache) if cache is not None else None
    with _cache_attached(cache, blocks, plan, evaluate, x.shape[0]):
        x = _solve(solver, plan, x, stages_of, evaluate, noise, progress, on_step if callback is not None else None)
    if not return_stats:
        return x
    stats = SampleStats(plan.steps, evaluate.nfe_cond, evaluate.nfe_uncond, evaluate.calls)
    stats.guided_steps = [i for i, g in enumerate(plan.guided) if g]
    if evaluate.cache_run is not None:
        stats.full_evaluations, stats.cached_evaluations = evaluate.cache_run.counts()
    return x, stats


def _calibration_generator(x: torch.Tensor) -> torch.Generator:
    """The calibration run's own seeded noise: it must not advance the generator the caller samples from."""
    return torch.Generator(device=x.device).manual_seed(0)


@contextlib.contextmanager
def _cache_attached(
    cache: fastcache.Cache | None, blocks: fastcache.Blocks | None, plan: Plan, evaluate: _Evaluator, batch: int
):
    """While the loop runs: ``cache``'s stand-ins in the network's ``blocks``, and ``evaluate`` telling it each
    call."""
    if cache is None:
        yield
        return
    with fastcache.attached(cache, blocks, sum(plan.evaluations), batch) as run:
        evaluate.cache_run = run
        yield


def _check_guidance(guidance) -> None:
    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be a fastdiff.Guidance, got {type(guidance).__name__}")


class CaptureError(RuntimeError):
    """The sampling loop could not be captured in a CUDA graph (the eager loop still works)."""


def capture_graph(
    fn: Callable[[], Any], device: torch.device, warmup: int = 1, generator: torch.Generator | None = None
) -> tuple[Any, Any]:
    """Run ``fn()`` ``warmup`` times on a side stream (lazy initialisation such as cuBLAS handles, cuDNN autotuning
    or compilation must not happen under capture), then capture one call in a CUDA graph. Returns ``(graph,
    output of the captured call)``; ``graph.replay()`` reruns it. ``generator``: a CUDA generator ``fn`` draws
    from (the device's default generator needs nothing), registered with the graph so that each replay advances it
    and draws anew. Raises :class:`CaptureError` when the capture fails; errors of the warm-up propagate as they
    are."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        register = getattr(graph, "register_generator_state", None)
        if register is None:
            raise CaptureError(f"this torch ({torch.__version__}) cannot capture draws from a torch.Generator of "
                               "your own in a CUDA graph; leave generator=None to draw from the device's default "
                               "generator (seed it with torch.cuda.manual_seed)")  # fmt: skip
        register(generator)
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as exc:
        cause = f"{exc}" + (f" (after: {exc.__context__})" if exc.__context__ is not None else "")
        raise CaptureError(
            f"the sampling loop could not be captured in a CUDA graph: {cause}. A capturable model does not "
            "read device values on the host (.item(), .cpu(), .tolist(), printing a tensor, Python branches on "
            "tensor values) and does not copy CPU tensors to the GPU inside forward. The same loop runs "
            "eagerly with cuda_graph=False."
        ) from exc
    return graph, out


@dataclass
class _Buffer:
    """A :class:`Sampler`'s schedule on one device and dtype: the model sigmas ``[N + 1]``, the coefficient table
    ``[N, S, 6 + MAX_HISTORY]``, and what the loop derives from them once (levels, per-stage rows)."""

    sigmas: torch.Tensor
    table: torch.Tensor
    levels: _Levels
    rows: list[list[StageRow]]


@dataclass
class _Graph:
    key: tuple
    graph: Any  # torch.cuda.CUDAGraph
    x: torch.Tensor
    cond: dict
    uncond: dict
    out: torch.Tensor
    trajectory: torch.Tensor | None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _signature(x: torch.Tensor, cond: Mapping, uncond: Mapping, trajectory: bool, generator=None) -> tuple:
    """What a captured graph is valid for: tensor shapes, dtypes and devices, non-tensor values, whether it
    records the trajectory, and which generator it draws from."""

    def of(kwargs):
        return tuple(
            (k, (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else ("value", v))
            for k, v in sorted(kwargs.items())
        )

    return tuple(x.shape), x.dtype, x.device, of(cond), of(uncond), trajectory, id(generator)


class Sampler:
    """A sampling loop built once and run many times, with its schedule and coefficients on the device.

    The object form of :func:`sample`. At build it fixes the :class:`Plan` (which steps run the unconditional
    pass, where multistep history restarts, how many evaluations each step makes) and evaluates every step's
    coefficients (:func:`plan_coefficients`); per device they live in buffers that the loop reads in place. The
    loop therefore has no ``.item()``, no ``.cpu()`` and no branch on a device value, which is what lets it run
    without host syncs and be captured, model calls included, in one CUDA graph.

    Args:
        model: ``model(x, sigma, **cond) -> D(x; sigma)``; ``sigma`` arrives as a ``[B]`` view of a device
            scalar. A model may define ``check_sigmas(sigmas)`` to refuse a schedule at build time.
        solver: a solver name or :class:`~fastdiff.solvers.Solver`.
        sigmas: ``[N + 1]`` decreasing schedule (fixed or learned), on any device; see :meth:`set_sigmas`.
        guidance: :class:`~fastdiff.Guidance`; a separate ``uncond_model`` and batched cond+uncond both work.
        shape: the batch shape ``[B, ...]`` this sampler is for; other shapes are then refused. Without it any
            shape runs, and a captured graph is captured again when the shape changes.
        cuda_graph: :meth:`sample` replays one CUDA graph of the whole loop, captured on first use (or by
            :meth:`capture`) and again whenever the input shapes, dtypes, non-tensor keyword arguments or the
            plan change. CUDA tensors only.
        compile: ``torch.compile`` the model (and a separate unconditional model); a dict is passed to
            ``torch.compile`` as options. Composes with ``cuda_graph`` (compilation happens in the warm-up).
        warmup: eager runs before a capture, so that lazy initialisation (cuBLAS, cuDNN autotuning,
            compilation) happens outside it.
        eval_sigmas: ``[N + 1]`` noise levels at which the model is called, when they differ from ``sigmas``
            (LD3's decoupled evaluation times); the coefficients always use ``sigmas``.

    Example::

        sampler = fastdiff.Sampler(model, solver="heun", sigmas=karras(32, 0.002, 80),
                                   guidance=fastdiff.Guidance(2.0, interval=(0.28, 2.9)), cuda_graph=True)
        images = sampler.sample(torch.randn(8, 3, 64, 64, device="cuda") * 80, cond={"class_labels": y})
    """

    def __init__(
        self,
        model: Model,
        *,
        solver: str | Solver = "dpmpp_2m",
        sigmas: torch.Tensor | Sequence[float],
        guidance: Guidance | None = None,
        shape: Sequence[int] | None = None,
        cuda_graph: bool = False,
        compile: bool | dict = False,
        warmup: int = 2,
        eval_sigmas: torch.Tensor | Sequence[float] | None = None,
        cache: str | fastcache.Cache | None = None,
    ):
        _check_model(model)
        _check_guidance(guidance)
        self.cache = fastcache.parse(cache)
        if self.cache is not None and self.cache.dynamic and cuda_graph:
            raise ValueError(f"cache={self.cache.spec()!r} decides at every evaluation from a value it reads back to "
                             "the host, which a CUDA graph cannot do: use a calibrated plan (drop ':dynamic') or "
                             "cuda_graph=False")  # fmt: skip
        if self.cache is not None and compile:
            raise ValueError("cache= and compile= do not compose: the cache swaps blocks of the network in and out "
                             "between evaluations, which would recompile the model")  # fmt: skip
        # Found once, here: a network without an adapter is refused at build.
        self._cache_blocks = fastcache.adapter_for(model, self.cache) if self.cache is not None else None
        if isinstance(compile, dict) and compile.get("mode") in ("reduce-overhead", "max-autotune") and cuda_graph:
            raise ValueError(f"compile mode {compile['mode']!r} captures its own CUDA graphs; with cuda_graph=True "
                             "use the default mode (the whole loop is captured here)")  # fmt: skip
        self.solver = cfg_pp.for_guidance(solvers.get(solver), guidance)
        self.guidance = guidance
        self.shape = None if shape is None else tuple(as_int(v, "shape entries", 1) for v in shape)
        self.cuda_graph = bool(cuda_graph)
        self.warmup = as_int(warmup, "warmup", 0)
        self._raw_model = model
        uncond_model = guidance.unconditional_model(model) if guidance is not None else model
        if compile:
            options = compile if isinstance(compile, dict) else {}
            compiled = torch.compile(model, **options)
            uncond_model = compiled if uncond_model is model else torch.compile(uncond_model, **options)
            model = compiled
        self.model, self.uncond_model = model, uncond_model
        self._buffers: dict[tuple, _Buffer] = {}
        self._graph: _Graph | None = None
        self._batched = False
        self._cache_counts: tuple[int, int] | None = None
        self.plan: Plan | None = None
        self.n_history: list[list[int]] = []
        self.set_sigmas(sigmas, eval_sigmas)

    # ------------------------------------------------------------------------------------------- schedule

    def set_sigmas(
        self, sigmas: torch.Tensor | Sequence[float], eval_sigmas: torch.Tensor | Sequence[float] | None = None
    ) -> None:
        """Replace the schedule (e.g. after an LD3 update). The host reads it once, here, to fix the plan.
        With the same plan the new coefficients are copied into the existing buffers, so a captured graph
        replays the new schedule without a recapture; a different plan makes the next :meth:`sample`
        capture again. The schedule is copied: later changes to ``sigmas`` do not reach the sampler."""
        sig = schedules.validate(sigmas).detach()
        host = sig.tolist()
        model_sig = sig if eval_sigmas is None else schedules.check_eval_sigmas(eval_sigmas, sig).to(sig.device)
        host_model_sig = model_sig.tolist()
        _check_schedule_for(self._raw_model, host_model_sig)
        plan = make_plan(self.solver, host, self.guidance)
        w = self.guidance.scale if self.guidance is not None else 1.0
        table, n_history = plan_coefficients(self.solver, sig, plan, w)
        same = plan == self.plan and n_history == self.n_history
        self.plan, self.n_history = plan, n_history
        self._sigmas, self._model_sigmas, self._table = sig.clone(), model_sig.clone(), table
        self._host_levels = [float(v) for v in level_values(self.solver, plan, host_model_sig)]
        self._intervals = noise_intervals(self.solver, plan, host)
        if same:
            for buf in self._buffers.values():
                buf.sigmas.copy_(model_sig)
                buf.table.copy_(table)
                buf.levels.sigmas.copy_(_level_tensor(self.solver, plan, buf.sigmas))
                buf.levels.refresh([self.model, self.uncond_model])
                buf.rows = _rows(buf.table, n_history, self._intervals)  # host rows are copies
        else:
            self._buffers.clear()
            self._graph = None

    @property
    def sigmas(self) -> torch.Tensor:
        """The schedule, ``[N + 1]`` float64 (a copy)."""
        return self._sigmas.clone()

    @property
    def nfe(self) -> tuple[int, int]:
        """``(nfe_cond, nfe_uncond)`` of one :meth:`sample` call."""
        return self.plan.nfe

    def stats(self) -> SampleStats:
        """What one :meth:`sample` call spends (``forward_calls`` as of the last run's batching)."""
        cond, uncond = self.plan.nfe
        guided = [i for i, g in enumerate(self.plan.guided) if g]
        stats = SampleStats(self.plan.steps, cond, uncond, cond + (0 if self._batched else uncond), guided)
        if self.cache is not None and self._cache_counts is not None:
            stats.full_evaluations, stats.cached_evaluations = self._cache_counts
        return stats

    def _buffer(self, x: torch.Tensor) -> _Buffer:
        """The schedule on x's device in the run's dtype, and what the loop derives from it, made once."""
        key = (x.device, ops.acc_dtype(x))  # the kernels' coefficient dtype
        buf = self._buffers.get(key)
        if buf is None:
            # copy=True: a buffer must never alias the caller's tensor or the float64 master.
            sig, table = (t.to(x.device, key[1], copy=True) for t in (self._model_sigmas, self._table))
            levels = _Levels(_level_tensor(self.solver, self.plan, sig), self._host_levels)
            buf = self._buffers[key] = _Buffer(sig, table, levels, _rows(table, self.n_history, self._intervals))
        return buf

    def _device_buffers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(model sigmas [N + 1], table [N, S, 6 + MAX_HISTORY])`` on x's device in the run's dtype."""
        buf = self._buffer(x)
        return buf.sigmas, buf.table

    # ----------------------------------------------------------------------------------------------- runs

    def _check_x(self, x: torch.Tensor) -> None:
        _check_state(x)
        if self.shape is not None and tuple(x.shape) != self.shape:
            raise ValueError(f"this Sampler was built for shape {self.shape}, got x of shape {tuple(x.shape)}; "
                             "build one for the new shape, or leave shape=None")  # fmt: skip
        if self.cuda_graph and not x.is_cuda:
            raise ValueError(f"cuda_graph=True needs CUDA tensors, x is on {x.device}")

    def run(
        self,
        x: torch.Tensor,
        cond: dict,
        uncond: dict,
        sigmas: torch.Tensor,
        table: torch.Tensor,
        trajectory: torch.Tensor | None = None,
        *,
        noise_sampler: Callable[[Any, Any], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The eager loop over explicit device tensors: ``sigmas [N + 1]``, where the model is evaluated, and
        ``table``, the coefficients (as :func:`plan_coefficients` makes them for this sampler's plan; LD3 passes a
        differentiable one). Differentiable with respect to x, sigmas and table: unlike :meth:`sample`, it records
        autograd where grad mode is on. With ``trajectory`` ``[N + 1, B, ...]``, every step's state is written into
        it (row 0 is ``x``). A stochastic solver's noise as in :meth:`sample`."""
        levels = _Levels(_level_tensor(self.solver, self.plan, sigmas))
        rows = _rows(table, self.n_history, self._intervals)
        return self._run(x, cond, uncond, levels, rows, _noise_source(x, noise_sampler, generator), trajectory)

    def _run(
        self, x: torch.Tensor, cond: dict, uncond: dict, levels: _Levels, rows: list[list[StageRow]], noise: Noise,
        trajectory: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        evaluate = _Evaluator(self.model, self.uncond_model, self.guidance, self.plan, cond, uncond, x.shape[0], levels)
        self._batched = evaluate.both is not None

        def record(i, x, x_next, d):
            trajectory[i + 1].copy_(x_next)

        if trajectory is not None:
            trajectory[0].copy_(x)
        with _cache_attached(self.cache, self._cache_blocks, self.plan, evaluate, x.shape[0]):
            out = _solve(
                self.solver, self.plan, x, rows.__getitem__, evaluate, noise,
                on_step=record if trajectory is not None else None,
            )  # fmt: skip
        if evaluate.cache_run is not None:
            self._cache_counts = evaluate.cache_run.counts()
        return out

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
        *,
        trajectory: bool = False,
        noise_sampler: Callable[[Any, Any], torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Sample from noise ``x`` ``[B, ...]`` (scaled by ``sigmas[0]``); returns ``[B, ...]`` in x's dtype,
        a new tensor (a replayed graph's output is copied out, so later replays do not overwrite it). With
        ``trajectory=True`` also the state after every step, ``[N + 1, B, ...]`` (row 0 is ``x``). Records nothing
        for autograd (:meth:`run` is the differentiable loop).

        A stochastic solver draws its noise from ``noise_sampler(sigma, sigma_next)`` (k-diffusion's convention;
        host floats in, a tensor like ``x`` out), or from ``generator`` on x's device (torch's global generator
        by default). In a captured CUDA graph the noise is drawn inside the graph, from ``generator`` (or the
        device's default generator): every replay draws fresh noise, and reseeding the generator before a call
        reproduces it. A ``noise_sampler`` runs on the host, so it cannot be captured and is refused there."""
        self._check_x(x)
        cond, uncond = _cond_kwargs(self.plan, cond, uncond, x)
        self._calibrate(x, cond, uncond)
        if self.cuda_graph:
            if noise_sampler is not None and self.plan.noisy:
                raise ValueError("a noise_sampler runs on the host between steps, so it cannot be captured in a "
                                 "CUDA graph: pass a torch.Generator (generator=) on x's device, or use "
                                 "cuda_graph=False")  # fmt: skip
            return self._replay(x, cond, uncond, trajectory, generator)
        noise = _noise_source(x, noise_sampler, generator)
        traj = x.new_empty((self.plan.steps + 1, *x.shape)) if trajectory else None
        buf = self._buffer(x)
        out = self._run(x, cond, uncond, buf.levels, buf.rows, noise, traj)
        return (out, traj) if trajectory else out

    def _calibrate(self, x: torch.Tensor, cond: dict, uncond: dict) -> None:
        """A calibrated first-block cache that has no plan for this sampler's evaluations makes one now, from a
        dynamic run on the first samples of ``x`` (with seeded noise of its own), before any capture."""
        if not fastcache.needs_calibration(self.cache, sum(self.plan.evaluations)):
            return
        xs, cs, us = fastcache.calibration_inputs(self.cache, x, cond, uncond)
        buf = self._buffer(x)
        noise = _noise_source(xs, None, _calibration_generator(x))
        self.cache.calibrate(lambda: self._run(xs, cs, us, buf.levels, buf.rows, noise))
        self._graph = None

    # ------------------------------------------------------------------------------------------ CUDA graph

    @torch.no_grad()
    def capture(
        self,
        x: torch.Tensor | None = None,
        cond: Mapping[str, Any] | None = None,
        uncond: Mapping[str, Any] | None = None,
    ) -> None:
        """Capture the whole loop in a CUDA graph now rather than on the first :meth:`sample`. ``x`` is an
        example input (its values only feed the warm-up); without it, noise of the built ``shape`` on the
        current CUDA device. Raises :class:`CaptureError` when the model cannot be captured."""
        if x is None:
            if self.shape is None:
                raise ValueError("capture() needs an example x, or a Sampler built with shape=")
            x = torch.randn(self.shape, device="cuda") * float(self._sigmas[0])
        self.cuda_graph = True
        self._check_x(x)
        cond, uncond = _cond_kwargs(self.plan, cond, uncond, x)
        self._capture(x, cond, uncond)

    def _capture(
        self, x: torch.Tensor, cond: dict, uncond: dict, trajectory: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:  # fmt: skip
        self._graph = None  # release the old graph's memory first
        static = lambda kw: {k: v.to(x.device, copy=True) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}  # noqa: E731
        sx, sc, su = x.clone(), static(cond), static(uncond)
        traj = x.new_empty((self.plan.steps + 1, *x.shape)) if trajectory else None
        buf = self._buffer(x)
        noise = _noise_source(sx, None, generator)  # drawn inside the graph: every replay draws anew

        def run():
            return self._run(sx, sc, su, buf.levels, buf.rows, noise, traj)

        if self.plan.noisy:  # warm-up draws advance the generator: rewind it, so that the first replay draws what
            # an eager run from the same seed draws
            source = generator if generator is not None else torch.cuda.default_generators[_cuda_index(x.device)]
            state = source.get_state()
        graph, out = capture_graph(run, x.device, self.warmup, generator if self.plan.noisy else None)
        if self.plan.noisy:
            source.set_state(state)
        self._graph = _Graph(_signature(x, cond, uncond, trajectory, generator), graph, sx, sc, su, out, traj)

    def _replay(self, x: torch.Tensor, cond: dict, uncond: dict, trajectory: bool, generator=None):
        key = _signature(x, cond, uncond, trajectory, generator)
        if self._graph is None or self._graph.key != key:
            if self._graph is not None:
                log.info(
                    "fastdiff.Sampler: inputs changed (%s -> %s); capturing a new CUDA graph", self._graph.key, key
                )
            self._capture(x, cond, uncond, trajectory, generator)
        g = self._graph
        g.x.copy_(x)
        for given, static in ((cond, g.cond), (uncond, g.uncond)):
            for k, v in given.items():
                if isinstance(v, torch.Tensor):
                    static[k].copy_(v)
        g.graph.replay()
        return (g.out.clone(), g.trajectory.clone()) if trajectory else g.out.clone()
