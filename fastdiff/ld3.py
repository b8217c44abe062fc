"""LD3 (Tong et al., ICLR 2025): learned timesteps for a given model, solver and NFE.

This module holds what a learned schedule is made of; the training loop is :mod:`fastdiff.train.ld3`.

* **Teacher pairs** (:func:`make_teacher_pairs`, :class:`TeacherPairs`): initial noise ``x_T`` and the sample a
  long solve reaches from it, made once and kept in a checksummed safetensors file.
* **The parameterisation** (:class:`LD3Schedule`): ``xi`` -> softmax -> cumulative sum -> reverse -> normalised
  onto ``[sigma_min, sigma_max]`` in logSNR or time (:func:`fastdiff.schedules.ld3_sigmas`, one fused op on
  xi's device), and decoupled evaluation offsets ``xi_c``.
* **The student** (:class:`Student`): any fastdiff solver over that schedule, run by :class:`fastdiff.Sampler`'s
  device loop on a differentiable coefficient table, so gradients reach ``xi`` through the fused step op's
  backward (the coefficient dot products) and through the model's sigma input.

fastdiff's schedules end with a step to sigma = 0, and LD3 keeps that: for ``N`` steps it learns ``N`` positive
sigmas from ``sigma_max`` to ``sigma_min`` (both fixed), followed by 0, the same structure as ``karras(N)``, so a
comparison at equal NFE differs only in where the steps are. (The paper's ``xi`` has ``N + 1`` entries because
its last timestep ``t_min`` is the output and is not evaluated; here the last positive sigma is evaluated and
the step from it to 0 is the final denoise.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fastdiff import checkpoint, generate, ops, schedules, solvers
from fastdiff.guidance import Guidance
from fastdiff.sampler import Model, Sampler, count_nfe, make_plan, plan_coefficients

TEACHER_FORMAT = "fastdiff-teacher-pairs"


# ------------------------------------------------------------------------------------------------ teacher


@dataclass
class TeacherPairs:
    """``noise`` ``[M, ...]`` (``x_T``, already scaled by ``sigma_max``), ``target`` ``[M, ...]`` (the teacher's
    sample from it), ``labels`` ``[M]`` int64 or None, and ``metadata`` (model, teacher solver and steps, sigma
    range, seed, indices)."""

    noise: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor | None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.noise.shape[0]

    def subset(self, index: slice | torch.Tensor) -> TeacherPairs:
        labels = None if self.labels is None else self.labels[index]
        return TeacherPairs(self.noise[index], self.target[index], labels, dict(self.metadata))

    def split(self, n_train: int) -> tuple[TeacherPairs, TeacherPairs]:
        """The first ``n_train`` pairs and the rest (the paper trains on half and validates on the other)."""
        if not 0 < n_train < len(self):
            raise ValueError(f"n_train must lie in (0, {len(self)}), got {n_train}")
        return self.subset(slice(0, n_train)), self.subset(slice(n_train, None))

    def save(self, path: str | Path) -> Path:
        """Write the pairs atomically as one checksummed safetensors file."""
        tensors = {"noise": self.noise, "target": self.target}
        if self.labels is not None:
            tensors["labels"] = self.labels
        path = Path(path)
        checkpoint._write_safetensors(path, tensors, TEACHER_FORMAT, self.metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TeacherPairs:
        """Read pairs written by :meth:`save` (checksum verified; no pickle). Raises
        :class:`~fastdiff.checkpoint.CheckpointError` naming the file for anything else: a missing, special,
        damaged or foreign file, or tensors that do not make pairs."""
        tensors, meta = checkpoint._read_safetensors(Path(path), TEACHER_FORMAT)
        noise, target, labels = tensors.get("noise"), tensors.get("target"), tensors.get("labels")
        if noise is None or target is None or noise.shape != target.shape or noise.ndim < 1 or not len(noise):
            raise checkpoint.CheckpointError(f"{path} lacks matching 'noise' and 'target' tensors [M, ...]")
        if not noise.is_floating_point() or not target.is_floating_point():
            raise checkpoint.CheckpointError(
                f"{path}: noise and target must be float, got {noise.dtype} and {target.dtype}"
            )
        unexpected = sorted(set(tensors) - {"noise", "target", "labels"})
        if unexpected:
            raise checkpoint.CheckpointError(f"{path} holds unexpected tensors {unexpected}")
        if labels is not None and (labels.dtype != torch.int64 or labels.shape != (len(noise),)):
            raise checkpoint.CheckpointError(
                f"{path}: labels must be int64 [{len(noise)}], got {labels.dtype} {tuple(labels.shape)}"
            )
        return cls(noise, target, labels, meta)


def make_teacher_pairs(
    model: Model,
    n: int,
    *,
    shape: tuple[int, ...],
    sigma_min: float,
    sigma_max: float,
    num_classes: int = 0,
    solver: str = "heun",
    steps: int = 32,
    seed: int = 0,
    first_index: int = 0,
    guidance: Guidance | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    model_name: str = "",
    progress: bool = False,
) -> TeacherPairs:
    """Solve ``n`` samples with a long, accurate solve (``solver`` over ``karras(steps)``) from per-sample seeded
    noise: sample ``k`` uses the noise of index ``first_index + k`` (:func:`fastdiff.generate.sample_noise`), so
    held-out pairs are the same pairs under another ``first_index`` or ``seed``. Class-conditional models get
    balanced labels ``index % num_classes``. Returns :class:`TeacherPairs` on the CPU in ``dtype``."""
    if n < 1:
        raise ValueError(f"need at least one teacher pair, got n={n}")
    indices = torch.arange(first_index, first_index + n)
    labels = generate.sample_labels(indices, num_classes, None)
    sampler = Sampler(model, solver=solver, sigmas=schedules.karras(steps, sigma_min, sigma_max), guidance=guidance)
    noise = generate.sample_noise(indices, shape, seed) * sigma_max
    outs = []
    for lo in tqdm(range(0, n, batch_size), desc="teacher", disable=not progress, leave=False):
        x = noise[lo : lo + batch_size].to(device=device, dtype=dtype)
        cond, uncond = generate.label_kwargs(None if labels is None else labels[lo : lo + batch_size].to(device))
        with torch.no_grad():
            outs.append(sampler.sample(x, cond, uncond).cpu())
    meta = {
        "model": model_name, "solver": solver, "steps": steps, "nfe": sum(count_nfe(solver, sampler.sigmas, guidance)),
        "sigma_min": sigma_min, "sigma_max": sigma_max, "seed": seed, "first_index": first_index, "n": n,
        "guidance": repr(guidance),
    }  # fmt: skip
    return TeacherPairs(noise.to(dtype), torch.cat(outs), labels, meta)


# ------------------------------------------------------------------------------------------ parameterisation


class LD3Schedule(nn.Module):
    """LD3's learnable timesteps for ``steps`` solver steps.

    Parameters: ``xi`` ``[steps]`` (ones: the uniform schedule of ``space``) and ``xi_c`` ``[steps]`` (zeros), in
    float64. :meth:`sigmas` gives ``[steps + 1]`` decreasing sigmas from ``sigma_max`` to ``sigma_min`` then 0;
    :meth:`eval_sigmas` the noise levels where the model is evaluated: each positive sigma moved by
    ``clamp(xi_c, +-gap / 2)`` in ``space`` (``gap``: the smallest spacing, held fixed in the backward), with the
    two endpoints unmoved.
    """

    def __init__(self, steps: int, sigma_min: float, sigma_max: float, space: str = "logsnr", decoupled: bool = True):
        super().__init__()
        if not isinstance(steps, int) or steps < 2:
            raise ValueError(f"LD3 needs at least 2 steps (the endpoints are fixed), got {steps!r}")
        schedules.ld3_sigmas(torch.ones(steps, dtype=torch.float64), sigma_min, sigma_max, space)  # checks the rest
        self.steps, self.sigma_min, self.sigma_max, self.space = steps, float(sigma_min), float(sigma_max), space
        self.decoupled = decoupled
        self.xi = nn.Parameter(torch.ones(steps, dtype=torch.float64))
        self.xi_c = nn.Parameter(torch.zeros(steps, dtype=torch.float64), requires_grad=decoupled)

    def positive_sigmas(self) -> torch.Tensor:
        """``[steps]`` from ``sigma_max`` down to ``sigma_min``, differentiable in ``xi``."""
        return schedules.ld3_sigmas(self.xi, self.sigma_min, self.sigma_max, self.space)

    def sigmas(self) -> torch.Tensor:
        """``[steps + 1]``: :meth:`positive_sigmas` and a final 0."""
        return torch.cat([self.positive_sigmas(), self.xi.new_zeros(1)])

    def _to_space(self, s: torch.Tensor) -> torch.Tensor:
        return s.log() if self.space == "logsnr" else s

    def _from_space(self, u: torch.Tensor) -> torch.Tensor:
        return u.exp() if self.space == "logsnr" else u

    def offsets(self, positive: torch.Tensor | None = None) -> torch.Tensor:
        """``[steps]`` clipped offsets in ``space`` (0 at both ends)."""
        u = self._to_space(self.positive_sigmas() if positive is None else positive)
        half_gap = (u[:-1] - u[1:]).min().detach() / 2
        inner = torch.ones_like(self.xi_c)
        inner[0] = inner[-1] = 0
        return torch.maximum(torch.minimum(self.xi_c, half_gap), -half_gap) * inner

    def eval_sigmas(self) -> torch.Tensor:
        """``[steps + 1]``: the sigmas where the model is evaluated (the final 0 is never evaluated)."""
        pos = self.positive_sigmas()
        if self.decoupled:
            pos = self._from_space(self._to_space(pos) + self.offsets(pos))
        return torch.cat([pos, self.xi.new_zeros(1)])


# --------------------------------------------------------------------------------------------- the student


class Student:
    """A solver's run over an :class:`LD3Schedule`: ``student(x_T, labels) -> x_0``, differentiable with respect to
    ``x_T`` and the schedule's parameters. The guidance plan is taken from the current sigmas (a host read per
    call, where one exists) and a changed plan rebuilds the run."""

    def __init__(self, model: Model, solver: str | solvers.Solver, schedule: LD3Schedule, guidance: Guidance | None):
        solver = solvers.get(solver)
        if solver.stochastic:
            raise ValueError(
                f"LD3 learns the schedule of a deterministic map from noise to image, and {solver!r} "
                "draws noise at its steps: choose an ODE solver, or eta=0 (er_sde: s_noise=0)"
            )
        self.schedule = schedule
        self.guidance = guidance
        self.sampler = Sampler(model, solver=solver, sigmas=schedule.sigmas().detach(), guidance=guidance)
        self.w = guidance.scale if guidance is not None else 1.0

    def __call__(self, x_T: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        sig = self.schedule.sigmas()
        if self.guidance is not None and self.guidance.interval is not None:
            # the guided steps follow the moving sigmas; the sampler is rebuilt only when they change
            plan = make_plan(self.sampler.solver, sig.detach().tolist(), self.guidance)
            if plan != self.sampler.plan:
                self.sampler.set_sigmas(sig.detach())
        table, _ = plan_coefficients(self.sampler.solver, sig, self.sampler.plan, self.w)
        acc = ops.acc_dtype(x_T)
        ev = self.schedule.eval_sigmas().to(x_T.device, acc)
        cond, uncond = generate.label_kwargs(labels)
        return self.sampler.run(x_T, cond or {}, uncond or {}, ev, table.to(x_T.device, acc))


def steps_for_nfe(solver: str | solvers.Solver, nfe: int) -> int:
    """The number of steps at which ``solver`` spends exactly ``nfe`` evaluations (a schedule ending in 0)."""
    for steps in range(1, nfe + 1):
        if sum(count_nfe(solver, schedules.karras(steps, 0.1, 1.0))) == nfe:
            return steps
    name = solver if isinstance(solver, str) else solver.name
    raise ValueError(f"solver {name!r} cannot spend exactly {nfe} evaluations")


# -------------------------------------------------------------------------------------------------- metric


def make_metric(name: str = "auto", decoder: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """``metric(a, b) -> [B]`` per-sample distances: ``"lpips"`` (images ``[B, C, H, W]`` in [-1, 1]; needs the
    lpips package and its backbone), ``"l2"`` (mean squared error), ``"l1"``, or ``"auto"`` (LPIPS where it can
    be built, else L2). ``decoder`` maps latents to images first. Returns ``(metric, resolved_name)``."""
    if name not in ("auto", "lpips", "l2", "l1"):
        raise ValueError(f"metric must be 'auto', 'lpips', 'l2' or 'l1', got {name!r}")
    lp = None
    if name in ("auto", "lpips"):
        try:
            from fastdiff.lpips import LPIPSAdapter

            lp = LPIPSAdapter()
        except (ImportError, FileNotFoundError):
            if name == "lpips":
                raise
    resolved = "lpips" if lp is not None else ("l2" if name == "auto" else name)

    def metric(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if decoder is not None:
            a, b = decoder(a), decoder(b)
        if lp is not None:
            return lp.to(a.device)(a.float(), b.float())
        d = (a - b).flatten(1)
        return d.abs().mean(1) if resolved == "l1" else d.square().mean(1)

    return metric, resolved


def slack_radius(gamma: float, dim: int, steps: int) -> float:
    """The slack ball's radius ``r = gamma * d / N**2`` (PAPERS.md), ``d`` the data dimension."""
    return gamma * dim / steps**2


def project_to_ball(x: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """Each sample of ``x`` ``[B, ...]`` moved onto the L2 ball of ``radius`` around ``center`` if outside it."""
    d = x - center
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-30)
    scale = torch.clamp(radius / norm, max=1.0)
    return center + d * scale.reshape((-1,) + (1,) * (x.ndim - 1))


__all__ = [
    "TeacherPairs", "make_teacher_pairs", "LD3Schedule", "Student", "steps_for_nfe", "make_metric", "slack_radius",
    "project_to_ball",
]  # fmt: skip
