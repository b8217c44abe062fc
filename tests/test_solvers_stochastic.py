"""The stochastic solvers against their peers, through fastdiff.sample and fastdiff.Sampler.

k-diffusion's samplers (the installed package, imported) run on the same inputs with the same noise: a noise sampler
that draws a fresh seeded normal per call and records the ``(sigma, sigma_next)`` it is asked for, so the results
agree to float64 rounding and the draws are asked for at the same intervals; and, for the samplers whose default
noise is ``torch.randn_like``, the global generator, seeded alike. ComfyUI's ``ddpm`` and ``er_sde`` (ComfyUI is not
installed) are checked against their update equations written out below as plain float64 loops.
"""

import math

import pytest
import torch

import fastdiff
from fastdiff import schedules, solvers

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = 1e-10  # float64 throughout: the loops agree to rounding (~1e-14); a wrong coefficient shows at 1e-3
SCHEDULES = {
    "karras5": schedules.karras(5, 0.002, 80.0),
    "karras12": schedules.karras(12, 0.002, 80.0),
    "open": schedules.karras(8, 0.05, 20.0)[:-1],  # ends at 0.05: no step to 0
}


class Fresh:
    """A noise sampler: a fresh seeded standard normal per call; records the intervals it is asked for."""

    def __init__(self, shape, seed=0):
        self.shape, self.generator, self.calls = shape, torch.Generator().manual_seed(seed), []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float64)


class Counted:
    """A model that counts its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return self.model(x, sigma, **kwargs)


def _rel(got, ref):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ----------------------------------------------------------------------------------------- against k-diffusion

# (fastdiff solver = k-diffusion's sample_<name>, options): defaults, other eta/s_noise/r, eta = 0 (draws made and
# multiplied by 0) and eta = 1.1 (on karras12 the last five steps put all of sigma_next into the noise, where
# DPM-2 and 2S ancestral fall back to one Euler step and DPM-2 ancestral draws nothing; on karras5 every step does).
K_CASES = [
    ("euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("euler_ancestral", {"eta": 1.1}),
    ("euler_ancestral", {"eta": 0.0}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"eta": 0.7, "s_noise": 1.2, "solver_type": "heun"}),
    ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 1.1}),
    ("dpm_2_ancestral", {}),
    ("dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.8}),
    ("dpm_2_ancestral", {"eta": 1.1}),
    ("dpm_2_ancestral", {"eta": 0.0}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.5, "s_noise": 1.3}),
    ("dpmpp_2s_ancestral", {"eta": 1.1}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}),
    ("dpmpp_sde", {}),
    ("dpmpp_sde", {"eta": 0.5, "r": 0.3}),
    ("dpmpp_sde", {"s_noise": 0.7, "r": 1.0}),
    ("dpmpp_sde", {"eta": 1.1}),
    ("dpmpp_sde", {"eta": 0.0}),
]


def _case_id(case):
    name, opts = case
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", K_CASES, ids=_case_id)
def test_equals_k_diffusion_given_the_noise(k_diffusion, gmm, noise, case, schedule):
    name, opts = case
    sig = SCHEDULES[schedule]
    x = noise * sig[0]
    theirs = Fresh(x.shape)
    ref = getattr(k_diffusion, f"sample_{name}")(gmm, x, sig, disable=True, noise_sampler=theirs, **opts)
    solver = solvers.get(name, **opts)
    ours = Fresh(x.shape)
    assert _rel(fastdiff.sample(gmm, x, sig, solver=solver, noise_sampler=ours), ref) <= TIGHT
    assert ours.calls == theirs.calls  # the same intervals, bitwise, in the same order
    ours = Fresh(x.shape)
    assert _rel(fastdiff.Sampler(gmm, solver=solver, sigmas=sig).sample(x, noise_sampler=ours), ref) <= TIGHT
    assert ours.calls == theirs.calls


def test_dpmpp_sde_asks_for_off_schedule_intervals(gmm, noise):
    # Two draws a step above 0: (sigma(t), sigma(s)) and (sigma(t), sigma(t_next)), with t = -log sigma, so
    # sigma(s) lies between the schedule's levels and sigma(t) is exp(log sigma), within rounding of sigma.
    sig = SCHEDULES["karras5"]
    ns = Fresh(noise.shape)
    fastdiff.sample(gmm, noise * sig[0], sig, solver=solvers.get("dpmpp_sde", r=0.3), noise_sampler=ns)
    host = sig.tolist()
    assert len(ns.calls) == 2 * 4
    for i in range(4):
        (t0, s), (t1, t_next) = ns.calls[2 * i : 2 * i + 2]
        assert t0 == t1 == pytest.approx(host[i], rel=1e-15) and t_next == pytest.approx(host[i + 1], rel=1e-15)
        assert s == pytest.approx(host[i] ** 0.7 * host[i + 1] ** 0.3, rel=1e-14)  # r = 0.3 of the way in log sigma


# k-diffusion's default noise for these is one torch.randn_like(x) per draw from the global generator.
DEFAULT_NOISE = [
    ("euler_ancestral", {}),
    ("dpm_2_ancestral", {}),
    ("dpm_2_ancestral", {"eta": 1.1}),
    ("dpm_2_ancestral", {"eta": 0.0}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 1.1, "s_noise": 0.8}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}),
]


# float32 is k-diffusion's usual setting. The mixture's posterior is sharp near sigma_min, so rounding is amplified:
# with the same noise, k-diffusion's own float32 run differs from its float64 run by up to 3.5e-6 on karras12 (1.5e-5
# on karras5), fastdiff's float32 run (coefficients formed in float64) by up to 1.8e-6; the seeded runs measured
# up to 6e-6 apart. Other draws, or draws in another order, differ by O(1).
@pytest.mark.parametrize("dtype,schedule,tol", [(torch.float64, "karras5", TIGHT), (torch.float64, "karras12", TIGHT),
                                                (torch.float32, "karras12", 2e-5)])  # fmt: skip
@pytest.mark.parametrize("case", DEFAULT_NOISE, ids=_case_id)
def test_default_noise_is_k_diffusions_randn_like(k_diffusion, gmm, noise, case, dtype, schedule, tol):
    name, opts = case
    sig = SCHEDULES[schedule].to(dtype)
    x = noise.to(dtype) * sig[0]
    torch.manual_seed(5)
    ref = getattr(k_diffusion, f"sample_{name}")(gmm, x, sig, disable=True, **opts)
    after = torch.randn(4)  # the generator's state after the run: the same number of draws
    solver = solvers.get(name, **opts)
    torch.manual_seed(5)
    assert _rel(fastdiff.sample(gmm, x, sig, solver=solver), ref) <= tol
    assert torch.equal(torch.randn(4), after)
    torch.manual_seed(5)
    assert _rel(fastdiff.Sampler(gmm, solver=solver, sigmas=sig).sample(x), ref) <= tol
    assert torch.equal(torch.randn(4), after)


# ------------------------------------------------------------------- ComfyUI's ddpm and er_sde, written out here


def _den(model, x, sigma):
    return model(x, torch.full((x.shape[0],), sigma, dtype=x.dtype))


def ref_ddpm(model, x, sig, noise):
    """ComfyUI's sample_ddpm: DDPM's ancestral step in the variance-preserving form of an eps model."""
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        eps = (x - _den(model, x, s)) / s
        abar, abar_next = 1 / (1 + s**2), 1 / (1 + s_next**2)
        alpha = abar / abar_next
        mu = (x / math.sqrt(1 + s**2) - (1 - alpha) * eps / math.sqrt(1 - abar)) / math.sqrt(alpha)
        if s_next > 0:
            mu = mu + math.sqrt((1 - alpha) * (1 - abar_next) / (1 - abar)) * noise(s, s_next)
            mu = mu * math.sqrt(1 + s_next**2)
        x = mu
    return x


def _psi(lam):
    return lam * (math.exp(lam**0.3) + 10.0)


def ref_er_sde(model, x, sig, noise, s_noise=1.0, max_stage=3):
    """ComfyUI's sample_er_sde for an eps (VE) model, lambda = sigma and alpha = 1, with its default noise scaler."""
    old = old_d = None
    for i in range(len(sig) - 1):
        s, t = sig[i], sig[i + 1]
        den = _den(model, x, s)
        stage = min(max_stage, i + 1)
        if t == 0:
            x = den
        else:
            r = _psi(t) / _psi(s)
            x = r * x + (1 - r) * den
            if stage >= 2:
                dt = t - s
                step = -dt / 200
                pts = [t + k * step for k in range(200)]
                d = (den - old) / (s - sig[i - 1])
                x = x + (dt + sum(1 / _psi(p) for p in pts) * step * _psi(t)) * d
                if stage >= 3:
                    u = (d - old_d) / ((s - sig[i - 2]) / 2)
                    x = x + (dt**2 / 2 + sum((p - s) / _psi(p) for p in pts) * step * _psi(t)) * u
                old_d = d
            if s_noise > 0:
                x = x + noise(s, t) * s_noise * math.sqrt(max(t**2 - s**2 * r**2, 0.0))
        old = den
    return x


COMFY_CASES = [
    ("ddpm", {}, ref_ddpm),
    ("er_sde", {}, ref_er_sde),
    ("er_sde", {"s_noise": 0.6}, ref_er_sde),
    ("er_sde", {"max_stage": 2}, ref_er_sde),
    ("er_sde", {"max_stage": 1, "s_noise": 1.4}, ref_er_sde),
    ("er_sde", {"s_noise": 0.0}, ref_er_sde),
]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", COMFY_CASES, ids=lambda c: _case_id(c[:2]))
def test_equals_comfyui_update_equations(gmm, noise, case, schedule):
    name, opts, ref_fn = case
    sig = SCHEDULES[schedule]
    x = noise * sig[0]
    theirs = Fresh(x.shape)
    ref = ref_fn(gmm, x, sig.tolist(), theirs, **opts)
    solver = solvers.get(name, **opts)
    ours = Fresh(x.shape)
    assert _rel(fastdiff.sample(gmm, x, sig, solver=solver, noise_sampler=ours), ref) <= TIGHT
    assert ours.calls == theirs.calls
    ours = Fresh(x.shape)
    assert _rel(fastdiff.Sampler(gmm, solver=solver, sigmas=sig).sample(x, noise_sampler=ours), ref) <= TIGHT
    assert ours.calls == theirs.calls


def test_er_sde_stages_change_the_result(gmm, noise):
    # Each stage is a real term: stage 2 from the second step, stage 3 from the third.
    sig = SCHEDULES["karras12"]
    x = noise * sig[0]
    out = [fastdiff.sample(gmm, x, sig, solver=solvers.get("er_sde", max_stage=k, s_noise=0.0)) for k in (1, 2, 3)]
    assert _rel(out[0], out[1]) > 1e-2 and _rel(out[1], out[2]) > 1e-3  # measured 0.19 and 0.013
    coef = [solvers.er_sde_coefficients(sig.tolist(), 2, max_stage=k)[1] for k in (1, 2, 3)]
    assert [len(b) for b in coef] == [1, 2, 3]
    assert all(sum(b) == pytest.approx(coef[0][0]) for b in coef)  # the differences' weights sum to 0


# ------------------------------------------------------------------------------------- structure and options

NEW = [
    ("dpm_2_ancestral", {}, True),
    ("dpm_2_ancestral", {"eta": 0.0}, False),
    ("dpmpp_2s_ancestral", {}, True),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, False),
    ("dpmpp_sde", {}, True),
    ("dpmpp_sde", {"eta": 0.0, "s_noise": 2.0}, False),
    ("ddpm", {}, True),
    ("er_sde", {}, True),
    ("er_sde", {"s_noise": 0.0}, False),
]


@pytest.mark.parametrize("name,opts,stochastic", NEW, ids=[_case_id(c[:2]) for c in NEW])
def test_stochastic_and_ode_flags(name, opts, stochastic):
    solver = solvers.get(name, **opts)
    assert solver.stochastic is stochastic and not solver.ode and name not in solvers.ODE_SOLVERS


TWO_STAGE = ["dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"]


@pytest.mark.parametrize("opts", [{}, {"eta": 0.0}, {"eta": 1.1}], ids=repr)
@pytest.mark.parametrize("name", TWO_STAGE + ["euler_ancestral"])
def test_nfe_per_step_is_k_diffusions(k_diffusion, gmm, noise, name, opts):
    # Two evaluations a step (one for Euler ancestral), one on the step to 0 and where sigma_down = 0 (eta = 1.1
    # on karras12's last five steps; dpmpp_sde splits the step by levels, not by sigma_down, and keeps both).
    sig = SCHEDULES["karras12"]
    solver = solvers.get(name, **opts)
    model = Counted(gmm)
    getattr(k_diffusion, f"sample_{name}")(
        model, noise * 80, sig, disable=True, noise_sampler=Fresh(noise.shape), **opts
    )
    two = 1 if name == "euler_ancestral" else 2
    falls_back = name in ("dpm_2_ancestral", "dpmpp_2s_ancestral") and opts.get("eta") == 1.1
    expected = ([two] * 6 + [1] * 5 if falls_back else [two] * 11) + [1]
    assert solver.evaluations(sig.tolist()) == expected
    assert fastdiff.count_nfe(solver, sig) == (sum(expected), 0) == (model.calls, 0)
    _, stats = fastdiff.sample(gmm, noise * 80, sig, solver=solver, noise_sampler=Fresh(noise.shape), return_stats=True)
    assert (stats.nfe_cond, stats.nfe_uncond) == (model.calls, 0)


@pytest.mark.parametrize("name", ["ddpm", "er_sde"])
def test_one_evaluation_a_step(gmm, noise, name):
    sig = SCHEDULES["karras12"]
    assert solvers.get(name).evaluations(sig.tolist()) == [1] * 12
    assert fastdiff.count_nfe(name, sig) == (12, 0)


TABLE = [
    solvers.get("dpm_2_ancestral"),
    solvers.get("dpm_2_ancestral", eta=0.0),
    solvers.get("dpm_2_ancestral", eta=1.1, s_noise=0.5),
    solvers.get("dpmpp_2s_ancestral", eta=0.4),
    solvers.get("dpmpp_2s_ancestral", eta=1.1),
    solvers.get("dpmpp_sde", r=0.3),
    solvers.get("dpmpp_sde", eta=1.1, r=1.0),
    solvers.get("ddpm"),
    solvers.get("er_sde"),
    solvers.get("er_sde", max_stage=2, s_noise=0.0),
]


@pytest.mark.parametrize("solver", TABLE, ids=repr)
def test_tensor_schedule_gives_the_host_coefficients_and_levels(solver):
    # fastdiff.Sampler builds its table from the schedule as 0-d tensors and its draws from the host values.
    s = schedules.karras(12, 0.002, 80.0)
    host, dev = solver.coefficient_table(s.tolist()), solver.coefficient_table(s)
    assert [len(st) for st in host] == [len(st) for st in dev]
    for hs, ds in zip(host, dev):
        for h, d in zip(hs, ds):
            want = [h.a, *h.b, h.hx, h.hd, h.c_noise]
            assert [float(v) for v in (d.a, *d.b, d.hx, d.hd, d.c_noise)] == pytest.approx(want, rel=1e-12, abs=1e-12)
            assert (h.noise is None) == (d.noise is None)
            assert h.noise is None or all(isinstance(v, float) for v in h.noise)
    values = solvers.schedule_values(s)
    for i in range(12):
        got = [p if isinstance(p, int) else float(p) for p in solver.points(values, i)]
        assert got == pytest.approx(solver.points(s.tolist(), i), rel=1e-12)


@pytest.mark.parametrize("solver", [t for t in TABLE if getattr(t, "eta", 0.0) <= 1], ids=repr)
def test_tensor_schedule_is_never_read_back(solver):
    # Meta tensors have no data: any host read raises. Up to eta = 1 the step's structure is fixed by the schedule's
    # shape (above, whether sigma_down is 0 depends on the values, which the host plan reads).
    s = schedules.karras(7, 0.002, 80.0).to("meta")
    table, _ = solver.coefficient_tensor(s, final_zero=True)
    assert table.device.type == "meta" and table.shape[0] == 7
    values = list(s.unbind()[:-1]) + [0.0]
    assert all(p.device.type == "meta" for i in range(7) for p in solver.points(values, i) if not isinstance(p, int))


@pytest.mark.parametrize("name", TWO_STAGE + ["er_sde"])
def test_deterministic_settings_are_differentiable_in_the_schedule(name):
    # What LD3 needs of a solver whose options draw nothing: coefficients differentiable in the schedule.
    solver = solvers.get(name, **({"s_noise": 0.0} if name == "er_sde" else {"eta": 0.0}))
    assert not solver.stochastic
    xi = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)

    def total(v):
        table = solver.coefficient_table(schedules.ld3_sigmas(v, 0.05, 20.0, append_zero=True))
        terms = [c for stages in table for st in stages for c in (st.a, *st.b)]
        return sum(torch.as_tensor(c, dtype=torch.float64) * (k + 1) for k, c in enumerate(terms))

    assert torch.autograd.gradcheck(total, (xi,))


@pytest.mark.parametrize("name,opts,message", [
    ("dpm_2_ancestral", {"eta": -0.1}, "eta must be >= 0"),
    ("dpm_2_ancestral", {"s_noise": float("nan")}, "s_noise must be a finite"),
    ("dpmpp_2s_ancestral", {"eta": float("inf")}, "eta must be a finite"),
    ("dpmpp_2s_ancestral", {"s_noise": "1"}, "s_noise must be a real number"),
    ("dpmpp_sde", {"r": 0.0}, r"r must be in \(0, 1\]"),
    ("dpmpp_sde", {"r": 1.5}, r"r must be in \(0, 1\]"),
    ("dpmpp_sde", {"r": float("nan")}, "r must be a finite"),
    ("dpmpp_sde", {"eta": True}, "eta must be a real number"),
    ("er_sde", {"max_stage": 0}, "max_stage must be a positive integer no larger than 3"),
    ("er_sde", {"max_stage": 4}, "max_stage must be a positive integer no larger than 3"),
    ("er_sde", {"max_stage": 2.0}, "max_stage must be"),
    ("er_sde", {"s_noise": -1.0}, "s_noise must be >= 0"),
    ("er_sde", {"eta": 1.0}, "solver 'er_sde' has no option eta"),
    ("ddpm", {"eta": 0.5}, "solver 'ddpm' has no option eta"),
])  # fmt: skip
def test_options_are_checked(name, opts, message):
    with pytest.raises(ValueError, match=message):
        solvers.get(name, **opts)


@pytest.mark.parametrize("name", ["dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_float32_schedule_never_evaluates_at_zero(name):
    """On a 2-step Karras schedule (80, 0.002, 0) the first step's sigma_down is 0.002^2 / 80 = 5e-8. k-diffusion's
    sqrt(sigma_to^2 - sigma_up^2) rounds that to 0 in float32, which would put DPM-2's midpoint (and 2S's
    log-levels) at sigma = 0, where a preconditioned network is undefined; fastdiff's cancellation-free form keeps
    it, on the float32 device table as on the host."""
    from fastdiff.models.unet import EDMUNet, UNetConfig

    net = EDMUNet(UNetConfig.tiny()).eval()
    sig = schedules.karras(2, 0.002, 80.0)
    down, up = solvers.get_ancestral_step(torch.tensor(80.0), torch.tensor(0.002))
    assert down.item() == pytest.approx(0.002**2 / 80, rel=1e-5) and up.item() == pytest.approx(0.002, rel=1e-6)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80
    labels = {"class_labels": torch.tensor([1, 2])}
    out = fastdiff.Sampler(net, solver=name, sigmas=sig).sample(x, labels, generator=torch.Generator().manual_seed(1))
    ref = fastdiff.sample(net, x, sig, solver=name, cond=labels, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_sa_solver_at_tau_zero_draws_nothing_and_serves_ld3(gmm, noise):
    """tau = 0 makes SA-Solver an ODE solver (no draws, so LD3's student takes it); its predictor at order 1 with
    tau = 0 is DDIM."""
    sigmas = schedules.karras(8, 0.05, 80.0)
    refuse = lambda s, t: pytest.fail("tau = 0 draws nothing")  # noqa: E731
    out = fastdiff.sample(gmm, noise * 80, sigmas, solver=solvers.get("sa_solver", tau=0.0), noise_sampler=refuse)
    assert torch.isfinite(out).all()
    ddim = fastdiff.sample(gmm, noise * 80, sigmas, solver="ddim")
    first = solvers.get("sa_solver", tau=0.0, predictor_order=1, corrector_order=1)
    assert not torch.allclose(fastdiff.sample(gmm, noise * 80, sigmas, solver=first), ddim)  # the corrector acts
    assert not solvers.get("sa_solver", tau=0.0).stochastic and solvers.get("sa_solver").stochastic
    a, b, c = solvers.multistep._sa_update([0.0, 0.7], 0, 1, [0], 0.0, predictor=True)
    assert (a, b[0], c) == pytest.approx((math.exp(-0.7), 1 - math.exp(-0.7), 0.0))
