"""Noise schedules: decreasing sigmas that end in 0, in the variance-exploding (EDM) convention.

Every constructor returns a float64 tensor of ``n + 1`` values, strictly decreasing, ending in 0, for ``n``
solver steps. :func:`get` finds one by name (:data:`SCHEDULES`: EDM's ``karras``, ``logsnr_uniform`` and
``time_uniform``; k-diffusion's ``exponential`` and ``polyexponential``; ComfyUI's ``simple``, ``sgm_uniform``,
``ddim_uniform``, ``normal``, ``beta``, ``linear_quadratic`` and ``kl_optimal``, the first five over a model's
discrete noise levels, Stable Diffusion's by default; the published ``align_your_steps`` and ``gits`` tables; and
``flow_shift``, a rectified-flow schedule with diffusers' static or resolution-dependent shift, in VE sigmas) with
its options (:func:`options`). :func:`validate` checks a user-given schedule; :func:`save` and :func:`load` keep a
(learned) schedule in a small JSON file: ``{"format": "fastdiff-schedule", "version": 2, "sigmas": [...],
"metadata": {...}, "eval_sigmas": [...] (optional), "sha256": ...}``, the checksum over every other entry. A
hand-written file may leave the checksum out as version 1.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff import ops, solvers
from fastdiff.arguments import as_int, as_real
from fastdiff.checkpoint import atomic_write, check_regular_file, parse_json

SCHEDULE_FORMAT = "fastdiff-schedule"
# A schedule of a million steps is about 25 MB of JSON; anything much larger is not a schedule file.
_MAX_FILE_BYTES = 64 * 2**20


def _as_float64(values, name: str) -> torch.Tensor:
    """A schedule-like argument as a float64 tensor (a tensor keeps its device): a tensor or NumPy array of real
    numbers, or a sequence of Python, NumPy or 0-d tensor numbers. Bools are not numbers here (``[True, False]``
    is not the schedule ``[1, 0]``), nor are strings; the error names ``name`` and the entry."""
    if isinstance(values, torch.Tensor):
        if values.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device, which holds no values: a schedule must be readable on the host when "
                "a sampler is built (its coefficients are computed there), so pass a CPU tensor or a list"
            )
        if not (values.is_floating_point() or values.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be real numbers, got dtype {values.dtype}")
        return values.to(torch.float64)
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be real numbers, got dtype {values.dtype}")
        return torch.from_numpy(values.astype(np.float64))
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a list of numbers, got a string: {values[:40]!r}")
    if not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of numbers or a 1-D tensor, got {type(values).__name__}")
    # Python numbers go straight to float64: torch's default float32 would round a learned schedule.
    return torch.tensor([as_real(v, f"{name}[{i}]", finite=False) for i, v in enumerate(values)], dtype=torch.float64)


def validate(sigmas: torch.Tensor | Sequence[float], *, name: str = "sigmas") -> torch.Tensor:
    """Check a schedule and return it as a 1-D float64 tensor on its own device.

    Refused with ``ValueError`` naming the problem: not 1-D, fewer than 2 entries, NaN or Inf, a negative
    value, not strictly decreasing, an entry that is not a number (a string, a bool), or a tensor on the meta
    device (a schedule is read on the host when a sampler is built); ``TypeError`` for a tensor or array of
    another dtype. The last value may be 0 (a full solve) or positive (a partial one).
    """
    s = _as_float64(sigmas, name)
    if s.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(s.shape)}")
    if s.numel() < 2:
        raise ValueError(f"{name} needs at least 2 entries (one step), got {s.numel()}")
    if not torch.isfinite(s).all():
        bad = torch.nonzero(~torch.isfinite(s)).flatten().tolist()
        raise ValueError(f"{name} contains NaN or Inf at positions {bad}")
    if (s < 0).any():
        raise ValueError(f"{name} contains negative values: {s[s < 0].tolist()}")
    steps = s[1:] - s[:-1]
    if (steps >= 0).any():
        i = int(torch.nonzero(steps >= 0)[0])
        raise ValueError(
            f"{name} must be strictly decreasing, but {name}[{i}]={s[i].item():g} <= "
            f"{name}[{i + 1}]={s[i + 1].item():g}"
        )
    return s


def _check_range(n: int, sigma_min: float, sigma_max: float) -> tuple[int, float, float]:
    """``(n, sigma_min, sigma_max)`` as Python numbers, checked: Python, NumPy and 0-d tensor numbers are taken,
    bools are not."""
    n = as_int(n, "the number of steps n", 1)
    lo, hi = as_real(sigma_min, "sigma_min", finite=False), as_real(sigma_max, "sigma_max", finite=False)
    if not (0 < lo < hi) or not math.isfinite(hi):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={lo}, sigma_max={hi}")
    return n, lo, hi


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM schedule (Karras et al. 2022): uniform in ``sigma**(1/rho)``, then 0. Shape ``[n + 1]``, float64."""
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    rho = as_real(rho, "rho")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    s = (hi + ramp * (lo - hi)) ** rho
    return _append_zero(s)


def logsnr_uniform(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in log-SNR, i.e. in ``log(sigma)`` (DPM-Solver's ``logSNR``), then 0. Shape ``[n + 1]``, float64."""
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    s = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return _append_zero(s)


def vp_sigma_to_t(sigma: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """Time t in (0, 1] of the continuous linear VP-SDE at which its noise level equals ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    d = beta_max - beta_min
    return (-beta_min + torch.sqrt(beta_min**2 + 2 * d * torch.log1p(sigma**2))) / d


def vp_t_to_sigma(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """Noise level sigma = sqrt(1/alpha_bar(t) - 1) of the continuous linear VP-SDE at time ``t``."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * (beta_max - beta_min) * t**2 + beta_min * t))


def time_uniform(
    n: int, sigma_min: float, sigma_max: float, beta_min: float = 0.1, beta_max: float = 20.0
) -> torch.Tensor:
    """Uniform in the time of the linear VP-SDE (DPM-Solver's ``time_uniform``), then 0.

    The times are those at which the VP-SDE with ``beta_min``/``beta_max`` reaches ``sigma_max`` and
    ``sigma_min``. Shape ``[n + 1]``, float64.
    """
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    beta_min, beta_max = as_real(beta_min, "beta_min"), as_real(beta_max, "beta_max")
    t_hi, t_lo = vp_sigma_to_t(torch.tensor([sigma_max, sigma_min]), beta_min, beta_max).tolist()
    t = torch.linspace(t_hi, t_lo, n, dtype=torch.float64)
    return _append_zero(vp_t_to_sigma(t, beta_min, beta_max))


def ld3_sigmas(
    xi: torch.Tensor, sigma_min: float, sigma_max: float, space: str = "logsnr", append_zero: bool = False
) -> torch.Tensor:
    """LD3's timestep parameterisation (Tong et al. 2025), differentiable and on ``xi``'s device.

    ``xi`` ``[N + 1]`` -> softmax -> cumulative sum -> reverse -> min-max normalised onto ``[0, 1]`` -> mapped
    onto ``[sigma_min, sigma_max]`` linearly in ``space``: ``"logsnr"`` (log sigma) or ``"time"`` (sigma, the
    EDM time). Returns the ``N + 1`` decreasing sigmas ``t_0 = sigma_max > ... > t_N = sigma_min`` of an
    ``N``-step solve (``N + 2`` with a final 0 when ``append_zero``), in ``xi``'s dtype. ``xi = ones``
    gives the uniform schedule of that space. Runs as one fused op on ``xi``'s device
    (:func:`fastdiff.ops.ld3_sigmas`), differentiable with respect to ``xi``.
    """
    if not isinstance(xi, torch.Tensor) or xi.ndim != 1 or xi.numel() < 2 or not xi.is_floating_point():
        got = f"{xi.dtype} {tuple(xi.shape)}" if isinstance(xi, torch.Tensor) else type(xi).__name__
        raise ValueError(f"xi must be a 1-D float tensor of at least 2 values, got {got}")
    _, sigma_min, sigma_max = _check_range(xi.numel() - 1, sigma_min, sigma_max)
    if space not in ("logsnr", "time"):
        raise ValueError(f"space must be 'logsnr' or 'time', got {space!r}")
    logsnr = space == "logsnr"
    lo, hi = (math.log(sigma_min), math.log(sigma_max)) if logsnr else (sigma_min, sigma_max)
    # LD3 training calls this every step under autograd, so the value checks run only where reading the values
    # costs no device sync: on CPU tensors, outside torch.compile. On a GPU the schedule is checked where the host
    # reads it anyway: validate() when a Sampler takes it, and schedules.save.
    on_host = xi.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and not torch.isfinite(xi).all():
        bad = torch.nonzero(~torch.isfinite(xi.detach())).flatten().tolist()
        raise ValueError(f"xi contains NaN or Inf at positions {bad}")
    s = ops.ld3_sigmas(xi, lo, hi, logsnr)
    if on_host:
        d = s.detach()
        if not (torch.isfinite(d).all() and (d[1:] < d[:-1]).all()):
            # softmax(xi) has entries below the dtype's resolution (one xi dominates): steps collapse to zero size
            # (or the normalisation divides 0 by 0), which no solver can take.
            raise ValueError(
                f"xi is saturated: its softmax gives steps too small for {xi.dtype} (xi spans "
                f"[{xi.min().item():.3g}, {xi.max().item():.3g}]), so the sigmas are not strictly decreasing"
            )
    return _append_zero(s) if append_zero else s


# ------------------------------------------------------------------------------------------- named schedules
# Each is a pure function of (n, sigma_min, sigma_max, **options) returning n + 1 strictly decreasing float64 sigmas
# (VE/EDM convention) ending in 0. k-diffusion's "exponential" is logsnr_uniform itself (registered under both names).

exponential = logsnr_uniform


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's polyexponential schedule: ``log sigma_j = log sigma_min + u_j**rho (log sigma_max - log
    sigma_min)`` with ``u`` uniform from 1 to 0 over the ``n`` levels, then 0. ``rho = 1`` is :func:`exponential`;
    ``rho > 1`` crowds the steps towards ``sigma_min``. Shape ``[n + 1]``, float64."""
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    rho = as_real(rho, "rho")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    u = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _append_zero((lo + u * (hi - lo)).exp())


def sd_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """Stable Diffusion's training schedule: "scaled linear" betas (linear in ``sqrt(beta)`` from ``beta_start`` to
    ``beta_end``) and ``alpha_bar_t = prod_{s <= t} (1 - beta_s)``. Shape ``[num_train_timesteps]``, float64,
    indexed by training timestep (decreasing).

    The product is taken in float32, as ComfyUI and diffusers take it: that table, not the float64 product (1.3e-5
    apart at the low end), is the one SD models are sampled on and the one GITS's published levels come from."""
    num = as_int(num_train_timesteps, "num_train_timesteps", 2)
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num, dtype=torch.float64) ** 2
    return torch.cumprod((1 - betas).to(torch.float32), 0).to(torch.float64)


def _discrete_table(sigmas, alphas_cumprod, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """A model's discrete noise levels, one per training timestep, ascending (index = timestep), float64 on the
    CPU, restricted to ``[sigma_min, sigma_max]`` (a relative 1e-6 of slack at either end, so a range given to a few
    digits still holds its end levels). ``sigmas`` (``[T]``, ascending) or ``alphas_cumprod`` (``[T]``, decreasing)
    give the table; ``sigmas="sd"`` or neither is Stable Diffusion's 1000-level scaled-linear table
    (:func:`sd_alphas_cumprod`), about 0.0292 to 14.61."""
    if sigmas is not None and alphas_cumprod is not None:
        raise ValueError("give the model's discrete table as sigmas or as alphas_cumprod, not both")
    if isinstance(sigmas, str):
        if sigmas != "sd":
            raise ValueError(f"sigmas must be a 1-D table of the model's noise levels or 'sd', got {sigmas!r}")
        sigmas = None
    if alphas_cumprod is not None:
        ac = _as_float64(alphas_cumprod, "alphas_cumprod").detach().cpu()
        if ac.ndim != 1 or ac.numel() < 2 or not torch.isfinite(ac).all() or not ((ac > 0) & (ac < 1)).all():
            raise ValueError("alphas_cumprod must be a 1-D table of at least 2 values in (0, 1)")
        table = ((1 - ac) / ac).sqrt()
        name = "alphas_cumprod"
    elif sigmas is not None:
        table, name = _as_float64(sigmas, "sigmas").detach().cpu(), "sigmas"
    else:
        ac = sd_alphas_cumprod()
        table, name = ((1 - ac) / ac).sqrt(), "the default (Stable Diffusion) table"
    if table.ndim != 1 or table.numel() < 2 or not torch.isfinite(table).all() or not (table > 0).all():
        raise ValueError(f"{name} must give a 1-D table of at least 2 finite positive noise levels")
    if not (table[1:] > table[:-1]).all():
        raise ValueError(f"{name} must give strictly increasing noise levels (index = training timestep)")
    keep = (table >= sigma_min * (1 - 1e-6)) & (table <= sigma_max * (1 + 1e-6))
    if int(keep.sum()) < 2:
        span = f"from {table[0].item():.4g} to {table[-1].item():.4g}"
        raise ValueError(f"fewer than 2 of the levels of {name} ({span}) lie in [sigma_min, sigma_max] = "
                         f"[{sigma_min:g}, {sigma_max:g}]")  # fmt: skip
    return table[keep]


def _table_sigma(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The table's noise level at fractional timesteps ``t``: linear interpolation of ``log sigma`` between the two
    neighbouring levels (ComfyUI's ``ModelSamplingDiscrete.sigma``)."""
    log_table = table.log()
    lo = t.floor().long().clamp(0, len(table) - 1)
    hi = t.ceil().long().clamp(0, len(table) - 1)
    w = t - t.floor()
    return ((1 - w) * log_table[lo] + w * log_table[hi]).exp()


def _from_indices(table: torch.Tensor, idx: list[int], what: str) -> torch.Tensor:
    if any(b >= a for a, b in zip(idx, idx[1:])):
        raise ValueError(f"{what}: {len(idx)} steps do not fit the {len(table)} levels of the table in range (two "
                         "steps would share a level); take fewer steps or a finer table")  # fmt: skip
    return _append_zero(table[torch.tensor(idx)])


_TABLE_DOC = """``sigmas`` (``[T]``, ascending, one per training timestep) or ``alphas_cumprod`` (``[T]``) give the
    model's discrete noise levels (ComfyUI's ``model_sampling.sigmas``); by default, or with ``sigmas="sd"``, Stable
    Diffusion's 1000-level scaled-linear table. Only the levels in ``[sigma_min, sigma_max]`` are used, so a range
    that contains the whole table (as EDM's default 0.002..80 does SD's) reproduces ComfyUI exactly."""


def simple(n: int, sigma_min: float, sigma_max: float, sigmas=None, alphas_cumprod=None) -> torch.Tensor:
    """ComfyUI's "simple": ``n`` levels of the model's table evenly spaced in timestep index from the top, the
    ``j``-th at index ``T - 1 - floor(j T / n)``, then 0. Needs ``n <= T``. Shape ``[n + 1]``, float64."""
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    table = _discrete_table(sigmas, alphas_cumprod, sigma_min, sigma_max)
    stride = len(table) / n  # a float stride, floored per step, as ComfyUI does
    return _from_indices(table, [len(table) - 1 - int(j * stride) for j in range(n)], "simple")


def ddim_uniform(n: int, sigma_min: float, sigma_max: float, sigmas=None, alphas_cumprod=None) -> torch.Tensor:
    """ComfyUI's "ddim_uniform": the table's levels at indices ``1, 1 + c, ..., 1 + (n - 1) c`` with the integer
    stride ``c = max(T // n, 1)`` (DDIM's "leading" spacing with offset 1), highest first, then 0. Shape ``[n + 1]``,
    float64; needs ``n < T``.

    ComfyUI continues the grid while the index stays below ``T``, which gives one or more levels beyond ``n`` when
    ``1 + n c < T`` (e.g. 8 levels for ``n = 7`` on 1000); here the schedule has ``n`` steps, so those top
    levels are left out and the rest equal ComfyUI's. ComfyUI's special case of a table whose level 1 is ~0 is not
    needed: the table is positive.
    """
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    table = _discrete_table(sigmas, alphas_cumprod, sigma_min, sigma_max)
    if n >= len(table):
        raise ValueError(f"ddim_uniform: {n} steps need more than the {len(table)} levels of the table in range")
    stride = max(len(table) // n, 1)
    return _from_indices(table, [1 + j * stride for j in reversed(range(n))], "ddim_uniform")


def normal(n: int, sigma_min: float, sigma_max: float, sigmas=None, alphas_cumprod=None) -> torch.Tensor:
    """ComfyUI's "normal": ``n`` timesteps uniform from the table's top index ``T - 1`` to 0 (fractional timesteps
    interpolate ``log sigma``), their levels, then 0. Shape ``[n + 1]``, float64."""
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    table = _discrete_table(sigmas, alphas_cumprod, sigma_min, sigma_max)
    t = torch.linspace(len(table) - 1, 0, n, dtype=torch.float64)
    return _append_zero(_table_sigma(table, t))


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, sigmas=None, alphas_cumprod=None) -> torch.Tensor:
    """ComfyUI's "sgm_uniform" (Stability's generative-models discretisation): ``n + 1`` timesteps uniform from
    ``T - 1`` to 0, the last one dropped, their (log-interpolated) levels, then 0. Shape ``[n + 1]``, float64."""
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    table = _discrete_table(sigmas, alphas_cumprod, sigma_min, sigma_max)
    t = torch.linspace(len(table) - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(_table_sigma(table, t))


for _f in (simple, ddim_uniform, normal, sgm_uniform):
    _f.__doc__ = _f.__doc__.rstrip() + "\n\n    " + _TABLE_DOC + "\n    "
del _f


def beta(
    n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6, sigmas=None, alphas_cumprod=None
) -> torch.Tensor:
    """Beta sampling (Lee et al. 2024, arXiv 2407.12173): step positions at the quantiles ``1 - j / n`` of a
    Beta(``alpha``, ``beta``) distribution, which for ``alpha = beta = 0.6`` crowds the steps at both ends.
    Shape ``[n + 1]``, float64.

    Without a table (the default): ``sigma_j = sigma_min + F^-1(1 - j / (n - 1)) (sigma_max - sigma_min)`` for
    ``j = 0..n-1``, linear in sigma from ``sigma_max`` to ``sigma_min``, then 0 (diffusers' ``use_beta_sigmas``).
    With the model's discrete table (``sigmas``, ``sigmas="sd"`` or ``alphas_cumprod``, as for :func:`simple`):
    ComfyUI's "beta", the levels at timestep indices ``round(F^-1(1 - j / n) (T - 1))``, ``j = 0..n-1``, then 0;
    refused if two steps round to one level (ComfyUI would drop one, giving fewer than ``n`` steps).
    """
    from scipy.stats import beta as beta_dist

    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    a, b = as_real(alpha, "alpha"), as_real(beta, "beta")
    if not (a > 0 and b > 0):
        raise ValueError(f"alpha and beta must be positive, got alpha={a}, beta={b}")
    if sigmas is None and alphas_cumprod is None:
        q = beta_dist.ppf(1 - np.linspace(0, 1, n), a, b)
        s = torch.from_numpy(sigma_min + q * (sigma_max - sigma_min))
        if not (s[1:] < s[:-1]).all():
            raise ValueError(f"beta: alpha={a}, beta={b} put two of the {n} levels at one sigma; take fewer steps")
        return _append_zero(s)
    table = _discrete_table(sigmas, alphas_cumprod, sigma_min, sigma_max)
    q = beta_dist.ppf(1 - np.linspace(0, 1, n, endpoint=False), a, b)
    return _from_indices(table, np.rint(q * (len(table) - 1)).astype(np.int64).tolist(), "beta")


def linear_quadratic(
    n: int, sigma_min: float, sigma_max: float, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> torch.Tensor:
    """ComfyUI's "linear_quadratic" (Genmo's Mochi schedule): ``sigma_max (1 - u_j)`` where ``u`` rises linearly by
    ``threshold_noise / linear_steps`` a step over the first ``linear_steps`` steps (default ``n // 2``), then along
    the quadratic that continues it smoothly to ``u_n = 1`` (sigma 0). ``sigma_min`` is checked but does not enter:
    the smallest nonzero level is set by the formula. ``n = 1`` is ``[sigma_max, 0]``. Shape ``[n + 1]``, float64."""
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    thr = as_real(threshold_noise, "threshold_noise")
    if not 0 < thr < 1:
        raise ValueError(f"threshold_noise must lie in (0, 1), got {thr}")
    if n == 1:
        if linear_steps is not None:
            raise ValueError("linear_steps needs at least 2 steps")
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    m = n // 2 if linear_steps is None else as_int(linear_steps, "linear_steps", 1, n - 1)
    # The quadratic part q(i) = a i^2 + b i + c (i = m..n) meets the linear part's value thr at i = m, and q(n) = 1.
    gap = m - thr * n
    a = gap / (m * (n - m) ** 2)
    b = thr / m - 2 * gap / (n - m) ** 2
    c = a * m**2
    u = [i * thr / m for i in range(m)] + [a * i * i + b * i + c for i in range(m, n)] + [1.0]
    s = sigma_max * (1 - torch.tensor(u, dtype=torch.float64))
    if not (s[1:] < s[:-1]).all():
        raise ValueError(f"linear_quadratic: threshold_noise={thr}, linear_steps={m} give a schedule that is not "
                         "strictly decreasing for this many steps")  # fmt: skip
    s[-1] = 0.0  # exactly, not sigma_max * (1 - 1.0) rounding
    return s


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule of the Align Your Steps authors: uniform in ``arctan(sigma)`` from ``sigma_max`` to
    ``sigma_min`` over ``n`` levels (ComfyUI's "kl_optimal"), then 0; ``n = 1`` is ``[sigma_max, 0]``. Shape
    ``[n + 1]``, float64."""
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    u = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    return _append_zero(torch.tan(u * math.atan(sigma_min) + (1 - u) * math.atan(sigma_max)))


# Align Your Steps (Sabour et al. 2024, arXiv 2404.14507): the optimised 10-step schedules the authors published
# for Stable Diffusion 1.5, SDXL and Stable Video Diffusion (their project page's table; the same numbers, last
# level 0, are diffusers' AysSchedules "StableDiffusionSigmas", "StableDiffusionXLSigmas",
# "StableDiffusionVideoSigmas"). 11 levels t_0 > ... > t_10 = the model's sigma_min.
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}

# GITS (Chen et al. 2024, arXiv 2405.11326): the schedules its dynamic programme finds for Stable Diffusion 1.5
# with its default coefficient 1.20, for 2..20 steps (row k has k + 1 levels, each one of SD's discrete levels).
# Numbers from the authors' published table as distributed in ComfyUI's GITSScheduler (comfy_extras/nodes_gits.py).
GITS_SIGMAS_SD15 = (
    (14.61464119, 0.803307, 0.02916753),
    (14.61464119, 1.56271636, 0.52423614, 0.02916753),
    (14.61464119, 2.36326075, 0.92192322, 0.36617002, 0.02916753),
    (14.61464119, 2.84484982, 1.24153244, 0.59516323, 0.25053367, 0.02916753),
    (14.61464119, 5.85520077, 2.05039096, 0.95350921, 0.45573691, 0.17026083, 0.02916753),
    (14.61464119, 5.85520077, 2.45070267, 1.24153244, 0.64427125, 0.29807833, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.45070267, 1.36964464, 0.803307, 0.45573691, 0.25053367, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.84484982, 1.61558151, 0.95350921, 0.59516323, 0.36617002, 0.19894916, 0.09824532,
     0.02916753),
    (14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823, 0.19894916,
     0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 2.95596409, 1.84880662, 1.24153244, 0.83188516, 0.59516323, 0.41087446, 0.27464288,
     0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 5.85520077, 3.07277966, 1.98035145, 1.36964464, 0.95350921, 0.69515091, 0.50118381, 0.36617002,
     0.25053367, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 6.77309084, 3.46139455, 2.36326075, 1.56271636, 1.08895338, 0.803307, 0.59516323, 0.45573691,
     0.34370604, 0.25053367, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 6.77309084, 3.46139455, 2.45070267, 1.61558151, 1.162866, 0.86115354, 0.64427125, 0.50118381,
     0.38853383, 0.29807833, 0.22545385, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.38853383, 0.29807833, 0.22545385, 0.17026083, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.41087446, 0.32104823, 0.25053367, 0.19894916, 0.13792117, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.41087446, 0.34370604, 0.27464288, 0.22545385, 0.17026083, 0.13792117, 0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.20157266, 0.92192322, 0.72133851,
     0.57119018, 0.45573691, 0.36617002, 0.29807833, 0.25053367, 0.19894916, 0.17026083, 0.13792117, 0.09824532,
     0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921, 0.74807048,
     0.59516323, 0.4783645, 0.38853383, 0.32104823, 0.27464288, 0.22545385, 0.19894916, 0.17026083, 0.13792117,
     0.09824532, 0.02916753),
    (14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921, 0.74807048,
     0.59516323, 0.50118381, 0.41087446, 0.34370604, 0.29807833, 0.25053367, 0.22545385, 0.19894916, 0.17026083,
     0.13792117, 0.09824532, 0.02916753),
)  # fmt: skip


def loglinear_interp(levels: Sequence[float], count: int) -> torch.Tensor:
    """``count`` levels from a decreasing positive table, resampled as the AYS authors do: ``log sigma`` linearly
    interpolated at ``count`` evenly spaced positions along the table's index (ends kept). Shape ``[count]``,
    float64."""
    ys = torch.tensor(levels, dtype=torch.float64).log()
    x = torch.linspace(0, len(levels) - 1, as_int(count, "count", 2), dtype=torch.float64)
    return _table_sigma(ys.flip(0).exp(), x.flip(0))


def _published(levels: Sequence[float], n: int) -> torch.Tensor:
    """A published table of ``len(levels)`` levels as an ``n``-step schedule: as is when it has ``n + 1`` levels,
    else log-linearly resampled to ``n + 1``; its last level (the model's sigma_min) becomes 0, as in ComfyUI and
    diffusers."""
    s = torch.tensor(levels, dtype=torch.float64) if len(levels) == n + 1 else loglinear_interp(levels, n + 1)
    s[-1] = 0.0
    return s


def align_your_steps(n: int, sigma_min: float, sigma_max: float, model: str = "sd15") -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): the published 10-step schedule for ``model`` (``"sd15"``, ``"sdxl"``
    or ``"svd"``, :data:`AYS_SIGMAS`), log-linearly interpolated to ``n + 1`` levels for other step counts as its
    authors do, its last level replaced by 0. The levels are the table's, in that model's sigma (SD's 0.029..14.6,
    SVD's 0.002..700): ``sigma_min`` and ``sigma_max`` are checked but not used. Shape ``[n + 1]``, float64."""
    n, _, _ = _check_range(n, sigma_min, sigma_max)
    if model not in AYS_SIGMAS:
        raise ValueError(f"align_your_steps: model must be one of {sorted(AYS_SIGMAS)}, got {model!r}")
    return _published(AYS_SIGMAS[model], n)


def gits(n: int, sigma_min: float, sigma_max: float, model: str = "sd15") -> torch.Tensor:
    """GITS (Chen et al. 2024): the published Stable Diffusion 1.5 schedule (coefficient 1.20,
    :data:`GITS_SIGMAS_SD15`) for ``2 <= n <= 20``; other ``n`` log-linearly interpolate the 20-step one (as
    ComfyUI does beyond 20). The last level becomes 0. In SD's sigma: ``sigma_min`` and ``sigma_max`` are checked but
    not used. Shape ``[n + 1]``, float64."""
    n, _, _ = _check_range(n, sigma_min, sigma_max)
    if model != "sd15":
        raise ValueError(f"gits: only model='sd15' has a published table, got model={model!r}")
    rows = {len(r) - 1: r for r in GITS_SIGMAS_SD15}
    return _published(rows.get(n, GITS_SIGMAS_SD15[-1]), n)


def dynamic_shift_mu(
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
) -> float:
    """The resolution-dependent flow shift ``mu`` for ``image_seq_len`` latent tokens: linear from ``base_shift``
    at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` (diffusers' ``calculate_shift``, which the
    SD3 and Flux pipelines pass their scheduler)."""
    seq = as_int(image_seq_len, "image_seq_len", 1)
    lo_len = as_int(base_image_seq_len, "base_image_seq_len", 1)
    hi_len = as_int(max_image_seq_len, "max_image_seq_len", 1)
    if hi_len == lo_len:
        raise ValueError("flow_shift: base_image_seq_len and max_image_seq_len must differ")
    b0, b1 = as_real(base_shift, "base_shift"), as_real(max_shift, "max_shift")
    return b0 + (seq - lo_len) * (b1 - b0) / (hi_len - lo_len)


def flow_shift(
    n: int,
    sigma_min: float,
    sigma_max: float,
    shift: float | None = None,
    mu: float | None = None,
    image_seq_len: int | None = None,
    time_shift: str = "exponential",
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
) -> torch.Tensor:
    """A rectified-flow schedule with a timestep shift, as diffusers' ``FlowMatchEulerDiscreteScheduler`` makes it,
    in fastdiff's VE sigmas. Shape ``[n + 1]``, float64.

    A flow time ``t`` in [0, 1] (``x_t = (1 - t) x0 + t eps``) is the VE level ``sigma = t / (1 - t)``. The ``n``
    times run uniformly in ``t`` from ``sigma_max / (1 + sigma_max)`` to ``sigma_min / (1 + sigma_min)`` (diffusers:
    ``linspace`` of its training times; its ``t = 1`` is ``sigma = inf``, so pass a large finite ``sigma_max``), are
    shifted, and end in 0. The range is that of the unshifted times, as in diffusers, where the shift follows the
    ``linspace``: the levels span ``k sigma_min .. k sigma_max``.

    * static (``shift``, default 1): ``t' = shift t / (1 + (shift - 1) t)``;
    * dynamic (``mu``, or ``image_seq_len`` giving ``mu`` linearly from ``base_shift`` at ``base_image_seq_len`` to
      ``max_shift`` at ``max_image_seq_len``, diffusers' ``calculate_shift``): ``time_shift="exponential"``
      ``t' = e^mu / (e^mu + (1 / t - 1))``, or ``"linear"`` ``t' = mu / (mu + (1 / t - 1))``.

    Each is the VE scaling ``sigma' = k sigma`` with ``k = shift``, ``e^mu`` or ``mu``, computed as such.
    """
    n, sigma_min, sigma_max = _check_range(n, sigma_min, sigma_max)
    given = [k for k, v in (("shift", shift), ("mu", mu), ("image_seq_len", image_seq_len)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"flow_shift: give one of shift, mu and image_seq_len, got {' and '.join(given)}")
    if time_shift not in ("exponential", "linear"):
        raise ValueError(f"flow_shift: time_shift must be 'exponential' or 'linear', got {time_shift!r}")
    if image_seq_len is not None:
        mu = dynamic_shift_mu(image_seq_len, base_shift, max_shift, base_image_seq_len, max_image_seq_len)
    if mu is not None:
        mu = as_real(mu, "mu")
        if time_shift == "linear" and not mu > 0:
            raise ValueError(f"flow_shift: the linear time shift needs mu > 0, got mu={mu}")
        k = math.exp(mu) if time_shift == "exponential" else mu
    else:
        k = 1.0 if shift is None else as_real(shift, "shift")
        if not k > 0:
            raise ValueError(f"flow_shift: shift must be positive, got {k}")
    t = torch.linspace(sigma_max / (1 + sigma_max), sigma_min / (1 + sigma_min), n, dtype=torch.float64)
    return _append_zero(k * t / (1 - t))


SCHEDULES = {
    "karras": karras,
    "logsnr_uniform": logsnr_uniform,
    "time_uniform": time_uniform,
    "exponential": exponential,
    "polyexponential": polyexponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "normal": normal,
    "beta": beta,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
    "align_your_steps": align_your_steps,
    "gits": gits,
    "flow_shift": flow_shift,
}


def options(name: str) -> tuple[str, ...]:
    """The options (keyword arguments beyond ``n, sigma_min, sigma_max``) that the named schedule takes."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return tuple(inspect.signature(SCHEDULES[name]).parameters)[3:]


def get(name: str | os.PathLike, n: int, sigma_min: float, sigma_max: float, **kwargs) -> torch.Tensor:
    """A schedule by name (a key of :data:`SCHEDULES`) with its options, or from a JSON file path (no options).

    Returns ``n + 1`` strictly decreasing float64 sigmas ending in 0. An option the schedule does not take is
    refused with a ``ValueError`` naming it and the options it does take."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise ValueError(f"a schedule is a name or a .json file path, got {name!r}")
    if name in SCHEDULES:
        unknown = sorted(set(kwargs) - set(options(name)))
        if unknown:
            takes = ", ".join(options(name)) or "none"
            raise ValueError(f"schedule {name!r} has no option {', '.join(map(repr, unknown))} (its options: {takes})")
        return SCHEDULES[name](n, sigma_min, sigma_max, **kwargs)
    if name.endswith(".json"):
        if kwargs:
            raise ValueError(f"a schedule file takes no options, got {', '.join(map(repr, sorted(kwargs)))}")
        return load(name)
    raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)} or a .json schedule file")


def check_eval_sigmas(eval_sigmas, sigmas: torch.Tensor, where: str = "eval_sigmas") -> torch.Tensor:
    """Check decoupled evaluation sigmas (LD3) against their schedule: one per entry, finite, and positive
    wherever the model is evaluated (all but the last). Returns them detached, float64, on the CPU."""
    try:
        ev = _as_float64(eval_sigmas, "eval_sigmas").detach().cpu()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    if ev.shape != sigmas.shape:
        raise ValueError(f"{where}: eval_sigmas has {ev.numel()} entries, sigmas {sigmas.numel()}; they must match")
    if not torch.isfinite(ev).all() or not (ev[:-1] > 0).all():
        raise ValueError(f"{where}: eval_sigmas must be finite and positive wherever the model is evaluated")
    return ev


def save(path: str | os.PathLike, sigmas: torch.Tensor, eval_sigmas: torch.Tensor | None = None, **metadata) -> None:
    """Write a schedule as JSON, atomically (a temporary file, then a rename). ``eval_sigmas`` are LD3's decoupled
    evaluation sigmas; ``metadata`` (JSON values) records what it was made for, e.g. ``solver``, ``nfe``,
    ``model``."""
    s = validate(sigmas)
    payload = {"format": SCHEDULE_FORMAT, "version": 2, "sigmas": s.tolist(), "metadata": metadata}
    if eval_sigmas is not None:
        payload["eval_sigmas"] = check_eval_sigmas(eval_sigmas, s, "save").tolist()
    payload = json.loads(json.dumps(payload))  # the digest is of what a reader will parse (tuples become lists)
    payload["sha256"] = _digest(payload)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=1)))


def _digest(payload: dict) -> str:
    """SHA-256 of every entry but ``sha256``, in one canonical JSON form: a changed digit, a damaged key (which
    would make ``metadata`` or ``eval_sigmas`` read as absent) or a changed version all show."""
    content = {k: v for k, v in payload.items() if k != "sha256"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class LearnedSchedule:
    """A schedule file's contents: ``sigmas`` ``[N + 1]`` float64, ``eval_sigmas`` ``[N + 1]`` or None, and the
    ``metadata`` it was saved with."""

    sigmas: torch.Tensor
    eval_sigmas: torch.Tensor | None
    metadata: dict


def load_schedule(path: str | os.PathLike, *, solver: str | None = None, nfe: int | None = None) -> LearnedSchedule:
    """Read a schedule file and check it. A file that records its solver and NFE must agree with itself (the
    solver must spend that NFE on its sigmas). Given the ``solver`` or ``nfe`` it is about to be used with, a
    mismatch with the recorded ones warns: timesteps learned for one solver and NFE are rarely good for another.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything else wrong
    with it (not a regular file, not UTF-8, not JSON, not a schedule, or a bad schedule)."""
    path = Path(path)
    payload = _read_schedule_json(path)
    sig = _sigmas_in(path, payload)
    ev = check_eval_sigmas(payload["eval_sigmas"], sig, str(path)) if payload.get("eval_sigmas") is not None else None
    meta = payload.get("metadata")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: metadata must be a JSON object")
    made_for, made_nfe = meta.get("solver"), meta.get("nfe")
    try:
        if made_for is not None and not isinstance(made_for, str):
            raise ValueError(f"metadata solver must be a solver name, got {made_for!r}")
        if made_nfe is not None:
            made_nfe = as_int(made_nfe, "metadata nfe", 1)
        if made_for is not None and made_nfe is not None:
            spent = sum(solvers.get(made_for).evaluations(sig.tolist()))
            if spent != made_nfe:
                raise ValueError(f"it says it was learned for {made_for} at NFE {made_nfe}, but {made_for} spends "
                                 f"{spent} evaluations on its {len(sig)} sigmas: the file is inconsistent")  # fmt: skip
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if solver is not None and made_for is not None and solver != made_for:
        warnings.warn(f"{path} was learned for solver {made_for!r}, not {solver!r}; its timesteps may suit "
                      f"{solver!r} badly", stacklevel=2)  # fmt: skip
    if nfe is not None and made_nfe is not None and nfe != made_nfe:
        warnings.warn(f"{path} was learned for NFE {made_nfe}, but this run spends {nfe}", stacklevel=2)
    return LearnedSchedule(sig, ev, meta)


def load(path: str | os.PathLike) -> torch.Tensor:
    """Read a schedule written by :func:`save` (for example a learned LD3 schedule) and validate it; returns
    only the sigmas (:func:`load_schedule` gives evaluation sigmas and metadata too). Errors as
    :func:`load_schedule`'s."""
    path = Path(path)
    return _sigmas_in(path, _read_schedule_json(path))


def _sigmas_in(path: Path, payload: dict) -> torch.Tensor:
    try:
        return validate(payload["sigmas"])
    except (TypeError, ValueError) as exc:  # a file's problems are ValueErrors, and name the file
        raise ValueError(f"{path}: {exc}") from None


def _read_schedule_json(path: Path) -> dict:
    size = check_regular_file(path, "schedule file")
    if size > _MAX_FILE_BYTES:
        raise ValueError(f"{path} holds {size} bytes, far too many for a schedule file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read schedule file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text, so not a schedule file ({exc})") from None
    try:
        payload = parse_json(text, "the file", nan_ok=True)  # NaN in metadata was always written; sigmas are checked
    except ValueError as exc:  # also the int-digits limit of a very long number
        raise ValueError(f"schedule file {path} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != SCHEDULE_FORMAT or "sigmas" not in payload:
        raise ValueError(f"{path} is not a fastdiff schedule file (expected format {SCHEDULE_FORMAT!r})")
    version = payload.get("version", 1)
    if type(version) is not int or version not in (1, 2):
        raise ValueError(f"{path} has schedule version {version!r}; this fastdiff reads versions 1 and 2")
    # Version 2 (what save writes) must carry its checksum; version 1 (hand-written, or older) is checked only if
    # it has one, so a damaged "version" key cannot switch the check off.
    if "sha256" in payload or version == 2:
        if payload.get("sha256") != _digest(payload):
            raise ValueError(
                f"{path} is corrupt: its contents do not match the checksum stored in it (if you edited it on "
                'purpose, delete its "sha256" entry and set "version": 1)'
            )
    return payload
