"""The EDM training loss (Karras et al. 2022, section 5 and Table 1), with label dropout for classifier-free guidance.

The contract with the training runtime (``fastdiff.train.runtime.train``) is

    loss_fn(model, batch, generator) -> (loss, logs)

- ``model(x, sigma, class_labels=None) -> D(x; sigma)``, fastdiff's model convention (e.g. ``EDMUNet``);
- ``batch = (images [B, C, H, W], labels [B] int64)``, or ``images`` alone / ``(images, None)`` for
  unconditional training; label ``-1`` already means "no class";
- ``generator``: a ``torch.Generator``, the only source of randomness (sigmas, noise, label dropout), so that a
  resumed run replays exactly. Its device decides where the draws happen; they are then moved to the images;
- ``loss``: a scalar tensor; ``logs``: ``dict[str, Tensor]`` of detached 0-d float32 tensors, the same keys at
  every step. Tensors rather than floats so that a step costs no device-to-host sync; the runtime converts them
  only on the steps it logs (``float(v)`` works on each).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

# Low / middle / high noise. With EDM's default sigma distribution about 6% of draws land above 2, so at
# batch 128 each bin is practically never empty.
DEFAULT_SIGMA_BINS = (0.2, 2.0)


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2``.

    It equals ``1 / c_out(sigma)^2``, so ``lambda * |D - x0|^2 = |F - F_target|^2``: the raw network sees a
    unit-variance target at every noise level.
    """
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _bin_names(edges: Sequence[float]) -> list[str]:
    names = [f"loss_sigma<{edges[0]:g}"]
    names += [f"loss_sigma{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    names.append(f"loss_sigma>={edges[-1]:g}")
    return names


class EDMDraw(NamedTuple):
    """One step's draws and the model's answer, for losses built on the EDM loss (SADM)."""

    x0: torch.Tensor  # [B, C, H, W] float32 clean images
    sigma: torch.Tensor  # [B] float32 noise levels
    denoised: torch.Tensor  # [B, C, H, W] D(x0 + sigma * noise; sigma, labels)
    per_sample: torch.Tensor  # [B] float32 weighted loss of each sample
    drop_frac: torch.Tensor  # 0-d fraction of labels dropped
    labels: torch.Tensor | None  # [B] int64 labels after dropout (-1: none), or None


class EDMLoss:
    """``EDMLoss(...)(model, batch, generator) -> (loss, logs)``: the EDM denoising loss.

    Per step, for images ``x [B, C, H, W]`` and labels ``y [B]``:

    1. ``sigma = exp(p_mean + p_std * n)``, ``n ~ N(0, 1)`` of shape ``[B]`` (log-normal noise levels);
    2. ``noise ~ N(0, 1)`` with the shape of ``x``;
    3. each label is replaced by ``-1`` (the null class) with probability ``label_dropout``, which trains the
       unconditional model that classifier-free guidance needs (uniforms ``[B]`` are drawn even when
       ``label_dropout = 0``, so the random stream does not depend on it);
    4. ``loss = mean over batch and elements of lambda(sigma) * (D(x + sigma * noise; sigma, y) - x)^2``.

    Taking the mean over elements (rather than EDM's sum over them) keeps the loss near 1 at initialisation for
    any image size; with Adam the constant factor does not change the updates.

    The draws happen in that order, all from ``generator``, in float32 on ``generator.device``.

    Logs (detached 0-d tensors): ``loss``, ``sigma_mean`` (geometric mean of the drawn sigmas),
    ``label_drop_frac`` (the fraction of labels dropped this step; 0 for unconditional batches) and the mean
    weighted loss in the sigma bins cut at ``sigma_bins`` (by default ``loss_sigma<0.2``, ``loss_sigma0.2-2``,
    ``loss_sigma>=2``; NaN when a bin received no sample this step).

    Args:
        p_mean, p_std: the log-normal sigma distribution (EDM: -1.2, 1.2). ``p_std = 0`` gives a fixed sigma.
        sigma_data: the data standard deviation in the weight; must match the model's own ``sigma_data`` when it
            has one.
        label_dropout: probability in [0, 1] of replacing a label by -1.
        sigma_bins: increasing bin edges for the per-bin logs; empty for none.
    """

    def __init__(
        self,
        *,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_data: float = 0.5,
        label_dropout: float = 0.1,
        sigma_bins: Sequence[float] = DEFAULT_SIGMA_BINS,
    ):
        if not (math.isfinite(p_mean) and math.isfinite(p_std) and p_std >= 0):
            raise ValueError(f"need finite p_mean and p_std >= 0, got {p_mean}, {p_std}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        if not 0 <= label_dropout <= 1:
            raise ValueError(f"label_dropout must lie in [0, 1], got {label_dropout}")
        edges = [float(e) for e in sigma_bins]
        if any(not e > 0 for e in edges) or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
            raise ValueError(f"sigma_bins must be positive and strictly increasing, got {tuple(sigma_bins)}")
        self.p_mean, self.p_std, self.sigma_data, self.label_dropout = p_mean, p_std, sigma_data, label_dropout
        self.sigma_bins = tuple(edges)
        self._bin_names = _bin_names(edges) if edges else []

    def __repr__(self) -> str:
        return (
            f"EDMLoss(p_mean={self.p_mean}, p_std={self.p_std}, sigma_data={self.sigma_data}, "
            f"label_dropout={self.label_dropout}, sigma_bins={self.sigma_bins})"
        )

    @staticmethod
    def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(batch, torch.Tensor):
            return batch, None
        if isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], torch.Tensor):
            return batch[0], (batch[1] if len(batch) == 2 else None)
        raise TypeError("batch must be images [B, ...] or a tuple (images [B, ...], labels [B] or None)")

    def __call__(
        self, model: Callable[..., torch.Tensor], batch, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.draw(model, batch, generator)
        loss = d.per_sample.mean()
        return loss, self.logs(loss, d)

    def draw(self, model: Callable[..., torch.Tensor], batch, generator: torch.Generator) -> EDMDraw:
        """Steps 1-4 above without the mean: the draws, the model's denoised images and the per-sample loss."""
        images, labels = self._unpack(batch)
        if images.ndim < 2 or images.shape[0] == 0:
            raise ValueError(f"images must have shape [B, ...] with B >= 1, got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point, got {images.dtype}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        model_sd = getattr(model, "sigma_data", None)
        if isinstance(model_sd, (int, float)) and not math.isclose(model_sd, self.sigma_data):
            raise ValueError(f"the loss uses sigma_data={self.sigma_data} but the model has {model_sd}")
        b, dev, gdev = images.shape[0], images.device, generator.device
        x0 = images.float()

        n = torch.randn(b, generator=generator, device=gdev, dtype=torch.float32).to(dev)
        sigma = (self.p_mean + self.p_std * n).exp()
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32).to(dev)
        cond = {}
        drop_frac = torch.zeros((), device=dev)
        dropped = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=dev)
            if labels.shape != (b,) or labels.is_floating_point():
                raise ValueError(
                    f"labels must be an integer tensor of shape [{b}], got {labels.dtype} {tuple(labels.shape)}"
                )
            u = torch.rand(b, generator=generator, device=gdev, dtype=torch.float32).to(dev)
            drop = u < self.label_dropout
            drop_frac = drop.float().mean()
            dropped = cond["class_labels"] = torch.where(drop, torch.full_like(labels, -1), labels.long())

        sb = sigma.reshape((b,) + (1,) * (x0.ndim - 1))
        denoised = model(x0 + sb * noise, sigma, **cond)
        err = (denoised.float() - x0) ** 2
        per_sample = edm_weight(sigma, self.sigma_data) * err.reshape(b, -1).mean(dim=1)
        return EDMDraw(x0, sigma, denoised, per_sample, drop_frac, dropped)

    def logs(self, loss: torch.Tensor, d: EDMDraw) -> dict[str, torch.Tensor]:
        """The logs listed above, for the step ``d`` with mean loss ``loss``."""
        sigma, per_sample = d.sigma, d.per_sample.detach()
        parts = [loss.detach(), sigma.log().mean().exp(), d.drop_frac.float()]
        if self._bin_names:
            edges = torch.tensor(self.sigma_bins, device=sigma.device, dtype=sigma.dtype)
            idx = torch.bucketize(sigma, edges, right=True)  # bin k holds edges[k-1] <= sigma < edges[k]
            k = len(self._bin_names)
            sums = torch.zeros(k, device=sigma.device).index_add_(0, idx, per_sample.float())
            counts = torch.zeros(k, device=sigma.device).index_add_(0, idx, torch.ones_like(per_sample).float())
            parts.append(sums / counts)  # 0/0 = NaN marks an empty bin
        values = torch.cat([p.reshape(-1).float() for p in parts])
        names = ["loss", "sigma_mean", "label_drop_frac", *self._bin_names]
        return dict(zip(names, values.unbind(0)))


def edm_loss(
    model: Callable[..., torch.Tensor],
    batch,
    generator: torch.Generator,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
    label_dropout: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Functional form of :class:`EDMLoss`: ``edm_loss(model, (images, labels), generator) -> (loss, logs)``."""
    fn = EDMLoss(p_mean=p_mean, p_std=p_std, sigma_data=sigma_data, label_dropout=label_dropout)
    return fn(model, batch, generator)


__all__ = ["EDMDraw", "EDMLoss", "edm_loss", "edm_weight"]
