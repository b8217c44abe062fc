"""EDM/EDM2-style networks run in fastdiff as they are, with EDM2's autoguidance.

An EDM network is called ``net(x, sigma, class_labels=None)`` with one-hot labels ``[B, C]`` and ``sigma [B]``
(reshaped to ``[B, 1, 1, 1]`` inside), applies the EDM preconditioning in float32 and returns D in float32,
whatever x's dtype. EDM2's autoguidance guides with a smaller network on the same labels:
``D = D_g + w (D_main - D_g)``, which is fastdiff's ``Guidance(w, uncond_model=gnet)`` with the labels in both
``cond`` and ``uncond``. Every path (fastdiff.sample, fastdiff.Sampler, fastdiff.k_diffusion.sample_heun with a
guiding wrapper) is compared with a plain-torch Heun loop written here, as EDM's sampler runs it (float64 state).
"""

import math

import pytest
import torch
from torch import nn

import fastdiff
from fastdiff import Guidance, schedules
from fastdiff import k_diffusion as K

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES, SIGMA_DATA = 4, 0.5
W = 2.3


class TinyEDMNet(nn.Module):
    """A small class-conditional conv net behind EDM's preconditioning (Karras et al. 2022, Table 1).

    ``D = c_skip x + c_out F(c_in x; c_noise, y)`` with ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = log(s) / 4``. The noise level
    and the one-hot label shift the hidden features. Records every sigma it is called with.
    """

    def __init__(self, channels=3, hidden=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.label = nn.Linear(CLASSES, hidden, bias=False)
        self.noise = nn.Linear(1, hidden)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(p[0].numel(), 1)))
        self.sigmas = []

    def forward(self, x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],), sigma.shape  # fastdiff passes [B]; EDM reshapes it here
        self.sigmas.append(float(sigma[0]))
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        y = torch.zeros(x.shape[0], CLASSES) if class_labels is None else class_labels.to(torch.float32)
        y = y.reshape(-1, CLASSES)
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
        c_in = 1 / (sigma**2 + SIGMA_DATA**2).sqrt()
        c_noise = sigma.log() / 4
        shift = self.label(y) + self.noise(c_noise.reshape(-1, 1))
        f = self.conv_out(torch.nn.functional.silu(self.conv_in(c_in * x) + shift[:, :, None, None]))
        return c_skip * x + c_out * f.to(torch.float32)


@pytest.fixture
def nets():
    return TinyEDMNet(hidden=16, seed=0), TinyEDMNet(hidden=6, seed=1)  # main, and the smaller guiding net


@pytest.fixture(scope="module")
def setup():
    sigmas = schedules.karras(10, 0.002, 80.0)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    y = torch.nn.functional.one_hot(torch.arange(6) % CLASSES, CLASSES)
    return x, sigmas, y


def heun_autoguided(net, gnet, x, sigmas, y, w, interval=None, per="step"):
    """EDM's Heun sampler (Algorithm 1, no churn) in float64 with autoguidance ``D_g + w (D - D_g)``.

    Guidance is decided per step at its start sigma (``per="step"``: fastdiff's rule, both Heun evaluations follow
    it) or at every evaluation's own sigma (``per="eval"``: what a guiding model wrapper does).
    """
    lo, hi = interval if interval is not None else (-math.inf, math.inf)

    def denoise(x, s, guided):
        sb = torch.full((x.shape[0],), s, dtype=torch.float64)
        d = net(x, sb, class_labels=y).to(torch.float64)
        if not guided:
            return d
        d_g = gnet(x, sb, class_labels=y).to(torch.float64)
        return d_g + w * (d - d_g)

    sig = sigmas.tolist()
    for s, s_next in zip(sig, sig[1:]):
        guided = lo < s <= hi
        d = (x - denoise(x, s, guided)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            guided_2 = guided if per == "step" else lo < s_next <= hi
            d_2 = (x_next - denoise(x_next, s_next, guided_2)) / s_next
            x_next = x + (s_next - s) * (d + d_2) / 2
        x = x_next
    return x


def _close(got, want, tol=1e-5):
    # The nets run in float32 on float64 states: the paths agree to float32 rounding of D (1e-7 relative),
    # carried over 10 steps; a wrong guidance weight or sigma shows at 1e-2.
    assert got.shape == want.shape
    err = (got.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), err


INTERVALS = [None, (0.3, 5.0)]


@pytest.mark.parametrize("interval", INTERVALS, ids=["everywhere", "interval"])
def test_fastdiff_sample_and_sampler_with_autoguidance(nets, setup, interval):
    net, gnet = nets
    x, sigmas, y = setup
    guidance = Guidance(W, interval=interval, uncond_model=gnet)
    want = heun_autoguided(net, gnet, x, sigmas, y, W, interval)
    want_g_calls = list(gnet.sigmas)
    lab = {"class_labels": y}
    gnet.sigmas.clear()
    _close(fastdiff.sample(net, x, sigmas, solver="heun", guidance=guidance, cond=lab, uncond=lab), want)
    assert gnet.sigmas == want_g_calls  # the guiding net runs exactly where the reference runs it
    sampler = fastdiff.Sampler(net, solver="heun", sigmas=sigmas, guidance=guidance)
    gnet.sigmas.clear()
    _close(sampler.sample(x, lab, lab), want)
    assert gnet.sigmas == pytest.approx(want_g_calls, rel=1e-12)
    if interval is not None:
        lo, hi = interval
        starts = [s for s in sigmas.tolist()[:-1] if lo < s <= hi]
        assert 0 < len(starts) < 10
        # Outside the interval the guiding net is never called: only at guided steps' starts and their
        # corrector points (each guided step here ends above 0).
        sig = sigmas.tolist()
        expected = [v for i, s in enumerate(sig[:-1]) if lo < s <= hi for v in (s, sig[i + 1])]
        assert gnet.sigmas == pytest.approx(expected, rel=1e-12)
        assert max(gnet.sigmas) <= hi


@pytest.mark.parametrize("interval", INTERVALS, ids=["everywhere", "interval"])
def test_k_diffusion_heun_with_a_guiding_wrapper(nets, setup, interval):
    net, gnet = nets
    x, sigmas, y = setup
    lo, hi = interval if interval is not None else (-math.inf, math.inf)

    def autoguided(x, sigma, class_labels=None):  # how k-diffusion users wrap a model
        d = net(x, sigma, class_labels=class_labels)
        if not lo < float(sigma[0]) <= hi:
            return d
        d_g = gnet(x, sigma, class_labels=class_labels)
        return d_g + W * (d - d_g)

    want = heun_autoguided(net, gnet, x, sigmas, y, W, interval, per="eval")
    want_g_calls = list(gnet.sigmas)
    gnet.sigmas.clear()
    got = K.sample_heun(autoguided, x, sigmas.float(), extra_args={"class_labels": y})
    _close(got, want)
    assert gnet.sigmas == pytest.approx(want_g_calls, rel=1e-6)
    assert all(lo < s <= hi for s in gnet.sigmas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_state_with_float32_network_output(nets, setup, dtype):
    # The network returns float32 D for a float16/bfloat16 state: the step computes in float32 and keeps the
    # state's dtype.
    net, gnet = nets
    x, sigmas, y = setup
    guidance = Guidance(W, interval=(0.3, 5.0), uncond_model=gnet)
    want = heun_autoguided(net, gnet, x, sigmas, y, W, (0.3, 5.0))
    lab = {"class_labels": y}
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    outs = [
        fastdiff.sample(net, x.to(dtype), sigmas, solver="heun", guidance=guidance, cond=lab, uncond=lab),
        fastdiff.Sampler(net, solver="heun", sigmas=sigmas, guidance=guidance).sample(x.to(dtype), lab, lab),
    ]
    for out in outs:
        assert out.dtype == dtype
        _close(out, want, tol)


def test_other_solvers_take_edm_nets(nets, setup):
    net, gnet = nets
    x, sigmas, y = setup
    lab = {"class_labels": y}
    guidance = Guidance(W, uncond_model=gnet)
    for solver in ("euler", "dpmpp_2m", "unipc"):
        a = fastdiff.sample(net, x, sigmas, solver=solver, guidance=guidance, cond=lab, uncond=lab)
        b = fastdiff.Sampler(net, solver=solver, sigmas=sigmas, guidance=guidance).sample(x, lab, lab)
        assert torch.isfinite(a).all() and a.dtype == x.dtype
        _close(b, a, 1e-6)
