"""The libraries fastdiff is measured against, imported where they are installed: k-diffusion (PyPI's
``k-diffusion``) and diffusers. Each loader returns the module or raises :class:`PeerMissing` with the install line,
so a benchmark row that needs a peer says so plainly instead of failing.

k-diffusion's package ``__init__`` imports its whole training stack (kornia, scikit-image, clean-fid, CLIP, wandb,
torchvision), and torchvision cannot be installed beside every torch (on the CPU machines it fails to import
beside torch 2.13). Its samplers need only torch, scipy, torchsde and torchdiffeq, so fastdiff installs it with
``--no-deps``, and where the plain import fails, :func:`k_diffusion_sampling` imports ``k_diffusion.sampling`` from
the installed package without running the package's ``__init__``, with a placeholder for the one torchvision module
that ``k_diffusion.utils`` imports at its top where torchvision is missing (only its image-conversion helpers use
it; the samplers never do). The code that runs is the package's own.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

K_DIFFUSION_INSTALL = "pip install k-diffusion --no-deps && pip install torchsde torchdiffeq scipy"
DIFFUSERS_INSTALL = "pip install 'fastdiff[diffusers]'"


class PeerMissing(ImportError):
    """A peer library is not installed (or cannot be imported here); the message says how to install it."""


def diffusers():
    """The ``diffusers`` module, or :class:`PeerMissing`."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as exc:
        raise PeerMissing(f"needs diffusers ({DIFFUSERS_INSTALL}): {exc}") from exc


def k_diffusion_sampling():
    """``k_diffusion.sampling`` from the installed k-diffusion package, or :class:`PeerMissing`."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise PeerMissing(f"needs k-diffusion ({K_DIFFUSION_INSTALL})")
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        pass  # the package's training stack is missing (installed with --no-deps), or torchvision cannot import
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        del sys.modules[name]  # the half-imported package
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    have_torchvision = importlib.util.find_spec("torchvision") is not None
    placeholders = {} if have_torchvision else _torchvision_placeholder()
    missing = {name: module for name, module in placeholders.items() if name not in sys.modules}
    sys.modules["k_diffusion"] = package
    sys.modules.update(missing)
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError as exc:
        del sys.modules["k_diffusion"]
        raise PeerMissing(f"k-diffusion's samplers do not import here ({exc}); {K_DIFFUSION_INSTALL}") from exc
    finally:
        for name in missing:  # nothing else may mistake the placeholder for torchvision
            sys.modules.pop(name, None)


def _torchvision_placeholder() -> dict[str, types.ModuleType]:
    """``torchvision.transforms.functional`` as a module whose every attribute raises: enough for
    ``k_diffusion.utils`` to import, useless to anything that would call it."""

    class Unavailable(types.ModuleType):
        def __getattr__(self, name):
            raise ImportError(f"torchvision is not installed; k_diffusion.utils.{name} needs it")

    root, transforms, functional = (types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms"),
                                    Unavailable("torchvision.transforms.functional"))  # fmt: skip
    root.transforms, transforms.functional = transforms, functional
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
