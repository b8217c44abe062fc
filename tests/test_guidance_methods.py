"""Guidance methods beyond plain CFG (fastdiff.guidance.guided_estimate): each against its defining equation, as
diffusers' guiders implement it, on random tensors in float64; their neutral options give plain CFG; and each runs
in every loop, under an interval, with the NFE of plain CFG."""

import pytest
import torch

import fastdiff
from fastdiff import Guidance, schedules
from fastdiff.guidance import guided_estimate, zero_velocity_estimate
from fastdiff.ode import reference_sample

diffusers = pytest.importorskip("diffusers")
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance  # noqa: E402
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale  # noqa: E402
from diffusers.guiders.guider_utils import rescale_noise_cfg  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

W = 4.0


def _tensors(seed=0, shape=(5, 3, 7, 6)):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.rand(shape[0], generator=g, dtype=torch.float64) * 5 + 0.1
    d_c, d_u = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    x = d_c + sigma.reshape(-1, 1, 1, 1) * torch.randn(shape, generator=g, dtype=torch.float64)
    return x, sigma, d_c, d_u


def _b(sigma):
    return sigma.reshape(-1, 1, 1, 1)


def _v_prediction(x, sigma, d):  # the VP v-prediction, written out: alpha eps - sigma_vp x0
    s = _b(sigma)
    alpha, sigma_vp = 1 / (1 + s**2) ** 0.5, s / (1 + s**2) ** 0.5
    return alpha * (x - d) / s - sigma_vp * d


def _flow_velocity(x, sigma, d):  # eps - x0
    return (x - d) / _b(sigma) - d


def test_rescale_is_diffusers_rescale_noise_cfg_on_v_predictions():
    x, sigma, d_c, d_u = _tensors()
    for phi in (0.0, 0.3, 0.7, 1.0):
        ours = guided_estimate(Guidance(W, method="rescale", phi=phi), x, sigma, d_c, d_u, {})
        v_cfg = _v_prediction(x, sigma, d_u + W * (d_c - d_u))
        expected = rescale_noise_cfg(v_cfg, _v_prediction(x, sigma, d_c), guidance_rescale=phi)
        torch.testing.assert_close(_v_prediction(x, sigma, ours), expected, rtol=1e-12, atol=1e-12)
    full = guided_estimate(Guidance(W, method="rescale", phi=1.0), x, sigma, d_c, d_u, {})
    torch.testing.assert_close(_v_prediction(x, sigma, full).std(dim=(1, 2, 3)),
                               _v_prediction(x, sigma, d_c).std(dim=(1, 2, 3)))  # fmt: skip


@pytest.mark.parametrize("eta,norm_threshold,momentum", [(0.0, None, None), (0.5, 2.0, None), (0.0, 3.0, -0.5),
                                                         (1.0, None, 0.3)])  # fmt: skip
def test_apg_is_diffusers_normalized_guidance_in_the_papers_form(eta, norm_threshold, momentum):
    """APG: D_c + (w - 1)(dD_perp + eta dD_par), i.e. diffusers' normalized_guidance with guidance_scale w - 1
    and its original formulation; the momentum runs over successive guided evaluations."""
    g = Guidance(W, method="apg", eta=eta, norm_threshold=norm_threshold, momentum=momentum)
    buffer = MomentumBuffer(momentum) if momentum is not None else None
    state = {}
    for seed in range(3):
        x, sigma, d_c, d_u = _tensors(seed)
        ours = guided_estimate(g, x, sigma, d_c, d_u, state)
        expected = normalized_guidance(d_c, d_u, W - 1, buffer, eta, norm_threshold or 0.0,
                                       use_original_formulation=True)  # fmt: skip
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_apg_without_its_parallel_part_moves_orthogonally_to_the_conditional_estimate():
    x, sigma, d_c, d_u = _tensors()
    out = guided_estimate(Guidance(W, method="apg", eta=0.0), x, sigma, d_c, d_u, {})
    dot = ((out - d_c) * d_c).sum(dim=(1, 2, 3))
    assert dot.abs().max() < 1e-10 * (out - d_c).norm() * d_c.norm()


def test_cfg_zero_star_is_diffusers_on_flow_velocities_with_the_optimal_scale():
    x, sigma, d_c, d_u = _tensors()
    ours = guided_estimate(Guidance(W, method="cfg_zero_star"), x, sigma, d_c, d_u, {})
    v_c, v_u = _flow_velocity(x, sigma, d_c), _flow_velocity(x, sigma, d_u)
    s = cfg_zero_star_scale(v_c.flatten(1), v_u.flatten(1)).reshape(-1, 1, 1, 1)  # diffusers computes in float32
    torch.testing.assert_close(_flow_velocity(x, sigma, ours), s * v_u + W * (v_c - s * v_u), rtol=1e-5, atol=1e-5)
    # s* minimises |v_c - s v_u|^2: the derivative in s is 0 there
    s64 = (v_c * v_u).sum(dim=(1, 2, 3)) / (v_u * v_u).sum(dim=(1, 2, 3))
    grad = -2 * ((v_c - s64.reshape(-1, 1, 1, 1) * v_u) * v_u).sum(dim=(1, 2, 3))
    assert grad.abs().max() < 1e-9 * v_c.norm() * v_u.norm()
    assert torch.equal(_flow_velocity(x, sigma, zero_velocity_estimate(x, _b(sigma))).abs().max() < 1e-12,
                       torch.tensor(True))  # fmt: skip


@pytest.mark.parametrize("method,options", [("rescale", {"phi": 0.0}), ("apg", {"eta": 1.0})])
def test_neutral_options_are_plain_cfg(gmm, noise, method, options):
    x, sigma, d_c, d_u = _tensors()
    g = Guidance(W, method=method, **options)
    assert g.plain
    torch.testing.assert_close(guided_estimate(g, x, sigma, d_c, d_u, {}), d_u + W * (d_c - d_u),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    s = schedules.karras(8, 0.002, 80.0)
    cond, uncond = _labels(64)
    plain = fastdiff.sample(gmm, noise * 80, s, guidance=Guidance(W, interval=(0.3, 5.0)), cond=cond, uncond=uncond)
    same = fastdiff.sample(gmm, noise * 80, s, guidance=Guidance(W, (0.3, 5.0), method=method, **options),
                           cond=cond, uncond=uncond)  # fmt: skip
    assert torch.equal(plain, same)


def _labels(n):
    y = torch.arange(n) % 3
    return {"class_labels": y}, {"class_labels": torch.full_like(y, -1)}


METHODS = [
    ("rescale", {"phi": 0.7}),
    ("apg", {"eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5}),
    ("cfg_zero_star", {"zero_init_steps": 2}),
]


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "unipc"])
@pytest.mark.parametrize("method,options", METHODS)
def test_methods_run_in_every_loop_with_the_nfe_of_cfg(gmm, noise, solver, method, options):
    """Under an interval: the same evaluations as plain CFG (counted), Sampler (the device table) equal to
    sample, and a result that differs from plain CFG's."""
    s = schedules.karras(10, 0.002, 80.0)
    cond, uncond = _labels(64)
    g = Guidance(W, interval=(0.3, 10.0), method=method, **options)
    out, stats = fastdiff.sample(gmm, noise * 80, s, solver=solver, guidance=g, cond=cond, uncond=uncond,
                                 return_stats=True)  # fmt: skip
    assert (stats.nfe_cond, stats.nfe_uncond) == fastdiff.count_nfe(solver, s, g) == fastdiff.count_nfe(
        solver, s, Guidance(W, interval=(0.3, 10.0)))  # fmt: skip
    sampler = fastdiff.Sampler(gmm, solver=solver, sigmas=s, guidance=g)
    torch.testing.assert_close(sampler.sample(noise * 80, cond, uncond), out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sampler.sample(noise * 80, cond, uncond), out, rtol=1e-10, atol=1e-10)  # state reset
    plain = fastdiff.sample(gmm, noise * 80, s, solver=solver, guidance=Guidance(W, interval=(0.3, 10.0)),
                            cond=cond, uncond=uncond)  # fmt: skip
    assert not torch.allclose(out, plain, atol=1e-3)


def test_zero_init_keeps_the_flow_state_on_its_first_steps(gmm, noise):
    """CFG-Zero*'s zero-init with Euler: the flow state x / (1 + sigma) does not move on the first steps."""
    s = schedules.karras(8, 0.002, 80.0)
    cond, uncond = _labels(64)
    seen = []
    fastdiff.sample(gmm, noise * 80, s, solver="euler", guidance=Guidance(W, method="cfg_zero_star", zero_init_steps=3),
                    cond=cond, uncond=uncond, callback=seen.append)  # fmt: skip
    for row in seen[:3]:
        torch.testing.assert_close(row["x_next"] / (1 + row["sigma_next"]), row["x"] / (1 + row["sigma"]))
    assert not torch.allclose(seen[3]["x_next"] / (1 + seen[3]["sigma_next"]), seen[3]["x"] / (1 + seen[3]["sigma"]))


def test_memoryless_methods_converge_to_their_guided_ode(gmm, noise):
    """CFG-Zero* without zero-init is a function of (x, sigma): finer solves approach the reference ODE solve of
    the same guided estimate. (So is rescale, but on this 2-D mixture a sample's standard deviation is that of two
    numbers, which can be near 0, and its ratio makes the ODE stiff for a few samples.) APG's momentum and
    zero-init are refused by the reference."""
    cond, uncond = _labels(16)
    g = Guidance(2.5, (0.3, 3.0), method="cfg_zero_star")
    x = noise[:16] * 80
    errors = []
    for n in (48, 96):
        s = schedules.karras(n, 0.002, 80.0)
        out = fastdiff.sample(gmm, x, s, solver="dpmpp_2m", guidance=g, cond=cond, uncond=uncond)
        ref = reference_sample(gmm, x, s, guidance=g, cond=cond, uncond=uncond)
        errors.append((out - ref).norm(dim=1).mean().item())
    assert errors[1] < 0.5 * errors[0] and errors[1] < 5e-3, errors
    for refused in (Guidance(2.5, method="apg", momentum=-0.5), Guidance(0.5, method="cfg_pp")):
        with pytest.raises(ValueError, match="momentum, CFG-Zero.* and CFG\\+\\+ depend on the steps"):
            reference_sample(gmm, noise * 80, schedules.karras(8, 0.002, 80.0), guidance=refused, cond=cond,
                             uncond=uncond)  # fmt: skip


def test_options_belong_to_their_method():
    with pytest.raises(ValueError, match="phi belongs to method='rescale', not method='apg'"):
        Guidance(W, method="apg", phi=0.5)
    with pytest.raises(ValueError, match="must be one of cfg, rescale, apg, cfg_zero_star"):
        Guidance(W, method="cfg++")
    with pytest.raises(ValueError, match="norm_threshold must be > 0"):
        Guidance(W, method="apg", norm_threshold=0.0)
    with pytest.raises(ValueError, match="zero_init_steps must be an integer >= 0"):
        Guidance(W, method="cfg_zero_star", zero_init_steps=-1)
    g = Guidance(W, (0.3, 3.0), method="apg", momentum=-0.5)
    assert repr(g) == ("Guidance(scale=4.0, interval=(0.3, 3.0), method='apg', eta=0.0, norm_threshold=None, "
                       "momentum=-0.5)")  # fmt: skip
    assert not g.plain and Guidance(W).plain
