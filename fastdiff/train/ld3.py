"""LD3's training loop: learn a schedule's timesteps against teacher pairs, with the slack objective.

For each batch of training pairs ``(x_T, x_0)``:

1. **Slack** (the inner problem): one gradient step on the stored ``x'_T`` (started at ``x_T``) with learning
   rate ``lr_slack``, projected onto the L2 ball of radius ``r = gamma * d / N**2`` around ``x_T``; a sample's
   new ``x'_T`` is kept only where it lowers that sample's loss.
2. **Outer step**: the loss ``metric(student(x'_T), x_0)`` backpropagates through the solver (the fused step's
   coefficient gradients) and the model's sigma input into ``xi`` (RMSprop) and, after the ``xi``-only rounds,
   the evaluation offsets ``xi_c`` (SGD); gradients are clipped, and each learning rate decays on a plateau of
   the batch loss.

After each round (a pass over the training pairs) the validation pairs are solved from their own ``x_T``; the
schedule with the lowest validation distance is the result. Defaults follow the paper's code (PAPERS.md §2).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastdiff import generate, ld3, metrics, schedules, solvers
from fastdiff.arguments import number
from fastdiff.guidance import Guidance
from fastdiff.ld3 import LD3Schedule, Student, TeacherPairs, make_metric, project_to_ball, slack_radius
from fastdiff.sampler import Model, Sampler, count_nfe


@dataclass
class LD3Config:
    """Every knob of :func:`train_ld3`; ``None`` learning rates take the paper's values for the step count."""

    space: str = "logsnr"  # where xi is normalised and xi_c moves: "logsnr" (log sigma) or "time" (sigma)
    decoupled: bool = True  # learn the evaluation offsets xi_c
    rounds_xi: int = 2  # rounds of xi alone
    rounds_both: int = 5  # then rounds of xi and xi_c
    batch_size: int = 2
    lr_xi: float = 5e-3  # RMSprop
    momentum: float = 0.9
    lr_xi_c: float | None = None  # SGD; 0.1 / steps
    lr_slack: float | None = None  # the inner step on x'_T; 12 / steps
    gamma: float = 1e-3  # slack radius r = gamma * d / steps**2
    clip: float = 1.0  # gradient norm clip of xi and xi_c
    plateau_factor: float = 0.8
    patience: int = 5  # iterations without a lower batch loss before a decay
    metric: str = "auto"  # "lpips" where it can be built, else "l2"; or "lpips", "l2", "l1"
    seed: int = 0  # the order of the training pairs

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, number(getattr(self, f.name)))
        if self.rounds_xi < 0 or self.rounds_both < 0 or self.rounds_xi + self.rounds_both == 0:
            raise ValueError("LD3 needs at least one round (rounds_xi + rounds_both > 0)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")


@dataclass
class LD3Result:
    """The best schedule (lowest validation distance), its ``sigmas`` and ``eval_sigmas`` ``[steps + 1]``
    float64, the per-round ``log``, the metric used and the wall time in seconds."""

    schedule: LD3Schedule
    sigmas: torch.Tensor
    eval_sigmas: torch.Tensor
    log: list[dict] = field(default_factory=list)
    metric: str = "l2"
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


def _batches(pairs: TeacherPairs, device, dtype):
    return (
        pairs.noise.to(device, dtype),
        pairs.target.to(device, dtype),
        (None if pairs.labels is None else pairs.labels.to(device)),
    )


@torch.no_grad()
def validation_distance(student: Student, pairs: TeacherPairs, metric, device, dtype, batch_size: int = 64):
    """``(mean metric, mean RMSE)`` of the student's samples from the pairs' own ``x_T`` against their targets."""
    noise, target, labels = _batches(pairs, device, dtype)
    outs = [student(noise[lo : lo + batch_size], None if labels is None else labels[lo : lo + batch_size])
            for lo in range(0, len(pairs), batch_size)]  # fmt: skip
    out = torch.cat(outs)
    return float(metric(out, target).mean()), metrics.teacher_error(out, target)["rmse_mean"]


def slack_step(
    student: Student,
    metric,
    x_prime: torch.Tensor,
    x_T: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor | None,
    lr: float,
    radius: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LD3's inner problem for one batch: a gradient step on ``x_prime`` ``[B, ...]``, projected onto the ball of
    ``radius`` around ``x_T``, kept per sample only where it lowers the loss. Returns ``(new x_prime, loss before
    [B], loss after [B])``; ``after <= before`` for every sample."""
    x = x_prime.detach().clone().requires_grad_(True)
    before = metric(student(x, labels), target)
    (g,) = torch.autograd.grad(before.sum(), x)
    with torch.no_grad():
        before = before.detach()
        cand = project_to_ball(x - lr * g, x_T, radius)
        moved = metric(student(cand, labels), target)
        better = moved < before
        keep = better.reshape((-1,) + (1,) * (cand.ndim - 1))
        return torch.where(keep, cand, x_prime), before, torch.where(better, moved, before)


def train_ld3(
    model: Model,
    solver: str | solvers.Solver,
    train_pairs: TeacherPairs,
    val_pairs: TeacherPairs,
    *,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    guidance: Guidance | None = None,
    config: LD3Config | None = None,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_round: Callable[[dict], None] | None = None,
) -> LD3Result:
    """Learn ``steps`` timesteps for ``solver`` on ``model`` from teacher pairs (see the module docstring).

    Args:
        train_pairs, val_pairs: :class:`~fastdiff.ld3.TeacherPairs`; ``noise`` ``[M, ...]`` already scaled by
            ``sigma_max``. The pairs' dtype is the run's (float64 for the exact mixture, float32 for networks).
        steps: solver steps (``fastdiff.ld3.steps_for_nfe`` converts an NFE).
        decoder: applied to samples and targets before the metric (latent models).
        on_round: called with each round's log row.
    """
    config = config or LD3Config()
    solver = solvers.get(solver)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < _MIN_LD3_STEPS:
        raise ValueError(f"LD3 keeps sigma_max and sigma_min fixed: it needs steps >= {_MIN_LD3_STEPS} to have a "
                         f"timestep to learn, got {steps!r}")  # fmt: skip
    device = torch.device(device)
    dtype = train_pairs.noise.dtype
    schedule = LD3Schedule(steps, sigma_min, sigma_max, config.space, config.decoupled).to(device)
    student = Student(model, solver, schedule, guidance)
    metric, metric_name = make_metric(config.metric, decoder)
    opt_xi = torch.optim.RMSprop([schedule.xi], lr=config.lr_xi, momentum=config.momentum)
    opt_c = torch.optim.SGD([schedule.xi_c], lr=config.lr_xi_c if config.lr_xi_c is not None else 0.1 / steps)
    plateaus = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=config.plateau_factor, patience=config.patience)
                for o in (opt_xi, opt_c)]  # fmt: skip
    lr_slack = config.lr_slack if config.lr_slack is not None else 12.0 / steps
    radius = slack_radius(config.gamma, train_pairs.noise[0].numel(), steps)

    noise, target, labels = _batches(train_pairs, device, dtype)
    slack = noise.clone()  # x'_T, kept across rounds
    order_gen = torch.Generator().manual_seed(config.seed)
    rounds = config.rounds_xi + config.rounds_both
    n_batches = -(-len(train_pairs) // config.batch_size)
    t0 = time.perf_counter()

    val, val_rmse = validation_distance(student, val_pairs, metric, device, dtype)
    best = (val, schedule.xi.detach().clone(), schedule.xi_c.detach().clone())
    log = [{"round": 0, "phase": "initial", "train_loss": None, "val_distance": val, "val_rmse": val_rmse,
            "lr_xi": config.lr_xi, "seconds": time.perf_counter() - t0}]  # fmt: skip
    if on_round:
        on_round(log[-1])
    bar = tqdm(total=rounds * n_batches, desc=f"LD3 {solver.name} {steps} steps", disable=not progress, leave=False)
    for r in range(1, rounds + 1):
        both = r > config.rounds_xi and config.decoupled
        losses = []
        for idx in torch.randperm(len(train_pairs), generator=order_gen).to(device).split(config.batch_size):
            x0, lab = target[idx], None if labels is None else labels[idx]
            slack[idx] = slack_step(student, metric, slack[idx], noise[idx], x0, lab, lr_slack, radius)[0]
            # the outer step on xi (and xi_c)
            loss = metric(student(slack[idx], lab), x0).mean()
            opt_xi.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([schedule.xi, schedule.xi_c], config.clip)
            opt_xi.step()
            if both:
                opt_c.step()
            for p in plateaus[: 2 if both else 1]:
                p.step(loss.item())
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3g}")
        val, val_rmse = validation_distance(student, val_pairs, metric, device, dtype)
        if val < best[0]:
            best = (val, schedule.xi.detach().clone(), schedule.xi_c.detach().clone())
        row = {"round": r, "phase": "xi+xi_c" if both else "xi", "train_loss": sum(losses) / len(losses),
               "val_distance": val, "val_rmse": val_rmse, "lr_xi": opt_xi.param_groups[0]["lr"],
               "seconds": time.perf_counter() - t0}  # fmt: skip
        log.append(row)
        if on_round:
            on_round(row)
    bar.close()
    with torch.no_grad():
        schedule.xi.copy_(best[1])
        schedule.xi_c.copy_(best[2])
        sigmas, eval_sigmas = schedule.sigmas().cpu(), schedule.eval_sigmas().cpu()
    return LD3Result(schedule, sigmas, eval_sigmas, log, metric_name, time.perf_counter() - t0, asdict(config))


def learnable_steps(solver: str | solvers.Solver, nfe: int) -> int:
    """The steps at which ``solver`` spends ``nfe`` evaluations, when LD3 has a timestep to learn there.

    LD3 keeps ``sigma_max`` and ``sigma_min`` fixed and learns the sigmas between them (and offsets of those), so it
    needs at least 3 steps; with fewer, training would run and report the starting schedule unchanged. Raises
    ``ValueError`` saying so, with the smallest NFE that works for ``solver``.
    """
    steps = ld3.steps_for_nfe(solver, nfe)
    if steps >= _MIN_LD3_STEPS:
        return steps
    name = solver if isinstance(solver, str) else solver.name
    smallest = count_nfe_at(solver, _MIN_LD3_STEPS)
    fixed = "sigma_max and 0" if steps == 1 else "sigma_max, sigma_min and 0"
    raise ValueError(f"{name} at NFE {nfe} takes {steps} step(s), whose sigmas ({fixed}) LD3 keeps fixed: there is "
                     f"no timestep to learn. LD3 needs {_MIN_LD3_STEPS} steps or more; for {name} the smallest NFE "
                     f"is {smallest}")  # fmt: skip


_MIN_LD3_STEPS = 3  # sigma_max, sigma_min (both fixed), and at least one learned sigma between them


def count_nfe_at(solver: str | solvers.Solver, steps: int) -> int:
    """The evaluations ``solver`` spends on ``steps`` steps of a schedule ending in 0."""
    return sum(count_nfe(solver, schedules.karras(steps, 0.1, 1.0)))


def model_spec(model: Model) -> tuple[tuple[int, ...], int, torch.dtype]:
    """``(sample shape, number of classes, dtype)`` of fastdiff's built-in model types, for teacher pairs."""
    from fastdiff.models import EDMUNet, GaussianMixture

    if isinstance(model, GaussianMixture):
        return (model.dim,), model.num_classes, torch.float64
    if isinstance(model, EDMUNet):
        cfg = model.config
        return (cfg.in_channels, cfg.resolution, cfg.resolution), cfg.num_classes, torch.float32
    raise TypeError(f"no sample shape known for {type(model).__name__}; build TeacherPairs yourself and call train_ld3")


def learn_schedule(
    model: Model,
    model_name: str,
    solver: str,
    nfe: int,
    out: str | Path,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    pairs: int = 100,
    held_out: int = 200,
    teacher_solver: str = "heun",
    teacher_steps: int = 32,
    teacher_cache: str | Path | None = None,
    guidance: Guidance | None = None,
    config: LD3Config | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    echo: Callable[[str], None] = print,
    spec: tuple[tuple[int, ...], int, torch.dtype] | None = None,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[LD3Result, dict[str, float]]:
    """The job behind ``fastdiff ld3``: teacher pairs (made once, cached in ``teacher_cache``), split half and
    half into training and validation, :func:`train_ld3`, then the held-out teacher RMSE of the learned schedule
    against the Karras and logSNR-uniform (LD3's starting point) schedules at the same NFE, on ``held_out`` new
    pairs. Saves the schedule to ``out`` (JSON with sigmas, eval_sigmas, solver, NFE, model and the log).

    ``spec``: ``(sample shape, number of classes, dtype)`` of a model :func:`model_spec` does not know (the class
    labels are whatever ``model`` takes as ``class_labels``, -1 for the unconditional pass); ``model_name`` then
    names everything the teacher pairs depend on, since a cache made under the same name is reused. ``decoder``:
    see :func:`train_ld3`."""
    shape, classes, dtype = spec if spec is not None else model_spec(model)
    steps = learnable_steps(solver, nfe)
    if pairs < 4:
        raise ValueError(f"LD3 needs at least 4 teacher pairs (half train, half validation), got {pairs}")
    out = Path(out)
    cache = Path(teacher_cache) if teacher_cache is not None else out.with_suffix(".teacher.safetensors")
    kw = dict(shape=shape, sigma_min=sigma_min, sigma_max=sigma_max, num_classes=classes, solver=teacher_solver,
              steps=teacher_steps, guidance=guidance, dtype=dtype, device=device, model_name=model_name)  # fmt: skip
    want = {"model": model_name, "solver": teacher_solver, "steps": teacher_steps, "sigma_min": sigma_min,
            "sigma_max": sigma_max, "n": pairs, "first_index": 0, "guidance": repr(guidance)}  # fmt: skip
    made = None
    if cache.exists():
        made = ld3.TeacherPairs.load(cache)
        if any(made.metadata.get(k) != v for k, v in want.items()):
            echo(f"teacher pairs in {cache} were made for other settings; making new ones")
            made = None
        else:
            echo(f"teacher pairs: {cache} ({len(made)} pairs)")
    if made is None:
        made = ld3.make_teacher_pairs(model, pairs, progress=progress, **kw)
        made.save(cache)
        teacher = f"{teacher_solver} {teacher_steps} steps ({made.metadata['nfe']} NFE)"
        echo(f"teacher pairs: {pairs} from {teacher} -> {cache}")
    train_pairs, val_pairs = made.split(pairs // 2)

    def on_round(row):
        echo(f"round {row['round']} ({row['phase']}): teacher distance {row['val_distance']:.5g} "
             f"(RMSE {row['val_rmse']:.4g}) on {len(val_pairs)} validation pairs, {row['seconds']:.0f} s")  # fmt: skip

    result = train_ld3(model, solver, train_pairs, val_pairs, steps=steps, sigma_min=sigma_min,
                       sigma_max=sigma_max, guidance=guidance, config=config, decoder=decoder, device=device,
                       progress=progress, on_round=on_round)  # fmt: skip
    schedules.save(out, result.sigmas, eval_sigmas=result.eval_sigmas, solver=solver, nfe=nfe, model=model_name,
                   space=result.config["space"], metric=result.metric, seconds=round(result.seconds, 1),
                   teacher=f"{teacher_solver} {teacher_steps} steps", log=result.log)  # fmt: skip

    held = ld3.make_teacher_pairs(model, held_out, first_index=1_000_000, **kw)
    noise, target = held.noise.to(device), held.target.to(device)
    cond, uncond = generate.label_kwargs(None if held.labels is None else held.labels.to(device))

    def rmse(sig, ev=None):
        with torch.no_grad():
            x = Sampler(model, solver=solver, sigmas=sig, guidance=guidance, eval_sigmas=ev).sample(noise, cond, uncond)
        return metrics.teacher_error(x, target)["rmse_mean"]

    errors = {"ld3": rmse(result.sigmas, result.eval_sigmas)}
    for name in ("karras", "logsnr_uniform"):
        errors[name] = rmse(schedules.get(name, steps, sigma_min, sigma_max))
    return result, errors
