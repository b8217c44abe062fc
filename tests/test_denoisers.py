"""Adapters: networks built from the exact mixture in each parameterisation must give back its D(x; sigma)."""

from types import SimpleNamespace

import pytest
import torch

import fastdiff
from fastdiff import denoisers, schedules


def _alphas_cumprod(n=1000):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2  # SD's scaled_linear
    return torch.cumprod(1 - betas, 0)


def _points(gmm):
    g = torch.Generator().manual_seed(5)
    sig = torch.tensor([0.05, 0.3, 1.0, 2.5, 7.0], dtype=torch.float64).repeat_interleave(4)
    x = gmm.sample(20, g) + sig[:, None] * torch.randn(20, 2, generator=g, dtype=torch.float64)
    return x, sig


def _vp_output(prediction, gmm, x_vp, sigma):
    s = sigma[:, None]
    x = x_vp * torch.sqrt(1 + s**2)
    d = gmm(x, sigma)
    eps = (x - d) / s
    return {"eps": eps, "x0": d, "v": eps / torch.sqrt(1 + s**2) - s / torch.sqrt(1 + s**2) * d}[prediction]


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_discrete_vp_adapter_recovers_denoiser(gmm, prediction):
    ab = _alphas_cumprod()
    holder = {}

    def net(x_vp, t):
        return SimpleNamespace(sample=_vp_output(prediction, gmm, x_vp, holder["den"].t_to_sigma(t)))

    den = holder["den"] = denoisers.VPDenoiser(net, ab, prediction=prediction)
    x, sig = _points(gmm)
    assert torch.allclose(den(x, sig), gmm(x, sig), atol=1e-9)


def test_discrete_vp_timestep_mapping(gmm):
    ab = _alphas_cumprod()
    den = denoisers.VPDenoiser(lambda x, t: x, ab)
    grid = ((1 - ab) / ab).sqrt()
    t = den.sigma_to_t(grid[[0, 10, 500, 999]])
    assert torch.allclose(t, torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64), atol=1e-9)
    mid = torch.tensor([12.25, 640.5], dtype=torch.float64)
    assert torch.allclose(den.sigma_to_t(den.t_to_sigma(mid)), mid, atol=1e-9)
    assert torch.equal(
        denoisers.VPDenoiser(lambda x, t: x, ab, quantize=True).sigma_to_t(den.t_to_sigma(mid)),
        torch.tensor([12.0, 640.0], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="outside the model's range"):
        den.sigma_to_t(torch.tensor([grid[-1] * 1.5]))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_continuous_vp_adapter_recovers_denoiser(gmm, prediction):
    def net(x_vp, t):
        return _vp_output(prediction, gmm, x_vp, schedules.vp_t_to_sigma(t / 999.0))

    den = denoisers.VPContinuousDenoiser(net, prediction=prediction, time_scale=999.0)
    x, sig = _points(gmm)
    assert torch.allclose(den(x, sig), gmm(x, sig), atol=1e-9)


def test_flow_adapter_recovers_denoiser(gmm):
    def net(x_t, t):
        t = t / 1000.0
        sigma = t / (1 - t)
        x = x_t * (1 + sigma[:, None])
        d = gmm(x, sigma)
        return (x - d) / sigma[:, None] - d  # v = eps - x0

    den = denoisers.FlowDenoiser(net, time_scale=1000.0)
    x, sig = _points(gmm)
    assert torch.allclose(den(x, sig), gmm(x, sig), atol=1e-9)


def test_edm_precond_recovers_denoiser(gmm):
    sd = 0.5

    def raw(x_in, c_noise):
        sigma = torch.exp(4 * c_noise)[:, None]
        x = x_in * torch.sqrt(sigma**2 + sd**2)
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / torch.sqrt(sigma**2 + sd**2)
        return (gmm(x, sigma[:, 0]) - c_skip * x) / c_out

    den = denoisers.EDMPrecond(raw, sigma_data=sd)
    x, sig = _points(gmm)
    assert torch.allclose(den(x, sig), gmm(x, sig), atol=1e-9)


def test_sampling_through_an_adapter_matches_the_model(gmm, noise):
    ab = _alphas_cumprod()
    holder = {}
    den = holder["den"] = denoisers.VPDenoiser(
        lambda x_vp, t: _vp_output("eps", gmm, x_vp, holder["den"].t_to_sigma(t)), ab
    )
    s = schedules.karras(10, den.sigma_min, den.sigma_max)
    x = noise * s[0]
    assert torch.allclose(fastdiff.sample(den, x, s), fastdiff.sample(gmm, x, s), atol=1e-8)


def test_adapter_errors():
    with pytest.raises(ValueError, match="prediction must be one of"):
        denoisers.VPDenoiser(lambda x, t: x, _alphas_cumprod(), prediction="score")
    with pytest.raises(ValueError, match="strictly decreasing"):
        denoisers.VPDenoiser(lambda x, t: x, _alphas_cumprod().flip(0))
    den = denoisers.EDMPrecond(lambda x, c: x)
    with pytest.raises(ValueError, match="sigma must be a scalar or have shape"):
        den(torch.randn(3, 2), torch.ones(2))
    with pytest.raises(TypeError, match="expected a tensor"):
        denoisers.EDMPrecond(lambda x, c: "nope")(torch.randn(3, 2), 1.0)
