"""Built-in models and the model registry.

``get(name_or_path)`` returns a model in fastdiff's convention ``model(x, sigma, **cond)``:

* ``gmm``: the exact Gaussian mixture (the test oracle of every solver);
* ``digits``: the built-in class-conditional UNet trained on sklearn's UCI digits at 16x16
  (``fastdiff/models/weights/digits_unet.safetensors``; the command that made it is in its metadata and the README);
* a path to a ``.safetensors`` file written by :func:`fastdiff.models.unet.save_unet` (e.g. by ``fastdiff train edm``),
  by :func:`fastdiff.train.cascade.save_cascade` (``fastdiff train cascade``; its blended denoiser) or by
  :func:`fastdiff.train.codi.save_student` (``fastdiff train codi``; the conditional student, which takes its
  condition as ``cond=`` and ``class_labels=``).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastdiff.models.classifier import DigitClassifier
from fastdiff.models.gmm import GaussianMixture, builtin_gmm
from fastdiff.models.unet import EDMUNet, UNet, UNetConfig, load_unet, save_unet

WEIGHTS = Path(__file__).parent / "weights"
DIGITS_UNET = WEIGHTS / "digits_unet.safetensors"
DIGITS_CLASSIFIER = WEIGHTS / "digits_classifier.safetensors"


def builtin_digits() -> EDMUNet:
    """fastdiff's built-in model: the small EDM UNet trained on the UCI digits (16x16, 10 classes)."""
    if not DIGITS_UNET.exists():
        raise FileNotFoundError(
            f"the built-in digits weights are missing ({DIGITS_UNET}); reinstall fastdiff, or retrain them with "
            "the command in the README"
        )
    return load_unet(DIGITS_UNET)


MODELS = {"gmm": builtin_gmm, "digits": builtin_digits}


def get(name: str | os.PathLike):
    """A built-in model by name (``gmm``, ``digits``) or the model of a ``.safetensors`` path: an EDM UNet, a
    Cas-DM model's blended denoiser or a CoDi student (see the module docstring)."""
    if str(name) in MODELS:
        return MODELS[str(name)]()
    path = Path(name)
    if path.suffix == ".safetensors":
        from fastdiff.checkpoint import load_model_weights

        kind = load_model_weights(path)[1].get("type")
        if kind == "cascade":
            from fastdiff.train.cascade import load_cascade

            return load_cascade(path).denoiser()
        if kind == "codi_student":
            from fastdiff.train.codi import load_student

            return load_student(path)
        return load_unet(path)
    raise ValueError(f"unknown model {str(name)!r}; choose one of {sorted(MODELS)} or a .safetensors file path")


__all__ = [
    "GaussianMixture", "EDMUNet", "UNet", "UNetConfig", "DigitClassifier", "builtin_gmm", "builtin_digits", "get",
    "load_unet", "save_unet", "MODELS", "WEIGHTS", "DIGITS_UNET", "DIGITS_CLASSIFIER",
]  # fmt: skip
