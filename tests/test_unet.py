from __future__ import annotations

import pytest
import torch

from fastdiff.checkpoint import save_model
from fastdiff.models.unet import EDMUNet, UNet, UNetConfig, count_parameters, load_unet, save_unet


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Zero-initialised output layers make a fresh net ignore its conditioning; perturb every parameter so that
    # the tests see a network whose output depends on all its inputs, as after training.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def tiny() -> EDMUNet:
    torch.manual_seed(0)
    return _trained_like(EDMUNet(UNetConfig.tiny())).eval()


class _StateOnly(torch.nn.Module):
    """Saves an arbitrary state dict through the model writer."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):
        return self._state


def _inputs(cfg: UNetConfig, b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g)
    sigma = torch.exp(torch.randn(b, generator=g))
    return x, sigma


def test_output_shape_and_dtype(tiny):
    x, sigma = _inputs(tiny.config)
    y = torch.tensor([0, 3, -1, 9])
    assert tiny(x, sigma, class_labels=y).shape == x.shape
    d64 = tiny(x.double(), sigma.double(), class_labels=y)
    assert d64.dtype == torch.float64 and d64.shape == x.shape
    raw = tiny.net(x, sigma.log() / 4, class_labels=y)
    assert raw.shape == x.shape and raw.dtype == torch.float32
    assert isinstance(tiny.net, UNet) and EDMUNet(tiny.net).net is tiny.net


def test_class_conditioning_changes_output_and_minus_one_is_none(tiny):
    x, sigma = _inputs(tiny.config)
    with torch.no_grad():
        d0 = tiny(x, sigma, class_labels=torch.zeros(4, dtype=torch.long))
        d5 = tiny(x, sigma, class_labels=torch.full((4,), 5))
        d_null = tiny(x, sigma, class_labels=torch.full((4,), -1))
        d_none = tiny(x, sigma)
    assert (d0 - d5).abs().max() > 1e-3
    assert (d0 - d_null).abs().max() > 1e-3
    torch.testing.assert_close(d_null, d_none, rtol=0, atol=0)


def test_per_sample_labels_are_independent(tiny):
    # Sample i's output depends only on its own label: no cross-talk through the batch.
    x, sigma = _inputs(tiny.config)
    with torch.no_grad():
        a = tiny(x, sigma, class_labels=torch.tensor([1, 2, 3, 4]))
        b = tiny(x, sigma, class_labels=torch.tensor([1, 7, 3, 4]))
    assert (a[1] - b[1]).abs().max() > 1e-3
    torch.testing.assert_close(a[[0, 2, 3]], b[[0, 2, 3]], rtol=1e-5, atol=1e-6)


def test_noise_level_changes_output(tiny):
    x, _ = _inputs(tiny.config)
    with torch.no_grad():
        f1 = tiny.net(x, torch.full((4,), -1.0))
        f2 = tiny.net(x, torch.full((4,), 0.5))
    assert (f1 - f2).abs().max() > 1e-3


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = _trained_like(EDMUNet(UNetConfig.tiny()))
    x, sigma = _inputs(model.config)
    loss = (model(x, sigma, class_labels=torch.tensor([0, 1, 2, -1])) - x).pow(2).mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    # class rows 3..9 were not used; the rows that were used get gradient
    g = model.net.class_embed.weight.grad
    assert g[[0, 1, 2, 10]].abs().sum(dim=1).min() > 0 and g[3:10].abs().sum() == 0


def test_fresh_model_is_c_skip_identity_and_tiny_sigma_gives_d_close_to_x():
    cfg = UNetConfig.tiny()
    fresh = EDMUNet(cfg)
    x, sigma = _inputs(cfg)
    sd = cfg.sigma_data
    c_skip = sd**2 / (sigma**2 + sd**2)
    # zero-initialised output conv: F = 0, so D = c_skip x exactly
    torch.testing.assert_close(fresh(x, sigma), c_skip[:, None, None, None] * x)
    trained = _trained_like(EDMUNet(cfg))
    with torch.no_grad():
        d = trained(x, torch.full((4,), 1e-4), class_labels=torch.tensor([1, 2, 3, 4]))
    # c_skip -> 1 and c_out ~ sigma: D = x + O(sigma)
    assert (d - x).abs().max() < 1e-3


def test_preset_parameter_counts():
    n_tiny = count_parameters(EDMUNet(UNetConfig.tiny()))
    n_small = count_parameters(EDMUNet(UNetConfig.small()))
    assert 5_000 <= n_tiny <= 50_000, n_tiny
    assert 500_000 <= n_small <= 1_500_000, n_small
    small = UNetConfig.small()
    assert (small.resolution, small.in_channels, small.num_classes) == (16, 1, 10)


def test_small_preset_forward():
    model = EDMUNet(UNetConfig.small())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert model(x, torch.tensor([0.5, 3.0]), class_labels=torch.tensor([7, -1])).shape == x.shape


def test_unconditional_config():
    cfg = UNetConfig(resolution=8, channels=8, channel_mult=(1, 1), num_blocks=1, attention_levels=(), num_classes=0)
    model = EDMUNet(cfg)
    x, sigma = _inputs(cfg, b=2)
    assert model(x, sigma).shape == x.shape
    assert model(x, sigma, class_labels=torch.tensor([-1, -1])).shape == x.shape
    with pytest.raises(ValueError, match="class_labels must lie in"):
        model(x, sigma, class_labels=torch.tensor([0, -1]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(2, 1, 16, 16), torch.ones(2), None), r"x must have shape \[B, 1, 8, 8\]"),
        (lambda: (torch.randn(2, 3, 8, 8), torch.ones(2), None), "x must have shape"),
        (lambda: (torch.randn(1, 8, 8), torch.ones(1), None), "x must have shape"),
        (lambda: (torch.randn(2, 1, 8, 8), torch.ones(3), None), "sigma must be a scalar or have shape"),
        (lambda: (torch.randn(2, 1, 8, 8), torch.ones(2), torch.tensor([0, 10])), r"lie in \[-1, 10\)"),
        (lambda: (torch.randn(2, 1, 8, 8), torch.ones(2), torch.tensor([0, -2])), r"lie in \[-1, 10\)"),
        (lambda: (torch.randn(2, 1, 8, 8), torch.ones(2), torch.tensor([0.0, 1.0])), "integer tensor"),
        (lambda: (torch.randn(2, 1, 8, 8), torch.ones(2), torch.tensor([1, 2, 3])), "class_labels must be a scalar"),
        (lambda: (torch.randn(2, 1, 8, 8), torch.zeros(2), None), "c_noise must be finite"),
    ],
)
def test_bad_inputs_raise(tiny, make, match):
    x, sigma, labels = make()
    with pytest.raises(ValueError, match=match):
        tiny(x, sigma, class_labels=labels)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(resolution=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(attention_levels=(3,))
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNetConfig.from_dict({"resolution": 16, "depth": 3})


def test_save_load_round_trip(tmp_path, tiny):
    path = tmp_path / "sub" / "unet.safetensors"
    save_unet(path, tiny)
    assert [p.name for p in path.parent.iterdir()] == ["unet.safetensors"]  # no temp file left behind
    loaded = load_unet(path)
    assert loaded.config == tiny.config and not loaded.training
    x, sigma = _inputs(tiny.config)
    y = torch.tensor([4, -1, 0, 9])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, class_labels=y), tiny(x, sigma, class_labels=y), rtol=0, atol=0)
    # a raw UNet saves to the same format
    assert loaded.provenance == ""
    save_unet(tmp_path / "raw.safetensors", tiny.net, provenance="fastdiff train edm --steps 3")
    raw = load_unet(tmp_path / "raw.safetensors")
    assert raw.config == tiny.config and raw.provenance == "fastdiff train edm --steps 3"


def test_load_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError):
        load_unet(tmp_path / "missing.safetensors")

    path = tmp_path / "unet.safetensors"
    save_unet(path, tiny)
    data = path.read_bytes()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt|truncated"):
        load_unet(corrupt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError):
        load_unet(garbage)

    # weights of one architecture under the config of another: every mismatch is named
    other = UNetConfig(resolution=8, channels=16, channel_mult=(1, 1), num_blocks=1, attention_levels=(1,))
    mismatch = tmp_path / "mismatch.safetensors"
    save_model(mismatch, EDMUNet(other), {"type": "edm_unet", **tiny.config.to_dict()})
    with pytest.raises(ValueError, match=r"shape mismatches.*net\.conv_in\.weight"):
        load_unet(mismatch)

    state = EDMUNet(tiny.config).state_dict()
    state.pop("net.conv_out.bias")
    state["net.extra.weight"] = torch.zeros(3)
    names = tmp_path / "names.safetensors"
    save_model(names, _StateOnly(state), {"type": "edm_unet", **tiny.config.to_dict()})
    with pytest.raises(ValueError, match=r"missing keys.*net\.conv_out\.bias[\s\S]*unexpected keys.*net\.extra"):
        load_unet(names)

    wrong_type = tmp_path / "wrong.safetensors"
    save_model(wrong_type, tiny, {"type": "digit_classifier"})
    with pytest.raises(ValueError, match="not 'edm_unet'"):
        load_unet(wrong_type)
