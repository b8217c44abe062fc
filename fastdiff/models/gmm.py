"""An exact model: a (class-conditional) Gaussian mixture with a closed-form denoiser in any dimension.

Data ``x0 ~ sum_k pi_k N(mu_k, diag(s_k^2))``. Under noise ``x = x0 + sigma eps`` the component posteriors are
``gamma_k(x) ∝ pi_k N(x; mu_k, diag(s_k^2 + sigma^2))`` and the ideal denoiser is

    D(x; sigma) = sum_k gamma_k(x) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)].

Conditioning on a class keeps only the components of that class; the label -1 is the "null" class, the whole
mixture, so that conditional and unconditional passes can share one batched call. This makes the mixture the
test oracle of every solver, and the built-in model of ``fastdiff sample --model gmm``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianMixture(nn.Module):
    """Exact denoiser of a diagonal Gaussian mixture; follows ``model(x, sigma, class_labels=None)``.

    Args:
        means: ``[K, dim]`` component means.
        stds: ``[K]`` or ``[K, dim]`` component standard deviations (> 0).
        weights: ``[K]`` mixture weights (normalised here); uniform by default.
        classes: ``[K]`` integer class of each component, for class-conditional use. ``class_labels=-1``
            (per sample) means no class: the whole mixture.

    ``x`` may have any shape ``[B, ...]`` with ``prod(...) == dim``. Arithmetic runs in float64 when ``x`` is
    float64, else in float32.
    """

    def __init__(self, means, stds, weights=None, classes=None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, dim], got {tuple(means.shape)}")
        k, dim = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        stds = stds[:, None].expand(k, dim) if stds.ndim == 1 else stds
        if stds.shape != (k, dim) or not (stds > 0).all():
            raise ValueError(f"stds must be positive with shape [{k}] or [{k}, {dim}]")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        weights = weights.to(torch.float64)
        if weights.shape != (k,) or not (weights > 0).all():
            raise ValueError(f"weights must be positive with shape [{k}]")
        self.register_buffer("means", means)
        self.register_buffer("variances", stds.contiguous() ** 2)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        if classes is not None:
            classes = torch.as_tensor(classes, dtype=torch.long)
            if classes.shape != (k,):
                raise ValueError(f"classes must have shape [{k}]")
        self.register_buffer("classes", classes)
        self._num_classes = 0 if classes is None else int(classes.max()) + 1  # read once, not per call on a GPU

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _log_prior(self, class_labels, batch: int, device, dtype) -> torch.Tensor:
        """``[B, K]`` log mixture weights, restricted to each sample's class."""
        lw = self.log_weights.to(device, dtype).expand(batch, -1)
        if class_labels is None:
            return lw
        if self.classes is None:
            raise ValueError("this mixture has no classes; call it without class_labels")
        y = torch.as_tensor(class_labels, device=device).long().reshape(-1).expand(batch)
        if y.device.type == "cpu" and ((y < -1) | (y >= self.num_classes)).any():  # no host sync per call on a GPU
            raise ValueError(f"class_labels must lie in [-1, {self.num_classes}), got {y.unique().tolist()}")
        keep = (self.classes.to(device)[None, :] == y[:, None]) | (y[:, None] == -1)
        # Renormalise within the class; -inf removes the other components.
        lw = lw.masked_fill(~keep, -math.inf)
        return lw - torch.logsumexp(lw, dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        b = x.shape[0]
        xf = x.reshape(b, -1).to(ct)
        if xf.shape[1] != self.dim:
            raise ValueError(f"x has {xf.shape[1]} features per sample, the mixture has dim {self.dim}")
        s2 = torch.as_tensor(sigma, device=x.device, dtype=ct).reshape(-1).expand(b)[:, None, None] ** 2
        mu, var = self.means.to(x.device, ct), self.variances.to(x.device, ct)
        tot = var[None] + s2  # [B, K, dim]
        diff = xf[:, None, :] - mu[None]
        log_n = -0.5 * ((diff**2 / tot) + tot.log()).sum(-1)  # the 2*pi term cancels in the posterior
        gamma = torch.softmax(self._log_prior(class_labels, b, x.device, ct) + log_n, dim=1)
        comp = mu[None] + var[None] / tot * diff
        return (gamma[:, :, None] * comp).sum(1).reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, class_labels=None) -> torch.Tensor:
        """``n`` exact draws from the data distribution (of the given classes), ``[n, dim]`` float64."""
        lw = self._log_prior(class_labels, n, self.means.device, torch.float64)
        k = torch.multinomial(lw.exp(), 1, generator=generator).squeeze(1)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=self.means.device)
        return self.means[k] + self.variances[k].sqrt() * eps


def builtin_gmm() -> GaussianMixture:
    """fastdiff's built-in 2-D model: 8 anisotropic components on a ring, 4 classes of 2 opposite components.

    Opposite components share a class, so the conditional distributions are bimodal and guidance visibly
    sharpens them.
    """
    k = 8
    angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = 2.0 * torch.stack([angle.cos(), angle.sin()], dim=1)
    stds = torch.stack([0.25 + 0.1 * (torch.arange(k) % 2), 0.15 + 0.05 * (torch.arange(k) % 3)], dim=1)
    weights = 1.0 + 0.5 * (torch.arange(k) % 2)
    return GaussianMixture(means, stds.to(torch.float64), weights, classes=torch.arange(k) % 4)
