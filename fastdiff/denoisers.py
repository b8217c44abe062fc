"""Adapters that turn networks into fastdiff's model convention ``model(x, sigma, **cond) -> D(x; sigma)``.

fastdiff works in the variance-exploding (EDM) form ``x = x0 + sigma * eps``. A variance-preserving model with
``alpha_bar`` sees ``x_vp = sqrt(alpha_bar) * x`` with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``; a
rectified-flow model sees ``x_t = (1 - t) x0 + t eps = x / (1 + sigma)`` with ``t = sigma / (1 + sigma)``.

Every adapter takes ``x`` of shape ``[B, ...]`` and ``sigma`` as a ``[B]`` tensor or a scalar, and returns
``D`` with the shape of ``x`` in the network's output dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fastdiff import schedules

PREDICTIONS = ("eps", "v", "x0")
OUTPUTS = PREDICTIONS + ("flow",)  # what :func:`to_denoised` converts


def _sigma_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a float tensor of shape ``[B]`` on x's device."""
    s = torch.as_tensor(sigma, device=x.device)
    s = s.to(torch.promote_types(x.dtype, torch.float32))
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(s.shape)}")
    return s


def _expand(v, x: torch.Tensor):
    """A per-sample ``[B]`` scaling shaped to broadcast against ``x`` ``[B, ...]``; a Python constant as it is."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1)) if isinstance(v, torch.Tensor) else v


Scaling = torch.Tensor | float  # a tensor shaped like sigma, or a Python constant where it does not depend on sigma


def _expand(v, x: torch.Tensor):
    """A per-sample ``[B]`` scaling shaped to broadcast against ``x`` ``[B, ...]``; a Python constant as it is."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1)) if isinstance(v, torch.Tensor) else v


Scaling = torch.Tensor | float  # a tensor shaped like sigma, or a Python constant where it does not depend on sigma


def network_output(out) -> torch.Tensor:
    """A network's output tensor: diffusers returns an object with ``.sample``, some networks a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the network returned {type(out).__name__}; expected a tensor (or an object with .sample)")


def _check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def output_scalings(prediction: str, sigma: torch.Tensor) -> tuple[Scaling, Scaling]:
    """``(c_skip, c_out)`` with ``D = c_skip x + c_out out`` for a network predicting ``prediction`` at the VE state
    ``x`` of noise level ``sigma``: ``"eps"``, ``"v"`` or ``"x0"`` for a VP network (it saw ``x / sqrt(1 + sigma^2)``),
    ``"flow"`` for a rectified-flow network predicting ``v = eps - x0`` (it saw ``x / (1 + sigma)``). Constants are
    Python floats."""
    if prediction == "eps":
        return 1.0, -sigma
    if prediction == "v":
        # v = sqrt(ab) eps - sqrt(1 - ab) x0  =>  x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) v
        return 1 / (1 + sigma**2), -sigma / torch.sqrt(1 + sigma**2)
    if prediction == "flow":
        return 1 / (1 + sigma), -sigma / (1 + sigma)  # x_t - t v with x_t = x / (1 + sigma), t = sigma / (1 + sigma)
    if prediction == "x0":
        return 0.0, 1.0
    raise ValueError(f"prediction must be one of {OUTPUTS}, got {prediction!r}")


def _scaled(x: torch.Tensor, c: Scaling) -> torch.Tensor:
    return x if isinstance(c, float) and c == 1.0 else x * c


def combine(x: torch.Tensor, out: torch.Tensor, c_skip: Scaling, c_out: Scaling) -> torch.Tensor:
    """``c_skip x + c_out out`` in ``promote(out, x)``, where a constant 0 or 1 costs nothing."""
    out = out.to(torch.promote_types(out.dtype, x.dtype))
    if isinstance(c_skip, float) and c_skip == 0.0:
        return _scaled(out, c_out)
    skipped = x if isinstance(c_skip, float) and c_skip == 1.0 else x * c_skip
    return torch.addcmul(skipped, out, c_out) if isinstance(c_out, torch.Tensor) else skipped + out * c_out


def to_denoised(prediction: str, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D from a network's output at the VE state ``x`` (``sigma`` already broadcast to it); see
    :func:`output_scalings` for ``prediction``."""
    return combine(x, out, *output_scalings(prediction, sigma))


class Preconditioned(nn.Module):
    """The form of every adapter here (Karras et al. 2022, Table 1)::

        D(x; sigma) = c_skip x + c_out net(c_in x, c_noise, **cond)

    with ``(c_skip, c_out, c_in, c_noise)`` functions of sigma alone (:meth:`scalings`). fastdiff's samplers
    evaluate them once per schedule, on the device, and call :meth:`denoise` at every step, so a step costs the
    network and at most three elementwise ops, nothing that depends only on the schedule. A subclass defines
    :meth:`scalings` and keeps this ``forward`` (the samplers call :meth:`denoise` with precomputed scalings only
    for models whose ``forward`` is this one).
    """

    net: Callable

    def scalings(self, sigma: torch.Tensor) -> tuple[Scaling, Scaling, Scaling, torch.Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at noise levels ``sigma`` (a float tensor of any shape): tensors shaped
        like ``sigma`` in its dtype, or Python floats where a scaling is constant."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        s = _sigma_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = self.scalings(s)
        return self.denoise(x, _expand(c_skip, x), _expand(c_out, x), _expand(c_in, x), c_noise, **cond)

    def denoise(
        self, x: torch.Tensor, c_skip: Scaling, c_out: Scaling, c_in: Scaling, c_noise: torch.Tensor, **cond
    ) -> torch.Tensor:
        """``D`` from ``x`` ``[B, ...]``, scalings that broadcast against it, and ``c_noise`` ``[B]``."""
        return combine(x, network_output(self.net(_scaled(x, c_in), c_noise, **cond)), c_skip, c_out)


class VPDenoiser(Preconditioned):
    """A discrete-time VP network (DDPM, diffusers UNets) given by its ``alphas_cumprod``.

    The network is called as ``net(x_vp, t, **cond)`` with the fractional timestep ``t`` whose noise level is
    ``sigma``: the timestep grid is interpolated linearly in ``log(sigma)`` (as k-diffusion does), so grid
    sigmas map to exact integer timesteps. With ``quantize=True`` the timestep is rounded to the grid instead.

    Args:
        net: the network; its output may be a tensor, a tuple, or an object with ``.sample``.
        alphas_cumprod: ``[T]`` cumulative products of ``1 - beta`` (``scheduler.alphas_cumprod`` in diffusers).
        prediction: ``"eps"``, ``"v"`` or ``"x0"``, what the network predicts.
    """

    def __init__(self, net: Callable, alphas_cumprod: torch.Tensor, prediction: str = "eps", quantize: bool = False):
        super().__init__()
        self.net = net
        self.prediction = _check_prediction(prediction)
        self.quantize = quantize
        ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if ab.ndim != 1 or ab.numel() < 2 or not ((ab > 0) & (ab < 1)).all():
            raise ValueError("alphas_cumprod must be a 1-D tensor of at least 2 values in (0, 1)")
        sig = ((1 - ab) / ab).sqrt()
        if not (sig[1:] > sig[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (noise grows with the timestep)")
        self.register_buffer("sigmas", sig, persistent=False)
        self.register_buffer("log_sigmas", sig.log(), persistent=False)
        self._range = (float(sig[0]), float(sig[-1]))  # host floats: reading the buffers on a GPU would sync

    @property
    def sigma_min(self) -> float:
        return self._range[0]

    @property
    def sigma_max(self) -> float:
        return self._range[1]

    def check_sigmas(self, sigmas) -> None:
        """Raise ``ValueError`` when a positive sigma lies outside the model's grid. fastdiff's samplers call
        this on the schedule before they start; per call, :meth:`sigma_to_t` checks only CPU sigmas, because
        on a GPU the check would be a host sync in every forward."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        self._check_range(s[s > 0])  # the final 0 of a schedule has no model call

    def _check_range(self, s: torch.Tensor) -> None:
        lo, hi = self.sigma_min, self.sigma_max
        if s.numel() and (s.min() < lo * (1 - 1e-5) or s.max() > hi * (1 + 1e-5)):
            raise ValueError(f"sigma {s.min().item():g}..{s.max().item():g} lies outside the model's range "
                             f"[{lo:g}, {hi:g}]")  # fmt: skip

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep for each sigma; raises for CPU sigmas outside the model's grid (GPU sigmas are
        clamped to it: see :meth:`check_sigmas`)."""
        s = torch.as_tensor(sigma, device=self.log_sigmas.device).to(torch.float64)
        if s.device.type == "cpu":
            self._check_range(s)
        lo, hi = self.sigma_min, self.sigma_max
        log_s = s.clamp(lo, hi).log()
        idx = torch.searchsorted(self.log_sigmas, log_s).clamp(1, len(self.log_sigmas) - 1)
        l0, l1 = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        t = (idx - 1) + (log_s - l0) / (l1 - l0)
        return t.round() if self.quantize else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of fractional timesteps, interpolated in ``log(sigma)``."""
        t = torch.as_tensor(t, dtype=torch.float64, device=self.log_sigmas.device)
        i0 = t.floor().long().clamp(0, len(self.sigmas) - 2)
        frac = t - i0
        return ((1 - frac) * self.log_sigmas[i0] + frac * self.log_sigmas[i0 + 1]).exp()

    def scalings(self, sigma):
        t = self.sigma_to_t(sigma).to(sigma.dtype).to(sigma.device)
        return *output_scalings(self.prediction, sigma), 1 / torch.sqrt(1 + sigma**2), t


class VPContinuousDenoiser(Preconditioned):
    """A continuous-time VP network on the linear VP-SDE (Song et al. 2021), ``beta(t) = beta_min + t (beta_max -
    beta_min)``. The network is called as ``net(x_vp, t * time_scale, **cond)`` with ``t`` in (0, 1];
    EDM's VP models use ``time_scale = 999``."""

    def __init__(
        self,
        net: Callable,
        prediction: str = "eps",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        time_scale: float = 1.0,
    ):
        super().__init__()
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.net = net
        self.prediction = _check_prediction(prediction)
        self.beta_min, self.beta_max, self.time_scale = beta_min, beta_max, time_scale

    def scalings(self, sigma):
        t = schedules.vp_sigma_to_t(sigma, self.beta_min, self.beta_max).to(sigma.dtype)
        return *output_scalings(self.prediction, sigma), 1 / torch.sqrt(1 + sigma**2), t * self.time_scale


class FlowDenoiser(Preconditioned):
    """A rectified-flow network (SD3/Flux style) predicting the velocity ``v = eps - x0`` of
    ``x_t = (1 - t) x0 + t eps``. The network is called as ``net(x_t, t * time_scale, **cond)``; diffusers'
    SD3 transformer takes ``time_scale = 1000``."""

    def __init__(self, net: Callable, time_scale: float = 1.0):
        super().__init__()
        self.net = net
        self.time_scale = time_scale

    def scalings(self, sigma):
        return *output_scalings("flow", sigma), 1 / (1 + sigma), sigma / (1 + sigma) * self.time_scale


class EDMPrecond(Preconditioned):
    """EDM preconditioning (Karras et al. 2022, Table 1) around a raw network ``F``::

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, **cond)
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2),   c_noise = log(sigma) / 4
    """

    def __init__(self, net: Callable, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.net = net
        self.sigma_data = sigma_data

    def scalings(self, sigma):
        sd = self.sigma_data
        root = torch.sqrt(sigma**2 + sd**2)
        return sd**2 / (sigma**2 + sd**2), sigma * sd / root, 1 / root, sigma.log() / 4


def discrete_sigmas(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The VE sigmas of integer ``timesteps`` of a discrete VP schedule, followed by 0: the schedule a
    diffusers scheduler steps through with those timesteps."""
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    t = torch.as_tensor(timesteps).long().cpu()
    sig = ((1 - ab[t]) / ab[t]).sqrt()
    return torch.cat([sig, sig.new_zeros(1)])


__all__ = [
    "Preconditioned",
    "combine",
    "output_scalings",
    "to_denoised",
    "VPDenoiser",
    "VPContinuousDenoiser",
    "FlowDenoiser",
    "EDMPrecond",
    "discrete_sigmas",
    "PREDICTIONS",
]
