"""A small digits classifier, the "Inception network" of fastdiff's built-in digits model.

Its logits give the class accuracy of conditional samples, and its penultimate features give a Fréchet distance
(FID-style) between generated and real digits, with no downloaded weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.checkpoint import load_typed_model, save_typed_model

CLASSIFIER_TYPE = "digit_classifier"


def _conv(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: no running statistics, so train and eval behave alike and the features of
    # an image do not depend on the other images in its batch.
    groups = next(g for g in (8, 4, 2, 1) if cout % g == 0 and (cout // g >= 4 or g == 1))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())


class DigitClassifier(nn.Module):
    """A small CNN: two pairs of 3x3 convs, each followed by 2x max pooling, one more conv, average pooling to
    2x2, a ``feature_dim`` feature layer (SiLU) and a linear head. (Pooling to 2x2 rather than 1x1 keeps coarse
    layout, which a digit's identity depends on: it learns several times faster.)

    ``forward(x) -> logits``: ``x [B, in_channels, resolution, resolution]`` float in [-1, 1] -> ``[B, num_classes]``.
    ``features(x)``: the same input -> ``[B, feature_dim]``, the penultimate layer used for Fréchet distances.
    """

    def __init__(
        self, resolution: int = 16, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 64
    ):
        super().__init__()
        if resolution < 4 or in_channels < 1 or num_classes < 2 or width < 4 or feature_dim < 1:
            raise ValueError(
                "need resolution >= 4, in_channels >= 1, num_classes >= 2, width >= 4, feature_dim >= 1; got "
                f"{resolution}, {in_channels}, {num_classes}, {width}, {feature_dim}"
            )
        self.config = {
            "resolution": resolution,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "feature_dim": feature_dim,
        }
        w = width
        self.body = nn.Sequential(
            _conv(in_channels, w),
            _conv(w, w),
            nn.MaxPool2d(2),
            _conv(w, 2 * w),
            _conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _conv(2 * w, 2 * w),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self.config["resolution"], self.config["in_channels"]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (c, r, r):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must have shape [B, {c}, {r}, {r}], got {got}")
        return x.to(self.head.weight.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [-1, 1] -> ``[B, feature_dim]`` penultimate features."""
        return self.body(self._check(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [-1, 1] -> ``[B, num_classes]`` logits."""
        return self.head(self.features(x))


def save_classifier(path: str | os.PathLike, model: DigitClassifier, *, provenance: str = "") -> Path:
    """Save with ``fastdiff.checkpoint.save_model``: safetensors weights and ``{"type": "digit_classifier",
    **constructor arguments}`` as JSON metadata, written atomically. ``provenance`` (e.g. the command that trained
    it) is stored alongside and comes back as ``load_classifier(path).provenance``."""
    if not isinstance(model, DigitClassifier):
        raise TypeError(f"save_classifier expects a DigitClassifier, got {type(model).__name__}")
    return save_typed_model(path, model, CLASSIFIER_TYPE, model.config, provenance)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> DigitClassifier:
    """Rebuild a ``DigitClassifier`` from ``save_classifier``'s file, in eval mode. FileNotFoundError for a missing
    file; ValueError (``CheckpointError``) for a corrupt file, another model type, or mismatched names/shapes."""
    model = load_typed_model(path, CLASSIFIER_TYPE, lambda config: DigitClassifier(**config))
    return model.to(device).eval()


def _check_dataset(images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if num_classes is not None and ((labels < 0) | (labels >= num_classes)).any():
        raise ValueError(f"labels must lie in [0, {num_classes})")


def _augment(x: torch.Tensor, generator: torch.Generator, noise: float) -> torch.Tensor:
    """Random shifts of -1, 0 or +1 pixel per axis (the border padded with the image's own edge, which is the
    background for digits) and Gaussian noise of a random std in [0, noise]: generated samples are slightly
    off-centre and slightly noisy, and the classifier should not punish that."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    out = torch.empty_like(x)
    for oy in range(3):
        for ox in range(3):
            sel = ((dy == oy) & (dx == ox)).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    std = torch.rand(b, 1, 1, 1, generator=generator) * noise
    return out + std * torch.randn(out.shape, generator=generator)


def train_classifier(
    dataset_images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
    *,
    width: int = 32,
    feature_dim: int = 64,
    num_classes: int | None = None,
    noise: float = 0.1,
) -> DigitClassifier:
    """Train a ``DigitClassifier`` with AdamW and a cosine learning-rate decay; deterministic for a given seed.

    Args:
        dataset_images: ``[N, C, H, W]`` float in [-1, 1], square.
        labels: ``[N]`` int64 in ``[0, num_classes)``; ``num_classes`` defaults to ``labels.max() + 1``.
        steps, batch_size, lr: the optimisation; batches are drawn uniformly with replacement.
        seed: seeds both the initialisation and the batch/augmentation draws (torch's global RNG is untouched).
        augment: random +-1 pixel shifts and small Gaussian noise (std up to ``noise``).

    Returns:
        the trained classifier, in eval mode, on the CPU.
    """
    x = torch.as_tensor(dataset_images).detach().float().cpu()
    y = torch.as_tensor(labels).detach().cpu().long()
    _check_dataset(x, y)
    if x.shape[2] != x.shape[3]:
        raise ValueError(f"images must be square, got {x.shape[2]}x{x.shape[3]}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    n_cls = int(y.max()) + 1 if num_classes is None else num_classes
    _check_dataset(x, y, n_cls)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(x.shape[2], x.shape[1], n_cls, width=width, feature_dim=feature_dim)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        xb = _augment(x[idx], gen, noise) if augment else x[idx]
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (``[B, C, H, W] -> [B, classes]`` logits) on ``images [N, C, H, W]`` with
    ``labels [N]``; a float in [0, 1]."""
    from fastdiff.metrics import class_accuracy

    return class_accuracy(model, images, labels, batch_size=batch_size)


__all__ = [
    "DigitClassifier",
    "train_classifier",
    "evaluate_accuracy",
    "save_classifier",
    "load_classifier",
]
