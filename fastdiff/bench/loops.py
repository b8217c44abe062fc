"""End-to-end sampling benchmark: whole sampling loops with classifier-free guidance, as users run them.

Every row samples one batch from the same noise with the same model, solver and schedule; only the loop differs:

* ``kdiff_eager``: a k-diffusion-style loop (:mod:`fastdiff.bench.baselines`) with a CFG wrapper that runs cond and
  uncond as one ``2B`` batch at every step;
* ``diffusers``: the diffusers scheduler loop (``set_timesteps``, ``scale_model_input``, cond+uncond batch,
  ``step``), guidance at every step, driving the raw network (for the digits model diffusers' EDM schedulers
  around its raw UNet);
* ``fastdiff_scheduler``: the same diffusers loop with :class:`~fastdiff.integrations.diffusers.FastDiffScheduler`
  (built from the diffusers scheduler's config) in place of the diffusers scheduler: the one-line swap;
* ``fastdiff_eager``: :class:`fastdiff.Sampler`, guidance at every step;
* ``fastdiff_graph``: the same with ``cuda_graph=True``, the whole loop replayed as one CUDA graph (CUDA only);
* ``fastdiff_interval``: guidance only in the noise interval ``(0.28, 2.9]`` (EDM2-S's), the other steps skip
  the unconditional pass; a CUDA graph on CUDA, eager on the CPU.
* ``pipeline_interval``: :class:`~fastdiff.integrations.diffusers.PipelineSampler` on the diffusers network and
  scheduler config (what ``sample_pipeline`` runs), guidance on the same interval, a CUDA graph on CUDA; diffusers
  networks only.

Per row: the median time of one sampled batch (CUDA events after warm-up on a GPU, wall clock on the CPU); the
model time, the median time of the network forwards that row issues (their count and batch sizes), alone and back
to back on fixed inputs: the raw network, without the loop, the preconditioning or the guidance arithmetic, and
replayed from a CUDA graph for the graph rows; the host overhead per step, the median over repetitions of
``(total - model) / steps`` (the two are timed alternately, so that a busy spell of a shared machine falls on
both); the NFE (cond, uncond); the peak memory (``torch.cuda.max_memory_allocated`` of the loop, weights
included; GPU only); the device and the date.

A second scenario, ``edm2_interval``, is EDM2's guidance interval on the digits model: 32 Heun steps on the
Karras schedule (sigma 0.002..80), guidance on ``(0.28, 2.9]`` against full CFG, with the fraction of
unconditional evaluations the schedule implies (diffusers has no EDM Heun scheduler, so that row is skipped).

Model families: ``null``, a network that costs nothing (``0.5 x``) behind :class:`~fastdiff.denoisers.VPDenoiser`,
so its rows are the loops' own cost; ``digits``, the built-in EDM UNet (1x16x16 at every preset); and diffusers
networks built from config with random weights: ``unet`` (``UNet2DModel``, class-conditional through
``num_class_embeds``, the last class the null class), ``unet_cond`` (``UNet2DConditionModel``, cross-attention on a
``[B, 77, D]`` context, a second random context as the unconditional one) and ``dit`` (``DiTTransformer2DModel``,
class-conditional, null class 1000). The diffusers networks are wrapped for fastdiff and the k-diffusion loop with
:class:`~fastdiff.denoisers.VPDenoiser` (eps prediction on SD's schedule) and driven by diffusers'
``DPMSolverMultistepScheduler`` (``EulerDiscreteScheduler``, ``HeunDiscreteScheduler`` for ``--solver euler|heun``).
The GPU preset uses SD-like latent sizes (4x64x64, 4x128x128) and SD-like layouts at reduced width
(:func:`_diffusers_config`), bf16 weights and float32 latents, so that the whole run fits a few minutes on one GPU.
"""

from __future__ import annotations

import csv
import datetime
import gc
import importlib.metadata
import io
import math
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import fastdiff
from fastdiff import denoisers, generate, schedules
from fastdiff.bench import baselines, peers
from fastdiff.checkpoint import atomic_write
from fastdiff.sampler import capture_graph

VARIANTS = (
    "kdiffusion", "kdiff_eager", "diffusers", "fastdiff_scheduler", "fastdiff_eager", "fastdiff_graph",
    "fastdiff_interval", "pipeline_interval",
)  # fmt: skip
MODELS = ("null", "null_edm", "digits", "dit", "unet", "unet_cond")  # roughly by cost
E2E_MODELS = ("null", "digits", "dit", "unet", "unet_cond")  # the e2e scenario's default families
SCENARIOS = ("overhead", "e2e", "edm2_interval")
INTERVAL = (0.28, 2.9)  # EDM2-S's guidance interval (Kynkaenniemi et al. 2024)
COLUMNS = [
    "scenario", "model", "config", "shape", "batch", "dtype", "solver", "steps", "variant", "library", "guidance",
    "nfe_cond", "nfe_uncond", "total_ms", "model_ms", "overhead_us_per_step", "peak_mem_mb", "threads", "device",
    "date", "note",
]  # fmt: skip
# The loop-overhead comparison (issue 17): batch 1, 4x8x8 latents, DPM-Solver++(2M), 40 steps, CFG by batching cond
# and uncond, a network that does one multiply; fastdiff against each peer's own loop on the same model form.
OVERHEAD = dict(batch=1, resolution=8, solver="dpmpp_2m", steps=40, reps=50)
OVERHEAD_PAIRS = {  # model family -> (the peer's variant, fastdiff's variant in the same execution mode)
    "null_edm": ("kdiffusion", "fastdiff_eager"),
    "null": ("diffusers", "fastdiff_eager"),
}
OVERHEAD_TARGET = 1 / 3  # fastdiff's per-step overhead at most a third of the peer's
# Variants that need diffusers in every cell, and that need the k-diffusion package.
NEEDS = {"diffusers": "diffusers", "fastdiff_scheduler": "diffusers", "pipeline_interval": "diffusers",
         "kdiffusion": "k-diffusion"}  # fmt: skip
DIFFUSERS_MODELS = ("dit", "unet", "unet_cond")  # families built from diffusers' classes
PEER_LOADERS = {"diffusers": "diffusers", "k-diffusion": "k_diffusion_sampling"}  # peer -> its loader in peers

# What each preset runs; ``size`` picks the diffusers configs of ``_diffusers_config``.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        resolutions=(8,), batches=(1, 4), steps=8, reps=3, warmup=1, edm2_batch=1, edm2_steps=32,
        dtype="float32", size="tiny", threads=1,
    ),
    "gpu": dict(
        resolutions=(64, 128), batches=(1, 8, 32), steps=20, reps=3, warmup=1, edm2_batch=32, edm2_steps=32,
        dtype="bfloat16", size="reduced", threads=None,
    ),
}  # fmt: skip


def _diffusers_config(family: str, resolution: int, size: str) -> tuple[dict, str]:
    """``(config kwargs, description)`` of a diffusers network. ``size="tiny"``: a few channels, for CPU runs and
    tests. ``size="reduced"``: SD-like layouts at reduced width (the GPU preset)."""
    if size == "tiny":
        if family == "unet":
            cfg = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))  # fmt: skip
            return cfg, "UNet2DModel tiny (32,64), attn at 1/2"
        if family == "unet_cond":
            cfg = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                       attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
            return cfg, "UNet2DConditionModel tiny (32,64), ctx 77x32"
        if family == "dit":
            cfg = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, patch_size=2)
            return cfg, "DiT tiny (2 layers, 32 wide, patch 2)"
    elif size == "reduced":
        # Widths are cut so that the whole GPU preset (6 networks x 3 batches x 5 loops, 20 steps with CFG) runs in a
        # few minutes; head sizes stay multiples of 16 so that the fused attention kernels apply as at full width.
        if family == "unet":
            # ADM/DDPM-like layout on latents at about 1/3 of ADM-ImageNet's width: attention at 1/4 and 1/8.
            cfg = dict(block_out_channels=(64, 128, 128, 256), layers_per_block=2, attention_head_dim=64,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))  # fmt: skip
            return cfg, "UNet2DModel ADM-like (64,128,128,256) x2, attn at 1/4,1/8"
        if family == "unet_cond" and resolution <= 64:
            # SD 1.5's layout (cross-attention at the three top levels, 77x768 context) at 0.3x width, 48-wide heads.
            cfg = dict(block_out_channels=(96, 192, 384, 384), layers_per_block=2, cross_attention_dim=768,
                       attention_head_dim=(2, 4, 8, 8))  # fmt: skip
            return cfg, "SD1.5 layout at 0.3x width (96,192,384,384), ctx 77x768"
        if family == "unet_cond":
            # SDXL's layout (no attention at full resolution, 2 transformer layers per block below) at 0.2x width,
            # 64-wide heads, without SDXL's added size/text-time embeddings.
            cfg = dict(block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=768,
                       attention_head_dim=(1, 2, 4), transformer_layers_per_block=(1, 2, 2),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))  # fmt: skip
            return cfg, "SDXL layout at 0.2x width (64,128,256), tf (1,2,2), ctx 77x768"
        if family == "dit":
            # DiT-S: 12 layers, 384 wide, 6 heads; patch 2 (1024 tokens at 64x64), patch 4 at 128x128 (also 1024).
            patch = 2 if resolution <= 64 else 4
            cfg = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, patch_size=patch)
            return cfg, f"DiT-S/{cfg['patch_size']} (12 layers, 384 wide)"
    raise ValueError(f"no {size} config for model family {family!r}")


class NullNet(torch.nn.Module):
    """A stand-in network that costs next to nothing (``0.5 x``, one elementwise op, ``[B, ...]`` in and out),
    so that a loop around it measures the loop's own cost: scheduler or solver arithmetic, guidance, adapters and
    launches. Called as ``net(x, t, **cond)`` (a raw network) or ``model(x, sigma, **cond)`` (an EDM-style model
    that returns ``D`` itself)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return x * 0.5


class DiffusersNet(torch.nn.Module):
    """A diffusers network as ``net(x, t, **cond) -> tensor``: ``x`` ``[B, C, H, W]`` is cast to the network's dtype
    (the loops keep float32 latents while the weights may be bf16), ``t`` ``[B]``; the output tensor is returned in
    the network's dtype."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.dtype = next(net.parameters()).dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x.to(self.dtype), t, **cond, return_dict=False)[0]


@dataclass
class Workload:
    """One model at one resolution: the fastdiff model ``den(x, sigma, **cond)``, the raw network
    ``net(x_in, t, **cond)`` the diffusers loop and the model timing call, and how to make its inputs."""

    family: str
    description: str
    shape: tuple[int, int, int]  # C, H, W
    den: Callable[..., torch.Tensor]
    net: Callable[..., torch.Tensor]
    scheduler: Callable[[str], Any]  # solver name -> a fresh diffusers scheduler, or None where diffusers has none
    make_cond: Callable[[int, torch.Generator], tuple[dict, dict]]  # batch -> (cond, uncond)
    timestep: Callable[[torch.Tensor], torch.Tensor]  # [B] sigmas -> what the raw network takes as t
    dtype: torch.dtype = torch.float32
    edm: bool = False  # sigmas come from the Karras schedule (EDM) rather than the scheduler's timesteps
    raw: torch.nn.Module | None = None  # the diffusers network itself (for the pipeline path)

    def sigmas(self, solver: str, steps: int) -> torch.Tensor:
        """``[steps + 1]`` float64 schedule, the one the diffusers scheduler steps through (computed without
        diffusers; tests/test_bench_sample.py checks that it is the same)."""
        if self.edm:
            return schedules.karras(steps, 0.002, 80.0)
        return baselines.vp_sigmas(solver, steps)


def build_workload(family: str, resolution: int, size: str, device: torch.device, dtype: torch.dtype) -> Workload:
    """Build a model family at a resolution (digits: always its own 1x16x16), random weights seeded with 0."""
    if family == "digits":
        model = fastdiff.models.get("digits").to(device).eval()

        def make_cond(b, g):
            return generate.label_kwargs(torch.arange(b, device=device) % model.config.num_classes)

        params = sum(v.numel() for v in model.parameters())
        return Workload(
            family, f"fastdiff digits EDM UNet, {params / 1e6:.1f}M params", (1, 16, 16), model, model.net,
            lambda solver: baselines.edm_scheduler(solver), make_cond, lambda s: s.log() / 4, torch.float32, edm=True,
        )  # fmt: skip

    if family == "null_edm":
        net = NullNet()

        def make_cond(b, g):
            labels = torch.arange(b, device=device) % 10
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, 10)}

        def no_scheduler(solver):
            raise _Skip("diffusers has no scheduler loop for a model that returns D itself")

        return Workload(
            family, "null EDM-style model (D = 0.5 x, called with sigma): the loop alone", (4, resolution, resolution),
            net, net, no_scheduler, make_cond, lambda s: s, torch.float32, edm=True,
        )  # fmt: skip

    ab = baselines.sd_alphas_cumprod()
    if family == "null":
        net = NullNet()
        den = denoisers.VPDenoiser(net, ab, prediction="eps").to(device)

        def make_cond(b, g):
            labels = torch.arange(b, device=device) % 10
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, 10)}

        return Workload(
            family, "null network (0.5 x) behind VPDenoiser: the loop alone", (4, resolution, resolution), den, net,
            baselines.vp_scheduler, make_cond, lambda s: den.sigma_to_t(s).to(torch.float32), torch.float32,
        )  # fmt: skip

    diffusers = peers.diffusers()
    cfg, desc = _diffusers_config(family, resolution, size)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: random init of 100M parameters on the host takes seconds
        if family == "unet":
            raw = diffusers.UNet2DModel(sample_size=resolution, in_channels=4, out_channels=4, num_class_embeds=11,
                                        **cfg)  # fmt: skip
            null, n_classes = 10, 10
        elif family == "unet_cond":
            raw = diffusers.UNet2DConditionModel(sample_size=resolution, in_channels=4, out_channels=4, **cfg)
        elif family == "dit":
            raw = diffusers.DiTTransformer2DModel(sample_size=resolution, in_channels=4, num_embeds_ada_norm=1000,
                                                  **cfg)  # fmt: skip
            null, n_classes = 1000, 1000
        else:
            raise ValueError(f"unknown model family {family!r}; choose from {list(MODELS)}")
    raw = raw.eval()
    if dtype != torch.float32:
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # its advice on from_pretrained does not apply to random weights
        raw = raw.to(dtype)
        diffusers.utils.logging.set_verbosity(verbosity)
    net = DiffusersNet(raw)
    params = sum(p.numel() for p in raw.parameters())
    desc = f"{desc}, {params / 1e6:.1f}M params"
    if family == "unet_cond":
        ctx_dim = raw.config.cross_attention_dim

        def make_cond(b, g):
            ctx = [torch.randn(b, 77, ctx_dim, generator=g, device=device).to(dtype) for _ in range(2)]
            return {"encoder_hidden_states": ctx[0]}, {"encoder_hidden_states": ctx[1]}
    else:

        def make_cond(b, g):
            labels = torch.arange(b, device=device) % n_classes
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, null)}

    den = denoisers.VPDenoiser(net, ab, prediction="eps").to(device)
    return Workload(
        family, desc, (4, resolution, resolution), den, net, baselines.vp_scheduler, make_cond,
        lambda s: den.sigma_to_t(s).to(torch.float32), dtype, raw=raw,
    )  # fmt: skip


# --- timing ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``fn()``: CUDA events on a GPU, wall clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(fns: Sequence[Callable[[], object]], device: torch.device, reps: int) -> list[list[float]]:
    """Seconds of ``reps`` calls of each (already warm) ``fn``, ``[len(fns)][reps]``. The calls alternate (a, b, a,
    b, ...) so that a slow spell of a shared machine falls on all of them alike rather than on one, and the
    difference of a pair is a fair estimate of what separates them."""
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            t.append(_timed(fn, device))
    return times


def _graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` captured in one CUDA graph (after a warm-up on a side stream); returns the replay."""
    return capture_graph(fn, device)[0].replay


def forward_plan(variant: str, batch: int, nfe: tuple[int, int]) -> tuple[int, ...]:
    """The batch sizes of the network forwards a variant issues in one run, in order of size (the timing only
    needs the multiset): the baselines run ``2B`` at every evaluation; fastdiff batches cond and uncond into one
    ``2B`` forward on guided evaluations and runs ``B`` on the others."""
    cond, uncond = nfe
    if variant in ("kdiffusion", "kdiff_eager", "diffusers", "fastdiff_scheduler"):
        return (2 * batch,) * cond
    return (2 * batch,) * uncond + (batch,) * (cond - uncond)


def model_forwards(
    w: Workload, batch: int, plan: Sequence[int], sigma: float, device: torch.device, graph: bool
) -> Callable[[], None]:
    """The raw network forwards of ``plan`` (batch sizes ``B`` or ``2B``) back to back on fixed inputs, as one
    callable (replaying one CUDA graph when ``graph``): the part of a sampling run that no loop can save."""
    g = torch.Generator(device=device).manual_seed(1)
    cond, uncond = w.make_cond(batch, g)
    inputs = {}
    for b in set(plan):
        kwargs = baselines.cat_cond(cond, uncond) if b == 2 * batch else cond
        x = torch.randn(b, *w.shape, generator=g, device=device)
        t = w.timestep(torch.full((b,), sigma, device=device, dtype=torch.float32))
        inputs[b] = (x, t, kwargs)

    def run():
        for b in plan:
            x, t, kwargs = inputs[b]
            w.net(x, t, **kwargs)

    return _graphed(run, device) if graph else run


# --- the variants ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One (workload, batch, solver, steps) cell: the inputs every variant of it shares."""

    w: Workload
    batch: int
    solver: str
    steps: int
    scale: float
    interval: tuple[float, float]
    sigmas: torch.Tensor  # [steps + 1] float64, host
    noise: torch.Tensor  # [B, C, H, W] unit noise on the device
    cond: dict = field(default_factory=dict)
    uncond: dict = field(default_factory=dict)


def _runner(case: Case, variant: str, device: torch.device) -> tuple[Callable[[], object], tuple[int, int], str]:
    """``(run, (nfe_cond, nfe_uncond), guidance label)`` for one variant; ``run()`` samples one batch."""
    w, scale = case.w, case.scale
    if NEEDS.get(variant) == "diffusers":
        peers.diffusers()  # says plainly what is missing, before anything imports it
    full = fastdiff.Guidance(scale)
    if variant in ("kdiffusion", "kdiff_eager"):
        sig = case.sigmas.to(device, torch.float32)  # k-diffusion keeps the schedule as a device tensor
        x = case.noise * sig[0]
        cfg = baselines.CFGDenoiser(w.den, scale)
        extra = {"cond": case.cond, "uncond": case.uncond}
        nfe = fastdiff.count_nfe(case.solver, case.sigmas, full)
        if variant == "kdiff_eager":
            sampler = baselines.KDIFF_SAMPLERS[case.solver]
            return lambda: sampler(cfg, x, sig, extra), nfe, "cfg every step"
        sampler = getattr(peers.k_diffusion_sampling(), f"sample_{case.solver}")  # the package's own loop
        return lambda: sampler(cfg, x, sig, extra_args=extra, disable=True), nfe, "cfg every step"
    if variant == "fastdiff_scheduler":
        from fastdiff.integrations.diffusers import FastDiffScheduler

        if w.edm:
            raise _Skip(f"FastDiffScheduler drives DDPM-family networks; the {w.family} model is an EDM network")
        scheduler = FastDiffScheduler.from_config(w.scheduler(case.solver).config, solver=case.solver)
        x = case.noise * scheduler.init_noise_sigma

        def run():
            return baselines.diffusers_loop(w.net, scheduler, x, case.steps, case.cond, case.uncond, scale)

        scheduler.set_timesteps(case.steps)
        n = len(scheduler.timesteps)
        return run, (n, n), "cfg every step"
    if variant == "pipeline_interval":
        from fastdiff.integrations.diffusers import PipelineSampler

        if w.raw is None:
            raise _Skip("the pipeline path runs diffusers networks")
        role = "transformer" if w.family == "dit" else "unet"
        pipe = SimpleNamespace(**{role: w.raw}, scheduler=w.scheduler(case.solver))
        guidance = fastdiff.Guidance(scale, interval=case.interval)
        runner = PipelineSampler(pipe, solver=case.solver, steps=case.steps, guidance=guidance,
                                 cuda_graph=device.type == "cuda")  # fmt: skip
        label = f"cfg on ({case.interval[0]:g}, {case.interval[1]:g}]" + (
            ", CUDA graph" if runner.sampler.cuda_graph else ""
        )

        def run():
            return runner(cond=case.cond, uncond=case.uncond, latents=case.noise, output_type="latent").images

        return run, tuple(runner.sampler.nfe), label
    if variant == "diffusers":
        scheduler = w.scheduler(case.solver)
        if scheduler is None:
            raise _Skip(f"diffusers has no EDM scheduler for {case.solver}")
        # diffusers' EDM schedulers give init_noise_sigma = sqrt(sigma_max^2 + 1); EDM starts at sigma_max.
        x = case.noise * float(scheduler.init_noise_sigma if not w.edm else case.sigmas[0])

        def run():
            return baselines.diffusers_loop(w.net, scheduler, x, case.steps, case.cond, case.uncond, scale)

        scheduler.set_timesteps(case.steps)
        n = len(scheduler.timesteps)
        return run, (n, n), "cfg every step"
    graph = variant == "fastdiff_graph" or (variant == "fastdiff_interval" and device.type == "cuda")
    if graph and device.type != "cuda":
        raise _Skip("CUDA graphs need a CUDA device")
    interval = variant == "fastdiff_interval"
    guidance = fastdiff.Guidance(scale, interval=case.interval) if interval else full
    label = f"cfg on ({case.interval[0]:g}, {case.interval[1]:g}]" if interval else "cfg every step"
    x = case.noise * float(case.sigmas[0])
    s = fastdiff.Sampler(w.den, solver=case.solver, sigmas=case.sigmas, guidance=guidance, shape=tuple(x.shape),
                         cuda_graph=graph)  # fmt: skip
    if graph:
        with torch.no_grad():
            s.capture(x, case.cond, case.uncond)
        label += ", CUDA graph"
    return lambda: s.sample(x, case.cond, case.uncond), tuple(s.nfe), label


def _reason(exc: Exception) -> str:
    """One line for a row's note: the exception's type and the start of its message."""
    msg = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}"


class _Skip(Exception):
    """A variant that does not apply here (the reason goes into the row's note)."""


def run_case(case: Case, variant: str, device: torch.device, reps: int, warmup: int, scenario: str) -> dict:
    """Time one variant of a case against its own model forwards; skips and failures become a row with the reason
    in ``note``."""
    w = case.w
    row = _row(_describe(scenario, w.family, w.shape, case.batch, case.solver, case.steps, w), variant, device)
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.no_grad():
            run, nfe, label = _runner(case, variant, device)
            row.update(guidance=label, nfe_cond=nfe[0], nfe_uncond=nfe[1])
            for _ in range(warmup):
                run()
            if cuda:  # the loop's own footprint (weights included), before the model-only timing allocates
                row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            graph = cuda and variant in ("fastdiff_graph", "fastdiff_interval", "pipeline_interval")
            plan = forward_plan(variant, case.batch, nfe)
            forwards = model_forwards(case.w, case.batch, plan, float(case.sigmas[1]), device, graph)
            forwards()
            totals, models = time_interleaved([run, forwards], device, reps)
        # Overhead from the paired differences: on a shared CPU the two medians can drift apart by more than the
        # overhead itself, while each pair ran back to back.
        overhead = statistics.median(t - m for t, m in zip(totals, models)) / case.steps
        row.update(total_ms=statistics.median(totals) * 1e3, model_ms=statistics.median(models) * 1e3,
                   overhead_us_per_step=overhead * 1e6)  # fmt: skip
    except (_Skip, peers.PeerMissing) as exc:
        row["note"] = f"skipped: {exc}"
    except Exception as exc:  # a failed variant must not lose the rest of a scarce GPU run
        row["note"] = f"failed: {_reason(exc)}"
    return row


# --- the benchmark --------------------------------------------------------------------------------------------


def _parse(values: str | Sequence | None, known: Sequence[str], what: str) -> list[str]:
    names = values.split(",") if isinstance(values, str) else list(values or known)
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose from {list(known)}")
    return names


def bench_sample(
    preset: str = "cpu",
    *,
    models: str | Sequence[str] | None = None,
    variants: str | Sequence[str] | None = None,
    scenarios: str | Sequence[str] | None = None,
    batches: Sequence[int] | None = None,
    resolutions: Sequence[int] | None = None,
    solver: str = "dpmpp_2m",
    steps: int | None = None,
    reps: int | None = None,
    scale: float = 2.0,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    time_budget: float | None = None,
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], object] | None = None,
) -> list[dict]:
    """Run the end-to-end benchmark; returns one row (dict with ``COLUMNS``) per (case, variant).

    Args:
        preset: ``"cpu"`` (tiny networks at 4x8x8, a run under two minutes on 2 cores) or ``"gpu"`` (SD-like
            latent sizes 4x64x64 and 4x128x128, batches 1, 8, 32; see ``PRESETS``); the other arguments override it.
        models, variants, scenarios: subsets of ``MODELS``, ``VARIANTS``, ``SCENARIOS`` (comma-separated or lists).
        solver: ``dpmpp_2m``, ``euler`` or ``heun``, for the ``e2e`` scenario (``edm2_interval`` is Heun).
        time_budget: seconds; rows that would start after it are recorded as skipped, so that a run on a lent GPU
            always ends with its results written.
        threads: torch's intra-op threads during the run (the CPU preset: 1). Small networks run as fast on one
            thread as on two, and two OpenMP threads on a shared 2-core machine turn every other timing into an
            outlier when the other core is busy.
        echo: called once before the run, with one line, where an optional peer (diffusers, k-diffusion) that
            some rows need does not import here: which rows need which package, and that they are skipped. Those
            rows are recorded as ``skipped: needs ...`` without being tried.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
    if solver not in baselines.KDIFF_SAMPLERS:
        raise ValueError(f"unknown solver {solver!r} for this benchmark; choose from {list(baselines.KDIFF_SAMPLERS)}")
    p = PRESETS[preset]
    models, variants = _parse(models or E2E_MODELS, MODELS, "model"), _parse(variants, VARIANTS, "variant")
    scenarios = _parse(scenarios, SCENARIOS, "scenario")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype or (p["dtype"] if device.type == "cuda" else "float32"))
    # None takes the preset's value; 0 is refused, never read as "unset".
    batches = list(p["batches"] if batches is None else batches)
    resolutions = list(p["resolutions"] if resolutions is None else resolutions)
    steps, reps, warmup = p["steps"] if steps is None else steps, p["reps"] if reps is None else reps, p["warmup"]
    for name, values in (("batches", batches), ("resolutions", resolutions), ("steps", [steps]), ("reps", [reps])):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be integers >= 1, got {values if len(values) != 1 else values[0]!r}")

    # The cells (scenario, family, resolution, batch, solver, steps, variants, reps), cheapest first, so that a time
    # budget cuts the most expensive ones: the loop-overhead pairs, the EDM2 scenario, then the families in MODELS'
    # order, small latents first. Workloads are built lazily and freed once their cells are done.
    cells = []
    if "overhead" in scenarios:
        o = OVERHEAD
        for family, pair in OVERHEAD_PAIRS.items():
            graph = ["fastdiff_graph"] if device.type == "cuda" else []
            chosen = [v for v in [*pair, *graph] if v in variants]
            cells.append(("overhead", family, o["resolution"], o["batch"], o["solver"], o["steps"], chosen, o["reps"]))
    if "edm2_interval" in scenarios:
        cells.append(("edm2_interval", "digits", 16, p["edm2_batch"], "heun", p["edm2_steps"], variants, reps))
    if "e2e" in scenarios:
        for family in models:
            for res in [16] if family == "digits" else sorted(resolutions):
                cells += [("e2e", family, res, b, solver, steps, variants, reps) for b in batches]
    total_rows = sum(len(cell[6]) for cell in cells)
    # Each peer some row needs is imported once, up front: a missing one is said before the run, in one line, and
    # its rows are skipped rather than each trying the import again.
    needed = {p for cell in cells for v in cell[6] for p in _peers_needed(cell[1], v)}
    missing = {}
    for peer in [p for p in PEER_LOADERS if p in needed]:
        try:
            getattr(peers, PEER_LOADERS[peer])()
        except peers.PeerMissing as exc:
            missing[peer] = str(exc)
    if missing and echo is not None:
        echo(_missing_peers_line(cells, missing))

    from tqdm.auto import tqdm

    threads = threads if threads is not None else (p["threads"] if device.type == "cpu" else None)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    bar = tqdm(total=total_rows, disable=not progress, desc="bench sample", unit="row")
    rows, t_start = [], time.perf_counter()
    workloads: dict[tuple, Workload] = {}
    try:
        for scenario, family, res, batch, slv, n, cell_variants, cell_reps in cells:
            key = (family, res)
            shape = (1, 16, 16) if family == "digits" else (4, res, res)
            try:
                lacking = [p for p in _peers_needed(family, None) if p in missing]
                if lacking:
                    raise peers.PeerMissing(missing[lacking[0]])
                if key not in workloads:
                    workloads.clear()  # one network on the device at a time
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    workloads[key] = build_workload(family, res, p["size"], device, dtype)
                w = workloads[key]
                g = torch.Generator(device=device).manual_seed(0)
                noise = torch.randn(batch, *w.shape, generator=g, device=device)
                cond, uncond = w.make_cond(batch, g)
                case = Case(w, batch, slv, n, scale, INTERVAL, w.sigmas(slv, n), noise, cond, uncond)
                desc, failed = _describe(scenario, family, shape, batch, slv, n, w), None
            except peers.PeerMissing as exc:  # e.g. the diffusers networks without diffusers
                desc, failed = _describe(scenario, family, shape, batch, slv, n), f"skipped: {exc}"
            except Exception as exc:  # a model that cannot be built here: record it, run the other cells
                desc, failed = _describe(scenario, family, shape, batch, slv, n), f"failed: {_reason(exc)}"
            for variant in cell_variants:
                bar.set_description(f"{scenario} {family} {shape[1]}px b={batch} {variant}")
                lacking = [p for p in _peers_needed(family, variant) if p in missing]
                if failed:
                    row = _row(desc, variant, device, failed)
                elif lacking:
                    row = _row(desc, variant, device, f"skipped: {missing[lacking[0]]}")
                elif time_budget is not None and time.perf_counter() - t_start > time_budget:
                    row = _row(desc, variant, device, f"skipped: time budget of {time_budget:g} s spent")
                else:
                    row = run_case(case, variant, device, cell_reps, warmup, scenario)
                rows.append(row)
                bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    return rows


def _peers_needed(family: str, variant: str | None) -> list[str]:
    """The optional peers a row of ``family`` and ``variant`` needs (``variant`` None: building the model), in the
    order the row would import them."""
    return [p for p in ("diffusers" if family in DIFFUSERS_MODELS else None, NEEDS.get(variant)) if p]


def _missing_peers_line(cells: list[tuple], missing: dict[str, str]) -> str:
    """One line: how many rows are skipped, and for each missing peer its install line, the models and variants
    that need it and its count of rows (a row that needs two missing peers counts for the first it imports)."""
    counts = dict.fromkeys(missing, 0)
    models: dict[str, dict] = {p: {} for p in missing}  # dicts as ordered sets
    variants: dict[str, dict] = {p: {} for p in missing}
    for cell in cells:
        family = cell[1]
        for variant in cell[6]:
            lacking = [p for p in _peers_needed(family, variant) if p in missing]
            if not lacking:
                continue
            counts[lacking[0]] += 1
            if lacking[0] in _peers_needed(family, None):
                models[lacking[0]][family] = None
            else:
                variants[lacking[0]][variant] = None
    install = {"diffusers": peers.DIFFUSERS_INSTALL, "k-diffusion": peers.K_DIFFUSION_INSTALL}
    parts = []
    for peer, count in counts.items():
        groups = (("model", list(models[peer])), ("variant", list(variants[peer])))
        what = [f"{kind}{'s' if len(names) > 1 else ''} {', '.join(names)}" for kind, names in groups if names]
        parts.append(f"{peer} ({install[peer]}) for {' and '.join(what)}: {count} row{'s' if count != 1 else ''}")
    total = sum(len(cell[6]) for cell in cells)
    return (f"{sum(counts.values())} of {total} rows skipped, their optional packages not importable here: "
            + "; ".join(parts))  # fmt: skip


def _describe(scenario: str, family: str, shape: Sequence[int], batch: int, solver: str, steps: int,
              w: Workload | None = None) -> dict:  # fmt: skip
    """The descriptive columns of a cell's rows (``w`` None where its model could not be built)."""
    return {
        "scenario": scenario, "model": family, "config": w.description if w else "", "shape": "x".join(map(str, shape)),
        "batch": batch, "dtype": str(w.dtype).removeprefix("torch.") if w else "", "solver": solver, "steps": steps,
    }  # fmt: skip


def _library(variant: str) -> str:
    """The library (and version) whose loop a variant runs."""
    if variant == "kdiff_eager":
        return "fastdiff's k-diffusion-style baseline"
    name = {"kdiffusion": "k-diffusion", "diffusers": "diffusers"}.get(variant, "fastdiff")
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def _row(desc: dict, variant: str, device: torch.device, note: str = "") -> dict:
    """A row with the cell's description filled in and no measurements yet."""
    return {
        **dict.fromkeys(COLUMNS, ""), **desc, "variant": variant, "library": _library(variant), "total_ms": math.nan,
        "model_ms": math.nan, "overhead_us_per_step": math.nan, "peak_mem_mb": "n/a",
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(), "note": note,
    }  # fmt: skip


# --- reporting ------------------------------------------------------------------------------------------------


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def overhead_summary(rows: list[dict]) -> str:
    """What the ``overhead`` rows show: fastdiff's per-step loop overhead against each peer's, and whether it meets
    the target (at most a third of the peer's)."""
    lines = []
    for family, (peer, ours) in OVERHEAD_PAIRS.items():
        sel = {r["variant"]: r for r in rows if r["scenario"] == "overhead" and r["model"] == family}
        if peer not in sel or ours not in sel:
            continue
        p, f = _num(sel[peer]["overhead_us_per_step"]), _num(sel[ours]["overhead_us_per_step"])
        if math.isnan(p) or math.isnan(f):
            why = sel[peer]["note"] or sel[ours]["note"]
            lines.append(f"{family}: not measured ({why})")
            continue
        ratio = f / p
        verdict = "met" if ratio <= OVERHEAD_TARGET else "MISSED"
        lines.append(
            f"{sel[ours]['config'].split(':')[0]}: fastdiff {f:.1f} us per step against {sel[peer]['library']} "
            f"{p:.1f} us: {ratio:.2f} of it (target <= 1/3: {verdict})"
        )
    if not lines:
        return ""
    o = OVERHEAD
    head = (f"Loop overhead per step (batch {o['batch']}, 4x{o['resolution']}x{o['resolution']}, {o['solver']}, "
            f"{o['steps']} steps, CFG batched, a one-multiply network; median of {o['reps']} runs):")  # fmt: skip
    return "\n".join([head, *lines])


def edm2_summary(rows: list[dict]) -> str:
    """What the ``edm2_interval`` rows show: the unconditional NFE the interval leaves and the time it saves."""
    sel = {r["variant"]: r for r in rows if r["scenario"] == "edm2_interval"}
    interval = sel.get("fastdiff_interval")
    if not interval or interval["nfe_cond"] == "":
        return ""
    c, u = int(interval["nfe_cond"]), int(interval["nfe_uncond"])
    lo, hi = INTERVAL
    lines = [
        f"EDM2 interval guidance on the digits model, {interval['steps']} Heun steps, Karras sigma 0.002..80, "
        f"batch {interval['batch']}: guidance on ({lo:g}, {hi:g}] runs {u} unconditional evaluations of {c} "
        f"({u / c:.0%} of full CFG's {c}); NFE {c + u} against {2 * c} ({(c + u) / (2 * c):.0%})."
    ]
    # Compare with full CFG in the same execution mode: the graph row on CUDA, the eager row on the CPU.
    full = sel.get("fastdiff_graph") if "CUDA graph" in interval["guidance"] else sel.get("fastdiff_eager")
    t_int = _num(interval["total_ms"])
    if full is not None and not math.isnan(_num(full["total_ms"])) and not math.isnan(t_int):
        t_full = _num(full["total_ms"])
        lines.append(f"Wall time per batch: interval {t_int:.1f} ms against full CFG {t_full:.1f} ms "
                     f"({full['variant']}), {t_full / t_int:.2f}x faster.")  # fmt: skip
    kd = sel.get("kdiff_eager")
    if kd is not None and not math.isnan(_num(kd["total_ms"])) and not math.isnan(t_int):
        lines.append(f"Against the k-diffusion-style eager loop with full CFG ({_num(kd['total_ms']):.1f} ms): "
                     f"{_num(kd['total_ms']) / t_int:.2f}x faster.")  # fmt: skip
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """One line per row: total and model time per batch, host overhead per step, NFE, peak memory, note."""
    head = ("| scenario | model | shape | batch | solver, steps | variant | NFE c+u | total ms | model ms | "
            "overhead µs/step | peak MB | note |")  # fmt: skip
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    fmt = lambda v, spec: "–" if math.isnan(_num(v)) else format(_num(v), spec)  # noqa: E731
    for r in rows:
        nfe = f"{r['nfe_cond']}+{r['nfe_uncond']}" if r["nfe_cond"] != "" else "–"
        lines.append(
            f"| {r['scenario']} | {r['model']} | {r['shape']} | {r['batch']} | {r['solver']}, {r['steps']} | "
            f"{r['variant']} | {nfe} | {fmt(r['total_ms'], '.1f')} | {fmt(r['model_ms'], '.1f')} | "
            f"{fmt(r['overhead_us_per_step'], '.0f')} | {r['peak_mem_mb']} | {r['note']} |"
        )
    return "\n".join(lines)


def _overhead_panel(ax, rows: list[dict]) -> None:
    """Bars: each loop's own cost per step in the overhead scenario, grouped by model form."""
    names = [f"{r['model']}\n{r['variant']}" for r in rows]
    colors = ["tab:blue" if r["library"].startswith("fastdiff") else "tab:grey" for r in rows]
    ax.bar(range(len(rows)), [_num(r["overhead_us_per_step"]) for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    ax.set_title("loop overhead, batch 1, 40 steps", fontsize=9)
    ax.set_ylabel("µs per step")
    ax.grid(True, axis="y", alpha=0.3)


def write_results(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """Write ``sample_loops.csv`` and ``sample_loops.png`` (per model and shape: total time per batch and host
    overhead per step against batch size, one line per variant; the EDM2 scenario as bars). Returns the paths."""
    out = Path(out)
    csv_path, png_path = out / "sample_loops.csv", out / "sample_loops.png"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(buf.getvalue(), newline=""))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if not math.isnan(_num(r["total_ms"]))]
    panels = list(dict.fromkeys((r["model"], r["shape"]) for r in measured if r["scenario"] == "e2e"))
    edm2 = [r for r in measured if r["scenario"] == "edm2_interval"]
    overhead = [r for r in measured if r["scenario"] == "overhead"]
    cols = max(1, len(panels) + bool(edm2) + bool(overhead))
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7), squeeze=False)
    if overhead:  # the last column
        _overhead_panel(axes[0, -1], overhead)
        axes[1, -1].axis("off")
        lines = "\n".join(textwrap.fill(line, 58) for line in overhead_summary(rows).splitlines())
        axes[1, -1].text(0, 0.5, lines, fontsize=6.5, va="center")
    for j, (model, shape) in enumerate(panels):
        pts = [r for r in measured if r["scenario"] == "e2e" and (r["model"], r["shape"]) == (model, shape)]
        for variant in dict.fromkeys(r["variant"] for r in pts):
            sel = sorted((r for r in pts if r["variant"] == variant), key=lambda r: r["batch"])
            b = [r["batch"] for r in sel]
            axes[0, j].plot(b, [_num(r["total_ms"]) for r in sel], marker="o", ms=3, label=variant)
            axes[1, j].plot(b, [_num(r["overhead_us_per_step"]) for r in sel], marker="o", ms=3, label=variant)
        batches = sorted({r["batch"] for r in pts})
        axes[0, j].set(title=f"{model} {shape}", ylabel="ms per batch")
        axes[1, j].set(xlabel="batch", ylabel="host overhead µs per step")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
        axes[1, j].axhline(0, color="grey", lw=0.5)
    if edm2:
        col = len(panels)
        ax = axes[0, col]
        names = [r["variant"] for r in edm2]
        pos = range(len(edm2))
        ax.bar([i - 0.2 for i in pos], [_num(r["total_ms"]) for r in edm2], width=0.4, label="total")
        ax.bar([i + 0.2 for i in pos], [_num(r["model_ms"]) for r in edm2], width=0.4, label="model alone")
        ax.set_xticks(pos, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"EDM2 interval, digits, heun {edm2[0]['steps']}, b={edm2[0]['batch']}", fontsize=9)
        ax.set_ylabel("ms per batch")
        ax.legend(fontsize=8)
        axes[1, col].axis("off")
        nfe = "\n".join(f"{r['variant']}: NFE {r['nfe_cond']}+{r['nfe_uncond']}" for r in edm2)
        axes[1, col].text(0, 0.5, nfe, fontsize=8, va="center")
    if panels:
        axes[0, 0].legend(fontsize=8)
    device = rows[0]["device"] if rows else "?"
    date = rows[0]["date"] if rows else ""
    fig.suptitle(f"end-to-end sampling loops with CFG on {device}, {date}")
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return csv_path, png_path
