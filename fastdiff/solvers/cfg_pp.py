"""CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained classifier free guidance for diffusion models"): the
guided estimate ``D = D_u + lambda (D_c - D_u)`` denoises, and the step re-noises along the unconditional
direction ``(x - D_u) / sigma`` instead of the guided one. It is a property of the solver step, so it exists for
the solvers its authors give (and ComfyUI ships): Euler (DDIM), Euler ancestral and DPM-Solver++(2M).

In the op's form every such step keeps its coefficients and only changes what multiplies the estimates. A step
``x' = a x + b0 D + sum_k b_k H_k`` becomes ``x' = a x + (b0 + a) D - a D_u + sum_k b_k H_k`` with the history
entries ``H`` made of unconditional estimates (DPM-Solver++(2M)'s ``D - D_u,prev`` term). That is the fused step
with the guidance weight ``w' = lambda (b0 + a) / b0`` (its ``D_c`` weight ``b0 w'`` and its ``D_u`` weight
``b0 (1 - w')`` are the ones above), so CFG++ runs in the same kernels, captured loops included.
"""

from __future__ import annotations

import torch

from fastdiff.solvers.base import Denoised, Solver, StageRow

CFG_PP_SOLVERS = ("euler", "ddim", "euler_ancestral", "dpmpp_2m")


def _weight_factor(a, b0):
    """``(b0 + a) / b0``, the factor CFG++ scales a step's guidance weight by (1 where ``b0 = 0``: a padded row)."""
    if isinstance(b0, torch.Tensor):
        return torch.where(b0 != 0, (b0 + a) / torch.where(b0 != 0, b0, 1), 1)
    return (b0 + a) / b0 if b0 != 0 else 1.0


class CFGPlusPlus(Solver):
    """``solver`` with CFG++'s re-noising; made by :func:`for_guidance` for ``Guidance(method="cfg_pp")``. Steps
    without the unconditional pass (outside a guidance interval) are the solver's own."""

    def __init__(self, solver: Solver):
        if solver.name not in CFG_PP_SOLVERS:
            raise ValueError(f"CFG++ (method='cfg_pp') is defined for the solvers {', '.join(CFG_PP_SOLVERS)}; "
                             f"{solver.name!r} has no CFG++ form")  # fmt: skip
        self.solver = solver
        self.name = solver.name
        self.ode = solver.ode

    @property
    def stochastic(self) -> bool:
        return self.solver.stochastic

    def points(self, sigmas, i):
        return self.solver.points(sigmas, i)

    def evaluations(self, sigmas):
        return self.solver.evaluations(sigmas)

    def start(self) -> dict:
        return self.solver.start()

    def stages(self, sigmas, i):
        return self.solver.stages(sigmas, i)

    def coefficient_tensor(self, sigmas, w=1.0, final_zero=None):
        table, n_history = self.solver.coefficient_tensor(sigmas, w, final_zero)
        weight = w * _weight_factor(table[..., 0], table[..., 5])
        return torch.cat([table[..., :1], weight[..., None], table[..., 2:]], -1), n_history

    def step(self, i, x, sigmas, evaluate, state, stages=None, points=None, noise=None):
        stages = stages or self.stages(sigmas, i)
        (stage,) = stages
        seen = {}

        def renoised(xi, p):
            den = evaluate(xi, p)
            seen["uncond"] = den.uncond
            if den.uncond is None or isinstance(stage, StageRow):  # a row already holds the step's weight
                return den
            return Denoised(den.cond, den.uncond, den.w * _weight_factor(stage.a, stage.b[0]))

        x_next, d = self.solver.step(i, x, sigmas, renoised, state, stages, points, noise)
        if seen["uncond"] is not None and state.get("history"):
            # the history holds the unconditional estimate (a copy: a model may reuse its output buffer)
            state["history"][0] = seen["uncond"].clone(memory_format=torch.contiguous_format)
        return x_next, d


def for_guidance(solver: Solver, guidance) -> Solver:
    """The solver a run uses under ``guidance``: CFG++'s form of ``solver`` for ``method="cfg_pp"``, else
    ``solver`` itself."""
    if guidance is not None and guidance.method == "cfg_pp" and not isinstance(solver, CFGPlusPlus):
        return CFGPlusPlus(solver)
    return solver
