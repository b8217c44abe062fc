"""LD3 for a diffusers pipeline: learn a solver's timesteps for the user's own prompts, with the pipeline's own
network and guidance (``fastdiff ld3 --pipeline DIR --prompts FILE``).

The prompts become class labels: :class:`PromptConditioned` is the pipeline's network as a fastdiff denoiser that
takes ``class_labels=i`` for prompt ``i`` (and -1 for the negative prompt), so LD3's teacher pairs, their cache
and its training loop (:func:`fastdiff.train.ld3.learn_schedule`) run on it unchanged: teacher pairs are solved
with classifier-free guidance (its interval optional) by a long solve, the distance is measured in latent space
(decoded LPIPS where ``lpips`` imports and the pipeline has a VAE), and the result is a schedule file that
``sample_pipeline(..., learned_schedule=...)`` and ``FastDiffScheduler.from_config(..., learned_schedule=...)``
take.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastdiff.guidance import Guidance
from fastdiff.integrations.diffusers import FastDiffScheduler
from fastdiff.integrations.diffusers_pipelines import Conditioning, PipelineSampler
from fastdiff.ld3 import make_metric
from fastdiff.train.ld3 import LD3Config, LD3Result, learn_schedule, learnable_steps


class PromptConditioned(torch.nn.Module):
    """A pipeline's denoiser conditioned by prompt index: ``model(x [B, ...], sigma [B], class_labels [B])`` runs
    the network on the inputs of prompt ``class_labels[b]`` (``-1``: the negative prompt, shared by all).

    Args:
        model: the denoiser (:attr:`PipelineSampler.model`).
        conditioning: the network inputs of P prompts (:meth:`PipelineSampler.conditioning`): per-sample tensors
            ``[P, ...]`` for the conditional pass, and for the unconditional pass (the same negative prompt in
            each row).
    """

    def __init__(self, model: torch.nn.Module, conditioning: Conditioning):
        super().__init__()
        self.model = model
        self.check_sigmas = getattr(model, "check_sigmas", None)  # the sampler's range check of the model
        cond, uncond = conditioning.cond, conditioning.uncond
        self.prompts = next(v.shape[0] for v in cond.values() if isinstance(v, torch.Tensor))
        # Row P of each table is the unconditional pass's input; a key only the conditional pass takes (Flux's
        # guidance) repeats a conditional row there, which no unconditional call reads.
        self.tables = {k: torch.cat([v, uncond.get(k, v)[:1]]) for k, v in cond.items()}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        rows = torch.where(class_labels < 0, self.prompts, class_labels)
        return self.model(x, sigma, **{k: t[rows] for k, t in self.tables.items()})


def pipeline_sigma_range(runner: PipelineSampler) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` of the pipeline's model: a DDPM-family model's training timesteps (0 and the
    last); for a flow model, its levels at one step per training timestep (with the pipeline's shift for its image
    size), the last and the second. The first, ``t = 1``, is ``sigma = inf`` (1e9 in fastdiff's steps): LD3's
    logSNR-spaced start would spend steps between 1e9 and 1e4, where a flow trajectory is straight, so it starts
    one training step lower (``t = 1 - 1/1000`` before the shift), leaving out x0's share of 1e-3 in the noise."""
    grid = runner.scheduler._grid
    if grid is not None:
        return grid.sigma_min, grid.sigma_max
    pipe, fam = runner.pipe, runner.family
    sched = FastDiffScheduler.from_config(pipe.scheduler.config, solver="euler")
    n = int(sched.config.num_train_timesteps)
    sched.set_timesteps(n, **fam.timestep_options(pipe, runner.network, n, runner.height, runner.width))
    sigmas = sched._schedule.sigmas
    return float(sigmas[-2]), float(sigmas[1])


def learn_pipeline_schedule(
    pipe,
    prompts: Sequence[str | int],
    solver: str,
    nfe: int,
    out: str | Path,
    *,
    negative_prompt: str | None = None,
    guidance: float | Guidance | None = None,
    height: int | None = None,
    width: int | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    pairs: int = 100,
    held_out: int = 200,
    teacher_solver: str = "heun",
    teacher_steps: int = 32,
    teacher_cache: str | Path | None = None,
    config: LD3Config | None = None,
    name: str | None = None,
    progress: bool = False,
    echo: Callable[[str], None] = print,
    **options: Any,
) -> tuple[LD3Result, dict[str, float]]:
    """Learn ``solver``'s timesteps at ``nfe`` evaluations for ``pipe`` on ``prompts`` and save them to ``out``
    (JSON; :func:`fastdiff.schedules.save`).

    Teacher pairs (``pairs`` of them, half for training and half for validation, prompts in turn) are solved by
    ``teacher_solver`` over ``teacher_steps`` Karras steps with the pipeline's network under ``guidance`` (a
    scale or a :class:`fastdiff.Guidance` with an interval; Flux: its distilled guidance input), and cached in
    ``teacher_cache`` (default: ``out`` with ``.teacher.safetensors``). The range is the pipeline's own
    (:func:`pipeline_sigma_range`) unless given. ``config.metric`` ``"auto"`` measures in latent space (L2),
    or with decoded LPIPS where ``lpips`` imports and the pipeline has a VAE. ``options``: the pipeline's prompt
    options (``prompt_2``, ``max_sequence_length``, SDXL sizes...). ``name`` identifies the pipeline's weights
    in the teacher cache (default: the pipeline's ``_name_or_path``).

    Returns the :class:`~fastdiff.train.ld3.LD3Result` and the held-out teacher RMSE (in latents) of the learned,
    Karras and logSNR-uniform schedules, as :func:`fastdiff.train.ld3.learn_schedule`.
    """
    prompts = list(prompts) if not isinstance(prompts, (str, int)) else [prompts]
    if not prompts:
        raise ValueError("LD3 for a pipeline needs at least one prompt")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise TypeError("negative_prompt must be one string, shared by every prompt (the unconditional pass)")
    config = config or LD3Config()
    steps = learnable_steps(solver, nfe)
    runner = PipelineSampler(pipe, solver=solver, steps=steps, guidance=guidance, height=height, width=width)
    negative = None if negative_prompt is None else [negative_prompt] * len(prompts)
    conditioning = runner.conditioning(prompts, negative, **options)
    runner._network.shared = conditioning.shared  # this runner's own network: its inputs shared by all prompts
    model = PromptConditioned(runner.model, conditioning)
    low, high = pipeline_sigma_range(runner)
    sigma_min, sigma_max = low if sigma_min is None else sigma_min, high if sigma_max is None else sigma_max

    decoder = None
    if config.metric in ("auto", "lpips"):
        if make_metric(config.metric)[1] == "lpips":  # lpips imports (else "auto" is L2, and "lpips" raised)
            if getattr(pipe, "vae", None) is None:
                raise ValueError("metric 'lpips' compares decoded images, and this pipeline has no VAE")
            decoder = runner.decode_latents

    key = json.dumps([prompts, negative_prompt, sorted(options.items()), runner.height, runner.width], default=str)
    source = name or getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    model_name = " ".join(filter(None, (type(pipe).__name__, source, f"prompts:{digest}",
                                        f"{runner.height}x{runner.width}")))  # fmt: skip
    shape = runner.latent_shape(1)[1:]
    echo(f"{type(pipe).__name__}: {len(prompts)} prompt(s), latents {tuple(shape)}, "
         f"sigma {sigma_min:.4g}..{sigma_max:.4g}")  # fmt: skip
    net = runner.network
    grads = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)  # LD3 learns the schedule; the network's weights need no gradient
    try:
        return learn_schedule(
            model, model_name, solver, nfe, out, sigma_min=sigma_min, sigma_max=sigma_max, pairs=pairs,
            held_out=held_out, teacher_solver=teacher_solver, teacher_steps=teacher_steps, teacher_cache=teacher_cache,
            guidance=runner.guidance, config=config, device=net.device, progress=progress, echo=echo,
            spec=(tuple(shape), len(prompts), torch.float32), decoder=decoder,
        )  # fmt: skip
    finally:
        for p, g in zip(net.parameters(), grads):
            p.requires_grad_(g)


def load_pipeline(path: str | Path, device: torch.device | str = "cpu"):
    """A diffusers pipeline saved with ``save_pretrained`` in the folder ``path``: safetensors weights only (no
    pickled ``.bin`` files), no hub access."""
    import transformers
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging

    path = Path(path)
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # loading's progress bars and notes, around the job's own output
    logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True)
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped (DiT: class names or ids)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return prompts
