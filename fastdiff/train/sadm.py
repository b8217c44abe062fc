"""SADM (Yang et al., CVPR 2024; PAPERS.md section 5): structure-guided adversarial training of diffusion models.

Besides the usual weighted x0 loss, SADM compares the *structure* of a batch: the pairwise affinities ``S_ij``
between samples, computed on the features of a learned encoder ``E_phi``. For real clean images ``x0`` and the
denoiser's predictions ``x0_hat = D(x0 + sigma n; sigma)`` at the same noise levels, the structural gap is

    gap = dist(S(E_phi(x0, sigma)), S(E_phi(x0_hat, sigma)))

over the off-diagonal pairs. The denoiser minimises ``loss_EDM + lam * gap``; the structure discriminator
``E_phi`` maximises ``gap`` (it learns features in which the predicted batch's structure differs most from the
real batch's). The two players alternate (:class:`fastdiff.train.runtime.Adversary`): ``d_updates`` discriminator
updates every ``d_every`` denoiser steps, on the same batch with fresh noise.

The paper's inferred choices are options (:class:`SADMConfig`), with these defaults:

* the affinity ``S``: ``"cosine"`` similarity of the features; ``"l2"``: minus the Euclidean distance between
  unit-normalised features (the squared distance would just be ``2 cos - 2``); ``"gaussian"``:
  ``exp(-|f_i - f_j|^2 / (2 h^2))`` on unit-normalised features, bandwidth ``h``;
* the distance: ``"l1"``, the mean ``|S_real - S_fake|`` over the ``B (B - 1)`` off-diagonal pairs; ``"l2"``,
  the mean squared difference; ``"kl"``, the mean over rows of ``KL(softmax(S_real / tau) || softmax(S_fake /
  tau))`` over each row's off-diagonal entries;
* ``E_phi`` sees the noise level ``sigma`` of the prediction (``encoder_sigma``), as the paper allows, and is a
  small strided CNN (:class:`StructureEncoder`) in the data's space (pixels, or latents for a latent model);
* ``lam`` (0.01), the discriminator's optimizer and the update ratio; a warm-up on the denoising loss alone
  (``warmup``) and an R1-style gradient penalty on the real batch (``gradient_penalty``), both off by default.

The structure lives within one process's batch: under DDP each rank compares its own ``batch_size`` samples. A
batch needs at least two samples (three for ``"kl"``, whose rows would otherwise hold one entry); smaller batches
are refused when the loss is built and when it is called. The trained denoiser is an ordinary fastdiff model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.unet import FourierEmbedding, _groups
from fastdiff.train.edm import EDMLoss
from fastdiff.train.runtime import Adversary

AFFINITIES = ("cosine", "l2", "gaussian")
DISTANCES = ("l1", "l2", "kl")


@dataclass(frozen=True)
class SADMConfig:
    """Every SADM setting; see the module docstring for what each does."""

    lam: float = 0.01  # 0.1 made samples worse than plain EDM on the digits; 0.01 did not (BENCHMARKS.md)
    affinity: str = "cosine"
    distance: str = "l1"
    temperature: float = 0.1  # "kl": the row softmax's temperature
    bandwidth: float = 1.0  # "gaussian": the kernel's bandwidth h on unit features
    encoder_channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 64
    encoder_sigma: bool = True
    d_lr: float = 2e-4
    d_betas: tuple[float, float] = (0.0, 0.99)
    d_updates: int = 1
    d_every: int = 1
    warmup: int = 0  # denoiser steps on the denoising loss alone before the game starts
    gradient_penalty: float = 0.0  # gamma of (gamma / 2) E|grad_x0 gap|^2, on the real batch
    label_dropout: float = 0.1
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_channels", tuple(int(c) for c in self.encoder_channels))
        object.__setattr__(self, "d_betas", tuple(float(b) for b in self.d_betas))
        if self.affinity not in AFFINITIES:
            raise ValueError(f"affinity must be one of {AFFINITIES}, got {self.affinity!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        for name in ("lam", "gradient_penalty"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("temperature", "bandwidth", "d_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not self.encoder_channels or min(self.encoder_channels) < 1 or self.feature_dim < 1:
            raise ValueError(f"need encoder channels and feature_dim >= 1, got {self.encoder_channels}, "
                             f"{self.feature_dim}")  # fmt: skip
        for name, minimum in (("d_updates", 1), ("d_every", 1), ("warmup", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {getattr(self, name)}")

    @property
    def min_batch(self) -> int:
        """The smallest batch that has a structure to compare (see the module docstring)."""
        return 3 if self.distance == "kl" else 2

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SADMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SADMConfig fields {sorted(unknown)}")
        return cls(**d)


class StructureEncoder(nn.Module):
    """``E_phi``: images ``[B, C, H, W]`` and noise levels ``sigma [B]`` -> features ``[B, feature_dim]`` float32.

    A 3x3 stem to ``channels[0]``, then per further entry a GroupNorm, SiLU and a stride-2 3x3 convolution, then
    GroupNorm, SiLU, a global average pool and a linear layer. With ``use_sigma`` the Fourier features of
    ``log(sigma) / 4`` (as the UNet embeds it) pass through a linear layer and are added to the stem's channels.
    Any image size works (the pool is global).
    """

    def __init__(
        self, in_channels: int, channels: tuple[int, ...] = (32, 64, 128), feature_dim: int = 64, use_sigma: bool = True
    ):
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.embed = nn.Sequential(FourierEmbedding(32), nn.Linear(32, channels[0])) if use_sigma else None
        self.down = nn.Sequential(*(
            nn.Sequential(nn.GroupNorm(_groups(a), a), nn.SiLU(), nn.Conv2d(a, b, 3, stride=2, padding=1))
            for a, b in zip(channels, channels[1:])
        ))  # fmt: skip
        c = channels[-1]
        self.head = nn.Sequential(
            nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, feature_dim)
        )

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"the structure encoder takes [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        h = self.stem(x)
        if self.embed is not None:
            if sigma is None:
                raise ValueError("this structure encoder takes the noise level: call it as encoder(x, sigma)")
            h = h + self.embed(sigma.float().log() / 4).to(h.dtype)[:, :, None, None]
        return self.head(self.down(h)).float()


def affinity(features: torch.Tensor, kind: str = "cosine", bandwidth: float = 1.0) -> torch.Tensor:
    """``S [B, B]`` float32 from ``features [B, F]``: the pairwise affinity of the batch (see the module)."""
    f = F.normalize(features.float(), dim=1)
    cos = f @ f.T
    if kind == "cosine":
        return cos
    sq = (2 - 2 * cos).clamp_min(0)
    if kind == "l2":
        return -(sq + 1e-12).sqrt()  # the epsilon keeps the gradient finite for identical features
    if kind == "gaussian":
        return torch.exp(-sq / (2 * bandwidth**2))
    raise ValueError(f"affinity must be one of {AFFINITIES}, got {kind!r}")


def structural_distance(s_real: torch.Tensor, s_fake: torch.Tensor, kind: str = "l1", temperature: float = 0.1):
    """0-d float32 distance between two ``[B, B]`` affinity matrices over their off-diagonal entries.

    Zero for identical inputs; invariant to permuting the batch when the same permutation is applied to both.
    """
    b = s_real.shape[0]
    if s_real.shape != (b, b) or s_fake.shape != (b, b):
        raise ValueError(f"need two [B, B] affinity matrices, got {tuple(s_real.shape)} and {tuple(s_fake.shape)}")
    if b < (3 if kind == "kl" else 2):
        raise ValueError(f"a batch of {b} has no structure to compare for distance {kind!r}")
    off = ~torch.eye(b, dtype=torch.bool, device=s_real.device)
    if kind == "l1":
        return (s_real - s_fake).abs()[off].mean()
    if kind == "l2":
        return (s_real - s_fake).square()[off].mean()
    if kind == "kl":
        # Each row without its diagonal entry, [B, B - 1]: masking it to -inf instead would give NaN gradients.
        log_p = (s_real[off].view(b, b - 1) / temperature).log_softmax(dim=1)
        log_q = (s_fake[off].view(b, b - 1) / temperature).log_softmax(dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    raise ValueError(f"distance must be one of {DISTANCES}, got {kind!r}")


class SADMLoss:
    """The denoiser's loss ``loss_EDM + lam * gap`` (:meth:`__call__`) and the discriminator's ``-gap``
    (:meth:`discriminator_loss`), with ``adversary``, the :class:`~fastdiff.train.runtime.Adversary` to hand to
    :func:`~fastdiff.train.runtime.train`::

        loss = SADMLoss(SADMConfig(), StructureEncoder(channels), sigma_data=0.5)
        train(model, loss, dataset, train_config, adversary=loss.adversary)

    Both calls draw sigmas, noise and label dropout as :class:`~fastdiff.train.edm.EDMLoss` does, from the
    runtime's generator. Before the game starts (``warmup`` steps) the denoiser's loss is ``loss_EDM`` alone and
    its ``structure_gap`` log is NaN.

    Logs of the denoiser: ``loss_denoise`` (the EDM loss), ``structure_gap``, and EDMLoss's sigma and per-bin
    logs; of the discriminator (``adv_``-prefixed by the runtime): ``structure_gap`` on its own draw and
    ``penalty``.
    """

    def __init__(self, config: SADMConfig, encoder: nn.Module, *, sigma_data: float = 0.5):
        self.config = config
        self.encoder = encoder
        self.edm = EDMLoss(p_mean=config.p_mean, p_std=config.p_std, sigma_data=sigma_data,
                           label_dropout=config.label_dropout)  # fmt: skip
        self.adversary = Adversary(
            encoder, self.discriminator_loss, lr=config.d_lr, betas=config.d_betas, updates=config.d_updates,
            every=config.d_every, start_step=config.warmup,
        )  # fmt: skip

    def gap(self, encoder: Callable[..., torch.Tensor], real: torch.Tensor, fake: torch.Tensor, sigma: torch.Tensor):
        """The structural gap (0-d float32) between ``real`` and ``fake`` ``[B, C, H, W]`` at noise levels
        ``sigma [B]``, through ``encoder``."""
        c = self.config
        if real.shape[0] < c.min_batch:
            raise ValueError(
                f"SADM compares the structure within a batch, and a batch of {real.shape[0]} has none for distance "
                f"{c.distance!r}: use a per-process batch of at least {c.min_batch}"
            )
        args = (sigma,) if c.encoder_sigma else ()
        s_real = affinity(encoder(real, *args), c.affinity, c.bandwidth)
        s_fake = affinity(encoder(fake, *args), c.affinity, c.bandwidth)
        return structural_distance(s_real, s_fake, c.distance, c.temperature)

    def __call__(self, model: nn.Module, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        d = self.edm.draw(model, batch, generator)
        denoise = d.per_sample.mean()
        logs = self.edm.logs(denoise, d)
        logs["loss_denoise"] = logs.pop("loss")
        if self.adversary.active:
            gap = self.gap(self.encoder, d.x0, d.denoised, d.sigma)
            loss = denoise + self.config.lam * gap
        else:
            gap, loss = torch.full((), math.nan, device=denoise.device), denoise
        logs["structure_gap"] = gap.detach()
        return loss, logs

    def discriminator_loss(
        self, encoder: nn.Module, model: nn.Module, batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        """``-gap`` on a fresh draw (the model run without gradients), plus the gradient penalty if set."""
        with torch.no_grad():
            d = self.edm.draw(model, batch, generator)
        gamma = self.config.gradient_penalty
        real = d.x0.detach().clone().requires_grad_(gamma > 0)
        gap = self.gap(encoder, real, d.denoised.detach(), d.sigma)
        penalty = torch.zeros((), device=gap.device)
        if gamma > 0:
            (grad,) = torch.autograd.grad(gap, real, create_graph=True)
            penalty = 0.5 * gamma * grad.square().flatten(1).sum(dim=1).mean()
        return penalty - gap, {"structure_gap": gap.detach(), "penalty": penalty.detach()}


def build_encoder(config: SADMConfig, image_shape: tuple[int, int, int]) -> StructureEncoder:
    """The structure discriminator for images of ``image_shape = (C, H, W)``, checked with one forward."""
    enc = StructureEncoder(image_shape[0], config.encoder_channels, config.feature_dim, config.encoder_sigma)
    with torch.no_grad():
        enc(torch.zeros(2, *image_shape), torch.ones(2))
    return enc


__all__ = [
    "AFFINITIES", "DISTANCES", "SADMConfig", "SADMLoss", "StructureEncoder", "affinity", "build_encoder",
    "structural_distance",
]  # fmt: skip
