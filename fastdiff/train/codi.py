"""CoDi (Mei et al., CVPR 2024; PAPERS.md section 3): distil an unconditional diffusion model into a conditional
sampler of 1-4 steps.

The pieces, in fastdiff's EDM convention (``z = x0 + sigma n``; a model returns the denoised ``D(z; sigma)``):

* **Student** (:class:`CoDiStudent`): the teacher's network plus a ControlNet-like adapter
  (:class:`UNetAdapter`), a copy of the teacher's encoder (input convolution, embeddings, down path, middle)
  that also reads the condition through a zero-initialised convolution and adds its features into the frozen
  network's skip connections through zero-initialised 1x1 convolutions (``fusion="zero_conv"``), or fuses them
  as ``(1 - mu) h + mu h_adapter`` with ``mu`` initialised to 0 (``"mu"``). At initialisation the student is the
  teacher exactly. The teacher's own path always runs unconditionally (label -1); class labels reach the student
  through the adapter's copy of the class embedding. ``trainable="adapter"`` is PE-CoDi, ``"all"`` full CoDi.
* **Consistency output** :func:`consistency_output`: ``f(z, sigma, c) = c_skip z + c_out x_hat(z, sigma, c)``
  with LCM's boundary scalings (:func:`fastdiff.solvers.consistency_scalings`, the one implementation that
  training and sampling share), ``u = scale (sigma - sigma_min)``, ``c_skip = sd^2 / (u^2 + sd^2)``,
  ``c_out = u / sqrt(u^2 + sd^2)``: ``f(z, sigma_min) = z`` exactly.
* **Loss** (:class:`CoDiLoss`): the noise levels ``sigma_0 < ... < sigma_N`` are Karras' (``rho`` 7) from
  ``sigma_min`` to ``sigma_max``; one interval ``n`` per batch, ``t = sigma_n``, ``s = sigma_{n-1}``. ``z_s`` is
  one deterministic (Euler = DDIM) step from ``z_t``, by the frozen teacher (unconditional), or by the EMA
  student with classifier-free guidance ``w ~ U[w_min, w_max)`` per sample (``target="ema_cfg"``; cond and
  uncond evaluated as one batch ``[cond; uncond]``, the guided estimate ``D_u + w (D_c - D_u)``). Then

      loss = |f_theta(z_t, t, c) - sg(f_theta-(z_s, s, c))|^2 + data_weight |x_hat_theta(z_t, t, c) - x0|^2

  where ``theta-`` is the run's EMA (``TrainConfig.ema_decay``), read through ``torch.func.functional_call``.
* **Conditions** (:func:`get_condition`): ``lowres2``/``lowres4`` (the image average-pooled by 2 or 4 and
  upsampled back, nearest), ``inpaint`` (the image with a random rectangle removed, plus the keep-mask),
  ``class``, combinations such as ``lowres4+class``, or any user tensor (:class:`TensorCondition`). For CFG the
  null condition (zeros, label -1) is trained by dropping the condition with probability ``cond_dropout``.
* **Sampling**: the core solver ``lcm`` (:class:`fastdiff.solvers.LCM`), multistep consistency sampling,
  ``x = f(x, sigma_i)`` then re-noise to ``sigma_{i+1}``, through :func:`fastdiff.sample`, :class:`fastdiff.Sampler`
  and ``fastdiff sample``, with the student's scalings (:func:`student_solver`) and its condition as keyword
  arguments: ``cond={"cond": tensor, "class_labels": labels}``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.arguments import as_int, as_real
from fastdiff.checkpoint import check_keys
from fastdiff.denoisers import EDMPrecond
from fastdiff.models.unet import MAX_CLASSES, MAX_IMAGE_CHANNELS, EDMUNet, UNet, UNetConfig, _zero
from fastdiff.schedules import karras
from fastdiff.solvers.consistency import LCM, consistency_scalings

FUSIONS = ("zero_conv", "mu")
TARGETS = ("teacher", "ema_cfg")
TRAINABLE = ("adapter", "all")
MAX_INTERVALS = 10**5  # the paper uses tens; a corrupt count would size the noise-level grid


# --------------------------------------------------------------------------------------------- conditions


class Condition:
    """What the student is conditioned on: an image-like tensor ``[B, channels, H, W]`` (``channels`` may be 0)
    and/or class labels (``uses_labels``). ``make(x0, labels, generator)`` builds it from a training batch; the
    sampler takes the same tensor, built from the user's input by the subclass's own helper."""

    channels: int = 0
    uses_labels: bool = False
    name: str = ""

    def make(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor | None:
        raise NotImplementedError


class LowResCondition(Condition):
    """``x0`` average-pooled by ``factor`` and upsampled back (nearest): super-resolution from a low-res input."""

    def __init__(self, image_channels: int, factor: int, uses_labels: bool = False):
        if factor not in (2, 4, 8):
            raise ValueError(f"the low-resolution factor must be 2, 4 or 8, got {factor}")
        self.channels, self.factor, self.uses_labels = image_channels, factor, uses_labels
        self.name = f"lowres{factor}" + ("+class" if uses_labels else "")

    def from_lowres(self, lowres: torch.Tensor) -> torch.Tensor:
        """The condition tensor of a low-resolution image ``[B, C, H / factor, W / factor]``."""
        return F.interpolate(lowres, scale_factor=self.factor, mode="nearest")

    def make(self, x0, labels, generator):
        if x0.shape[-1] % self.factor or x0.shape[-2] % self.factor:
            raise ValueError(f"images of {tuple(x0.shape[-2:])} do not divide by the factor {self.factor}")
        return self.from_lowres(F.avg_pool2d(x0, self.factor))


class InpaintCondition(Condition):
    """The image with a random rectangle removed (covering ``min_frac`` to ``max_frac`` of each side), and the
    keep-mask (1 where the pixel is given) as one more channel: ``[B, C + 1, H, W]``."""

    def __init__(self, image_channels: int, min_frac: float = 0.3, max_frac: float = 0.7, uses_labels: bool = False):
        if not 0 < min_frac <= max_frac < 1:
            raise ValueError(f"need 0 < min_frac <= max_frac < 1, got {min_frac}, {max_frac}")
        self.channels, self.min_frac, self.max_frac, self.uses_labels = (
            image_channels + 1,
            min_frac,
            max_frac,
            uses_labels,
        )
        self.name = "inpaint" + ("+class" if uses_labels else "")

    @staticmethod
    def from_masked(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The condition tensor of ``image [B, C, H, W]`` with ``keep [B, 1, H, W]`` (1: given, 0: to fill)."""
        return torch.cat([image * keep, keep], dim=1)

    def make(self, x0, labels, generator):
        b, _, h, w = x0.shape
        u = torch.rand(b, 4, generator=generator, device=generator.device).to(x0.device)
        size = self.min_frac + (self.max_frac - self.min_frac) * u[:, :2]
        hh, ww = (size[:, 0] * h).round(), (size[:, 1] * w).round()
        top, left = (u[:, 2] * (h - hh + 1)).floor(), (u[:, 3] * (w - ww + 1)).floor()
        rows = torch.arange(h, device=x0.device)[None, :, None]
        cols = torch.arange(w, device=x0.device)[None, None, :]
        hole = ((rows >= top[:, None, None]) & (rows < (top + hh)[:, None, None])
                & (cols >= left[:, None, None]) & (cols < (left + ww)[:, None, None]))  # fmt: skip
        keep = (~hole).to(x0.dtype)[:, None]
        return self.from_masked(x0, keep)


class ClassCondition(Condition):
    """Class labels alone."""

    def __init__(self):
        self.uses_labels, self.name = True, "class"

    def make(self, x0, labels, generator):
        return None


class TensorCondition(Condition):
    """Any user tensor: ``fn(x0 [B, C, H, W], labels [B] or None) -> [B, channels, H, W]`` builds it from a
    training batch (an edge map, a depth map, a segmentation); at sampling pass the tensor itself."""

    def __init__(self, channels: int, fn: Callable, name: str = "tensor", uses_labels: bool = False):
        if channels < 1:
            raise ValueError(f"a tensor condition needs channels >= 1, got {channels}")
        self.channels, self.fn, self.name, self.uses_labels = channels, fn, name, uses_labels

    def make(self, x0, labels, generator):
        if self.fn is None:
            raise ValueError(f"the {self.name} condition was loaded from a model file without its function: pass "
                             "the condition tensor itself")  # fmt: skip
        return self.fn(x0, labels)


def get_condition(spec: str, image_channels: int) -> Condition:
    """``lowres2``, ``lowres4``, ``lowres8``, ``inpaint`` or ``class``; ``+class`` adds labels to an image one."""
    base, _, extra = spec.partition("+")
    if extra not in ("", "class") or (extra and base == "class"):
        raise ValueError(f"unknown condition {spec!r}: use lowres2|lowres4|lowres8|inpaint|class, optionally +class")
    labels = extra == "class"
    if base.startswith("lowres") and base[6:].isdigit():
        return LowResCondition(image_channels, int(base[6:]), labels)
    if base == "inpaint":
        return InpaintCondition(image_channels, uses_labels=labels)
    if base == "class":
        return ClassCondition()
    raise ValueError(f"unknown condition {spec!r}: use lowres2|lowres4|lowres8|inpaint|class, optionally +class")


# --------------------------------------------------------------------------------------------- the student


class AdapterBase(nn.Module):
    """What every CoDi adapter shares: the condition's input convolution (zero-initialised, from ``cond_channels``
    to ``width``) and the fusion of the adapter's features into the adapted network's skips and middle output,
    whose channel counts are ``widths`` (the skips in order, then the middle)."""

    def __init__(self, cond_channels: int, width: int, widths: list[int], fusion: str):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion, self.cond_channels = fusion, cond_channels
        self.cond_in = _zero(nn.Conv2d(cond_channels, width, 3, padding=1)) if cond_channels else None
        if fusion == "zero_conv":
            self.zero = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in widths)
        else:
            self.mu = nn.Parameter(torch.zeros(len(widths)))

    def check_cond(self, cond: torch.Tensor | None, x: torch.Tensor) -> None:
        if self.cond_channels:
            want = (x.shape[0], self.cond_channels, *x.shape[2:])
            if cond is None or tuple(cond.shape) != want:
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"the condition tensor must have shape {list(want)}, got {got}")
        elif cond is not None:
            raise ValueError("this adapter takes no condition tensor")

    def add_cond(self, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The adapter's input features: ``h`` (its copy of the input convolution) plus the condition's."""
        return h if self.cond_in is None else h + self.cond_in(cond.to(h.dtype))

    def fuse(self, h, skips, ha, skips_a) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The middle output and the skips with the adapter's features fused in."""
        out = []
        for i, (a, b) in enumerate([*zip(skips, skips_a), (h, ha)]):
            out.append(a + self.zero[i](b) if self.fusion == "zero_conv" else (1 - self.mu[i]) * a + self.mu[i] * b)
        return out[-1], out[:-1]


class UNetAdapter(AdapterBase):
    """The ControlNet-like adapter of a fastdiff :class:`~fastdiff.models.unet.UNet` (see the module docstring).

    ``forward(unet, x_in, c_noise, labels, cond) -> F``: the raw output of ``unet`` (the copy being adapted) on
    ``x_in [B, C, H, W]`` with the adapter's features fused into its skips and middle. ``labels [B]`` go to the
    adapter's class embedding (``num_classes`` classes, -1 for none); ``cond [B, cond_channels, H, W]`` to its
    input through a zero-initialised 3x3 convolution.
    """

    def __init__(self, unet: UNet, cond_channels: int, num_classes: int, fusion: str = "zero_conv"):
        cfg = unet.config
        with torch.no_grad():
            x = torch.zeros(1, cfg.in_channels, cfg.resolution, cfg.resolution)
            h, skips = unet.encode(unet.conv_in(x), unet.embed(torch.zeros(1), torch.full((1,), -1)))
        super().__init__(cond_channels, unet.conv_in.out_channels, [s.shape[1] for s in [*skips, h]], fusion)
        enc = copy.deepcopy(unet)
        enc.up, enc.norm_out, enc.conv_out = nn.ModuleList(), None, None  # the encoder alone
        if num_classes != cfg.num_classes:
            enc.config = dataclasses.replace(cfg, num_classes=num_classes)
            enc.class_embed = nn.Embedding(num_classes + 1, enc.class_embed.embedding_dim)
        self.enc = enc

    def forward(self, unet: UNet, x_in, c_noise, labels, cond) -> torch.Tensor:
        c, _ = unet._check(x_in, c_noise, None)
        _, y = self.enc._check(x_in, c_noise, labels)
        self.check_cond(cond, x_in)
        emb = unet.embed(c, torch.full_like(y, -1))  # the adapted network stays unconditional
        h, skips = unet.encode(unet.conv_in(x_in.to(emb.dtype)), emb)
        ha, skips_a = self.enc.encode(self.add_cond(self.enc.conv_in(x_in.to(emb.dtype)), cond), self.enc.embed(c, y))
        h, skips = self.fuse(h, skips, ha, skips_a)
        return unet.decode(h, skips, emb)


class AdaptedNetwork(nn.Module):
    """A student's raw network: ``forward(x, t, class_labels=None, cond=None) = adapter(net, x, t, labels, cond)``,
    where ``net`` is the copy of the teacher's network being adapted."""

    def __init__(self, net: nn.Module, adapter: nn.Module):
        super().__init__()
        self.unet, self.adapter = net, adapter

    def forward(self, x, t, class_labels=None, cond=None):
        return self.adapter(self.unet, x, t, class_labels, cond)


def set_trainable(student: nn.Module, which: str) -> nn.Module:
    """``"adapter"`` (PE-CoDi: the adapted network frozen) or ``"all"`` (full CoDi), for a student whose ``.net``
    is an :class:`AdaptedNetwork`; returns the student."""
    if which not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {which!r}")
    student.requires_grad_(True)
    if which == "adapter":
        student.net.unet.requires_grad_(False)
    return student


class CoDiStudent(EDMPrecond):
    """The student ``D(z; sigma, class_labels=None, cond=None)`` in fastdiff's model convention: a copy of the
    teacher's UNet plus a :class:`UNetAdapter`, under the teacher's EDM preconditioning. Equal to the teacher
    (called unconditionally) at initialisation."""

    def __init__(self, teacher: EDMUNet, condition: Condition, fusion: str = "zero_conv", num_classes: int = 10):
        if not isinstance(teacher, EDMUNet):
            raise TypeError(f"the CoDi student adapts a fastdiff EDMUNet, got {type(teacher).__name__}")
        classes = num_classes if condition.uses_labels else 0
        adapter = UNetAdapter(teacher.net, condition.channels, classes, fusion)
        super().__init__(AdaptedNetwork(copy.deepcopy(teacher.net), adapter), teacher.sigma_data)
        self.condition = condition

    @property
    def config(self) -> UNetConfig:
        """The :class:`~fastdiff.models.unet.UNetConfig` as the student is called: the teacher's image shape and
        the student's own classes (``num_classes`` 0 when its condition has no labels)."""
        return self.net.adapter.enc.config

    def set_trainable(self, which: str) -> CoDiStudent:
        """See :func:`set_trainable`."""
        return set_trainable(self, which)


# --------------------------------------------------------------------------------------------- consistency


def _sigma_data(model) -> float:
    # Through a DistributedDataParallel wrapper too; 0.5 (data in [-1, 1]) for models without one (VP networks).
    return getattr(getattr(model, "module", model), "sigma_data", 0.5)


def consistency_output(model: Callable, z: torch.Tensor, sigma: torch.Tensor, sigma_min: float, scale: float = 10.0,
                       **cond) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(f(z, sigma), x_hat)``: the consistency output and the model's denoised estimate, ``sigma [B]``."""
    x_hat = model(z, sigma, **cond)
    c_skip, c_out = consistency_scalings(sigma.reshape(-1, *[1] * (z.ndim - 1)), sigma_min,
                                         _sigma_data(model), scale)  # fmt: skip
    return c_skip * z + c_out * x_hat, x_hat


@dataclass(frozen=True)
class CoDiConfig:
    """Every CoDi setting (PAPERS.md section 3); see the module docstring."""

    condition: str = "lowres4+class"
    intervals: int = 20
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    target: str = "teacher"
    w_min: float = 2.0
    w_max: float = 14.0
    cond_dropout: float = 0.1
    data_weight: float = 1.0
    boundary_scale: float = 10.0
    fusion: str = "zero_conv"
    trainable: str = "adapter"

    def __post_init__(self) -> None:
        # Numbers are stored as Python numbers (the config is saved as JSON) and bounded before anything is
        # allocated: the noise-level grid has `intervals + 1` entries.
        object.__setattr__(self, "intervals", as_int(self.intervals, "intervals", 1, MAX_INTERVALS))
        for name in ("sigma_min", "sigma_max", "rho", "w_min", "w_max", "cond_dropout", "data_weight",
                     "boundary_scale"):  # fmt: skip
            object.__setattr__(self, name, as_real(getattr(self, name), name))
        if not isinstance(self.condition, str):
            raise ValueError(f"condition must be a condition name such as 'lowres4+class', got {self.condition!r}")
        if not self.rho > 0:
            raise ValueError(f"rho must be positive, got {self.rho}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got {self.w_min}, {self.w_max}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        if not self.data_weight >= 0:
            raise ValueError(f"data_weight must be a finite number >= 0, got {self.data_weight!r}")
        if not self.boundary_scale > 0:  # 0 would make f(z, sigma) = z at every sigma: nothing to learn or sample
            raise ValueError(f"boundary_scale must be a finite number > 0, got {self.boundary_scale!r}")

    def grid(self) -> torch.Tensor:
        """``[intervals + 1]`` float64 noise levels ``sigma_0 = sigma_min < ... < sigma_N = sigma_max``."""
        return karras(self.intervals + 1, self.sigma_min, self.sigma_max, self.rho)[:-1].flip(0).double()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CoDiConfig:
        return cls(**check_keys(d, "CoDiConfig", allowed=[f.name for f in dataclasses.fields(cls)]))


class CoDiLoss:
    """``CoDiLoss(config, teacher, condition)(student, batch, generator) -> (loss, logs)`` on the training runtime.

    ``batch = (x0 [B, C, H, W], labels [B])``. Draws, all from ``generator``: the interval ``n`` (one per batch),
    the noise, the condition (random masks), the condition dropout and, with ``target="ema_cfg"``, the guidance
    scales. The target network is the run's EMA of the student, bound by the runtime through :meth:`bind`;
    unbound (a direct call), the target is the student's current weights. Logs: ``loss_consistency``,
    ``loss_data``, ``sigma`` (this batch's ``t``).
    """

    def __init__(self, config: CoDiConfig, teacher: Callable, condition: Condition):
        self.config, self.teacher, self.condition = config, teacher, condition
        self.grid = config.grid()
        self._ema: dict[str, torch.Tensor] | None = None
        self._module: nn.Module | None = None

    def bind(self, state) -> None:
        """Use the run's EMA weights (``state.ema``) in the architecture of ``state.model`` as the target."""
        self._ema, self._module = state.ema, state.model

    def target_model(self, student: nn.Module) -> Callable:
        """The EMA student as a callable ``(z, sigma, **cond) -> D`` (the student itself when unbound)."""
        if self._ema is None:
            return student
        module, weights = self._module, self._ema

        def ema_student(z, sigma, **cond):
            return torch.func.functional_call(module, weights, (z, sigma), cond)

        ema_student.sigma_data = _sigma_data(module)
        return ema_student

    def _teacher_denoised(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        classes = getattr(getattr(self.teacher, "config", None), "num_classes", 0)
        kw = {"class_labels": torch.full((z.shape[0],), -1, device=z.device)} if classes else {}
        return self.teacher(z, sigma, **kw)

    def guided(self, model: Callable, z, sigma, cond_kw: dict, null_kw: dict, w: torch.Tensor) -> torch.Tensor:
        """``D_u + w (D_c - D_u)`` with ``D_c`` and ``D_u`` from one batched call on ``[cond; uncond]``."""
        both = {k: torch.cat([cond_kw[k], null_kw[k]]) for k in cond_kw}
        d = model(torch.cat([z, z]), torch.cat([sigma, sigma]), **both)
        d_cond, d_uncond = d.chunk(2)
        return d_uncond + w.reshape(-1, *[1] * (z.ndim - 1)) * (d_cond - d_uncond)

    def _cond_kwargs(self, x0, labels, generator) -> tuple[dict, dict]:
        """The condition as model keyword arguments, after dropout, and the null condition."""
        b, dev = x0.shape[0], x0.device
        drop = torch.rand(b, generator=generator, device=generator.device).to(dev) < self.config.cond_dropout
        cond_kw, null_kw = {}, {}
        tensor = self.condition.make(x0, labels, generator)
        if tensor is not None:
            keep = (~drop).to(tensor.dtype).reshape(-1, *[1] * (tensor.ndim - 1))
            cond_kw["cond"], null_kw["cond"] = tensor * keep, torch.zeros_like(tensor)
        if self.condition.uses_labels:
            if labels is None:
                raise ValueError(f"the {self.condition.name} condition needs class labels in the batch")
            cond_kw["class_labels"] = torch.where(drop, torch.full_like(labels, -1), labels.long())
            null_kw["class_labels"] = torch.full_like(labels, -1)
        return cond_kw, null_kw

    def __call__(self, student: nn.Module, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        x0, labels = (batch, None) if isinstance(batch, torch.Tensor) else batch
        x0 = x0.float()
        b, dev, gdev, cfg = x0.shape[0], x0.device, generator.device, self.config
        n = int(torch.randint(1, cfg.intervals + 1, (1,), generator=generator, device=gdev))
        t = torch.full((b,), float(self.grid[n]), device=dev)
        s = torch.full((b,), float(self.grid[n - 1]), device=dev)
        z_t = x0 + t[:, None, None, None] * torch.randn(x0.shape, generator=generator, device=gdev).to(dev)
        cond_kw, null_kw = self._cond_kwargs(x0, labels, generator)
        target = self.target_model(student)
        with torch.no_grad():
            if cfg.target == "teacher":
                d = self._teacher_denoised(z_t, t)
            else:
                w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=generator, device=gdev).to(dev)
                d = self.guided(target, z_t, t, cond_kw, null_kw, w)
            z_s = z_t + ((s - t) / t)[:, None, None, None] * (z_t - d)  # one Euler (= DDIM) step to s
            f_target, _ = consistency_output(target, z_s, s, cfg.sigma_min, cfg.boundary_scale, **cond_kw)
        f, x_hat = consistency_output(student, z_t, t, cfg.sigma_min, cfg.boundary_scale, **cond_kw)
        loss_cons = (f.float() - f_target.float()).square().mean()
        loss_data = (x_hat.float() - x0).square().mean()
        loss = loss_cons + cfg.data_weight * loss_data
        logs = {"loss_consistency": loss_cons.detach(), "loss_data": loss_data.detach(), "sigma": t[0]}
        return loss, logs


def student_solver(student: nn.Module, config: CoDiConfig | None = None) -> LCM:
    """The ``lcm`` solver with the scalings ``student`` was trained with: ``config``'s ``sigma_min`` and
    ``boundary_scale`` (by default the student's own ``codi_config``, which :func:`load_student` sets) and the
    student's ``sigma_data``. ``fastdiff.sample(student, x, sigmas, solver=student_solver(student), cond=...)``."""
    config = config if config is not None else getattr(student, "codi_config", None)
    if not isinstance(config, CoDiConfig):
        raise ValueError("pass the student's CoDiConfig as config=: only a loaded student (load_student) carries "
                         "its own")  # fmt: skip
    return LCM(sigma_min=config.sigma_min, boundary_scale=config.boundary_scale, sigma_data=_sigma_data(student))


class LowResReplacement(nn.Module):
    """A model conditioned on a low-resolution image by replacement, the training-free baseline CoDi is compared
    with: ``D'(x; sigma) = D + up(lowres - down(D))``, so the denoised estimate's ``factor x factor`` block means
    are the given pixels at every evaluation, whatever the solver. ``lowres [B, C, H / factor, W / factor]``
    must line up with the batch the sampler passes (no guidance, which would double it)."""

    def __init__(self, model: Callable, lowres: torch.Tensor, factor: int):
        super().__init__()
        self.model, self.lowres, self.factor = model, lowres, factor
        self.sigma_data = getattr(model, "sigma_data", 0.5)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        d = self.model(x, sigma, **cond)
        if d.shape[0] != self.lowres.shape[0]:
            raise ValueError(f"the low-res batch has {self.lowres.shape[0]} images, the sampler passed {d.shape[0]}")
        gap = self.lowres.to(d) - F.avg_pool2d(d, self.factor)
        return d + F.interpolate(gap, scale_factor=self.factor, mode="nearest")


CODI_TYPE = "codi_student"
_FILE_KEYS = ("unet", "codi", "cond_channels", "uses_labels", "num_classes")


def save_student(path, student: CoDiStudent, config: CoDiConfig, *, provenance: str = ""):
    """Write a student (its weights, the UNet config, the condition and the CoDi settings) as a safetensors model
    file, atomically; :func:`load_student` and ``fastdiff.models.get(path)`` read it back."""
    from fastdiff.checkpoint import save_typed_model

    cond = student.condition
    meta = {"unet": student.net.unet.config.to_dict(), "codi": config.to_dict(), "cond_channels": cond.channels,
            "uses_labels": cond.uses_labels, "num_classes": student.net.adapter.enc.config.num_classes}  # fmt: skip
    return save_typed_model(path, student, CODI_TYPE, meta, provenance)


def load_student(path, device: str | torch.device = "cpu") -> CoDiStudent:
    """Rebuild a :func:`save_student` file, in eval mode on ``device``; ``.codi_config`` holds its settings. A
    student trained on a :class:`TensorCondition` comes back with a condition of the same channels and no
    ``make`` (pass the tensor itself when sampling)."""
    from fastdiff.checkpoint import load_typed_model

    def build(meta):
        check_keys(meta, "the CoDi model config", required=_FILE_KEYS, allowed=())
        codi, unet = CoDiConfig.from_dict(meta["codi"]), UNetConfig.from_dict(meta["unet"])
        cond_channels = as_int(meta["cond_channels"], "cond_channels", 0, MAX_IMAGE_CHANNELS)
        num_classes = as_int(meta["num_classes"], "num_classes", 0, MAX_CLASSES)
        if not isinstance(meta["uses_labels"], bool):
            raise ValueError(f"uses_labels must be true or false, got {meta['uses_labels']!r}")
        try:
            cond = get_condition(codi.condition, unet.in_channels)
        except ValueError:
            cond = TensorCondition(cond_channels, None, codi.condition, meta["uses_labels"])
        student = CoDiStudent(EDMUNet(unet), cond, codi.fusion, num_classes)
        student.codi_config = codi
        return student

    return load_typed_model(path, CODI_TYPE, build).to(device).eval()


__all__ = [
    "AdaptedNetwork", "AdapterBase", "CoDiConfig", "CoDiLoss", "CoDiStudent", "ClassCondition", "Condition",
    "InpaintCondition", "LowResCondition", "LowResReplacement", "TensorCondition", "UNetAdapter",
    "consistency_output", "get_condition", "load_student", "save_student", "set_trainable", "student_solver",
]  # fmt: skip
