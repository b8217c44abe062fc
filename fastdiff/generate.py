"""Generating images from a model: per-sample seeded noise, batching, and sharding across processes.

Sample ``i`` of a run with seed ``s`` always starts from the same noise, draws the same noise at a stochastic
solver's steps (both from its own generator, seeded from ``(s, i)``) and gets the same class label, whatever the
batch size and however many processes share the work. So a run sharded with ``torchrun`` writes exactly the images
a single process would, each once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import fastdiff
from fastdiff.checkpoint import atomic_write
from fastdiff.guidance import Guidance
from fastdiff.sampler import BrownianDraws, Model

_SEED_STRIDE = 1_000_003  # a prime larger than any run's sample count: (seed, index) pairs never collide


class SampleNoise:
    """Every sample's own generator, seeded by ``(seed, indices[k])``: its first draw is the sample's initial noise
    (:meth:`draw`), its later draws the noise a stochastic solver asks for (called as k-diffusion's
    ``noise_sampler(sigma, sigma_next)``). So a stochastic run too gives sample ``i`` the same image whatever the
    batch size and the number of processes."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, ...], seed: int):
        self.shape = shape
        self.generators = [torch.Generator().manual_seed(seed * _SEED_STRIDE + int(i)) for i in indices.tolist()]

    def draw(self) -> torch.Tensor:
        """The next unit Gaussian draw of every sample, ``[len(indices), *shape]`` float64 on the CPU."""
        rows = [torch.randn(self.shape, generator=g, dtype=torch.float64) for g in self.generators]
        return torch.stack(rows) if rows else torch.empty(0, *self.shape, dtype=torch.float64)

    def like(self, x: torch.Tensor) -> BrownianDraws:
        """A noise sampler ``(sigma, sigma_next) -> [B, *shape]`` in ``x``'s dtype and device, Brownian where a
        step's intervals nest, as the samplers' own default noise (:class:`~fastdiff.sampler.BrownianDraws`)."""
        return BrownianDraws(lambda: self.draw().to(device=x.device, dtype=x.dtype))


def sample_noise(indices: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Unit Gaussian noise ``[len(indices), *shape]`` float64, row ``k`` drawn from its own generator seeded by
    ``(seed, indices[k])`` (the first draw of :class:`SampleNoise`)."""
    return SampleNoise(indices, shape, seed).draw()


def sample_labels(indices: torch.Tensor, num_classes: int, class_label: int | None) -> torch.Tensor | None:
    """Labels ``[len(indices)]`` int64: ``class_label`` for all, or balanced (``index % num_classes``) when it is
    None; None for an unconditional model."""
    if num_classes == 0:
        if class_label is not None:
            raise ValueError("this model is unconditional; drop --class")
        return None
    if class_label is None:
        return indices % num_classes
    if not 0 <= class_label < num_classes:
        raise ValueError(f"class must lie in [0, {num_classes}), got {class_label}")
    return torch.full_like(indices, class_label)


def label_kwargs(labels: torch.Tensor | None, condition: torch.Tensor | None = None) -> tuple[dict | None, dict | None]:
    """``(cond, uncond)`` keyword arguments for class labels ``[B]`` (int64) and a condition tensor ``[B, ...]``
    (a CoDi student's ``cond=``): the labels and the tensor, and for the unconditional pass the null label -1 and
    zeros (the null condition CoDi trains); ``(None, None)`` for an unconditional model."""
    cond, uncond = {}, {}
    if labels is not None:
        cond["class_labels"], uncond["class_labels"] = labels, torch.full_like(labels, -1)
    if condition is not None:
        cond["cond"], uncond["cond"] = condition, torch.zeros_like(condition)
    return (cond, uncond) if cond else (None, None)


@dataclass
class Generated:
    """Images ``[N, C, H, W]`` float32 in [-1, 1] (clamped), their labels ``[N]`` (or None) and sample indices
    ``[N]``, and the NFE one sample cost (``nfe_uncond`` of them unconditional)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    indices: torch.Tensor
    nfe: int
    nfe_uncond: int = 0
    full_evaluations: int | None = None  # with a feature cache: per sample, the network's full forward calls
    cached_evaluations: int | None = None  # and those that reused cached features


def generate(
    model: Model,
    indices: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    shape: tuple[int, ...],
    num_classes: int,
    solver: str | fastdiff.solvers.Solver = "dpmpp_2m",
    guidance: Guidance | None = None,
    class_label: int | None = None,
    seed: int = 0,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: bool = False,
    cuda_graph: bool = False,
    eval_sigmas: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    cache: str | fastdiff.cache.Cache | None = None,
) -> Generated:
    """Sample the images with the given ``indices [N]`` (int64), ``batch_size`` at a time, on ``device`` in float32,
    over ``sigmas`` (a schedule ending in 0); ``shape`` is one image's ``(C, H, W)``. Returns :class:`Generated`
    with images ``[N, C, H, W]`` on the CPU. With guidance the unconditional pass uses the null label -1 (batched
    with the conditional one). One :class:`~fastdiff.Sampler` serves every batch; with ``cuda_graph`` it replays
    one captured graph per batch size. ``eval_sigmas``: a learned schedule's evaluation sigmas (LD3). A stochastic
    solver draws each sample's step noise from that sample's generator (:class:`SampleNoise`); in a CUDA graph it
    draws on the device from one generator seeded per batch, so there its images depend on the batching.
    ``condition``: ``[M, ...]`` condition tensors the model takes as ``cond=`` (a CoDi student's), sample ``i``
    taking row ``i % M``, so that a sample's condition, like its noise, depends on its index alone. ``cache``: a
    feature cache (:mod:`fastdiff.cache`); a calibrated one calibrates on the first batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if condition is not None and len(condition) == 0:
        raise ValueError("condition holds no rows")
    labels = sample_labels(indices, num_classes, class_label)
    images = []
    sampler = fastdiff.Sampler(model, solver=solver, sigmas=sigmas, guidance=guidance, cuda_graph=cuda_graph,
                               eval_sigmas=eval_sigmas, cache=cache)  # fmt: skip
    batches = list(indices.split(batch_size))
    label_batches = labels.split(batch_size) if labels is not None else [None] * len(batches)
    steps = tqdm(
        list(zip(batches, label_batches)), desc="sampling", unit="batch", disable=not progress or len(batches) < 2
    )
    graph_noise = torch.Generator(device=device) if cuda_graph and sampler.plan.noisy else None
    for idx, lab in steps:
        noise = SampleNoise(idx, shape, seed)
        x = (noise.draw() * sigmas[0]).to(device=device, dtype=torch.float32)
        rows = None if condition is None else condition[idx % len(condition)].to(device=device, dtype=torch.float32)
        cond, uncond = label_kwargs(None if lab is None else lab.to(device), rows)
        if graph_noise is not None:  # a captured graph draws its noise on the device, from one generator a batch
            out = sampler.sample(x, cond, uncond, generator=graph_noise.manual_seed(seed * _SEED_STRIDE + int(idx[0])))
        else:
            out = sampler.sample(x, cond, uncond, noise_sampler=noise.like(x) if sampler.plan.noisy else None)
        images.append(out.clamp(-1, 1).float().cpu())
    if not images:
        return Generated(torch.empty(0, *shape), labels, indices, 0)
    nfe_cond, nfe_uncond = sampler.nfe
    stats = sampler.stats()
    return Generated(torch.cat(images), labels, indices, nfe_cond + nfe_uncond, nfe_uncond, stats.full_evaluations,
                     stats.cached_evaluations)  # fmt: skip


def shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """The sample indices of one process: ``rank, rank + world_size, ...`` below ``n``."""
    return torch.arange(rank, n, world_size)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]``, the layout image tools expect."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)


def part_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return out_dir / f"part-{rank:03d}-of-{world_size:03d}.npz"


def write_part(out_dir: Path, gen: Generated, rank: int, world_size: int) -> Path:
    """One process's images as ``part-RRR-of-WWW.npz`` (``images`` uint8 NHWC, ``labels``, ``indices``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = part_path(out_dir, rank, world_size)
    labels = gen.labels.numpy() if gen.labels is not None else np.full(len(gen.indices), -1)
    _save_npz(path, images=to_uint8(gen.images), labels=labels, indices=gen.indices.numpy())
    return path


def merge_parts(out_dir: Path, n: int, world_size: int) -> Path:
    """Join every process's part into ``samples.npz`` ordered by sample index, after checking that the parts
    hold each index below ``n`` exactly once; then remove the parts."""
    parts = [part_path(out_dir, r, world_size) for r in range(world_size)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise FileNotFoundError(f"missing shard files in {out_dir}: {missing}")
    loaded = [np.load(p, allow_pickle=False) for p in parts]
    indices = np.concatenate([z["indices"] for z in loaded])
    counts = np.bincount(indices, minlength=n)
    if len(counts) != n or (counts != 1).any():
        dup, lost = np.flatnonzero(counts > 1), np.flatnonzero(counts[:n] == 0)
        raise RuntimeError(f"shards do not cover 0..{n - 1} once each: duplicated {dup[:10]}, missing {lost[:10]}")
    order = np.argsort(indices)
    images = np.concatenate([z["images"] for z in loaded])[order]
    labels = np.concatenate([z["labels"] for z in loaded])[order]
    out = out_dir / "samples.npz"
    _save_npz(out, images=images, labels=labels, indices=indices[order])
    for p in parts:
        p.unlink()
    return out
