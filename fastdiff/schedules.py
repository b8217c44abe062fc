"""Noise schedules: decreasing sigmas that end in 0, in the variance-exploding (EDM) convention.

Every constructor returns a float64 tensor of ``n + 1`` values, strictly decreasing, ending in 0, for ``n``
solver steps. :func:`validate` checks a user-given schedule; :func:`save` and :func:`load` keep a (learned)
schedule in a small JSON file: ``{"format": "fastdiff-schedule", "version": 2, "sigmas": [...], "metadata": {...},
"eval_sigmas": [...] (optional), "sha256": ...}``, the checksum over every other entry. A hand-written file may
leave the checksum out as version 1.
"""

from __future__ import annotations

import hashlib
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


SCHEDULES = {"karras": karras, "logsnr_uniform": logsnr_uniform, "time_uniform": time_uniform}


def get(name: str | os.PathLike, n: int, sigma_min: float, sigma_max: float, **kwargs) -> torch.Tensor:
    """A schedule by name (``karras``, ``logsnr_uniform``, ``time_uniform``) or from a JSON file path."""
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise ValueError(f"a schedule is a name or a .json file path, got {name!r}")
    if name in SCHEDULES:
        return SCHEDULES[name](n, sigma_min, sigma_max, **kwargs)
    if name.endswith(".json"):
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
