"""fastdiff reproduces diffusers' own schedulers on the same model and the same timesteps.

The model is the exact Gaussian mixture written as a discrete-time eps- or v-prediction network on Stable
Diffusion's ``scaled_linear`` beta schedule, so both sides call one smooth, real network. diffusers steps in
float32 and fastdiff in float64; over 10-16 steps float32 rounding moves samples of unit scale by about 1e-6,
so agreement to 5e-5 (max abs) leaves room for that and nothing else: a wrong coefficient shows up at 1e-3 or
more (the first-order and second-order variants of the same solver already differ by > 1e-2 here).
"""

import pytest
import torch

import fastdiff
from _vp_mixture import MixtureNet

from fastdiff import denoisers, solvers

diffusers = pytest.importorskip("diffusers")

TOL = 5e-5
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _noise(n=32):
    return torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(7))


def _run_diffusers(scheduler, net, steps, x):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x).prev_sample
    return x


CASES = [
    # (diffusers scheduler, its options, fastdiff solver, space of the scheduler's samples, steps)
    ("EulerDiscreteScheduler", {}, "euler", "ve", 10),
    ("HeunDiscreteScheduler", {}, "heun", "ve", 10),
    ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=True), "ddim", "vp", 10),
    (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero"),
        "dpmpp_2m",
        "vp",
        10,
    ),
    (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver++", solver_order=3, final_sigmas_type="zero"),
        "dpmpp_3m",
        "vp",
        16,
    ),
    (
        "UniPCMultistepScheduler",
        dict(solver_order=2, solver_type="bh2", final_sigmas_type="zero"),
        solvers.UniPC(order=2, variant="bh2"),
        "vp",
        10,
    ),
    (
        "UniPCMultistepScheduler",
        dict(solver_order=3, solver_type="bh2", final_sigmas_type="zero"),
        solvers.UniPC(order=3, variant="bh2"),
        "vp",
        16,
    ),
    # diffusers' bh1 returns NaN on a step to exactly 0 (B_h = -h = -inf times a zero residual), so bh1 is
    # compared on its other ending: a last step to the smallest training sigma.
    (
        "UniPCMultistepScheduler",
        dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"),
        solvers.UniPC(order=3, variant="bh1"),
        "vp",
        10,
    ),
]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("cls,opts,solver,space,steps", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_matches_diffusers(gmm, prediction, cls, opts, solver, space, steps):
    sched = getattr(diffusers, cls)(
        **BETAS,
        prediction_type="epsilon" if prediction == "eps" else "v_prediction",
        timestep_spacing="leading",
        steps_offset=1,
        **opts,
    )
    ab = sched.alphas_cumprod.double()
    net = MixtureNet(gmm, ab, prediction)
    x_init = _noise() * sched.init_noise_sigma
    expected = _run_diffusers(sched, net, steps, x_init.clone())

    den = denoisers.VPDenoiser(net, ab, prediction=prediction)
    sigmas = denoisers.discrete_sigmas(ab, sched.timesteps.round().long().unique_consecutive())
    if opts.get("final_sigmas_type") == "sigma_min":
        sigmas[-1] = den.sigma_min
    to_ve = lambda s: torch.sqrt(1 + s**2) if space == "vp" else 1.0  # noqa: E731
    got = fastdiff.sample(den, x_init.double() * to_ve(sigmas[0]), sigmas, solver=solver) / to_ve(sigmas[-1])
    assert (got - expected.double()).abs().max() < TOL


def test_parity_tolerance_detects_a_wrong_solver(gmm):
    """The tolerance is tight enough to tell DPM-Solver++(2M) from Euler on this problem."""
    sched = diffusers.DPMSolverMultistepScheduler(
        **BETAS, timestep_spacing="leading", steps_offset=1, final_sigmas_type="zero"
    )
    ab = sched.alphas_cumprod.double()
    net = MixtureNet(gmm, ab, "eps")
    expected = _run_diffusers(sched, net, 10, _noise())
    sigmas = denoisers.discrete_sigmas(ab, sched.timesteps)
    x = _noise().double() * torch.sqrt(1 + sigmas[0] ** 2)
    wrong = fastdiff.sample(denoisers.VPDenoiser(net, ab), x, sigmas, solver="euler")
    assert (wrong - expected.double()).abs().max() > 100 * TOL
