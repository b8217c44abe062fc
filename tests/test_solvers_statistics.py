"""The stochastic solvers sample the right distribution: on an exact Gaussian mixture, their samples reproduce each
component's weight, mean and covariance, and their distance to the data distribution shrinks to the sampling noise
as the steps grow. Interval guidance with a stochastic solver spends exactly the planned unconditional passes.

The mixture's components lie so far apart (at least 10 standard deviations from any midpoint) that assigning a
sample to its nearest mean misplaces none in practice, so the exact per-component moments are the mixture's own
parameters. Tolerances are in standard errors of the estimates over ``N`` samples."""

import math

import pytest
import torch

import fastdiff
from fastdiff import schedules
from fastdiff.models.gmm import GaussianMixture

MEANS = torch.tensor([[6.0, 0.0], [-3.0, 5.2], [-3.0, -5.2]], dtype=torch.float64)
STDS = torch.tensor([[0.5, 1.0], [0.8, 0.4], [0.6, 0.6]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
N = 20_000
# lcm is left out: it samples a consistency model's distribution, and the exact denoiser is not one. So is tcd:
# each step carries its estimates back by a fraction gamma of the timesteps with one DDIM step, whatever the step
# count, a first-order error that does not shrink as the steps grow (it is meant for few-step distilled models).
STOCHASTIC = sorted(n for n, c in fastdiff.SOLVERS.items() if not c.ode and n not in ("lcm", "tcd"))
FIRST_ORDER = {"euler_ancestral", "ddpm"}  # weak order 1: they need more steps to reach the same bias


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture(MEANS, STDS, WEIGHTS)


def _run(mixture, solver, steps, seed):
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 80.0
    noise = torch.Generator().manual_seed(seed + 1)
    return fastdiff.sample(mixture, x, schedules.karras(steps, 0.002, 80.0), solver=solver, generator=noise)


def _z_scores(x: torch.Tensor) -> dict[str, float]:
    """Each component's estimated weight, mean, variances and correlation against the exact values, in standard
    errors; the largest of each kind."""
    nearest = ((x[:, None, :] - MEANS[None]) ** 2).sum(-1).argmin(1)
    z = {"weight": 0.0, "mean": 0.0, "variance": 0.0, "covariance": 0.0}
    for k in range(len(MEANS)):
        xs = x[nearest == k]
        p, nk = len(xs) / len(x), WEIGHTS[k].item() * len(x)
        cov = xs.T.cov()
        var = STDS[k] ** 2
        z["weight"] = max(z["weight"], abs(p - WEIGHTS[k].item()) / math.sqrt(p * (1 - p) / len(x)))
        z["mean"] = max(z["mean"], ((xs.mean(0) - MEANS[k]).abs() / (STDS[k] / math.sqrt(nk))).max().item())
        z["variance"] = max(z["variance"], ((cov.diagonal() - var).abs() / (var * math.sqrt(2 / nk))).max().item())
        z["covariance"] = max(z["covariance"], cov[0, 1].abs().item() / (STDS[k].prod().item() / math.sqrt(nk)))
    return z


def _sliced_w1(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over 64 fixed directions of the 1-D Wasserstein-1 distance between the projections of x and y."""
    d = torch.randn(2, 64, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    d = d / d.norm(dim=0)
    return ((x @ d).sort(0).values - (y @ d).sort(0).values).abs().mean().item()


def test_the_moment_check_accepts_exact_draws_and_rejects_a_biased_sampler(mixture):
    """The check itself: exact draws pass it, and 10 Euler ancestral steps (visibly too few) fail it."""
    exact = mixture.sample(N, generator=torch.Generator().manual_seed(3))
    assert max(_z_scores(exact).values()) < 4.5
    assert max(_z_scores(_run(mixture, "euler_ancestral", 10, 0)).values()) > 20


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_samples_have_each_components_weight_mean_and_covariance(mixture, solver):
    steps = 384 if solver in FIRST_ORDER else 96
    z = _z_scores(_run(mixture, solver, steps, 0))
    assert max(z.values()) < 5.0, z


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_distribution_converges_as_the_steps_grow(mixture, solver):
    """Sliced Wasserstein distance to exact draws falls with the steps, down to the distance between two sets of
    exact draws (the sampling noise at N)."""
    exact = mixture.sample(N, generator=torch.Generator().manual_seed(7))
    floor = _sliced_w1(exact, mixture.sample(N, generator=torch.Generator().manual_seed(8)))
    ladder = (16, 64, 256) if solver in FIRST_ORDER else (8, 24, 96)
    dist = [_sliced_w1(_run(mixture, solver, steps, 10 + steps), exact) for steps in ladder]
    assert dist[0] > max(dist[1], 3 * floor) and dist[2] < 2.5 * floor, (dist, floor)


@pytest.mark.parametrize("solver", STOCHASTIC)
def test_interval_guidance_spends_the_planned_unconditional_passes(gmm, solver):
    """A counting model sees the unconditional rows (label -1) exactly on the steps whose sigma lies in the
    interval, once per evaluation of those steps, batched or not; the stochastic draws change nothing."""
    sig = schedules.karras(14, 0.002, 80.0)
    interval = (0.3, 3.0)
    expected_steps = [i for i, s in enumerate(sig[:-1].tolist()) if interval[0] < s <= interval[1]]
    plan = fastdiff.sampler.make_plan(solver, sig.tolist(), fastdiff.Guidance(2.0, interval=interval))
    expected_uncond = sum(plan.evaluations[i] for i in expected_steps)
    for batch in (True, False):
        seen = {"cond": 0, "uncond": 0}

        def counting(x, sigma, class_labels=None, seen=seen):
            unc = int((class_labels == -1).sum())
            seen["uncond"] += unc // 4
            seen["cond"] += (len(class_labels) - unc) // 4
            return gmm(x, sigma, class_labels=class_labels)

        g = fastdiff.Guidance(2.0, interval=interval, batch=batch)
        y = torch.arange(4) % 4
        x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
        sampler = fastdiff.Sampler(counting, solver=solver, sigmas=sig, guidance=g)
        sampler.sample(x, {"class_labels": y}, {"class_labels": torch.full_like(y, -1)},
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert sampler.stats().guided_steps == expected_steps
        assert (seen["cond"], seen["uncond"]) == (sum(plan.evaluations), expected_uncond) == sampler.nfe
        assert expected_uncond >= len(expected_steps) > 0


def test_default_noise_is_one_brownian_path_over_a_steps_nested_intervals():
    """BrownianDraws: (a, s) then (a, b) are normalised increments of one path, correlated sqrt(|s-a| / |b-a|);
    any other interval is a fresh draw; one fresh draw per call either way."""
    calls = []

    def fresh():
        calls.append(1)
        return torch.randn(200_000, generator=gen, dtype=torch.float64)

    gen = torch.Generator().manual_seed(0)
    draws = fastdiff.sampler.BrownianDraws(fresh)
    z1, z2 = draws(2.0, 1.5), draws(2.0, 0.5)  # DPM-Solver++ SDE's two queries
    z3 = draws(0.5, 0.2)
    assert len(calls) == 3
    for z in (z1, z2, z3):
        assert abs(z.std().item() - 1) < 0.01
    assert abs((z1 * z2).mean().item() - math.sqrt(0.5 / 1.5)) < 0.01
    assert abs((z2 * z3).mean().item()) < 0.01
    assert abs((z1 * draws(1.5, 0.5)).mean().item()) < 0.01  # a different start: fresh


def test_dpmpp_sde_needs_the_brownian_draws(mixture):
    """Independent draws for its two stages bias dpmpp_sde's variances; the default noise does not."""
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80.0
    gen = torch.Generator().manual_seed(1)
    independent = lambda sigma, sigma_next: torch.randn(N, 2, generator=gen, dtype=torch.float64)  # noqa: E731
    out = fastdiff.sample(mixture, x, schedules.karras(96, 0.002, 80.0), solver="dpmpp_sde", noise_sampler=independent)
    assert _z_scores(out)["variance"] > 5.0
