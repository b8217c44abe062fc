"""Sample-quality metrics that need no downloaded weights.

- ``sliced_wasserstein``: a distance between point clouds (low-dimensional data such as the GMM).
- ``feature_statistics`` / ``frechet_distance`` / ``frechet_distance_from_features`` / ``fd_features``: the
  Fréchet distance between Gaussians fitted to features (FID when the extractor is Inception; fastdiff's
  digits use ``fastdiff.models.classifier.DigitClassifier.features``).
- ``teacher_error``: per-sample RMSE (and optional LPIPS) of few-step samples against high-NFE ones.
- ``class_accuracy``: how often a classifier recognises the class a conditional sample was drawn for.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, *, projections: int = 512, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein distance between two point clouds ``a [N, dim]`` and ``b [M, dim]``.

    Both are projected on ``projections`` random unit directions; each 1-D W2 is computed between the
    empirical quantile functions (on ``max(N, M)`` levels), and the root mean square over directions returned.
    """
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"point clouds differ in dimension: {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("sliced_wasserstein needs at least 2 points in each cloud")
    dirs = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a.device)
    pa, pb = (a @ dirs).sort(dim=0).values, (b @ dirs).sort(dim=0).values
    n = max(a.shape[0], b.shape[0])
    levels = (torch.arange(n, dtype=torch.float64, device=a.device) + 0.5) / n
    qa = torch.quantile(pa, levels, dim=0) if pa.shape[0] != n else pa
    qb = torch.quantile(pb, levels, dim=0) if pb.shape[0] != n else pb
    return float(((qa - qb) ** 2).mean().sqrt())


# --- Fréchet distance (FID-style) ------------------------------------------------------------------------------


def _check_features(feats: torch.Tensor, name: str) -> torch.Tensor:
    f = torch.as_tensor(feats)
    if f.ndim != 2:
        raise ValueError(f"{name} must have shape [N, d], got {tuple(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"{name} has {f.shape[0]} sample(s); a covariance needs at least 2")
    f = f.detach().to("cpu", torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return f


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` (float64, CPU) of ``features [N, d]``, N >= 2.

    With N <= d the covariance is rank-deficient; the Fréchet distance is still defined but biased upwards,
    as FID is for small sample counts, so compare distances only at equal N.
    """
    f = _check_features(features, "features")
    mu = f.mean(dim=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _sym_sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix; eigenvalues below 0 (rounding) are clamped to 0."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``::

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

    ``mu*``: ``[d]``; ``sigma*``: ``[d, d]`` symmetric PSD covariances. Computed in float64. The trace term uses
    ``tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i)`` over the eigenvalues of the symmetric PSD matrix
    ``M = S1^{1/2} S2 S1^{1/2}`` (similar to ``S1 S2``, so same eigenvalues). ``M`` is symmetrised and its
    eigenvalues come from ``eigh``, so they are real; tiny negative ones produced by rounding are clamped to 0.
    Unlike ``scipy.linalg.sqrtm`` of the non-symmetric ``S1 S2`` this never yields complex parts, and it is
    exact for singular covariances. The result is clamped at 0 (it can only go below through rounding).
    """
    m1, m2 = (torch.as_tensor(m).detach().to("cpu", torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).detach().to("cpu", torch.float64) for s in (sigma1, sigma2))
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"means must be 1-D of equal size, got {tuple(m1.shape)} and {tuple(m2.shape)}")
    d = m1.shape[0]
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (d, d):
            raise ValueError(f"{name} must have shape [{d}, {d}] to match the means, got {tuple(s.shape)}")
    for name, t in (("mu1", m1), ("sigma1", s1), ("mu2", m2), ("sigma2", s2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    root1 = _sym_sqrt_psd(s1)
    m = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    fd = ((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2 * eig.sqrt().sum()
    return max(float(fd), 0.0)


def frechet_distance_from_features(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``feat_a [N, d]`` and ``feat_b [M, d]`` (N, M >= 2)."""
    a = _check_features(feat_a, "feat_a")
    b = _check_features(feat_b, "feat_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


@torch.no_grad()
def fd_features(
    extractor: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Run ``extractor`` (e.g. ``DigitClassifier.features``, or an Inception pool layer) over ``images [N, ...]``
    in batches, without gradients. Outputs of shape ``[B, d, 1, 1]`` (pooled conv maps) are flattened.

    Returns ``[N, d]`` float64 on the CPU, ready for ``frechet_distance_from_features``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"images must have shape [N, ...] with N >= 1, got {tuple(images.shape)}")
    out = []
    for i in range(0, images.shape[0], batch_size):
        f = torch.as_tensor(extractor(images[i : i + batch_size]))
        out.append(f.reshape(f.shape[0], -1).to("cpu", torch.float64))
    return torch.cat(out)


# --- sample quality against a teacher and a classifier -----------------------------------------------------------


@torch.no_grad()
def teacher_error(
    x: torch.Tensor, x_teacher: torch.Tensor, lpips_model: Callable | None = None, batch_size: int = 64
) -> dict:
    """Distance of few-step samples ``x`` to high-NFE samples ``x_teacher`` drawn from the SAME initial noise.

    With a deterministic (ODE) sampler both are approximations of the same flow map, so the gap measures the
    few-step solver's error directly, per sample, without the variance of a distribution metric.

    Args:
        x, x_teacher: ``[B, ...]`` of equal shape (images in [-1, 1] when LPIPS is used).
        lpips_model: optional ``lpips_model(a, b) -> [B]`` (or ``[B, 1, 1, 1]``) distances, e.g.
            ``fastdiff.lpips.LPIPSAdapter``; evaluated in batches of ``batch_size``.

    Returns:
        ``{"rmse": [B] float64 tensor, "rmse_mean": float}`` plus ``"lpips": [B]`` and ``"lpips_mean": float``
        when ``lpips_model`` is given. The per-sample RMSE is ``||x - x_teacher||_2 / sqrt(numel per sample)``.
    """
    if x.shape != x_teacher.shape:
        raise ValueError(f"x and x_teacher differ in shape: {tuple(x.shape)} and {tuple(x_teacher.shape)}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("teacher_error needs at least one sample")
    a = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    b = x_teacher.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("x or x_teacher contains NaN or infinite values")
    rmse = ((a - b) ** 2).mean(dim=1).sqrt()
    out = {"rmse": rmse, "rmse_mean": float(rmse.mean())}
    if lpips_model is not None:
        parts = []
        for i in range(0, x.shape[0], batch_size):
            d = torch.as_tensor(lpips_model(x[i : i + batch_size], x_teacher[i : i + batch_size]))
            parts.append(d.reshape(d.shape[0], -1).mean(dim=1).to("cpu", torch.float64))
        lp = torch.cat(parts)
        out.update({"lpips": lp, "lpips_mean": float(lp.mean())})
    return out


@torch.no_grad()
def class_accuracy(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 512,
) -> float:
    """Top-1 accuracy in [0, 1] of ``classifier`` (``[B, C, H, W] -> [B, classes]`` logits) on ``images [N, ...]``
    against integer ``labels [N]``: for conditional samples, how often the class asked for is the class seen.
    An ``nn.Module`` classifier is switched to eval mode for the call and restored afterwards."""
    labels = torch.as_tensor(labels)
    if images.shape[0] == 0 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"need N >= 1 images and labels of shape [N]; got {tuple(images.shape)}, {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    was_training = isinstance(classifier, nn.Module) and classifier.training
    if was_training:
        classifier.eval()
    try:
        correct = 0
        for i in range(0, images.shape[0], batch_size):
            logits = classifier(images[i : i + batch_size])
            pred = logits.argmax(dim=1).cpu()
            correct += int((pred == labels[i : i + batch_size].cpu()).sum())
    finally:
        if was_training:
            classifier.train()
    return correct / images.shape[0]
