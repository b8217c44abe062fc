"""`fastdiff train edm` and `fastdiff train classifier` end to end, on tiny budgets."""

import re

import pytest
import torch

from fastdiff import models
from fastdiff.cli import main
from fastdiff.models.classifier import load_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_edm_exports_loadable_weights_and_a_loss_plot_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "edm", "--size", "tiny", "--resolution", "8", "--steps", "4", "--checkpoint-every", "2",
            "--out-dir", str(run)]  # fmt: skip
    assert main(argv) == 0
    model = models.get(run / "model.safetensors")
    assert model.config.resolution == 8 and model.config.num_classes == 10
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert main(argv) == 0  # a finished run resumes at its last step and exports the same weights
    again = models.get(run / "model.safetensors").state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_train_classifier_reports_held_out_accuracy(tmp_path, capsys):
    out = tmp_path / "clf.safetensors"
    assert main(["train", "classifier", "--steps", "30", "--out", str(out)]) == 0
    acc = re.search(r"held-out accuracy ([\d.]+)", capsys.readouterr().out)
    assert acc and float(acc[1]) > 0.8  # measured 0.936 after 30 steps (chance: 0.1)
    assert load_classifier(out).feature_dim == 64


def test_train_edm_rejects_unknown_data(capsys):
    assert main(["train", "edm", "--data", "nowhere/at/all", "--steps", "1"]) == 2
    assert "nowhere/at/all" in capsys.readouterr().err
