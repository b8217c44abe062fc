"""Distribution distances that need no downloaded weights."""

from __future__ import annotations

import torch


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
