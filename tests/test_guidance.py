"""Limited-interval guidance: exact NFE accounting, endpoints, equivalences, and the guided ODE itself."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import Guidance, schedules
from fastdiff.ode import reference_sample


class Spy:
    """Wraps a model and records (sigma, class label of the first sample, batch size) of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, sigma, class_labels=None):
        label = None if class_labels is None else int(torch.as_tensor(class_labels).reshape(-1)[0])
        self.calls.append((float(sigma[0]), label, x.shape[0]))
        return self.model(x, sigma, class_labels=class_labels)


def _labels(n):
    return {"class_labels": torch.arange(n) % 4}


@pytest.mark.parametrize("solver", sorted(fastdiff.SOLVERS))
def test_uncond_nfe_matches_plan(gmm, noise, solver):
    s = schedules.karras(12, 0.002, 80.0)
    g = Guidance(2.0, interval=(0.3, 3.0))
    plan = g.plan(s)
    spy = Spy(gmm)
    _, stats = fastdiff.sample(spy, noise, s, solver=solver, guidance=g, cond=_labels(64), return_stats=True)
    per_step = fastdiff.solvers.get(solver).evaluations(s.tolist())
    assert stats.guided_steps == [i for i, p in enumerate(plan) if p]
    assert stats.nfe_uncond == sum(n for n, p in zip(per_step, plan) if p)
    two = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}  # two a step, one on the last
    assert stats.nfe_cond == sum(per_step) == (2 * 12 - 1 if solver in two else 12)
    assert stats.nfe_uncond == sum(1 for _, label, _ in spy.calls if label is None)
    assert fastdiff.count_nfe(solver, s, g) == (stats.nfe_cond, stats.nfe_uncond)


def test_edm2_interval_on_32_heun_steps_needs_14_uncond_evaluations(gmm, noise):
    # PAPERS.md: EDM2-S interval (0.28, 2.90] on 32 Heun steps, sigma 0.002..80, rho 7: 14 of 63 evaluations.
    s = schedules.karras(32, 0.002, 80.0, rho=7.0)
    g = Guidance(2.1, interval=(0.28, 2.90))
    _, stats = fastdiff.sample(gmm, noise, s, solver="heun", guidance=g, cond=_labels(64), return_stats=True)
    assert (stats.nfe_cond, stats.nfe_uncond) == (63, 14)


def test_interval_endpoints(gmm, noise):
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    # (lo, hi] on the step's start sigma: 3.0 is in, 1.0 is out.
    assert Guidance(2.0, interval=(1.0, 3.0)).plan(s) == [False, True, True, False, False]
    assert Guidance(2.0, interval=(0.0, 100.0)).plan(s) == [True] * 5
    assert Guidance(2.0, interval=(2.0, 2.0)).plan(s) == [False] * 5
    assert Guidance(2.0, steps=(1, 3)).plan(s) == [False, True, True, True, False]
    assert Guidance(2.0).plan(s) == [True] * 5


def test_heun_uses_the_start_decision_for_both_stages(gmm, noise):
    s = torch.tensor([4.0, 3.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    spy = Spy(gmm)
    fastdiff.sample(spy, noise, s, solver="heun", guidance=Guidance(2.0, interval=(2.0, 3.5)), cond=_labels(64))
    uncond_sigmas = [sig for sig, label, _ in spy.calls if label is None]
    # Step 1 starts at 3.0 (inside) and ends at 1.0 (outside): both of its evaluations are guided.
    assert uncond_sigmas == [3.0, 1.0]


def test_scale_one_equals_no_guidance(gmm, noise):
    s = schedules.karras(8, 0.002, 80.0)
    a, st = fastdiff.sample(gmm, noise, s, guidance=Guidance(1.0), cond=_labels(64), return_stats=True)
    b = fastdiff.sample(gmm, noise, s, cond=_labels(64))
    assert torch.equal(a, b) and st.nfe_uncond == 0


def test_batched_and_separate_passes_agree(gmm, noise):
    s = schedules.karras(8, 0.002, 80.0)
    cond, uncond = _labels(64), {"class_labels": torch.full((64,), -1)}
    kw = dict(cond=cond, uncond=uncond, return_stats=True, solver="heun")
    a, sa = fastdiff.sample(gmm, noise, s, guidance=Guidance(3.0, batch=True), **kw)
    b, sb = fastdiff.sample(gmm, noise, s, guidance=Guidance(3.0, batch=False), **kw)
    assert torch.allclose(a, b, atol=1e-12)
    assert (sa.nfe_cond, sa.nfe_uncond) == (sb.nfe_cond, sb.nfe_uncond)
    assert sa.forward_calls == sa.nfe_cond and sb.forward_calls == sb.nfe
    # Keyword sets that differ cannot be concatenated: two calls, same answer as the null-class batch.
    c, sc = fastdiff.sample(gmm, noise, s, guidance=Guidance(3.0), cond=cond, return_stats=True, solver="heun")
    assert torch.allclose(a, c, atol=1e-12) and sc.forward_calls == sc.nfe


def test_separate_unconditional_model(gmm, noise):
    s = schedules.karras(8, 0.002, 80.0)
    small = Spy(gmm)
    g = Guidance(2.0, interval=(0.5, 10.0), uncond_model=small)
    out, stats = fastdiff.sample(gmm, noise, s, guidance=g, cond=_labels(64), return_stats=True)
    assert len(small.calls) == stats.nfe_uncond == sum(g.plan(s)) > 0
    same = fastdiff.sample(gmm, noise, s, guidance=Guidance(2.0, interval=(0.5, 10.0)), cond=_labels(64))
    assert torch.allclose(out, same, atol=1e-12)


def test_guided_sampling_converges_to_the_guided_ode(gmm, noise):
    s = schedules.karras(128, 0.002, 80.0)
    g = Guidance(2.5, interval=(0.3, 3.0))
    x = noise * 80.0
    out = fastdiff.sample(gmm, x, s, solver="dpmpp_2m", guidance=g, cond=_labels(64))
    ref = reference_sample(gmm, x, s, guidance=g, cond=_labels(64))
    assert (out - ref).norm(dim=1).mean() < 2e-3


@pytest.mark.parametrize("solver,order", [("dpmpp_2m", 2.0), ("unipc", 2.5), ("ipndm", 2.5)])
def test_multistep_solvers_keep_their_order_under_interval_guidance(gmm, noise, solver, order):
    x, cond = noise[:32] * 80.0, _labels(32)
    steps = [24, 48, 96, 192]
    errs = {True: [], False: []}
    for n in steps:
        s = schedules.karras(n, 0.002, 80.0)
        ref = reference_sample(gmm, x, s, guidance=Guidance(3.0, interval=(0.3, 3.0)), cond=cond)
        for restart in (True, False):
            g = Guidance(3.0, interval=(0.3, 3.0), restart=restart)
            out = fastdiff.sample(gmm, x, s, solver=solver, guidance=g, cond=cond)
            errs[restart].append((out - ref).norm(dim=1).mean().item())
    slope = lambda e: -float(np.polyfit(np.log(steps), np.log(e), 1)[0])  # noqa: E731
    assert slope(errs[True]) > order - 0.2, errs[True]
    # Without the restart the finest step pair converges at first order: history crosses the switch.
    last = np.log(errs[False][-2] / errs[False][-1]) / np.log(2)
    assert last < 1.5 and errs[True][-1] < errs[False][-1] / 2, errs


def test_guidance_errors():
    with pytest.raises(ValueError, match="sigma_lo=3.0 > sigma_hi=1.0"):
        Guidance(2.0, interval=(3.0, 1.0))
    with pytest.raises(ValueError, match="start=4 > stop=2"):
        Guidance(2.0, steps=(4, 2))
    with pytest.raises(ValueError, match="one form"):
        Guidance(2.0, interval=(0.1, 1.0), steps=(0, 1))
    with pytest.raises(ValueError, match="finite real number"):
        Guidance(float("nan"))
    with pytest.raises(ValueError, match="must be a pair"):
        Guidance(2.0, interval=0.5)


def test_guidance_without_cond_is_refused(gmm, noise):
    with pytest.raises(ValueError, match="guidance needs cond"):
        fastdiff.sample(gmm, noise, schedules.karras(4, 0.1, 10.0), guidance=Guidance(2.0))


def test_numpy_and_0d_tensor_scales_are_numbers():
    g = Guidance(np.float32(2.0), interval=(np.float64(0.3), torch.tensor(3.0)))
    assert g.scale == 2.0 and type(g.scale) is float and g.interval == (0.3, 3.0)
    assert Guidance(torch.tensor(2), steps=(np.int64(1), np.int32(3))).steps == (1, 3)
    assert repr(Guidance(np.float16(1.5))) == "Guidance(scale=1.5, everywhere)"


@pytest.mark.parametrize("bad", [True, np.bool_(True), "2", torch.ones(2), torch.tensor(True), 2j])
def test_non_numbers_are_refused_as_scales(bad):
    with pytest.raises(ValueError, match="guidance scale must be a real number"):
        Guidance(bad)


def test_bools_are_not_interval_bounds():
    with pytest.raises(ValueError, match=r"guidance interval\[1\] must be a real number"):
        Guidance(2.0, interval=(0.0, True))


def test_negative_scale_warns_but_runs(gmm, noise):
    s = schedules.karras(4, 0.1, 10.0)
    with pytest.warns(UserWarning, match="guidance scale -1 is negative"):
        g = Guidance(-1.0)
    out = fastdiff.sample(gmm, noise, s, guidance=g, cond=_labels(64))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------ the three forms of guided steps


@pytest.mark.parametrize("n", [1, 7, 10, 23])
def test_fractions_select_the_steps_diffusers_guider_selects(n):
    """Guidance(fractions=(start, stop)) guides the steps diffusers' ClassifierFreeGuidance(start=, stop=) enables
    (int(start N) <= i < int(stop N)), for a grid of fractions including the ones where float rounding bites."""
    diffusers = pytest.importorskip("diffusers")
    sigmas = schedules.karras(n, 0.002, 80.0)
    for start in (0.0, 0.1, 0.2, 0.3, 0.35, 0.5, 0.7, 0.99):  # diffusers takes start < 1
        for stop in (start, 0.3, 0.6, 0.7, 0.9, 1.0):
            if stop < start:
                continue
            guider = diffusers.ClassifierFreeGuidance(guidance_scale=5.0, start=start, stop=stop)
            enabled = []
            for i in range(n):
                guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(999))
                enabled.append(guider._is_cfg_enabled())
            assert Guidance(5.0, fractions=(start, stop)).plan(sigmas) == enabled, (start, stop)


def test_the_three_forms_convert_into_each_other():
    """On a schedule, a sigma interval, a step range and diffusers' fractions describe the same guided steps, and
    each converter's output gives the plan of its input."""
    from fastdiff.guidance import fractions_to_steps, interval_to_steps, steps_to_fractions, steps_to_interval

    for n in (3, 10, 32):
        sigmas = schedules.karras(n, 0.002, 80.0)
        for start in range(n):
            for stop in range(start, n):
                plan = Guidance(3.0, steps=(start, stop)).plan(sigmas)
                interval = steps_to_interval((start, stop), sigmas)
                fractions = steps_to_fractions((start, stop), n)
                assert Guidance(3.0, interval).plan(sigmas) == plan
                assert Guidance(3.0, fractions=fractions).plan(sigmas) == plan
                assert interval_to_steps(interval, sigmas) == (start, stop)
                assert fractions_to_steps(fractions, n) == (start, stop)
    sigmas = schedules.karras(10, 0.002, 80.0)
    guided = [i for i, s in enumerate(sigmas.tolist()[:-1]) if 0.28 < s <= 5.42]  # EDM2's interval
    assert interval_to_steps((0.28, 5.42), sigmas) == (guided[0], guided[-1]) and len(guided) > 1
    assert interval_to_steps((100.0, 200.0), sigmas) is None
    assert fractions_to_steps((0.5, 0.5), 10) is None
    assert not any(Guidance(3.0, fractions=(0.5, 0.5)).plan(sigmas))


def test_one_form_at_a_time_and_bad_fractions():
    with pytest.raises(ValueError, match="one form.*not interval and fractions"):
        Guidance(3.0, (0.1, 1.0), fractions=(0.0, 0.5))
    with pytest.raises(ValueError, match="not steps and fractions"):
        Guidance(3.0, steps=(0, 2), fractions=(0.0, 0.5))
    for bad in ((0.5, 0.2), (-0.1, 0.5), (0.0, 1.5)):
        with pytest.raises(ValueError, match="0 <= start <= stop <= 1"):
            Guidance(3.0, fractions=bad)
    from fastdiff.guidance import steps_to_interval

    with pytest.raises(ValueError, match="go past"):
        steps_to_interval((2, 10), schedules.karras(10, 0.002, 80.0))
    assert repr(Guidance(3.0, fractions=(0.1, 0.6))) == "Guidance(scale=3.0, fractions=(0.1, 0.6))"
