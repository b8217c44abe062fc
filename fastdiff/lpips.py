"""Optional LPIPS (Zhang et al. 2018) adapter for ``fastdiff.metrics.teacher_error`` and LD3's training metric.

The ``lpips`` package is an optional extra (``pip install fastdiff[lpips]``); it imports ``torchvision``, which
must therefore be importable too. Nothing is downloaded here:

- the small linear layers on top of the backbone ship inside the ``lpips`` wheel and are read from there;
- the ImageNet backbone (AlexNet, VGG16 or SqueezeNet 1.1) comes from ``weights_path`` or from torchvision's
  usual cache file in ``torch.hub.get_dir()/checkpoints/`` (see ``BACKBONE_FILES``). When it is missing, the
  error names the exact file and folder, so it can be copied there from a machine with network access.

Everything runs through ``torch.load(..., weights_only=True)``: no arbitrary unpickling.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The torchvision checkpoint each lpips backbone is built from (torchvision's own cache file names).
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
BACKBONE_URL = "https://download.pytorch.org/models/{}"
MIN_SIZE = 32
RESIZE_TO = 64


def preprocess_for_lpips(x: torch.Tensor) -> torch.Tensor:
    """Make images LPIPS-ready: ``[B, C, H, W]`` in [-1, 1] -> ``[B, 3, H', W']`` in [-1, 1] (not clamped, so
    gradients pass through).

    - 1 channel (grey) is replicated to 3; 4 channels (RGBA) lose the alpha channel; 3 stay; others raise.
    - Images smaller than 32 pixels on either side are resized bilinearly to 64x64: AlexNet's stride-4 stem and
      the max-pools behind it shrink a 16x16 image to nothing by the deeper layers, whose distances then carry
      no spatial information (or fail outright). Larger images are left at their size.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"LPIPS expects images of shape [B, C, H, W], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"LPIPS expects floating-point images in [-1, 1], got {x.dtype}")
    c = x.shape[1]
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c == 4:
        x = x[:, :3]
    elif c != 3:
        raise ValueError(f"LPIPS needs 1, 3 or 4 channels, got {c}")
    if x.shape[2] < MIN_SIZE or x.shape[3] < MIN_SIZE:
        x = F.interpolate(x, size=(RESIZE_TO, RESIZE_TO), mode="bilinear", align_corners=False)
    return x.contiguous()


def _import_lpips():
    try:
        import lpips
    except Exception as e:  # torchvision failing to import surfaces as various errors, not only ImportError
        raise ImportError(
            "LPIPS needs the optional 'lpips' package: pip install fastdiff[lpips]. lpips imports torchvision, "
            f"so a working torchvision matching your torch is required as well (import failed with: {e!r})"
        ) from e
    return lpips


def backbone_weights_path(net: str = "alex", weights_path: str | os.PathLike | None = None) -> Path:
    """Where the backbone checkpoint of ``net`` is read from: ``weights_path`` if given, else torchvision's cache
    file ``torch.hub.get_dir()/checkpoints/<BACKBONE_FILES[net]>``. Raises FileNotFoundError naming the exact
    file (and, for the cache, the folder and the download URL) when it does not exist."""
    if net not in BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    if weights_path is not None:
        p = Path(weights_path)
        if not p.is_file():
            raise FileNotFoundError(f"LPIPS backbone weights for net={net!r} not found at {str(p)!r}")
        return p
    name = BACKBONE_FILES[net]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    p = folder / name
    if not p.is_file():
        raise FileNotFoundError(
            f"LPIPS backbone weights for net={net!r} not found: expected the file {name!r} in the directory "
            f"{str(folder)!r} (full path {str(p)!r}). Download {BACKBONE_URL.format(name)} on a machine with "
            "network access and copy it there, or pass weights_path=."
        )
    return p


class LPIPSAdapter(nn.Module):
    """``LPIPSAdapter(net="alex", weights_path=None)(a, b) -> [B]`` perceptual distances.

    ``a``, ``b``: ``[B, C, H, W]`` in [-1, 1] with C in {1, 3, 4} (see ``preprocess_for_lpips``). The weights
    are frozen, but gradients flow to the inputs, so it also serves as a training metric (LD3).

    Raises ImportError (with the install hint) when ``lpips`` cannot be imported and FileNotFoundError (naming
    the expected file and folder) when the backbone checkpoint is missing.
    """

    def __init__(self, net: str = "alex", weights_path: str | os.PathLike | None = None):
        super().__init__()
        if net not in BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
        lpips = _import_lpips()
        path = backbone_weights_path(net, weights_path)
        # pnet_rand=True builds the backbone without torchvision's download; pretrained=True still loads the
        # linear layers from the lpips wheel. The backbone weights are filled in below from the local file.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        _load_backbone(model.net, torch.load(path, map_location="cpu", weights_only=True), path)
        self.model = model.eval().requires_grad_(False)
        self.net_name = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
        d = self.model(preprocess_for_lpips(a), preprocess_for_lpips(b), normalize=False)
        return d.reshape(d.shape[0])

    def train(self, mode: bool = True) -> LPIPSAdapter:
        # The metric never trains (its dropout must stay off), whatever mode an enclosing module is put in.
        return super().train(False)


def _load_backbone(backbone: nn.Module, state: dict, path: Path) -> None:
    """Fill lpips' sliced backbone from a torchvision checkpoint.

    lpips splits torchvision's ``features`` Sequential into ``slice1..sliceK`` but keeps each layer's original
    index as its name, so ``sliceK.<i>.<param>`` is torchvision's ``features.<i>.<param>``.
    """
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict (got {type(state).__name__})")
    own = backbone.state_dict()
    mapped, missing, bad = {}, [], []
    for key, t in own.items():
        src = "features." + key.split(".", 1)[1]
        if src not in state:
            missing.append(src)
        elif tuple(state[src].shape) != tuple(t.shape):
            bad.append(f"{src}: file {tuple(state[src].shape)} vs model {tuple(t.shape)}")
        else:
            mapped[key] = state[src]
    if missing or bad:
        raise ValueError(f"{path} does not fit the lpips backbone: missing {missing}, shape mismatches {bad}")
    backbone.load_state_dict(mapped, strict=True)


__all__ = ["LPIPSAdapter", "preprocess_for_lpips", "backbone_weights_path", "BACKBONE_FILES"]
