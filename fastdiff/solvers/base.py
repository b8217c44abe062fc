"""What every solver shares: the model evaluation it consumes, the stage it applies, and the :class:`Solver`
protocol the sampling loops drive.

Every step of every solver is a linear combination of the state, denoised estimates and, for the stochastic ones,
fresh noise (DESIGN.md)::

    x' = a x + sum_k b[k] term_k + c_noise z

applied by the one op :func:`fastdiff.ops.guided_step`. A solver is a pure function from the schedule to the
coefficients of its stages (:meth:`Solver.stages`, on Python floats or on 0-d tensors), the noise levels at which
each step evaluates the model (:meth:`Solver.points`), and a few lines that feed them to the op (:meth:`Solver.step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch

from fastdiff import ops


class Denoised(NamedTuple):
    """One model evaluation: conditional estimate, unconditional one (None outside the guidance interval)
    and the guidance scale. The guided estimate is ``uncond + w * (cond - uncond)``; with ``guide`` (``[B, 3]``, a
    guidance method's per-sample weights, :func:`fastdiff.guidance.method_weights`) it is ``guide[:, 0] x +
    guide[:, 1] cond + guide[:, 2] uncond`` at the evaluated state ``x``."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    w: float = 1.0
    guide: torch.Tensor | None = None


# evaluate(x, point) -> Denoised. ``point`` is a noise level, or (in fastdiff's sampling loops) the index of a level
# in the run's table of evaluation levels, which the loop's evaluator maps to the noise level.
Evaluate = Callable[[torch.Tensor, object], Denoised]
Scalar = float | torch.Tensor
Coefficients = tuple[Scalar, list[Scalar]]  # (a, b): x_next = a * x + sum_k b[k] * term_k
Interval = tuple[float, float]  # (sigma, sigma_next) of a noise draw, as k-diffusion's noise samplers take it
Noise = Callable[[Interval], torch.Tensor]  # draws standard normal noise shaped like x for one stage

# The coefficient functions take sigmas as Python floats (the sampler's host path) or as 0-d tensors (a
# schedule on a device, differentiable, as LD3 needs); these helpers serve both.


def _expm1(v: Scalar) -> Scalar:
    return torch.expm1(v) if isinstance(v, torch.Tensor) else math.expm1(v)


def _exp(v: Scalar) -> Scalar:
    return torch.exp(v) if isinstance(v, torch.Tensor) else math.exp(v)


def _sqrt(v: Scalar) -> Scalar:
    return v.clamp(min=0).sqrt() if isinstance(v, torch.Tensor) else math.sqrt(max(v, 0.0))


def _lam(sigma: Scalar) -> Scalar:
    return -torch.log(sigma) if isinstance(sigma, torch.Tensor) else -math.log(sigma)


def _is_zero(sigma: Scalar) -> bool:
    """Whether a step ends at sigma = 0. Only a Python float can be 0: :meth:`Solver.coefficient_table` passes
    a schedule's final 0 as ``0.0`` and its positive sigmas as tensors, so no branch reads a device value."""
    return not isinstance(sigma, torch.Tensor) and sigma == 0


class Stage(NamedTuple):
    """One application of the step op: ``x' = a x + sum_k b[k] term_k + c_noise z`` and history entry
    ``hx x + hd D``. ``noise``: the interval ``(sigma, sigma_next)`` at which the stage draws its noise ``z`` (what
    a noise sampler is asked for), or None for a stage that draws none; it is structure, fixed by the host schedule,
    so a device-resident loop knows which stages draw without reading a device value."""

    a: Scalar
    b: list[Scalar]
    hx: Scalar = 0.0
    hd: Scalar = 1.0
    c_noise: Scalar = 0.0
    noise: Interval | None = None


class StageRow(NamedTuple):
    """A stage as a device-resident loop holds it: ``coef``, a row ``[6 + K]`` of :meth:`Solver.coefficient_tensor`
    (K history terms, w included; a tensor that stays on its device, or its host values), and the stage's noise
    interval as in :class:`Stage`."""

    coef: torch.Tensor | list[float]
    noise: Interval | None = None


def _hx(stage: Stage | StageRow) -> Scalar:
    """A stage's ``hx``, from either form."""
    return stage.coef[2] if isinstance(stage, StageRow) else stage.hx


def _draw(noise: Noise | None, interval: Interval | None) -> torch.Tensor | None:
    if interval is None:
        return None
    if noise is None:
        raise ValueError("this solver step draws noise: pass a noise source (the sampling loops always do)")
    return noise(interval)


def _apply(
    x: torch.Tensor, den: Denoised, history: Sequence[torch.Tensor], stage: Stage | StageRow, noise: Noise | None = None
):
    """One op application. ``stage`` is a :class:`Stage` or, from a sampling loop, whose inputs are valid by
    construction, a :class:`StageRow`. A stage with a noise interval draws its noise from ``noise``."""
    z = _draw(noise, stage.noise)
    if den.guide is not None:
        if isinstance(stage, StageRow):
            coef = stage.coef
        else:
            coef = [stage.a, 1.0, stage.hx, stage.hd, stage.c_noise, *stage.b]
        n_history = (coef.numel() if isinstance(coef, torch.Tensor) else len(coef)) - 6
        return ops.guided_step_per_sample(x, den.cond, den.uncond, list(history[:n_history]), coef, den.guide, z)
    if isinstance(stage, StageRow):
        coef = stage.coef
        return ops.loop_step(x, den.cond, den.uncond, list(history[: len(coef) - 6]), coef, z)
    return ops.guided_step(
        x, den.cond, den.uncond, list(history[: len(stage.b) - 1]), a=stage.a, b=stage.b, w=den.w, hx=stage.hx,
        hd=stage.hd, noise=z, c_noise=stage.c_noise if z is not None else 0.0,
    )  # fmt: skip


class Solver:
    """Base class. A solver is stateless; per-run state lives in the dict made by :meth:`start`.

    ``stochastic``: whether the solver draws noise (with its options as given: an ancestral solver with ``eta =
    0`` draws none). Deterministic solvers serve LD3, whose student must be a function of the noise alone.
    """

    name: ClassVar[str] = ""
    ode: ClassVar[bool] = True  # integrates the probability-flow ODE (no noise term)

    @property
    def stochastic(self) -> bool:
        return False

    def points(self, sigmas: Sequence[Scalar], i: int) -> list[int | Scalar]:
        """The noise levels at which step ``i`` evaluates the model, in order: an ``int`` ``k`` is the schedule's
        entry ``k`` (where a loop calls the model at its model sigma ``k``, which LD3 may move), any other value
        is a level between the schedule's entries, computed from ``sigmas`` (floats, or 0-d tensors on a device).
        One evaluation at ``sigmas[i]`` by default."""
        return [i]

    def evaluations(self, sigmas: Sequence[float]) -> list[int]:
        """Model evaluations each step spends (before guidance doubles any of them)."""
        return [len(self.points(sigmas, i)) for i in range(len(sigmas) - 1)]

    def start(self) -> dict:
        return {"history": []}

    def stages(self, sigmas: Sequence[Scalar], i: int) -> list[Stage]:
        """The op applications of step ``i``, in order (pure function of the schedule)."""
        raise NotImplementedError

    def coefficient_table(
        self, sigmas: Sequence[Scalar] | torch.Tensor, final_zero: bool | None = None
    ) -> list[list[Stage]]:
        """Every step's stages for a whole schedule. With a float tensor of sigmas (on any device) the
        coefficients are 0-d tensors on that device that carry gradients back to the sigmas, e.g. from
        :func:`fastdiff.schedules.ld3_sigmas`; nothing is read back to the host except, when ``final_zero`` is
        None, whether the schedule ends in 0 (a valid schedule has no other 0)."""
        sig = schedule_values(sigmas, final_zero)
        return [self.stages(sig, i) for i in range(len(sig) - 1)]

    def coefficient_tensor(
        self, sigmas: torch.Tensor, w: float = 1.0, final_zero: bool | None = None
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """The whole schedule's op coefficients packed on ``sigmas``' device, for device-resident sampling.

        Returns ``(table, n_history)``: ``table`` ``[N, S, 6 + MAX_HISTORY]`` in ``sigmas``' dtype, where row
        ``[i, j]`` is stage ``j`` of step ``i`` in :func:`fastdiff.ops.guided_step_coef`'s layout ``[a, w, hx,
        hd, c_noise, b0, ..., bK]`` (zero-padded), and ``n_history[i][j]`` is that stage's history count ``K``,
        so ``table[i, j, : 6 + K]`` is the stage's ``coef``. Differentiable with respect to ``sigmas``.
        """
        table = self.coefficient_table(sigmas, final_zero)
        n_stages = max(len(stages) for stages in table)
        width = 6 + ops.MAX_HISTORY

        def entry(c: Scalar) -> torch.Tensor:  # a fill, not a host-to-device copy, for Python constants
            return c if isinstance(c, torch.Tensor) else sigmas.new_full((), c)

        def row(st: Stage) -> torch.Tensor:
            coef = [entry(c) for c in (st.a, w, st.hx, st.hd, st.c_noise, *st.b)]
            return torch.cat([torch.stack(coef), sigmas.new_zeros(width - len(coef))])

        rows = []
        for stages in table:
            rows.append(torch.stack([row(st) for st in stages] + [sigmas.new_zeros(width)] * (n_stages - len(stages))))
        return torch.stack(rows), [[len(st.b) - 1 for st in stages] for stages in table]

    def step(
        self,
        i: int,
        x: torch.Tensor,
        sigmas: Sequence[Scalar] | None,
        evaluate: Evaluate,
        state: dict,
        stages: Sequence[Stage | StageRow] | None = None,
        points: Sequence[object] | None = None,
        noise: Noise | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance ``x`` from ``sigmas[i]`` to ``sigmas[i + 1]``; returns ``(x_next, D_i)``.

        ``stages`` are step ``i``'s coefficients (:meth:`stages` by default) and ``points`` what ``evaluate`` is
        called with (the levels of :meth:`points` by default). Given both, a step does no arithmetic with
        ``sigmas``, which may then be None: fastdiff's loops pass the levels' indices as points and, from a device,
        :class:`StageRow` s, so that nothing in the step is read back to the host. ``noise`` draws the noise of
        the stages that have a noise interval.
        """
        raise NotImplementedError

    def _points(self, sigmas: Sequence[Scalar] | None, i: int, points: Sequence[object] | None) -> Sequence[object]:
        """The points of step ``i`` as :meth:`step` passes them to ``evaluate``: the loop's, or noise levels."""
        if points is not None:
            return points
        return [sigmas[p] if isinstance(p, int) else p for p in self.points(sigmas, i)]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class OneStage(Solver):
    """Shared driver of solvers whose step is one evaluation and one op application, with a history of the last
    ``keep`` denoised estimates, newest first."""

    keep: ClassVar[int] = 1

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        hist = state["history"]
        stages = stages or self.stages(sigmas, i)
        (p,) = self._points(sigmas, i, points)
        x_next, d = _apply(x, evaluate(x, p), hist, stages[0], noise)
        state["history"] = [d] + hist[: self.keep - 1]
        return x_next, d


class TwoStage(Solver):
    """Shared driver of the two-stage single-step methods: the first evaluation feeds a predictor stage, whose
    history entry is that evaluation's ``D``; the second, at the predicted state, feeds a corrector stage that
    starts again from ``x`` and combines both evaluations. A step with one stage (into sigma = 0) is the
    predictor alone."""

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        stages = stages or self.stages(sigmas, i)
        points = self._points(sigmas, i, points)
        x_pred, d = _apply(x, evaluate(x, points[0]), [], stages[0], noise)
        if len(stages) == 1:
            return x_pred, d
        x_next, _ = _apply(x, evaluate(x_pred, points[1]), [d], stages[1], noise)
        return x_next, d


def schedule_values(sigmas: Sequence[Scalar] | torch.Tensor, final_zero: bool | None = None) -> list[Scalar]:
    """A schedule as the coefficient functions take it: Python floats, or the 0-d tensors of a tensor with its final
    0 as the float ``0.0`` (so that :func:`_is_zero` never reads a device value); ``final_zero`` None reads it."""
    if not isinstance(sigmas, torch.Tensor):
        return list(sigmas)
    sig: list[Scalar] = list(sigmas.unbind())
    if final_zero is None:
        final_zero = bool(sigmas[-1] == 0)
    if final_zero:
        sig[-1] = 0.0
    return sig
