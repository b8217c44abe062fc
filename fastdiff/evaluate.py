"""Sample quality of digits models, with no downloaded weights: the FID recipe with a domain classifier.

:class:`DigitsJudge` holds fastdiff's shipped digits classifier (trained by ``fastdiff train classifier`` on the
train split of the UCI digits) and the feature statistics of all 1797 real digits. From it:

* **Fréchet distance** (FD) between the classifier's penultimate features of generated and real digits (of the
  same classes), the FID formula in a feature space that knows digits. Like FID it is biased upwards for small
  sample counts, so only compare numbers computed from the same number of samples;
  :meth:`DigitsJudge.real_floor` gives the FD of real held-out digits for that count (no floor where they are few:
  the held-out split has 359, and the FD of a few hundred or fewer is biased upward, so samples can score below it).
* **Class accuracy** of class-conditional samples: how often the classifier reads the requested digit.

The teacher error (a few-step sample against a high-NFE sample from the same noise) is in
:func:`fastdiff.metrics.teacher_error`; :data:`TEACHER` is the solve the CLI and benchmarks use as teacher.
"""

from __future__ import annotations

import functools

import torch

from fastdiff import generate, metrics, schedules
from fastdiff.models import DIGITS_CLASSIFIER
from fastdiff.models.classifier import DigitClassifier, load_classifier

TEACHER = {"solver": "heun", "steps": 32}  # 63 NFE per sample with EDM's second-order method
TEACHER_LABEL = f"{TEACHER['solver']} {TEACHER['steps']} steps"


def teacher_sample(model, indices: torch.Tensor, sigma_min: float, sigma_max: float, **kwargs) -> generate.Generated:
    """The :data:`TEACHER` solve (Karras schedule over ``[sigma_min, sigma_max]``) of the samples with these
    ``indices``, from the same noise as any other :func:`fastdiff.generate.generate` call with the same seed;
    ``kwargs`` go to ``generate`` (shape, num_classes, seed, guidance, ...)."""
    sigmas = schedules.karras(TEACHER["steps"], sigma_min, sigma_max)
    return generate.generate(model, indices, sigmas, solver=TEACHER["solver"], **kwargs)


class DigitsJudge:
    """The shipped classifier and the real digits' feature statistics; see the module docstring.

    Args:
        classifier: a ``DigitClassifier`` for 16x16 images; the shipped one by default.
        resolution: the images' size (the classifier's).
    """

    def __init__(self, classifier: DigitClassifier | None = None, resolution: int = 16):
        from fastdiff.data import DigitsDataset  # sklearn is only needed once a judge is made

        self.classifier = classifier if classifier is not None else load_classifier(DIGITS_CLASSIFIER)
        self.real = DigitsDataset(resolution)
        self.held_out = DigitsDataset(resolution, split="test")
        self._real_stats: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` in [-1, 1] -> ``[N, feature_dim]`` float64."""
        return metrics.fd_features(self.classifier.features, images.float().cpu()).double()

    @staticmethod
    def _classes(labels: torch.Tensor | None) -> tuple[int, ...]:
        return () if labels is None else tuple(sorted(set(labels.tolist())))

    def _reference(self, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature statistics of the real digits of ``classes`` (all digits for ``()``), computed once."""
        if classes not in self._real_stats:
            keep = torch.isin(self.real.labels, torch.tensor(classes)) if classes else slice(None)
            self._real_stats[classes] = metrics.feature_statistics(self.features(self.real.images[keep]))
        return self._real_stats[classes]

    def fd(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Fréchet distance of ``images [N, 1, H, W]`` (N >= 2) to the real digits of the classes in ``labels``
        (all real digits when None): samples of one requested class compare with that class's digits."""
        ref = self._reference(self._classes(labels))
        return metrics.frechet_distance(*metrics.feature_statistics(self.features(images)), *ref)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``images`` the classifier reads as their requested ``labels [N]``."""
        return metrics.class_accuracy(self.classifier, images.float().cpu(), labels.cpu())

    def real_floor(self, n: int, labels: torch.Tensor | None = None) -> tuple[float, int]:
        """``(FD, count)`` that up to ``n`` real held-out digits of ``labels``' classes score; the held-out split
        has 359 digits, about 36 per class. Only a floor for ``n`` samples where ``count`` reaches ``n`` and is
        large: the FD of a small set is biased upward, the more the smaller it is."""
        classes = self._classes(labels)
        held = self.held_out.images
        if classes:
            held = held[torch.isin(self.held_out.labels, torch.tensor(classes))]
        held = held[:n]
        return self.fd(held, labels), len(held)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        out = {"fd": self.fd(images, labels)}
        if labels is not None:
            out["accuracy"] = self.accuracy(images, labels)
        return out


@functools.cache
def default_judge() -> DigitsJudge:
    """The judge with the shipped classifier, built once per process."""
    return DigitsJudge()
