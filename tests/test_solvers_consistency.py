"""The consistency solver ``lcm``: its step against the defining equations written out here (ComfyUI's
``sample_lcm``, which only ComfyUI defines, and multistep consistency sampling with LCM's boundary scalings), the
same run through both sampling loops, its NFE under interval guidance, and where it draws noise."""

import math

import pytest
import torch

import fastdiff
from fastdiff import schedules, solvers
from fastdiff.solvers import LCM, consistency_scalings

SIGMAS = schedules.karras(6, 0.002, 80.0)
CODI = {"sigma_min": 0.002, "boundary_scale": 10.0, "sigma_data": 0.5}


def _labels(n):
    return {"class_labels": torch.arange(n) % 4}


class _Recorded:
    """A noise sampler that hands out fixed noise and records the intervals it is asked for."""

    def __init__(self, shape, count=16, seed=7):
        g = torch.Generator().manual_seed(seed)
        self.noise = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]
        self.asked = []

    def __call__(self, sigma, sigma_next):
        self.asked.append((sigma, sigma_next))
        return self.noise[len(self.asked) - 1]


def _comfy_lcm(model, x, sigmas, noise, **cond):
    """ComfyUI's ``sample_lcm`` as its update equations: ``x = D(x; sigma_i)``, then ``x += sigma_{i+1} z`` where
    ``sigma_{i+1} > 0``."""
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        x = model(x, torch.full((x.shape[0],), sig[i], dtype=x.dtype), **cond)
        if sig[i + 1] > 0:
            x = x + sig[i + 1] * noise(sig[i], sig[i + 1])
    return x


def _multistep_consistency(model, x, sigmas, noise, sigma_min, scale, sigma_data, w=None, uncond=None, **cond):
    """Multistep consistency sampling with LCM's boundary scalings, written out: ``f = c_skip x + c_out D`` with
    ``u = scale (sigma - sigma_min)``, ``c_skip = sd^2 / (u^2 + sd^2)``, ``c_out = u / sqrt(u^2 + sd^2)``, then
    ``x = f + sqrt(sigma_{i+1}^2 - sigma_min^2) z`` where ``sigma_{i+1} > 0``; with ``w``, ``D`` is the CFG estimate
    on the steps whose sigma lies in the guidance interval ``uncond[0]``."""
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        s = torch.full((x.shape[0],), sig[i], dtype=x.dtype)
        d = model(x, s, **cond)
        if w is not None and uncond[0][0] < sig[i] <= uncond[0][1]:
            d_u = model(x, s, **uncond[1])
            d = d_u + w * (d - d_u)
        u = scale * (sig[i] - sigma_min)
        x = sigma_data**2 / (u**2 + sigma_data**2) * x + u / math.sqrt(u**2 + sigma_data**2) * d
        if sig[i + 1] > 0:
            x = x + math.sqrt(sig[i + 1] ** 2 - sigma_min**2) * noise(sig[i], sig[i + 1])
    return x


def test_the_default_is_comfyuis_sample_lcm(gmm, noise):
    x = noise * 80.0
    got_noise, want_noise = _Recorded(x.shape), _Recorded(x.shape)
    got = fastdiff.sample(gmm, x, SIGMAS, solver="lcm", cond=_labels(64), noise_sampler=got_noise)
    want = _comfy_lcm(gmm, x, SIGMAS, want_noise, **_labels(64))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got_noise.asked == want_noise.asked
    # the one-step sample is the model's own estimate at sigma_max
    one = fastdiff.sample(gmm, x, schedules.karras(1, 0.002, 80.0), solver="lcm", cond=_labels(64))
    torch.testing.assert_close(one, gmm(x, torch.full((64,), 80.0, dtype=x.dtype), **_labels(64)), rtol=0, atol=0)


@pytest.mark.parametrize("options", [CODI, {"sigma_min": 0.001, "boundary_scale": 3.0, "sigma_data": 1.5}])
def test_boundary_scalings_follow_their_equations(gmm, noise, options):
    x = noise * 80.0
    got_noise, want_noise = _Recorded(x.shape), _Recorded(x.shape)
    solver = solvers.get("lcm", **options)
    got = fastdiff.sample(gmm, x, SIGMAS, solver=solver, cond=_labels(64), noise_sampler=got_noise)
    want = _multistep_consistency(gmm, x, SIGMAS, want_noise, *options.values(), **_labels(64))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got_noise.asked == want_noise.asked
    # and the boundary: at sigma_min the consistency output is its input
    at_min = torch.tensor([options["sigma_min"], 0.0], dtype=torch.float64)
    torch.testing.assert_close(fastdiff.sample(gmm, x, at_min, solver=solver, cond=_labels(64)), x, rtol=0, atol=0)


def test_scalings_on_floats_and_tensors_agree():
    sig = torch.tensor([[0.002], [0.5], [80.0]], dtype=torch.float64)
    c_skip, c_out = consistency_scalings(sig, 0.002, 0.5, 10.0)
    assert c_skip.shape == c_out.shape == (3, 1) and c_skip.dtype == torch.float64
    for k, s in enumerate(sig.flatten().tolist()):
        assert (float(c_skip[k]), float(c_out[k])) == pytest.approx(consistency_scalings(s, 0.002, 0.5, 10.0))
    assert (float(c_skip[0]), float(c_out[0])) == (1.0, 0.0)
    assert consistency_scalings(sig, 0.002, 0.5, math.inf) == (0.0, 1.0)
    # a device schedule's coefficients (0-d tensors, differentiable) equal the host ones
    tensor_sig = SIGMAS.clone().requires_grad_(True)
    table, _ = LCM(**CODI).coefficient_tensor(tensor_sig)
    host = LCM(**CODI).coefficient_table(SIGMAS.tolist())
    for i, (st,) in enumerate(host):
        row = table[i, 0].tolist()
        assert row[0] == pytest.approx(st.a, abs=1e-15) and row[5] == pytest.approx(st.b[0], abs=1e-15)
        assert row[4] == pytest.approx(st.c_noise, abs=1e-15)
    table[:, 0, 5].sum().backward()
    assert tensor_sig.grad is not None and torch.isfinite(tensor_sig.grad).all()


@pytest.mark.parametrize("options", [{}, CODI])
def test_sample_and_sampler_draw_the_same_noise(gmm, noise, options):
    solver = solvers.get("lcm", **options)
    ref = fastdiff.sample(gmm, noise * 80, SIGMAS, solver=solver, cond=_labels(64),
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    out = fastdiff.Sampler(gmm, solver=solver, sigmas=SIGMAS).sample(
        noise * 80, _labels(64), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out, ref)
    other = fastdiff.sample(gmm, noise * 80, SIGMAS, solver=solver, cond=_labels(64),
                            generator=torch.Generator().manual_seed(4))  # fmt: skip
    assert not torch.allclose(other, ref)


def test_interval_guidance_spends_the_documented_nfe(gmm, noise):
    """One evaluation a step; the unconditional pass on the steps whose sigma lies in the interval."""
    g = fastdiff.Guidance(2.0, interval=(0.3, 3.0))
    uncond = {"class_labels": torch.full((64,), -1)}
    got_noise, want_noise = _Recorded(noise.shape), _Recorded(noise.shape)
    solver = solvers.get("lcm", **CODI)
    out, stats = fastdiff.sample(gmm, noise * 80, SIGMAS, solver=solver, guidance=g, cond=_labels(64), uncond=uncond,
                                 noise_sampler=got_noise, return_stats=True)  # fmt: skip
    guided = [i for i, s in enumerate(SIGMAS[:-1].tolist()) if 0.3 < s <= 3.0]
    assert guided and stats.guided_steps == guided
    assert (stats.nfe_cond, stats.nfe_uncond) == (6, len(guided)) == fastdiff.count_nfe(solver, SIGMAS, g)
    want = _multistep_consistency(gmm, noise * 80, SIGMAS, want_noise, *CODI.values(), w=2.0,
                                  uncond=((0.3, 3.0), uncond), **_labels(64))  # fmt: skip
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "sigmas",
    [SIGMAS, torch.tensor([80.0, 0.0]), torch.tensor([80.0, 2.0, 0.5])],  # a schedule may stop above 0
    ids=["karras", "one step", "no final zero"],
)
def test_draws_happen_exactly_where_sigma_next_is_positive(gmm, noise, sigmas):
    sig = sigmas.tolist()
    asked = _Recorded(noise.shape)
    fastdiff.sample(gmm, noise * sig[0], sigmas, solver="lcm", cond=_labels(64), noise_sampler=asked)
    assert asked.asked == [(a, b) for a, b in zip(sig, sig[1:]) if b > 0]
    plan = fastdiff.sampler.make_plan("lcm", sig)
    assert plan.draws == tuple((b > 0,) for b in sig[1:])
    assert LCM().stochastic and not LCM.ode


def test_it_is_registered_and_checks_its_options():
    assert fastdiff.SOLVERS["lcm"] is LCM and "lcm" not in fastdiff.ODE_SOLVERS
    assert repr(solvers.get("lcm")) == "LCM(sigma_min=0.0, boundary_scale=inf, sigma_data=0.5)"
    for options, message in [
        ({"sigma_min": -1.0}, "sigma_min must be >= 0"),
        ({"sigma_min": math.nan}, "sigma_min must be a finite real number"),
        ({"boundary_scale": 0.0}, "boundary_scale must be > 0"),
        ({"boundary_scale": math.nan}, "boundary_scale must be > 0"),
        ({"sigma_data": 0.0}, "sigma_data must be > 0"),
        ({"eta": 1.0}, "solver 'lcm' has no option eta"),
    ]:
        with pytest.raises(ValueError, match=message):
            solvers.get("lcm", **options)
    with pytest.raises(ValueError, match=r"lcm evaluates at sigma=0.001, below its sigma_min=0.002"):
        fastdiff.sample(lambda x, s: x, torch.ones(2, 2), [1.0, 0.001, 0.0], solver=solvers.get("lcm", **CODI))


# ------------------------------------------------------------------------------------------------------ TCD


def test_tcd_carries_its_estimates_back_on_the_training_grid():
    """sigma_s is the grid level of floor((1 - gamma) t), t the rounded timestep of sigma_next, never above
    sigma_next (below the grid it is sigma_next: DDIM); floats and tensors agree."""
    ab = solvers.consistency.sd_alphas_cumprod()
    grid = fastdiff.denoisers.VPDenoiser(None, ab)
    tcd = solvers.get("tcd", gamma=0.3)
    for t in (999, 500, 37, 1):
        sigma = float(grid.t_to_sigma(torch.tensor(float(t))))
        expected = float(grid.t_to_sigma(torch.tensor(float(math.floor(0.7 * t)))))
        assert tcd.sigma_s(sigma) == pytest.approx(expected, rel=1e-12)
        assert float(tcd.sigma_s(torch.tensor(sigma, dtype=torch.float64))) == pytest.approx(expected, rel=1e-12)
    assert tcd.sigma_s(0.01) == 0.01  # below the grid's lowest level
    assert solvers.get("tcd", gamma=0.0).sigma_s(3.0) == pytest.approx(3.0, rel=1e-9)


def test_tcd_with_gamma_zero_is_ddim_and_draws_nothing(gmm, noise):
    sigmas = schedules.karras(6, 0.05, 14.0)
    ddim = fastdiff.sample(gmm, noise * 14.0, sigmas, solver="ddim")
    tcd = fastdiff.sample(gmm, noise * 14.0, sigmas, solver=solvers.get("tcd", gamma=0.0),
                          noise_sampler=lambda s, t: pytest.fail("gamma = 0 draws nothing"))  # fmt: skip
    assert torch.allclose(tcd, ddim, rtol=1e-12, atol=1e-12)
    assert not solvers.get("tcd", gamma=0.0).stochastic and solvers.get("tcd").stochastic
    with pytest.raises(ValueError, match="gamma must lie in"):
        solvers.get("tcd", gamma=1.5)
