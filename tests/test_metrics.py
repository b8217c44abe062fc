from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from fastdiff import lpips as fd_lpips
from fastdiff.metrics import (
    class_accuracy,
    fd_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    sliced_wasserstein,
    teacher_error,
)
from fastdiff.models.classifier import (
    DigitClassifier,
    evaluate_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_cov(d: int, g: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(d, rank or d + 3, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1]


def _fd_scipy(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean))


# --- Fréchet distance ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 5, 32])
def test_frechet_distance_matches_scipy_sqrtm(d):
    g = torch.Generator().manual_seed(d)
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = _random_cov(d, g), _random_cov(d, g)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = _fd_scipy(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_frechet_distance_closed_form_diagonal():
    mu1 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    mu2 = torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64)
    v1 = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    v2 = torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum()
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(float(expected), rel=1e-12)
    # by hand: 0.25 + 9 + (1 + 9 - 6) + (4 + 1 - 4) + 0 = 14.25
    assert float(expected) == pytest.approx(14.25)


def test_frechet_distance_rotated_gaussians_closed_form():
    # Same spectrum, different orientation: FD = tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), known in 2-D for commuting
    # diagonal matrices after rotating both by the same orthogonal Q (FD is invariant under it).
    theta = 0.7
    q = torch.tensor([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]], dtype=torch.float64)
    s1, s2 = q @ torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)) @ q.T, q @ torch.eye(2).double() @ q.T
    z = torch.zeros(2, dtype=torch.float64)
    assert frechet_distance(z, s1, z, s2) == pytest.approx((4 + 1 - 4) + (1 + 1 - 2), abs=1e-12)


def test_frechet_distance_identity_symmetry_and_singular():
    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(8, generator=g, dtype=torch.float64), _random_cov(8, g)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-10)
    mu2, s2 = torch.randn(8, generator=g, dtype=torch.float64), _random_cov(8, g, rank=3)  # singular
    ab, ba = frechet_distance(mu, s, mu2, s2), frechet_distance(mu2, s2, mu, s)
    # a singular covariance has eigenvalues at 0 up to rounding, and sqrt amplifies that rounding to ~1e-8
    assert ab == pytest.approx(ba, rel=1e-7)
    assert ab == pytest.approx(_fd_scipy(mu, s, mu2, s2), rel=1e-6)
    assert ab > 0


def test_frechet_distance_from_features_identity_and_scipy():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = 0.5 + 1.5 * torch.randn(300, 6, generator=g, dtype=torch.float64)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-10)
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    np.testing.assert_allclose(s1.numpy(), np.cov(a.numpy(), rowvar=False), rtol=1e-12)
    assert mu1.dtype == s1.dtype == torch.float64 and s1.shape == (6, 6)
    assert frechet_distance_from_features(a, b) == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-9)
    # float32 features are promoted; the result agrees
    assert frechet_distance_from_features(a.float(), b.float()) == pytest.approx(
        frechet_distance_from_features(a, b), rel=1e-5
    )


def test_frechet_distance_errors():
    z, s = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"shape \[N, d\]"):
        feature_statistics(torch.randn(5))
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance_from_features(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_features(torch.randn(10, 3), torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(z, s, torch.tensor([0.0, float("nan"), 0.0]), s)
    with pytest.raises(ValueError, match="means must be 1-D"):
        frechet_distance(z, s, torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match=r"sigma2 must have shape \[3, 3\]"):
        frechet_distance(z, s, z, torch.eye(4))


def test_fd_features_batches_and_flattens():
    x = torch.randn(10, 2, 3, 3)
    calls = []

    def extractor(batch):
        calls.append(batch.shape[0])
        return batch.mean(dim=(2, 3), keepdim=True)  # [B, 2, 1, 1], like a pooled conv map

    f = fd_features(extractor, x, batch_size=4)
    assert calls == [4, 4, 2]
    assert f.shape == (10, 2) and f.dtype == torch.float64
    torch.testing.assert_close(f, x.mean(dim=(2, 3)).double())
    with pytest.raises(ValueError, match="batch_size"):
        fd_features(extractor, x, batch_size=0)


def test_sliced_wasserstein_still_works():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(a, a, generator=torch.Generator().manual_seed(1)) == pytest.approx(0.0, abs=1e-12)
    shifted = sliced_wasserstein(a, a + 1.0, generator=torch.Generator().manual_seed(1))
    assert 0.5 < shifted < 1.5


# --- teacher error and class accuracy --------------------------------------------------------------------------


def test_teacher_error_rmse_and_lpips_hook():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 1, 4, 4, generator=g)
    offsets = torch.tensor([0.0, 0.1, 0.2, 0.5, 1.0])
    x = t + offsets[:, None, None, None]
    out = teacher_error(x, t)
    torch.testing.assert_close(out["rmse"], offsets.double(), rtol=1e-6, atol=1e-7)
    assert out["rmse_mean"] == pytest.approx(float(offsets.mean()), rel=1e-6)
    assert "lpips_mean" not in out

    def fake_lpips(a, b):  # returns [B, 1, 1, 1] like lpips.LPIPS
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)

    out = teacher_error(x, t, lpips_model=fake_lpips, batch_size=2)
    torch.testing.assert_close(out["lpips"], offsets.double(), rtol=1e-6, atol=1e-7)
    assert out["lpips_mean"] == pytest.approx(float(offsets.mean()), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        teacher_error(x, t[:4])
    with pytest.raises(ValueError, match="NaN"):
        teacher_error(x * float("nan"), t)


def test_class_accuracy_counts_argmax_and_restores_mode():
    class Lookup(torch.nn.Module):
        def forward(self, x):
            return F.one_hot(x[:, 0, 0, 0].long(), 3).float()

    images = torch.tensor([0, 1, 2, 2, 1, 0]).float()[:, None, None, None].expand(6, 1, 2, 2)
    model = Lookup().train()
    assert class_accuracy(model, images, torch.tensor([0, 1, 2, 0, 1, 1]), batch_size=4) == pytest.approx(4 / 6)
    assert model.training
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(model, images, torch.tensor([0, 1]))


# --- the digits classifier -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits16():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # [N, 1, 8, 8] in [-1, 1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def trained_classifier(digits16):
    xtr, ytr, _, _ = digits16
    return train_classifier(xtr, ytr, steps=120, batch_size=64, lr=5e-3, seed=0, width=16, feature_dim=32)


def test_classifier_trains_to_high_heldout_accuracy(digits16, trained_classifier):
    _, _, xte, yte = digits16
    acc = evaluate_accuracy(trained_classifier, xte, yte)
    assert acc > 0.9, acc
    # robust to the small shifts of generated digits
    assert evaluate_accuracy(trained_classifier, torch.roll(xte, 1, dims=3), yte) > 0.85


def test_classifier_shapes_and_features(trained_classifier, digits16):
    x = digits16[2][:7]
    assert trained_classifier(x).shape == (7, 10)
    f = trained_classifier.features(x)
    assert f.shape == (7, trained_classifier.feature_dim) == (7, 32)
    torch.testing.assert_close(trained_classifier.head(f), trained_classifier(x))
    assert DigitClassifier().features(torch.zeros(2, 1, 16, 16)).shape == (2, 64)
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        trained_classifier(torch.zeros(2, 1, 8, 8))


def test_classifier_features_separate_real_from_degraded(trained_classifier, digits16):
    # FD on classifier features: a held-out real set is closer to the training set than a blurred/noised one
    xtr, _, xte, _ = digits16
    ref = fd_features(trained_classifier.features, xtr)
    real = frechet_distance_from_features(ref, fd_features(trained_classifier.features, xte))
    g = torch.Generator().manual_seed(0)
    noisy = xte + 0.5 * torch.randn(xte.shape, generator=g)
    degraded = frechet_distance_from_features(ref, fd_features(trained_classifier.features, noisy))
    assert real < degraded


def test_classifier_training_is_deterministic(digits16):
    xtr, ytr, xte, _ = digits16
    a = train_classifier(xtr[:200], ytr[:200], steps=3, batch_size=16, seed=3, width=8, feature_dim=8)
    b = train_classifier(xtr[:200], ytr[:200], steps=3, batch_size=16, seed=3, width=8, feature_dim=8)
    torch.testing.assert_close(a(xte[:5]), b(xte[:5]), rtol=0, atol=0)


def test_classifier_save_load(tmp_path, trained_classifier, digits16):
    path = tmp_path / "clf.safetensors"
    save_classifier(path, trained_classifier, provenance="test run")
    loaded = load_classifier(path)
    assert loaded.provenance == "test run" and loaded.config == trained_classifier.config
    x = digits16[2][:9]
    torch.testing.assert_close(loaded(x), trained_classifier(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "nope.safetensors")
    data = path.read_bytes()
    (tmp_path / "bad.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError):
        load_classifier(tmp_path / "bad.safetensors")


def test_train_classifier_validates():
    with pytest.raises(ValueError, match="labels must have shape"):
        train_classifier(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="steps"):
        train_classifier(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), steps=0)


# --- LPIPS adapter ---------------------------------------------------------------------------------------------


def test_lpips_preprocess():
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    out = fd_lpips.preprocess_for_lpips(grey)
    assert out.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out[:, 0], out[:, 2])
    # bilinear upsampling keeps the mean of a smooth image and the [-1, 1] range
    assert out.min() >= -1 and out.max() <= 1
    rgba = torch.rand(1, 4, 40, 48, generator=g)
    out = fd_lpips.preprocess_for_lpips(rgba)
    assert out.shape == (1, 3, 40, 48)
    torch.testing.assert_close(out, rgba[:, :3])
    rgb = torch.rand(1, 3, 32, 32, generator=g, requires_grad=True)
    out = fd_lpips.preprocess_for_lpips(rgb)
    assert out.shape == (1, 3, 32, 32)
    out.sum().backward()
    assert rgb.grad is not None
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        fd_lpips.preprocess_for_lpips(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        fd_lpips.preprocess_for_lpips(torch.zeros(3, 8, 8))


def test_lpips_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` fail
    with pytest.raises(ImportError, match=r"pip install fastdiff\[lpips\].*torchvision"):
        fd_lpips.LPIPSAdapter()


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_missing_backbone_names_file_and_directory(tmp_path, monkeypatch, net):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}[net]
    with pytest.raises(FileNotFoundError) as info:
        fd_lpips.backbone_weights_path(net)
    msg = str(info.value)
    assert expected in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(FileNotFoundError, match="not found at"):
        fd_lpips.backbone_weights_path(net, tmp_path / "nowhere.pth")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / expected).write_bytes(b"")
    assert fd_lpips.backbone_weights_path(net) == tmp_path / "hub" / "checkpoints" / expected
    with pytest.raises(ValueError, match="net must be one of"):
        fd_lpips.backbone_weights_path("resnet")


def test_lpips_real_model():
    pytest.importorskip("lpips", reason="lpips (and the torchvision it imports) is not installed here")
    try:
        model = fd_lpips.LPIPSAdapter("alex")
    except FileNotFoundError as e:
        pytest.skip(f"AlexNet backbone weights not available offline: {e}")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    d_same, d_diff = model(a, a), model(a, b)
    assert d_same.shape == (3,) and d_same.abs().max() < 1e-6 and (d_diff > 0.01).all()
    out = teacher_error(b, a, lpips_model=model)
    assert out["lpips_mean"] == pytest.approx(float(d_diff.mean()), rel=1e-5)
