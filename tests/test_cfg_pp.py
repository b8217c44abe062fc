"""CFG++ (Guidance(method="cfg_pp")) against its defining update for each solver its authors give, written as the
papers' and ComfyUI's samplers write it, with the same model, noise and schedule; and AutoGuidance as plain CFG
with a weaker model for the unconditional pass."""

import math

import pytest
import torch

import fastdiff
from fastdiff import Guidance, schedules
from fastdiff.solvers.stochastic import get_ancestral_step

LAM = 0.6  # CFG++'s lambda


def _setup(gmm, noise):
    sigmas = schedules.karras(12, 0.002, 80.0)
    labels = torch.arange(noise.shape[0]) % gmm.num_classes
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, -1)}
    return sigmas, noise * 80, cond, uncond


def _estimates(gmm, x, sigma, cond, uncond, lam, guided=True):
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype)
    d_c = gmm(x, s, **cond)
    if not guided:
        return d_c, d_c
    d_u = gmm(x, s, **uncond)
    return d_u + lam * (d_c - d_u), d_u


def _euler_cfg_pp(gmm, x, sigmas, cond, uncond, lam, guided):
    for i in range(len(sigmas) - 1):
        d, d_u = _estimates(gmm, x, sigmas[i], cond, uncond, lam, guided[i])
        x = d + sigmas[i + 1] * (x - d_u) / sigmas[i]  # re-noised along the unconditional direction
    return x


def _euler_ancestral_cfg_pp(gmm, x, sigmas, cond, uncond, lam, guided, draws):
    for i in range(len(sigmas) - 1):
        d, d_u = _estimates(gmm, x, sigmas[i], cond, uncond, lam, guided[i])
        sigma_down, sigma_up = get_ancestral_step(float(sigmas[i]), float(sigmas[i + 1]))
        x = d + sigma_down * (x - d_u) / sigmas[i]
        if sigmas[i + 1] > 0:
            x = x + draws[i] * sigma_up
    return x


def _dpmpp_2m_cfg_pp(gmm, x, sigmas, cond, uncond, lam, guided):
    t = [-math.log(float(s)) if s > 0 else math.inf for s in sigmas]
    old_u = None
    for i in range(len(sigmas) - 1):
        d, d_u = _estimates(gmm, x, sigmas[i], cond, uncond, lam, guided[i])
        h = t[i + 1] - t[i]
        if old_u is None or sigmas[i + 1] == 0:
            mix = -math.exp(-h) * d_u
        else:
            r = (t[i] - t[i - 1]) / h
            mix = -math.exp(-h) * d_u - math.expm1(-h) / (2 * r) * (d - old_u)
        x = d + mix + math.exp(-h) * x
        old_u = d_u
    return x


@pytest.mark.parametrize("solver", ["euler", "euler_ancestral", "dpmpp_2m"])
@pytest.mark.parametrize("interval", [None, (0.3, 10.0)], ids=["all", "interval"])
def test_cfg_pp_is_its_defining_update(gmm, noise, solver, interval):
    sigmas, x0, cond, uncond = _setup(gmm, noise)
    g = Guidance(LAM, interval, method="cfg_pp", restart=False)
    guided = g.plan(sigmas)
    draws = [torch.randn(x0.shape, generator=torch.Generator().manual_seed(i), dtype=x0.dtype) for i in range(12)]
    queue = iter(draws)
    out = fastdiff.sample(gmm, x0, sigmas, solver=solver, guidance=g, cond=cond, uncond=uncond,
                          noise_sampler=lambda s, sn: next(queue))  # fmt: skip
    if solver == "euler":
        ref = _euler_cfg_pp(gmm, x0, sigmas, cond, uncond, LAM, guided)
    elif solver == "euler_ancestral":
        ref = _euler_ancestral_cfg_pp(gmm, x0, sigmas, cond, uncond, LAM, guided, draws)
    else:
        ref = _dpmpp_2m_cfg_pp(gmm, x0, sigmas, cond, uncond, LAM, guided)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # the device-table loop (Sampler) reads the same weights from its coefficient rows
    queue = iter(draws)
    sampler = fastdiff.Sampler(gmm, solver=solver, sigmas=sigmas, guidance=g)
    torch.testing.assert_close(sampler.sample(x0, cond, uncond, noise_sampler=lambda s, sn: next(queue)), ref,
                               rtol=1e-10, atol=1e-10)  # fmt: skip
    plain = fastdiff.sample(gmm, x0, sigmas, solver=solver, guidance=Guidance(LAM, interval, restart=False),
                            cond=cond, uncond=uncond, noise_sampler=lambda s, sn: draws[0])  # fmt: skip
    assert not torch.allclose(out, plain, atol=1e-3)


def test_cfg_pp_at_lambda_one_still_renoises_unconditionally(gmm, noise):
    """lambda = 1 denoises with D_c but re-noises with D_u: it runs the unconditional pass, unlike CFG at w = 1."""
    sigmas, x0, cond, uncond = _setup(gmm, noise)
    g = Guidance(1.0, method="cfg_pp")
    assert fastdiff.count_nfe("euler", sigmas, g) == (12, 12)
    out = fastdiff.sample(gmm, x0, sigmas, solver="euler", guidance=g, cond=cond, uncond=uncond)
    torch.testing.assert_close(out, _euler_cfg_pp(gmm, x0, sigmas, cond, uncond, 1.0, [True] * 12))


def test_cfg_pp_is_refused_for_other_solvers(gmm, noise):
    sigmas, x0, cond, uncond = _setup(gmm, noise)
    with pytest.raises(ValueError, match="CFG\\+\\+ .* defined for the solvers euler, ddim, euler_ancestral"):
        fastdiff.sample(gmm, x0, sigmas, solver="heun", guidance=Guidance(LAM, method="cfg_pp"), cond=cond,
                        uncond=uncond)  # fmt: skip
    with pytest.raises(ValueError, match="no CFG\\+\\+ form"):
        fastdiff.Sampler(gmm, solver="unipc", sigmas=sigmas, guidance=Guidance(LAM, method="cfg_pp"))


def test_autoguidance_is_cfg_with_a_weaker_model_of_the_same_condition(gmm, noise):
    """AutoGuidance (Karras et al. 2024): D_weak + w (D - D_weak), both called with the condition: the separate
    unconditional model given ``uncond=cond``."""
    sigmas, x0, cond, _ = _setup(gmm, noise)

    def weak(x, sigma, class_labels):  # a degraded version of the same model: its estimate pulled toward x
        return 0.7 * gmm(x, sigma, class_labels=class_labels) + 0.3 * x / (1 + sigma.reshape(-1, 1) ** 2)

    g = Guidance(2.5, uncond_model=weak)
    out = fastdiff.sample(gmm, x0, sigmas, solver="euler", guidance=g, cond=cond, uncond=cond)
    x = x0
    for i in range(12):
        s = torch.full((x.shape[0],), float(sigmas[i]), dtype=x.dtype)
        d_weak = weak(x, s, **cond)
        d = d_weak + 2.5 * (gmm(x, s, **cond) - d_weak)
        x = d + sigmas[i + 1] * (x - d) / sigmas[i]
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)
