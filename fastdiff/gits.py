"""GITS-style timesteps: dynamic programming over a fine grid against the teacher's trajectory.

After Chen et al. (ICML 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", GITS): solve a
few samples along a fine grid, measure the cost of jumping with one solver step from every grid point ``i`` to
every later grid point ``j`` (the distance between that step's result and the teacher's state at ``j``), and
pick the ``N``-step path from ``sigma_max`` to 0 with the least total cost.

What is implemented here (choices GITS leaves to the user): the grid is ``karras(grid, sigma_min, sigma_max)``
(so it ends with the step to 0), the teacher trajectory is Heun on that grid, the one-step cost uses Euler (DDIM)
in fastdiff's data-prediction form, and the cost is the mean squared distance over ``n`` samples. One model
evaluation per grid point makes every cost, since an Euler jump from ``i`` only needs ``D`` at ``i``.
"""

from __future__ import annotations

import torch

from fastdiff import generate, schedules
from fastdiff.sampler import Model, Sampler


@torch.no_grad()
def cost_matrix(
    model: Model,
    *,
    shape: tuple[int, ...],
    sigma_min: float,
    sigma_max: float,
    grid: int = 64,
    n: int = 64,
    num_classes: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grid_sigmas [G + 1], cost [G + 1, G + 1])`` float64: ``cost[i, j]`` (``i < j``) is the mean squared
    distance between one Euler step from the teacher's state at grid point ``i`` to point ``j`` and the teacher's
    state at ``j``; ``inf`` elsewhere."""
    sig = schedules.karras(grid, sigma_min, sigma_max)
    indices = torch.arange(n)
    labels = generate.sample_labels(indices, num_classes, None)
    cond, uncond = generate.label_kwargs(None if labels is None else labels.to(device))
    x = (generate.sample_noise(indices, shape, seed) * sigma_max).to(device, dtype)
    _, traj = Sampler(model, solver="heun", sigmas=sig).sample(x, cond, uncond, trajectory=True)
    g1 = len(sig)
    cost = torch.full((g1, g1), float("inf"), dtype=torch.float64)
    for i in range(g1 - 1):
        s_i = float(sig[i])
        d = model(traj[i], torch.full((n,), s_i, device=device, dtype=torch.promote_types(dtype, torch.float32)),
                  **(cond or {}))  # fmt: skip
        for j in range(i + 1, g1):
            r = float(sig[j]) / s_i
            jump = r * traj[i] + (1 - r) * d
            cost[i, j] = (jump - traj[j]).double().flatten(1).square().mean(1).mean()
    return sig, cost


def best_path(cost: torch.Tensor, steps: int) -> list[int]:
    """The grid indices ``0 = k_0 < k_1 < ... < k_steps = G`` minimising ``sum cost[k_m, k_m+1]``."""
    g1 = cost.shape[0]
    if not 1 <= steps <= g1 - 1:
        raise ValueError(f"steps must lie in [1, {g1 - 1}] for a grid of {g1} points, got {steps}")
    inf = float("inf")
    best = [[inf] * g1 for _ in range(steps + 1)]
    back = [[-1] * g1 for _ in range(steps + 1)]
    best[0][0] = 0.0
    c = cost.tolist()
    for m in range(1, steps + 1):
        for j in range(1, g1):
            for i in range(j):
                v = best[m - 1][i] + c[i][j]
                if v < best[m][j]:
                    best[m][j], back[m][j] = v, i
    path = [g1 - 1]
    for m in range(steps, 0, -1):
        path.append(back[m][path[-1]])
    return path[::-1]


def gits_sigmas(model: Model, steps: int, sigma_min: float, sigma_max: float, **kwargs) -> torch.Tensor:
    """A ``steps``-step schedule ``[steps + 1]`` float64 ending in 0, chosen by :func:`best_path` over
    :func:`cost_matrix` (``kwargs`` go to it: ``shape``, ``grid``, ``n``, ``num_classes``, ``device``, ...)."""
    sig, cost = cost_matrix(model, sigma_min=sigma_min, sigma_max=sigma_max, **kwargs)
    return sig[best_path(cost, steps)]
