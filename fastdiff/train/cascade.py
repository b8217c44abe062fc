"""Cas-DM (An et al., IJCAI 2024; PAPERS.md section 4): a cascaded eps + x0 model trained with a metric loss.

Module theta is a standard eps-prediction DDPM network. Module phi is cascaded after it: it sees theta's clean-image
estimate ``x0_theta = (x_t - sqrt(1 - ab_t) eps_theta) / sqrt(ab_t)`` with the gradient stopped, plus ``x_t`` and
``t``, and predicts ``x0_phi`` and a per-pixel weight ``r`` in [0, 1]. The model's denoised estimate is the blend
``x0_mix = r x0_phi + (1 - r) x0_theta``. The losses (:class:`CascadeLoss`):

* ``|eps - eps_theta|^2`` for theta, the plain DDPM loss: the only term that reaches theta;
* ``|x0 - x0_phi|^2 + lam * metric(x0_phi, x0)`` for phi (LPIPS where it imports, else pseudo-Huber);
* the r-loss ``c_t^2 |x0 - (r sg(x0_phi) + (1 - r) sg(x0_theta))|^2``, both branches detached, with the DDPM
  posterior-mean weight ``c_t = sqrt(ab_{t-1}) beta_t / (1 - ab_t)``: the dual-output model's mean loss.

Network conventions. Every network is called ``net(x, t, class_labels=None)`` with ``x`` ``[B, C_in, H, W]`` and
``t`` a ``[B]`` float tensor of (possibly fractional) DDPM timesteps in ``[0, T - 1]``; it returns ``[B, C_out, H,
W]``. theta: ``C_in = C_out = C`` (the image channels). phi: ``C_in = 2C`` (``x_t`` and ``sg(x0_theta)``
concatenated along channels, ``phi_inputs="xt_x0"``) or ``C`` (``sg(x0_theta)`` alone, ``"x0"``); ``C_out = C + 1``
(``x0_phi``, then one logit channel for ``r``, ``r_map="pixel"``) or ``2C`` (a logit per channel, ``"channel"``).
The variants share the conventions: ``"ddpm"`` is theta alone; ``"dual"`` is the dual-output model of Benny & Wolf
(one network, ``C_out = 2C + 1`` or ``3C``: eps, x0, r logits), the metric on its x0 head. A user's networks work
once their channel counts fit; :class:`CascadeModel` checks them with one forward when it is built.

Sampling: :meth:`CascadeModel.denoiser` is ``x0_mix`` in fastdiff's model convention (a
:class:`~fastdiff.denoisers.VPDenoiser` with ``prediction="x0"``), so every solver, the fused kernels, interval
guidance (the loss drops labels for CFG) and LD3 work on it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.arguments import as_int, as_real
from fastdiff.checkpoint import check_keys
from fastdiff.denoisers import VPDenoiser

VARIANTS = ("cascade", "dual", "ddpm")
MAX_TIMESTEPS = 10**6  # DDPM uses 1000; a million is already absurd, and a corrupt count would size the tables
METRICS = ("auto", "lpips", "pseudo_huber", "l2", "none")


def vp_alphas_cumprod(kind: str = "linear", timesteps: int = 1000) -> torch.Tensor:
    """``[T]`` float64 cumulative products of ``1 - beta`` for DDPM training: ``"linear"`` betas from 1e-4 to
    0.02 (Ho et al. 2020, scaled to ``T``), or ``"cosine"`` (Nichol & Dhariwal 2021, s = 0.008, betas capped at
    0.999)."""
    if not isinstance(timesteps, int) or timesteps < 2:
        raise ValueError(f"timesteps must be an integer >= 2, got {timesteps!r}")
    if kind == "linear":
        scale = 1000 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    elif kind == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")
    return torch.cumprod(1 - betas, 0)


@dataclass(frozen=True)
class CascadeConfig:
    """Every inferred choice of PAPERS.md as an option; the defaults are the inferred ones.

    Attributes:
        variant: ``"cascade"`` (Cas-DM), ``"dual"`` (one network with eps, x0 and r heads) or ``"ddpm"`` (eps only).
        schedule, timesteps: the discrete VP training schedule (:func:`vp_alphas_cumprod`).
        phi_inputs: ``"xt_x0"`` (phi sees ``x_t`` and ``sg(x0_theta)``) or ``"x0"`` (only ``sg(x0_theta)``).
        r_map: ``"pixel"`` (one weight per pixel, shared by the channels) or ``"channel"`` (one per element).
        r_loss: ``"posterior"`` (the c_t^2-weighted mean loss), ``"uniform"`` (weight 1) or ``"none"`` (r is not
            trained and stays at its initial value; an ablation).
        lam: the metric's weight.
        metric: ``"auto"`` (LPIPS where it imports, else pseudo-Huber), ``"lpips"``, ``"pseudo_huber"``, ``"l2"`` or
            ``"none"``.
        clip_phi_input: clamp ``sg(x0_theta)`` to ``[-c, c]`` before phi sees it (at large t the estimate divides by
            ``sqrt(ab_t)`` ~ 0.006 and can be far outside the data range); None for no clamp. The blend uses the
            unclamped estimate.
        label_dropout: probability of replacing a label by -1 (the null class), for classifier-free guidance.
    """

    variant: str = "cascade"
    schedule: str = "linear"
    timesteps: int = 1000
    phi_inputs: str = "xt_x0"
    r_map: str = "pixel"
    r_loss: str = "posterior"
    lam: float = 1.0
    metric: str = "auto"
    clip_phi_input: float | None = 1.0
    label_dropout: float = 0.1

    def __post_init__(self):
        choices = dict(variant=VARIANTS, schedule=("linear", "cosine"), phi_inputs=("xt_x0", "x0"),
                       r_map=("pixel", "channel"), r_loss=("posterior", "uniform", "none"), metric=METRICS)  # fmt: skip
        for name, allowed in choices.items():
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        # Numbers are stored as Python numbers (the config is saved as JSON), and bounded before anything is
        # allocated: the schedule tables have `timesteps` entries.
        object.__setattr__(self, "timesteps", as_int(self.timesteps, "timesteps", 2, MAX_TIMESTEPS))
        for name in ("lam", "label_dropout"):
            object.__setattr__(self, name, as_real(getattr(self, name), name))
        if self.clip_phi_input is not None:
            object.__setattr__(self, "clip_phi_input", as_real(self.clip_phi_input, "clip_phi_input"))
        if not self.lam >= 0:
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam}")
        if not 0 <= self.label_dropout <= 1:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")
        if self.clip_phi_input is not None and not self.clip_phi_input > 0:
            raise ValueError(f"clip_phi_input must be positive or None, got {self.clip_phi_input}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CascadeConfig:
        return cls(**check_keys(d, "CascadeConfig", allowed=[f.name for f in fields(cls)]))

    def network_channels(self, c: int) -> dict[str, tuple[int, int]]:
        """``{network: (in_channels, out_channels)}`` for images of ``c`` channels."""
        r = 1 if self.r_map == "pixel" else c
        if self.variant == "ddpm":
            return {"theta": (c, c)}
        if self.variant == "dual":
            return {"theta": (c, 2 * c + r)}
        return {"theta": (c, c), "phi": (2 * c if self.phi_inputs == "xt_x0" else c, c + r)}


class CascadeOutput(NamedTuple):
    """One forward at ``(x_t, t)``: ``eps`` (theta's noise prediction), ``x0_theta`` (the clean image it implies),
    ``x0_phi`` and ``r`` (None for the ``ddpm`` variant); all ``[B, C, H, W]`` except ``r`` ``[B, 1 or C, H, W]``."""

    eps: torch.Tensor
    x0_theta: torch.Tensor
    x0_phi: torch.Tensor | None
    r: torch.Tensor | None

    def mixed(self) -> torch.Tensor:
        """``r x0_phi + (1 - r) x0_theta``, the model's clean-image estimate."""
        if self.r is None:
            return self.x0_theta
        return self.r * self.x0_phi + (1 - self.r) * self.x0_theta


class CascadeModel(nn.Module):
    """Cas-DM's two networks (or one, for the ``dual`` and ``ddpm`` variants) on a discrete VP schedule.

    Args:
        theta: ``theta(x_t, t, class_labels=None)``, see the module docstring for the channel counts.
        phi: the cascaded x0 network (``cascade`` only; None otherwise).
        config: a :class:`CascadeConfig`.
        image_shape: ``(C, H, W)`` of the data: the networks are run once on it here, so that a channel mismatch is
            an error now rather than an hour into training.

    ``forward(x_t, t, class_labels=None) -> CascadeOutput`` with ``x_t`` ``[B, C, H, W]`` (VP space) and ``t``
    ``[B]`` timesteps (int or float).
    """

    def __init__(self, theta: nn.Module, phi: nn.Module | None, config: CascadeConfig, image_shape: tuple[int, ...]):
        super().__init__()
        if (phi is not None) != (config.variant == "cascade"):
            raise ValueError(f"the {config.variant!r} variant takes {'a' if config.variant == 'cascade' else 'no'} "
                             "phi network")  # fmt: skip
        self.config = config
        self.theta, self.phi = theta, phi
        self.image_shape = tuple(int(v) for v in image_shape)
        ab = vp_alphas_cumprod(config.schedule, config.timesteps)
        self.register_buffer("alphas_cumprod", ab, persistent=False)
        self._grid = VPDenoiser(None, ab)
        self._check_networks()

    def _check_networks(self) -> None:
        c = self.image_shape[0]
        t = torch.tensor([0.0, self.config.timesteps - 1.0])
        for name, (c_in, c_out) in self.config.network_channels(c).items():
            net = getattr(self, name)
            try:
                with torch.no_grad():
                    out = net(torch.zeros(2, c_in, *self.image_shape[1:]), t)
            except Exception as exc:
                shape = [2, c_in, *self.image_shape[1:]]
                raise ValueError(f"{name} cannot take input {shape} with t [2] ({self.config.variant} variant): "
                                 f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
            want = (2, c_out, *self.image_shape[1:])
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"{name} must return {list(want)} for the {self.config.variant} variant on "
                                 f"{c}-channel images ({self._layout(name)}), got {got}")  # fmt: skip

    def _layout(self, name: str) -> str:
        cfg = self.config
        if cfg.variant == "dual":
            return "eps, x0, then r logits"
        if name == "phi":
            return "x0_phi, then r logits"
        return "eps"

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The VE noise level of (fractional) timesteps ``t`` ``[B]``, as float64 on t's device."""
        return self._grid.t_to_sigma(t.detach())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> CascadeOutput:
        t = torch.as_tensor(t, device=x_t.device).float().expand(x_t.shape[0])
        c = x_t.shape[1]
        s = self._sigma(t).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        # x0 from eps: (x_t - sqrt(1 - ab) eps) / sqrt(ab) = x_t sqrt(1 + s^2) - s eps, with s^2 = (1 - ab) / ab
        out = self.theta(x_t, t, class_labels=class_labels)
        eps = out[:, :c]
        x0_theta = x_t * torch.sqrt(1 + s**2) - s * eps
        if self.config.variant == "ddpm":
            return CascadeOutput(eps, x0_theta, None, None)
        if self.config.variant == "dual":
            return CascadeOutput(eps, x0_theta, out[:, c : 2 * c], torch.sigmoid(out[:, 2 * c :]))
        x0_in = x0_theta.detach()  # the stop-gradient: nothing phi's losses do reaches theta
        if self.config.clip_phi_input is not None:
            x0_in = x0_in.clamp(-self.config.clip_phi_input, self.config.clip_phi_input)
        phi_in = torch.cat([x_t, x0_in], dim=1) if self.config.phi_inputs == "xt_x0" else x0_in
        out_phi = self.phi(phi_in, t, class_labels=class_labels)
        return CascadeOutput(eps, x0_theta, out_phi[:, :c], torch.sigmoid(out_phi[:, c:]))

    def denoiser(self) -> VPDenoiser:
        """The blended estimate ``x0_mix`` as a fastdiff model ``D(x; sigma, class_labels=None)``. A model made by
        :func:`build_cascade` also carries its UNet's ``config`` (image size, channels, classes), as fastdiff's
        UNets do, for the CLI."""
        den = VPDenoiser(_MixedX0(self), self.alphas_cumprod, prediction="x0")
        if getattr(self, "unet_config", None) is not None:
            den.config = self.unet_config
        return den


class _MixedX0(nn.Module):
    """``net(x_vp, t, **cond) -> x0_mix``: the cascade as the network of a ``VPDenoiser`` (x0 prediction)."""

    def __init__(self, cascade: CascadeModel):
        super().__init__()
        self.cascade = cascade

    def forward(self, x_vp: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        return self.cascade(x_vp, t, class_labels=class_labels).mixed()


class TimestepUNet(nn.Module):
    """fastdiff's :class:`~fastdiff.models.unet.UNet` as a DDPM network ``net(x, t, class_labels=None)``: the
    timestep enters as the UNet's noise conditioning ``c_noise = log(sigma_t) / 4`` (EDM's), with ``sigma_t`` the
    VE noise level of ``t`` on the training schedule."""

    def __init__(self, config, alphas_cumprod: torch.Tensor):
        super().__init__()
        from fastdiff.models.unet import UNet

        self.unet = UNet(config)
        self._grid = VPDenoiser(None, alphas_cumprod)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).float().expand(x.shape[0])
        c_noise = self._grid.t_to_sigma(t.detach()).log().div(4).float()
        return self.unet(x, c_noise, class_labels=class_labels)


def build_cascade(config: CascadeConfig, unet_config, image_shape: tuple[int, int, int]) -> CascadeModel:
    """A :class:`CascadeModel` made of fastdiff UNets: every network is ``unet_config`` with the variant's channel
    counts (so theta, phi, the dual network and the DDPM network have the same size but for their first and last
    convolutions)."""
    from fastdiff.models.unet import UNetConfig

    ab = vp_alphas_cumprod(config.schedule, config.timesteps)
    nets = {}
    for name, (c_in, c_out) in config.network_channels(image_shape[0]).items():
        cfg = UNetConfig.from_dict({**unet_config.to_dict(), "in_channels": c_in, "out_channels": c_out})
        nets[name] = TimestepUNet(cfg, ab)
    model = CascadeModel(nets["theta"], nets.get("phi"), config, image_shape)
    model.unet_config = unet_config
    return model


CASCADE_TYPE = "cascade"


def save_cascade(path, model: CascadeModel, *, provenance: str = ""):
    """Write a :func:`build_cascade` model (its weights, the cascade and UNet configs and the image shape) as a
    safetensors model file, atomically; :func:`load_cascade` and ``fastdiff.models.get(path)`` read it back."""
    from fastdiff.checkpoint import save_typed_model

    unet_config = getattr(model, "unet_config", None)
    if unet_config is None:
        raise TypeError("save_cascade saves models made by build_cascade (fastdiff UNets); save your own "
                        "networks' state_dict with fastdiff.checkpoint.save_model")  # fmt: skip
    config = {"cascade": model.config.to_dict(), "unet": unet_config.to_dict(), "image_shape": list(model.image_shape)}
    return save_typed_model(path, model, CASCADE_TYPE, config, provenance)


def load_cascade(path, device: str | torch.device = "cpu") -> CascadeModel:
    """Rebuild a :func:`save_cascade` file, in eval mode on ``device`` (config fields, names and shapes checked;
    :class:`~fastdiff.checkpoint.CheckpointError` naming the file and the field otherwise)."""
    from fastdiff.checkpoint import load_typed_model
    from fastdiff.models.unet import UNetConfig

    def build(config):
        check_keys(config, "the cascade model config", required=("cascade", "unet", "image_shape"), allowed=())
        cascade, unet = CascadeConfig.from_dict(config["cascade"]), UNetConfig.from_dict(config["unet"])
        shape = config["image_shape"]
        if not isinstance(shape, list) or len(shape) != 3:
            raise ValueError(f"image_shape must be a list [C, H, W], got {shape!r}")
        c, h, w = (as_int(v, f"image_shape[{i}]", 1) for i, v in enumerate(shape))
        # The networks are run once on this shape when built, so it must fit them before anything is allocated
        # (the channels are checked as the networks' UNetConfigs).
        if (h, w) != (unet.resolution, unet.resolution):
            raise ValueError(f"image_shape {shape} does not fit the UNet's resolution {unet.resolution}")
        return build_cascade(cascade, unet, (c, h, w))

    return load_typed_model(path, CASCADE_TYPE, build).to(device).eval()


# ---------------------------------------------------------------------------------------------------- the loss


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sample pseudo-Huber distances ``sqrt(mean((a - b)^2) + c^2) - c``, ``c = 0.00054``, of images
    ``[B, ...]``: Song & Dhariwal's (2023) metric, ``sqrt(|a - b|^2 + (0.00054 sqrt(d))^2) - 0.00054 sqrt(d)`` for
    ``d`` elements, divided by ``sqrt(d)`` so that its scale (an RMS error) does not grow with the image size."""
    c = 0.00054
    return torch.sqrt((a - b).flatten(1).square().mean(1) + c**2) - c


def make_metric(name: str) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, str]:
    """``(metric(a, b) -> [B], resolved name)``; ``"auto"`` is LPIPS where it can be built, else pseudo-Huber;
    ``"none"`` gives ``(None, "none")``."""
    if name not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {name!r}")
    if name == "none":
        return None, "none"
    if name in ("auto", "lpips"):
        try:
            from fastdiff.lpips import LPIPSAdapter

            lp = LPIPSAdapter()
            return (lambda a, b: lp.to(a.device)(a.float(), b.float()).reshape(-1)), "lpips"
        except (ImportError, FileNotFoundError):
            if name == "lpips":
                raise
        name = "pseudo_huber"
    if name == "pseudo_huber":
        return pseudo_huber, name
    return (lambda a, b: (a - b).flatten(1).square().mean(1)), "l2"


def check_metric(metric, name: str, image_shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` now if ``metric`` cannot take a batch of images of ``image_shape``."""
    if metric is None:
        return
    x = torch.zeros(2, *image_shape)
    try:
        out = metric(x, x + 0.1)
    except Exception as exc:
        raise ValueError(f"the {name} metric cannot take images of shape {list(image_shape)}: "
                         f"{type(exc).__name__}: {exc}") from exc  # fmt: skip
    if not isinstance(out, torch.Tensor) or out.shape != (2,):
        raise ValueError(f"the {name} metric must return one distance per sample ([2] here), got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")  # fmt: skip


def posterior_weight(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``[T]`` ``c_t^2``: the squared weight of x0 in DDPM's posterior mean, ``c_t = sqrt(ab_{t-1}) beta_t / (1 -
    ab_t)`` (``ab_{-1} = 1``)."""
    ab = alphas_cumprod.double()
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    beta = 1 - ab / prev
    return (prev.sqrt() * beta / (1 - ab)) ** 2


class CascadeLoss:
    """``CascadeLoss(config, image_shape)(model, batch, generator) -> (loss, logs)`` for :class:`CascadeModel`.

    Per step: ``t ~ U{0, ..., T-1}`` ``[B]``, ``noise ~ N(0, 1)``, label dropout uniforms ``[B]``, drawn in that
    order from ``generator``; ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``. The loss is the sum of the terms in the
    module docstring, each a mean over the batch (and over elements for the squared errors). ``terms`` picks them:
    ``"all"`` (joint training), ``"theta"`` (the eps term alone: the first stage of staged training) or ``"phi"``
    (all but the eps term: the second stage, with theta frozen).

    Logs: ``loss``, ``loss_eps``, ``loss_x0``, ``loss_metric`` (unweighted), ``loss_r`` and ``r_mean``.
    """

    def __init__(self, config: CascadeConfig, image_shape: tuple[int, ...], *, terms: str = "all"):
        if terms not in ("all", "theta", "phi"):
            raise ValueError(f"terms must be 'all', 'theta' or 'phi', got {terms!r}")
        self.config = config
        self.metric, self.metric_name = make_metric(config.metric if config.variant != "ddpm" else "none")
        check_metric(self.metric, self.metric_name, image_shape)
        ab = vp_alphas_cumprod(config.schedule, config.timesteps)
        self.alphas_cumprod = ab.float()
        self.c2 = posterior_weight(ab).float()
        self.terms = terms

    def __call__(self, model, batch, generator: torch.Generator):
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        x0 = images.float()
        b, dev, gdev = x0.shape[0], x0.device, generator.device
        cfg = self.config
        t = torch.randint(0, cfg.timesteps, (b,), generator=generator, device=gdev).to(dev)
        noise = torch.randn(x0.shape, generator=generator, device=gdev).to(dev)
        cond = {}
        if labels is not None:
            u = torch.rand(b, generator=generator, device=gdev).to(dev)
            cond["class_labels"] = torch.where(u < cfg.label_dropout, torch.full_like(labels, -1), labels.long())
        shape = (b,) + (1,) * (x0.ndim - 1)
        ab = self.alphas_cumprod.to(dev)[t].reshape(shape)
        out = model(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, **cond)
        zero = x0.new_zeros(())
        loss_eps = F.mse_loss(out.eps.float(), noise)
        loss_x0 = loss_metric = loss_r = zero
        r_mean = zero
        if out.r is not None:
            loss_x0 = F.mse_loss(out.x0_phi.float(), x0)
            if self.metric is not None:
                loss_metric = self.metric(out.x0_phi.float(), x0).mean()
            r_mean = out.r.detach().float().mean()
            if cfg.r_loss != "none":
                blend = out.r * out.x0_phi.detach() + (1 - out.r) * out.x0_theta.detach()
                per = (blend.float() - x0).square().flatten(1).mean(1)
                w = self.c2.to(dev)[t] if cfg.r_loss == "posterior" else torch.ones_like(per)
                loss_r = (w * per).mean()
        loss = loss_x0 + cfg.lam * loss_metric + loss_r
        if self.terms == "theta":
            loss = loss_eps
        elif self.terms == "all":
            loss = loss + loss_eps
        logs = dict(loss=loss, loss_eps=loss_eps, loss_x0=loss_x0, loss_metric=loss_metric, loss_r=loss_r,
                    r_mean=r_mean)  # fmt: skip
        return loss, {k: v.detach().float() for k, v in logs.items()}


__all__ = [
    "CascadeConfig", "CascadeLoss", "CascadeModel", "CascadeOutput", "TimestepUNet", "build_cascade",
    "check_metric", "load_cascade", "make_metric", "posterior_weight", "pseudo_huber", "save_cascade",
    "vp_alphas_cumprod",
]  # fmt: skip
