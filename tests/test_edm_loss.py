from __future__ import annotations

import math

import pytest
import torch

from fastdiff.models.unet import EDMUNet, UNetConfig
from fastdiff.train.edm import EDMLoss, edm_loss, edm_weight


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(torch.nn.Module):
    """A model that returns a fixed function of its input and records what it was called with."""

    def __init__(self, mode: str = "zero", sigma_data: float | None = None):
        super().__init__()
        self.mode = mode
        if sigma_data is not None:
            self.sigma_data = sigma_data
        self.calls: list[dict] = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append({"x": x.clone(), "sigma": sigma.clone(), "class_labels": class_labels})
        return torch.zeros_like(x) if self.mode == "zero" else x.clone()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _digits8(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    return x, torch.tensor(d.target[:n], dtype=torch.long)


def test_weight_formula():
    s = torch.tensor([0.1, 0.5, 2.0])
    expected = torch.tensor([(0.01 + 0.25) / (0.05**2), (0.25 + 0.25) / 0.25**2, (4 + 0.25) / 1.0])
    torch.testing.assert_close(edm_weight(s, 0.5), expected)
    # lambda = 1 / c_out^2
    c_out = s * 0.5 / torch.sqrt(s**2 + 0.25)
    torch.testing.assert_close(edm_weight(s, 0.5), 1 / c_out**2)


def test_loss_at_fixed_sigma_equals_hand_computation():
    # p_std = 0 pins sigma = exp(p_mean) = 0.5; with D = 0 the loss is lambda * mean(x^2) = 8 * 0.09
    x = torch.full((3, 1, 4, 4), 0.3)
    loss, logs = edm_loss(Recorder("zero"), (x, torch.tensor([0, 1, 2])), _gen(), p_mean=math.log(0.5), p_std=0.0)
    assert float(loss) == pytest.approx(8 * 0.09, rel=1e-6)
    assert float(logs["loss"]) == pytest.approx(8 * 0.09, rel=1e-6)
    assert float(logs["sigma_mean"]) == pytest.approx(0.5, rel=1e-6)


def test_identity_model_replays_the_documented_draws():
    # D(x_noisy) = x_noisy gives lambda * sigma^2 * mean(noise^2); the noise is replayed from the same seed in the
    # documented order: sigma normals [B], then the noise, then the label-dropout uniforms [B].
    b, shape = 5, (5, 2, 3, 3)
    x = torch.randn(shape, generator=_gen(9))
    labels = torch.arange(b)
    model = Recorder("identity")
    loss, _ = EDMLoss(label_dropout=0.5)(model, (x, labels), _gen(4))
    g = _gen(4)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(b, generator=g))
    noise = torch.randn(shape, generator=g)
    drop = torch.rand(b, generator=g) < 0.5
    per = edm_weight(sigma, 0.5) * sigma**2 * (noise**2).reshape(b, -1).mean(1)
    assert float(loss) == pytest.approx(float(per.mean()), rel=1e-5)
    call = model.calls[0]
    torch.testing.assert_close(call["sigma"], sigma)
    torch.testing.assert_close(call["x"], x + sigma[:, None, None, None] * noise)
    torch.testing.assert_close(call["class_labels"], torch.where(drop, -1, labels))


def test_same_seed_same_loss_and_global_rng_untouched():
    torch.manual_seed(0)
    model = EDMUNet(UNetConfig.tiny())
    x, y = _digits8(16)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    l1, logs1 = EDMLoss()(model, (x, y), _gen(7))
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn from the global RNG
    torch.manual_seed(999)  # a different global state changes nothing either
    l2, logs2 = EDMLoss()(model, (x, y), _gen(7))
    assert l1.detach().item() == l2.detach().item()
    assert {k: float(v) for k, v in logs1.items()} == pytest.approx(
        {k: float(v) for k, v in logs2.items()}, nan_ok=True
    )
    l3, _ = EDMLoss()(model, (x, y), _gen(8))
    assert l3.detach().item() != l1.detach().item()


def test_label_dropout_rate():
    n = 20_000
    x = torch.zeros(n, 1, 1, 1)
    labels = torch.randint(0, 10, (n,), generator=_gen(1))
    for rate in (0.0, 0.1, 0.5, 1.0):
        model = Recorder()
        _, logs = EDMLoss(label_dropout=rate)(model, (x, labels), _gen(2))
        got = model.calls[0]["class_labels"]
        dropped = got == -1
        assert abs(dropped.float().mean().item() - rate) < 0.01, rate
        assert float(logs["label_drop_frac"]) == pytest.approx(dropped.float().mean().item())
        torch.testing.assert_close(got[~dropped], labels[~dropped])  # the rest are untouched


def test_sigma_distribution_is_lognormal():
    n = 20_000
    model = Recorder()
    EDMLoss(p_mean=-1.2, p_std=1.2)(model, torch.zeros(n, 1), _gen(3))
    log_s = model.calls[0]["sigma"].log()
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_s.std().item() == pytest.approx(1.2, abs=0.03)


def test_fresh_edm_unet_starts_at_unit_loss():
    # F = 0 at initialisation, so D = c_skip x_noisy and E[lambda (D - x)^2] = 1 for zero-mean data of std
    # sigma_data at every sigma: EDM's preconditioning and weighting agree.
    model = EDMUNet(UNetConfig.tiny())
    x = 0.5 * torch.randn(4096, 1, 8, 8, generator=_gen(5))
    with torch.no_grad():
        loss, logs = EDMLoss()(model, (x, torch.zeros(4096, dtype=torch.long)), _gen(6))
    assert float(loss) == pytest.approx(1.0, abs=0.05)
    for k in ("loss_sigma<0.2", "loss_sigma0.2-2", "loss_sigma>=2"):
        assert float(logs[k]) == pytest.approx(1.0, abs=0.1), k


def test_unconditional_batches_and_log_keys():
    x = torch.randn(6, 1, 8, 8, generator=_gen(0))
    model = Recorder()
    keys = None
    for batch in (x, (x,), (x, None)):
        _, logs = EDMLoss()(model, batch, _gen(0))
        assert model.calls[-1]["class_labels"] is None
        assert float(logs["label_drop_frac"]) == 0.0
        assert keys is None or set(logs) == keys
        keys = set(logs)
    assert keys == {"loss", "sigma_mean", "label_drop_frac", "loss_sigma<0.2", "loss_sigma0.2-2", "loss_sigma>=2"}
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in logs.values())
    _, logs = EDMLoss(sigma_bins=())(model, x, _gen(0))
    assert set(logs) == {"loss", "sigma_mean", "label_drop_frac"}


def test_bad_arguments_raise():
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="sigma_data"):
        EDMLoss(sigma_data=0.5)(Recorder(sigma_data=1.0), x, _gen())
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        EDMLoss()(Recorder(), (x, torch.tensor([0, 1, 2])), _gen())
    with pytest.raises(ValueError, match="labels must be an integer"):
        EDMLoss()(Recorder(), (x, torch.tensor([0.0, 1.0])), _gen())
    with pytest.raises(TypeError, match="generator"):
        EDMLoss()(Recorder(), x, None)
    with pytest.raises(TypeError, match="batch must be"):
        EDMLoss()(Recorder(), "images", _gen())
    with pytest.raises(ValueError, match="label_dropout"):
        EDMLoss(label_dropout=1.5)
    with pytest.raises(ValueError, match="p_std"):
        EDMLoss(p_std=-1.0)
    with pytest.raises(ValueError, match="sigma_bins"):
        EDMLoss(sigma_bins=(1.0, 0.5))


def test_gradient_descent_lowers_the_loss():
    torch.manual_seed(0)
    model = EDMUNet(UNetConfig.tiny())
    x, y = _digits8(32)
    loss_fn = EDMLoss()

    def eval_loss() -> float:
        # the same sigmas and noise every time, many of them, so the comparison is not noise
        with torch.no_grad():
            return float(loss_fn(model, (x.repeat(8, 1, 1, 1), y.repeat(8)), _gen(1234))[0])

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = _gen(0)
    for _ in range(50):
        loss, _ = loss_fn(model, (x, y), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.75 * before, (before, after)


def test_runtime_resume_is_exact(tmp_path):
    runtime = pytest.importorskip("fastdiff.train.runtime")
    x, y = _digits8(24)
    data = torch.utils.data.TensorDataset(x, y)

    def run(out: str, steps: int) -> EDMUNet:
        torch.manual_seed(0)
        model = EDMUNet(UNetConfig.tiny())
        cfg = runtime.TrainConfig(
            steps=steps, batch_size=8, lr=1e-3, checkpoint_every=2, log_every=1, out_dir=out, progress=False
        )
        state = runtime.train(model, EDMLoss(), data, cfg)
        return state.model

    straight = run(str(tmp_path / "a"), 4)
    run(str(tmp_path / "b"), 2)
    resumed = run(str(tmp_path / "b"), 4)
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
