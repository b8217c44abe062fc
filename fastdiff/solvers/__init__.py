"""Solvers of the probability-flow ODE and of its stochastic counterparts, in data-prediction form, one module
per family: :mod:`~fastdiff.solvers.single` (single-step ODE), :mod:`~fastdiff.solvers.multistep` (multistep ODE),
:mod:`~fastdiff.solvers.stochastic` (ancestral and SDE), :mod:`~fastdiff.solvers.consistency` (consistency
models). :mod:`~fastdiff.solvers.base` holds what they share.

A model gives ``D(x; sigma)``; every solver step is a linear combination of the state, denoised estimates and, for
the stochastic solvers, fresh noise (DESIGN.md), applied by the one op :func:`fastdiff.ops.guided_step`. Each
solver is a pure function from the schedule to step coefficients (the ``*_coefficients`` functions and
:meth:`Solver.stages`, on Python floats or on 0-d tensors) plus a few lines that feed them to the op;
:meth:`Solver.coefficient_table` evaluates a whole schedule at once.

Final step to sigma = 0, as each method's authors do it:

* euler, ddim, dpmpp_2m, dpmpp_3m, unipc: the step to 0 returns the last denoised estimate, ``x_N = D``.
  For Euler/DDIM this is the plain update with ``sigma' = 0``; DPM-Solver++ and UniPC drop to first order
  there (diffusers' ``final_sigmas_type="zero"``, k-diffusion's ``sigma_next == 0`` branch).
* heun: EDM's Algorithm 1 skips the corrector on the step to 0, so that step is one Euler step.
* ipndm: the Adams-Bashforth step is applied unchanged, as in k-diffusion's ``sample_ipndm`` and DEIS.
* dpm_2: one Euler step, ``x_N = D`` (k-diffusion's ``sample_dpm_2``).
* lms: the linear multistep rule unchanged, as k-diffusion 0.1.1's ``sample_lms`` (ComfyUI returns ``D``).
* deis, res_multistep, gradient_estimation: the step to 0 returns ``D``, as ComfyUI's samplers do.
* the stochastic solvers: the step to 0 returns ``D`` and draws no noise, as in k-diffusion.
* lcm: the step to 0 returns the consistency output ``f`` and draws no noise.
"""

from __future__ import annotations

import inspect

from fastdiff.solvers import consistency, multistep, single, stochastic
from fastdiff.solvers.base import (
    Coefficients,
    Denoised,
    Evaluate,
    Interval,
    Noise,
    Scalar,
    Solver,
    Stage,
    StageRow,
    schedule_values,
)

# Each family module lists its solver classes in ``SOLVERS`` (not exported) and its public names in ``__all__``.
from fastdiff.solvers.consistency import *  # noqa: F403, E402
from fastdiff.solvers.multistep import *  # noqa: F403, E402
from fastdiff.solvers.single import *  # noqa: F403, E402
from fastdiff.solvers.stochastic import *  # noqa: F403, E402

_FAMILIES = (single, multistep, stochastic, consistency)
SOLVERS: dict[str, type[Solver]] = {cls.name: cls for family in _FAMILIES for cls in family.SOLVERS}
ODE_SOLVERS = tuple(name for name, cls in SOLVERS.items() if cls.ode)  # the deterministic probability-flow ODE solvers


def get(solver: str | Solver, **options) -> Solver:
    """A solver by name (a key of :data:`SOLVERS`) with its options by keyword, named as k-diffusion and ComfyUI
    name them (``eta``, ``s_noise``, ``solver_type``, ``order``...), or a :class:`Solver` instance passed through."""
    if isinstance(solver, Solver):
        if options:
            raise ValueError("solver options go to the constructor when passing a Solver instance")
        return solver
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    cls = SOLVERS[solver]
    params = inspect.signature(cls.__init__).parameters.values()
    accepted = [p.name for p in params if p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"solver {solver!r} has no option {', '.join(unknown)}; its options: {accepted or 'none'}")
    return cls(**options)


__all__ = [
    "SOLVERS", "ODE_SOLVERS", "get", "Solver", "Stage", "StageRow", "Denoised", "Evaluate", "Noise", "Interval",
    "Scalar", "Coefficients", "schedule_values",
    *(name for family in _FAMILIES for name in family.__all__),
]  # fmt: skip
