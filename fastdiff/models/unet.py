"""A small class-conditional UNet in EDM's preconditioned form, and its safetensors checkpoints.

The raw network ``UNet`` computes ``F(x_in, c_noise, class_labels)``; ``EDMUNet`` wraps it in
``fastdiff.denoisers.EDMPrecond`` so that it follows fastdiff's model convention
``model(x, sigma, class_labels=None) -> D(x; sigma)``.

Class labels: ``0 .. num_classes - 1`` are the classes and ``-1`` is the null class, i.e. "no class". It has its
own row in the class embedding, is the target of label dropout during training, and is what the unconditional
pass of classifier-free guidance uses; this matches the ``-1`` convention of ``fastdiff.models.gmm``.
``class_labels=None`` means ``-1`` for every sample.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.arguments import as_int, as_real
from fastdiff.checkpoint import check_keys, load_typed_model, save_typed_model
from fastdiff.denoisers import EDMPrecond

UNET_TYPE = "edm_unet"

# Plausibility limits of a config, far beyond any UNet this architecture is meant for (the built-in one has about
# 1M parameters, EDM's largest ImageNet models a few hundred million); a config beyond them is damage or a typo.
MAX_PARAMETERS = 2**32
MAX_IMAGE_CHANNELS = 4096
MAX_CLASSES = 2**24
_MAX_MULT = 1024
_MAX_LEVELS = 16
_INT_FIELDS = (
    ("resolution", 1, 2**16), ("in_channels", 1, MAX_IMAGE_CHANNELS), ("channels", 1, 2**14), ("num_blocks", 1, 256),
    ("num_classes", 0, MAX_CLASSES), ("head_channels", 1, 2**16),
)  # fmt: skip


def _int_tuple(value, name: str, lo: int, hi: int, min_len: int = 0, max_len: int | None = None) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers, got {value!r}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        raise ValueError(f"{name} must have {min_len} to {max_len} entries, got {len(value)}")
    return tuple(as_int(v, f"{name}[{i}]", lo, hi) for i, v in enumerate(value))


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a ``UNet``.

    Attributes:
        resolution: height = width of the images; must be divisible by ``2 ** (len(channel_mult) - 1)``.
        in_channels: input channels (the image channels).
        out_channels: output channels; None for ``in_channels`` (a denoiser's output is an image).
        channels: base width; level ``i`` has ``channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level; level ``i`` works at ``resolution / 2**i``.
        num_blocks: residual blocks per level in the encoder (the decoder has one more, for the extra skip).
        attention_levels: indices of the levels that get a self-attention block after each residual block.
        num_classes: number of classes; 0 makes the network unconditional (only label -1 / None is accepted).
        dropout: dropout probability inside residual blocks. It draws from torch's global RNG, so a training
            run that must resume bit-exactly with ``dropout > 0`` has to save and restore that RNG state too.
        sigma_data: the data standard deviation used by the EDM preconditioning.
        head_channels: channels per attention head.
    """

    resolution: int = 16
    in_channels: int = 1
    out_channels: int | None = None
    channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)
    num_classes: int = 10
    dropout: float = 0.0
    sigma_data: float = 0.5
    head_channels: int = 32

    def __post_init__(self):
        # Every field is checked for type and plausibility before anything is allocated: a config read from a file
        # (or typed by hand) with channels=1e6 would otherwise ask for terabytes. NumPy and 0-d tensor integers are
        # taken and stored as Python numbers, so that the config stays JSON; JSON round trips turn tuples into
        # lists, so sequences are normalised to tuples and configs compare equal.
        def put(name, value):
            object.__setattr__(self, name, value)

        for name, lo, hi in _INT_FIELDS:
            put(name, as_int(getattr(self, name), name, lo, hi))
        if self.out_channels is not None:
            put("out_channels", as_int(self.out_channels, "out_channels", 1, MAX_IMAGE_CHANNELS))
        put("channel_mult", _int_tuple(self.channel_mult, "channel_mult", 1, _MAX_MULT, 1, _MAX_LEVELS))
        levels = len(self.channel_mult)
        put("attention_levels", _int_tuple(self.attention_levels, "attention_levels", 0, levels - 1))
        put("dropout", as_real(self.dropout, "dropout"))
        put("sigma_data", as_real(self.sigma_data, "sigma_data"))
        if self.resolution % (2 ** (levels - 1)):
            raise ValueError(f"resolution {self.resolution} must be divisible by 2**{levels - 1} for {levels} levels")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")
        bound = self.parameter_bound()
        if bound > MAX_PARAMETERS:
            raise ValueError(
                f"this UNet (channels={self.channels}, channel_mult={self.channel_mult}, num_blocks="
                f"{self.num_blocks}, num_classes={self.num_classes}) could have up to {bound:.3g} parameters, beyond "
                f"the plausible {MAX_PARAMETERS:.3g}: a damaged or mistyped config"
            )

    def parameter_bound(self) -> int:
        """An upper bound on the network's parameter count, from the config alone (nothing is built): every block
        is counted at the widest level's width ``W``, with the decoder's concatenated input ``2W``."""
        w, emb = self.channels * max(self.channel_mult), 4 * self.channels
        levels, io = len(self.channel_mult), self.in_channels + (self.out_channels or self.in_channels)
        res_blocks = levels * self.num_blocks + levels * (self.num_blocks + 1) + 2
        per_res = 9 * 2 * w * w + 9 * w * w + 2 * w * w + 2 * emb * w + 16 * w  # conv1, conv2, skip, emb, norms/biases
        per_attn = 4 * w * w + 6 * w
        samplers = 2 * levels * (9 * w * w + w)
        embeds = self.channels * emb + emb * emb + 2 * emb + (self.num_classes + 1) * emb
        return res_blocks * (per_res + per_attn) + samplers + embeds + 9 * io * w + 4 * w

    @classmethod
    def tiny(cls) -> UNetConfig:
        """About 21k parameters at 8x8 (the native size of sklearn's digits): for tests only."""
        return cls(
            resolution=8, in_channels=1, channels=8, channel_mult=(1, 1), num_blocks=1, attention_levels=(1,),
            num_classes=10, head_channels=8,
        )  # fmt: skip

    @classmethod
    def small(cls) -> UNetConfig:
        """fastdiff's built-in digits model: 16x16, 1 channel, 10 classes, about 1.0M parameters.

        Widths 16/32/64 at 16x16/8x8/4x4, attention only at 4x4: most parameters sit at the coarse levels, where
        they are cheap, which keeps one batch-128 training step well under a second on 2 CPU cores (a uniform
        width of 32 costs about twice the FLOPs for a similar parameter count).
        """
        return cls(
            resolution=16, in_channels=1, channels=16, channel_mult=(1, 2, 4), num_blocks=2, attention_levels=(2,),
            num_classes=10, dropout=0.0,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return cls(**check_keys(d, "UNetConfig", allowed=[f.name for f in dataclasses.fields(cls)]))


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, and at least 4 channels per group where possible."""
    for g in (8, 4, 2, 1):
        if channels % g == 0 and channels // g >= min(4, channels):
            return g
    return 1


def _zero(module: nn.Module) -> nn.Module:
    # Zero-initialised output layers make every residual branch start as the identity, and F start at 0 so that
    # the untrained model is D = c_skip x: a stable start for EDM training.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class FourierEmbedding(nn.Module):
    """Fixed sinusoidal features of ``c_noise [B] -> [B, dim]``.

    Frequencies are geometric from 1/4 to 32 radians per unit (powers of two for ``dim = 16``). With
    ``c_noise = log(sigma) / 4`` spanning about [-1.6, 1.1] for sigma in [0.002, 80], the top frequency makes
    about 14 periods over that range (enough to tell nearby noise levels apart) and the bottom ones are smooth
    and nearly monotone; much higher frequencies would only add features that vary erratically with sigma.
    Not learned and not saved (it is rebuilt from the config).
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"FourierEmbedding needs an even dim, got {dim}")
        freqs = torch.logspace(-2, 5, dim // 2, base=2.0)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise[:, None].float() * self.freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding applied as a scale and shift after the second norm."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions, residual."""

    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"{channels} channels do not split into {self.heads} heads")
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # [B, heads, HW, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The raw network ``F`` of EDM: ``forward(x, c_noise, class_labels=None) -> F``.

    Args (forward):
        x: ``[B, in_channels, resolution, resolution]`` float (the preconditioned input ``c_in * x``).
        c_noise: ``[B]`` (or scalar) float noise conditioning, ``log(sigma) / 4`` under EDMPrecond.
        class_labels: ``[B]`` int64 in ``[-1, num_classes)`` (``-1`` = null class), or None (all ``-1``).

    Returns:
        ``[B, out_channels, resolution, resolution]`` in the parameters' dtype (float32 by default).

    Raises ValueError for a wrong shape, a non-finite ``c_noise`` or a label outside ``[-1, num_classes)``;
    the value checks are skipped while a CUDA graph is captured or under ``torch.compile``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.channels
        emb_dim = 4 * ch
        self.time_embed = FourierEmbedding(ch)
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Row num_classes is the null class (label -1); it exists even for unconditional nets so that the
        # single "no class" input has a learned embedding in both cases.
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch * cfg.channel_mult[0], 3, padding=1)

        self.down = nn.ModuleList()
        skip_chs = [ch * cfg.channel_mult[0]]
        cur = skip_chs[0]
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_blocks):
                self.down.append(ResBlock(cur, ch * mult, emb_dim, cfg.dropout))
                cur = ch * mult
                if level in cfg.attention_levels:
                    self.down.append(AttentionBlock(cur, cfg.head_channels))
                skip_chs.append(cur)
            if level < levels - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)
        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, emb_dim, cfg.dropout),
                AttentionBlock(cur, cfg.head_channels),
                ResBlock(cur, cur, emb_dim, cfg.dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            out = ch * cfg.channel_mult[level]
            for _ in range(cfg.num_blocks + 1):
                self.up.append(ResBlock(cur + skip_chs.pop(), out, emb_dim, cfg.dropout))
                cur = out
                if level in cfg.attention_levels:
                    self.up.append(AttentionBlock(cur, cfg.head_channels))
            if level > 0:
                self.up.append(Upsample(cur))
        # The skip structure, fixed here rather than read from the blocks' types as the loops run, so that a block
        # may be replaced by a stand-in (fastdiff.cache). A skip is taken after each ResBlock group (after its
        # attention, if any) and after each Downsample; each up ResBlock takes one.
        self._gives_skip = [not isinstance(nxt, AttentionBlock) for nxt in [*list(self.down)[1:], None]]
        self._takes_skip = [isinstance(block, ResBlock) for block in self.up]
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = _zero(nn.Conv2d(cur, cfg.out_channels or cfg.in_channels, 3, padding=1))

    def _check(self, x: torch.Tensor, c_noise, class_labels) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        want = (cfg.in_channels, cfg.resolution, cfg.resolution)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B, {want[0]}, {want[1]}, {want[2]}], got {got}")
        b = x.shape[0]
        c = torch.as_tensor(c_noise, device=x.device)
        if c.ndim == 0:
            c = c.expand(b)
        if c.shape != (b,):
            raise ValueError(f"c_noise must be a scalar or have shape [{b}], got {tuple(c.shape)}")
        # Value checks read the tensors back to the host. On a GPU that is a sync per forward (and impossible under
        # CUDA graph capture), and under torch.compile a graph break, so they run only on CPU tensors in eager
        # mode; fastdiff's samplers check labels on the host before they reach the device. Shapes are always
        # checked.
        check_values = x.device.type == "cpu" and not torch.compiler.is_compiling()
        if check_values and not torch.isfinite(c).all():
            raise ValueError("c_noise must be finite (EDMPrecond gives -inf for sigma = 0, which has no denoiser call)")
        if class_labels is None:
            y = torch.full((b,), -1, dtype=torch.long, device=x.device)
        else:
            y = torch.as_tensor(class_labels, device=x.device)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"class_labels must be an integer tensor, got {y.dtype}")
            y = y.long()
            if y.ndim == 0:
                y = y.expand(b)
            if y.shape != (b,):
                raise ValueError(f"class_labels must be a scalar or have shape [{b}], got {tuple(y.shape)}")
            if check_values and ((y < -1) | (y >= cfg.num_classes)).any():
                raise ValueError(
                    f"class_labels must lie in [-1, {cfg.num_classes}) (-1 = unconditional), "
                    f"got values {sorted(set(y.unique().tolist()))}"
                )
        return c, y

    def forward(self, x: torch.Tensor, c_noise, class_labels=None) -> torch.Tensor:
        c, y = self._check(x, c_noise, class_labels)
        emb = self.embed(c, y)
        h, skips = self.encode(self.conv_in(x.to(emb.dtype)), emb)
        return self.decode(h, skips, emb)

    # The three stages, public so that an adapter (CoDi's ControlNet-like copy of the encoder) can run a copy of
    # the first two and add its features into the third's inputs.

    def embed(self, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B, 4 * channels]``: the noise and class embedding of ``c_noise [B]`` and labels ``y [B]`` (-1: none)."""
        dtype = self.conv_in.weight.dtype
        y = torch.where(y < 0, torch.full_like(y, self.config.num_classes), y)
        return F.silu(self.time_mlp(self.time_embed(c).to(dtype)) + self.class_embed(y))

    def encode(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down path and the middle from ``h = conv_in(x)``: the middle's output and the skips, in order."""
        skips = [h]
        for block, gives_skip in zip(self.down, self._gives_skip):
            h = block(h, emb)
            if gives_skip:
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        return h, skips

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """The up path from the middle's output and the skips (consumed last first) to the output ``F``."""
        skips = list(skips)
        for block, takes_skip in zip(self.up, self._takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMUNet(EDMPrecond):
    """A ``UNet`` in EDM's preconditioned form: ``model(x, sigma, class_labels=None) -> D(x; sigma)``.

    Built from a ``UNetConfig`` (a fresh network) or from an existing ``UNet`` (wrapped as is).

    Args (forward):
        x: ``[B, C, H, W]`` noisy images (float32 or float64).
        sigma: ``[B]`` tensor or scalar, > 0.
        class_labels: ``[B]`` int64 in ``[-1, num_classes)`` or None; ``-1`` = unconditional.

    Returns:
        ``D`` with the shape of ``x``, in ``promote(float32, x.dtype)``.
    """

    def __init__(self, config: UNetConfig | UNet):
        net = config if isinstance(config, UNet) else UNet(config)
        super().__init__(net, net.config.sigma_data)
        self.config = net.config


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_unet(path: str | os.PathLike, model: EDMUNet | UNet, *, provenance: str = "") -> Path:
    """Save an ``EDMUNet`` (or a raw ``UNet``) with ``fastdiff.checkpoint.save_model``: safetensors weights (names
    as in ``EDMUNet.state_dict()``, i.e. prefixed ``net.``) and ``{"type": "edm_unet", **UNetConfig}`` as JSON
    metadata, written atomically. ``provenance`` (e.g. the command that trained it) is stored alongside and
    comes back as ``load_unet(path).provenance``."""
    if isinstance(model, UNet):
        model = EDMUNet(model)
    if not isinstance(model, EDMUNet):
        raise TypeError(f"save_unet expects an EDMUNet or UNet, got {type(model).__name__}")
    return save_typed_model(path, model, UNET_TYPE, model.config.to_dict(), provenance)


def load_unet(path: str | os.PathLike, device: str | torch.device = "cpu") -> EDMUNet:
    """Rebuild an ``EDMUNet`` from a ``save_unet`` file, in eval mode on ``device``.

    Raises FileNotFoundError for a missing file, and ValueError (``fastdiff.checkpoint.CheckpointError``) for a
    corrupt file, another format or model type, an invalid config, or weights whose names or shapes do not match
    the config (all listed).
    """
    model = load_typed_model(path, UNET_TYPE, lambda config: EDMUNet(UNetConfig.from_dict(config)))
    return model.to(device).eval()


__all__ = ["UNetConfig", "UNet", "EDMUNet", "save_unet", "load_unet", "count_parameters"]
