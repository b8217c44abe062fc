"""Sample quality of digits models, with no downloaded weights: the FID recipe with a domain classifier.

:class:`DigitsJudge` holds fastdiff's shipped digits classifier (trained by ``fastdiff train classifier`` on the
train split of the UCI digits) and the feature statistics of all 1797 real digits. From it:

* **Fréchet distance** (FD) between the classifier's penultimate features of generated and real digits, the FID
  formula in a feature space that knows digits. Like FID it is biased upwards for small sample counts, so only
  compare numbers computed from the same number of samples; :meth:`DigitsJudge.real_floor` gives the FD of real
  held-out digits for that count.
* **Class accuracy** of class-conditional samples: how often the classifier reads the requested digit.

The teacher error (a few-step sample against a high-NFE sample from the same noise) is in
:func:`fastdiff.metrics.teacher_error`; :data:`TEACHER` is the solve the CLI and benchmarks use as teacher.
"""

from __future__ import annotations

import functools

import torch

from fastdiff import metrics
from fastdiff.models import DIGITS_CLASSIFIER
from fastdiff.models.classifier import DigitClassifier, load_classifier

TEACHER = {"solver": "heun", "steps": 32}  # 63 NFE per sample with EDM's second-order method


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
        self.real_stats = metrics.feature_statistics(self.features(self.real.images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` in [-1, 1] -> ``[N, feature_dim]`` float64."""
        return metrics.fd_features(self.classifier.features, images.float().cpu()).double()

    def fd(self, images: torch.Tensor) -> float:
        """Fréchet distance of ``images [N, 1, H, W]`` (N >= 2) to all real digits, in classifier features."""
        return metrics.frechet_distance(*metrics.feature_statistics(self.features(images)), *self.real_stats)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``images`` the classifier reads as their requested ``labels [N]``."""
        return metrics.class_accuracy(self.classifier, images.float().cpu(), labels.cpu())

    def real_floor(self, n: int) -> float:
        """The FD that ``n`` real held-out digits score (n is capped at the held-out split's 359)."""
        return self.fd(self.held_out.images[:n])

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        out = {"fd": self.fd(images)}
        if labels is not None:
            out["accuracy"] = self.accuracy(images, labels)
        return out


@functools.cache
def default_judge() -> DigitsJudge:
    """The judge with the shipped classifier, built once per process."""
    return DigitsJudge()
