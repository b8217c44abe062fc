"""fastdiff.k_diffusion: k-diffusion's sampler API on fastdiff's solvers and fused op.

Every sampler is checked against a plain-torch loop written here from the formulas (k-diffusion style, float64,
no fastdiff solver code), on the exact Gaussian-mixture denoiser; the deterministic ones also against
fastdiff.sample with the matching solver. The stochastic ones get pre-drawn noise through a noise sampler, so
the comparison is exact; their distribution is checked against the mixture's exact moments.
"""

import math

import pytest
import torch

import fastdiff
from fastdiff import k_diffusion as K
from fastdiff import schedules, solvers

pytestmark = pytest.mark.usefixtures("one_thread")

SIG = schedules.karras(12, 0.002, 80.0)
TIGHT = 1e-10  # float64 throughout: the loops agree to rounding (~1e-14); a wrong coefficient shows at 1e-3


def _close(a, b, tol=TIGHT):
    assert a.shape == b.shape and a.dtype == b.dtype
    err = (a - b).abs().max().item()
    assert err <= tol * max(b.abs().max().item(), 1.0), err


def _lam(s):
    return -math.log(s)


class Recorded:
    """A noise sampler that returns pre-drawn standard normals in order and records its arguments."""

    def __init__(self, shape, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.zs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.zs[len(self.calls) - 1]


class Spy:
    """A model that records the keyword arguments and sigmas it is called with."""

    def __init__(self, model):
        self.model, self.kwargs, self.sigmas = model, [], []

    def __call__(self, x, sigma, **kwargs):
        assert sigma.shape == (x.shape[0],)
        self.kwargs.append(kwargs)
        self.sigmas.append(float(sigma[0]))
        return self.model(x, sigma, **kwargs)


# ------------------------------------------------------------------------ plain-torch loops (the references)


def _call(model, x, s, extra):
    return model(x, torch.full((x.shape[0],), s, dtype=x.dtype), **extra)


def ref_euler_heun(model, x, sig, heun=False, extra=None, gammas=None, noise=None, s_noise=1.0):
    """EDM Algorithm 2 (Algorithm 1 without churn); Heun skips the corrector on the step to 0."""
    extra = extra or {}
    for i in range(len(sig) - 1):
        gamma = gammas[i] if gammas else 0.0
        s_hat, s_next = sig[i] * (1 + gamma), sig[i + 1]
        if gamma > 0:
            x = x + noise(sig[i], s_hat) * s_noise * math.sqrt(s_hat**2 - sig[i] ** 2)
        d = (x - _call(model, x, s_hat, extra)) / s_hat
        x_pred = x + (s_next - s_hat) * d
        if not heun or s_next == 0:
            x = x_pred
        else:
            d2 = (x_pred - _call(model, x_pred, s_next, extra)) / s_next
            x = x + (s_next - s_hat) * (d + d2) / 2
    return x


def ref_dpmpp_2m(model, x, sig, extra=None):
    extra, old = extra or {}, None
    for i in range(len(sig) - 1):
        den = _call(model, x, sig[i], extra)
        s, s_next = sig[i], sig[i + 1]
        if s_next == 0:
            x = den
        else:
            h = _lam(s_next) - _lam(s)
            if old is not None:
                r = (_lam(s) - _lam(sig[i - 1])) / h
                den_mix = (1 + 1 / (2 * r)) * den - 1 / (2 * r) * old
            else:
                den_mix = den
            x = (s_next / s) * x - math.expm1(-h) * den_mix
        old = den
    return x


def ref_ipndm(model, x, sig, max_order=4):
    ab = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    ds = []  # derivatives, newest first
    for i in range(len(sig) - 1):
        ds.insert(0, (x - _call(model, x, sig[i], {})) / sig[i])
        w = ab[min(max_order, i + 1)]
        x = x + (sig[i + 1] - sig[i]) * sum(wj * dj for wj, dj in zip(w, ds))
        ds = ds[: max_order - 1]
    return x


def ref_euler_ancestral(model, x, sig, eta=1.0, s_noise=1.0, noise=None):
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _call(model, x, s, {})
        up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
        down = math.sqrt(s_next**2 - up**2)
        x = x + (x - den) / s * (down - s)
        if s_next > 0:
            x = x + noise(s, s_next) * up * s_noise
    return x


def ref_dpmpp_2m_sde(model, x, sig, eta=1.0, s_noise=1.0, noise=None, solver_type="midpoint"):
    old = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _call(model, x, s, {})
        if s_next == 0:
            x = den
        else:
            h = _lam(s_next) - _lam(s)
            eh = eta * h
            x = s_next / s * math.exp(-eh) * x + (1 - math.exp(-h - eh)) * den
            if old is not None:
                r = (_lam(s) - _lam(sig[i - 1])) / h
                if solver_type == "midpoint":
                    x = x + 0.5 * (1 - math.exp(-h - eh)) / r * (den - old)
                else:  # the integral of a line through D_{i-1}, D_i against the step's exponential weight
                    x = x + (1 - (1 - math.exp(-h - eh)) / (h + eh)) / r * (den - old)
            if eta:
                x = x + noise(s, s_next) * s_next * math.sqrt(1 - math.exp(-2 * eh)) * s_noise
        old = den
    return x


def ref_dpmpp_3m_sde(model, x, sig, eta=1.0, s_noise=1.0, noise=None):
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        den = _call(model, x, s, {})
        if s_next == 0:
            x = den
        else:
            h = _lam(s_next) - _lam(s)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x + (1 - math.exp(-h_eta)) * den
            phi_2 = (math.exp(-h_eta) - 1) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (den - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * (den - d_1) / (h_1 / h)
            if eta:
                x = x + noise(s, s_next) * s_next * math.sqrt(1 - math.exp(-2 * h * eta)) * s_noise
            h_1, h_2 = h, h_1
        d_1, d_2 = den, d_1
    return x


# ----------------------------------------------------------------------------------------- deterministic


DETERMINISTIC = [
    ("euler", K.sample_euler, {}, lambda m, x, s: ref_euler_heun(m, x, s)),
    ("heun", K.sample_heun, {}, lambda m, x, s: ref_euler_heun(m, x, s, heun=True)),
    ("dpmpp_2m", K.sample_dpmpp_2m, {}, ref_dpmpp_2m),
    ("ipndm", K.sample_ipndm, {}, ref_ipndm),
    ("ipndm", K.sample_ipndm, {"max_order": 2}, lambda m, x, s: ref_ipndm(m, x, s, 2)),
]


@pytest.mark.parametrize("name,fn,opts,ref", DETERMINISTIC, ids=["euler", "heun", "dpmpp_2m", "ipndm", "ipndm_2"])
def test_deterministic_equal_fastdiff_and_reference(gmm, noise, name, fn, opts, ref):
    x = noise * SIG[0]
    expected = fastdiff.sample(gmm, x, SIG, solver=solvers.get(name, **opts))
    got = fn(gmm, x, SIG, **opts)
    assert torch.equal(got, expected)  # the same solver on the same op: bit for bit
    _close(got, ref(gmm, x, SIG.tolist()))


@pytest.mark.parametrize("fn,solver", [(K.sample_euler, "euler"), (K.sample_heun, "heun"),
                                       (K.sample_dpmpp_2m, "dpmpp_2m"), (K.sample_ipndm, "ipndm"),
                                       (K.sample_dpmpp_3m_sde, "dpmpp_3m_kdiffusion")])  # fmt: skip
def test_deterministic_run_through_fastdiff_sample(gmm, noise, monkeypatch, fn, solver):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["solver"].name)
        return fastdiff.sample(*args, **kwargs)

    monkeypatch.setattr(K, "sample", spy)
    opts = {"eta": 0.0} if fn is K.sample_dpmpp_3m_sde else {}
    fn(gmm, noise * SIG[0], SIG, **opts)
    assert seen == [solver]


def test_dpmpp_3m_eta0_is_fastdiff_3m_but_for_kdiffusions_second_step(gmm, noise):
    x = noise * SIG[0]
    sig = SIG.tolist()
    ours, fastdiff_3m = K.KDiffusionDPMSolverPP3M(), solvers.DPMSolverPP3M()
    for i in range(len(sig) - 1):
        a, b = ours.coefficients(sig, i)
        a_f, b_f = fastdiff_3m.coefficients(sig, i)
        if i == 1:  # k-diffusion: phi_2(h) (D - D_1) / r; fastdiff/diffusers: the 2M midpoint weight (1 - e^-h) / 2r
            h = _lam(sig[2]) - _lam(sig[1])
            r = (_lam(sig[1]) - _lam(sig[0])) / h
            assert b[1] == pytest.approx(-(math.expm1(-h) / h + 1) / r, rel=1e-12)
            assert b_f[1] == pytest.approx(math.expm1(-h) / (2 * r), rel=1e-12)
        else:
            assert a == a_f and b == b_f
        # The SDE coefficients at eta = 0 are the same step (a = e^-h = s'/s).
        a_s, b_s, c_s = K.dpmpp_3m_sde_coefficients(sig, i, eta=0.0)
        assert c_s == 0 and a_s == pytest.approx(a, rel=1e-13) and b_s == pytest.approx(b, rel=1e-11, abs=1e-13)
    got = K.sample_dpmpp_3m_sde(gmm, x, SIG, eta=0.0)
    _close(got, ref_dpmpp_3m_sde(gmm, x, sig, eta=0.0))
    _close(got, fastdiff.sample(gmm, x, SIG, solver=ours))
    _close(got, fastdiff.Sampler(gmm, solver=ours, sigmas=SIG).sample(x))  # its table on the device works too
    # The whole run differs from fastdiff's dpmpp_3m only through that step: a little, not at rounding level.
    diff = (got - fastdiff.sample(gmm, x, SIG, solver="dpmpp_3m")).abs().max().item()
    assert 1e-8 < diff < 1e-2
    # The stochastic loop at eta -> 0 (no noise) meets the routed solver.
    _close(K.sample_dpmpp_3m_sde(gmm, x, SIG, eta=1e-13, s_noise=0.0), got, 1e-9)


@pytest.mark.parametrize("heun", [False, True], ids=["euler", "heun"])
def test_churn_matches_edm_algorithm_2(gmm, noise, heun):
    x = noise * SIG[0]
    sig = SIG.tolist()
    opts = dict(s_churn=2.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.007)
    gammas = [min(2.0 / 12, math.sqrt(2) - 1) if 0.05 <= s <= 10.0 else 0.0 for s in sig[:-1]]
    assert 0 < sum(g > 0 for g in gammas) < 12  # some steps churn, some do not
    fn = K.sample_heun if heun else K.sample_euler
    ns = Recorded(x.shape)
    got = fn(gmm, x, SIG, noise_sampler=ns, **opts)
    expected = ref_euler_heun(gmm, x, sig, heun, gammas=gammas, noise=Recorded(x.shape), s_noise=1.007)
    _close(got, expected)
    assert len(ns.calls) == sum(g > 0 for g in gammas)
    assert all(s_hat == pytest.approx(s * (1 + 2.0 / 12)) for s, s_hat in ns.calls)
    # Seeded churn reproduces; s_churn whose window holds no step is the plain solver.
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(fn(gmm, x, SIG, generator=g(), **opts), fn(gmm, x, SIG, generator=g(), **opts))
    assert torch.equal(fn(gmm, x, SIG, s_churn=5.0, s_tmin=100.0, s_tmax=200.0), fn(gmm, x, SIG))


def test_churn_default_noise_is_torch_global_rng(gmm, noise):
    x = noise * SIG[0]
    torch.manual_seed(5)
    got = K.sample_euler(gmm, x, SIG, s_churn=1.0)
    torch.manual_seed(5)
    expected = ref_euler_heun(gmm, x, SIG.tolist(), gammas=[1.0 / 12] * 12, noise=lambda s, t: torch.randn_like(x))
    _close(got, expected)


# ---------------------------------------------------------------------------------------------- stochastic


STOCHASTIC = [
    ("euler_ancestral", K.sample_euler_ancestral, {}, ref_euler_ancestral),
    ("euler_ancestral_eta", K.sample_euler_ancestral, {"eta": 0.6, "s_noise": 0.9}, ref_euler_ancestral),
    ("dpmpp_2m_sde", K.sample_dpmpp_2m_sde, {}, ref_dpmpp_2m_sde),
    ("dpmpp_2m_sde_heun", K.sample_dpmpp_2m_sde, {"solver_type": "heun", "eta": 0.7}, ref_dpmpp_2m_sde),
    ("dpmpp_3m_sde", K.sample_dpmpp_3m_sde, {}, ref_dpmpp_3m_sde),
    ("dpmpp_3m_sde_eta", K.sample_dpmpp_3m_sde, {"eta": 0.5, "s_noise": 1.1}, ref_dpmpp_3m_sde),
]


@pytest.mark.parametrize("name,fn,opts,ref", STOCHASTIC, ids=[s[0] for s in STOCHASTIC])
def test_stochastic_equal_reference_given_the_noise(gmm, noise, name, fn, opts, ref):
    x = noise * SIG[0]
    ns = Recorded(x.shape)
    got = fn(gmm, x, SIG, noise_sampler=ns, **opts)
    _close(got, ref(gmm, x, SIG.tolist(), noise=Recorded(x.shape), **opts))
    sig = SIG.tolist()
    assert ns.calls == list(zip(sig[:-2], sig[1:-1]))  # (sigma_i, sigma_{i+1}) for every step ending above 0


@pytest.mark.parametrize("name,fn,opts,ref", STOCHASTIC[::2], ids=[s[0] for s in STOCHASTIC[::2]])
def test_stochastic_step_is_one_fused_op_with_the_noise(gmm, noise, monkeypatch, name, fn, opts, ref):
    calls = []
    real = K.ops.guided_step

    def counting(x, d, d_uncond, history, **kw):
        calls.append((d_uncond, kw["noise"] is not None, kw["c_noise"]))
        return real(x, d, d_uncond, history, **kw)

    monkeypatch.setattr(K.ops, "guided_step", counting)
    fn(gmm, noise * SIG[0], SIG, noise_sampler=Recorded(noise.shape), **opts)
    assert len(calls) == 12
    assert all(du is None for du, _, _ in calls)
    assert [has for _, has, _ in calls] == [True] * 11 + [False]  # the step to 0 returns D: no noise
    assert all(c > 0 for _, _, c in calls[:-1])


@pytest.mark.parametrize("fn,det,opts", [(K.sample_euler_ancestral, K.sample_euler, {}),
                                         (K.sample_dpmpp_2m_sde, K.sample_dpmpp_2m, {}),
                                         (K.sample_dpmpp_2m_sde, None, {"solver_type": "heun"})])  # fmt: skip
def test_eta_zero_is_the_ode_solver(gmm, noise, fn, det, opts):
    x = noise * SIG[0]
    got = fn(gmm, x, SIG, eta=0.0, noise_sampler=Recorded(x.shape), **opts)
    if det is not None:
        _close(got, det(gmm, x, SIG))
    else:
        _close(got, ref_dpmpp_2m_sde(gmm, x, SIG.tolist(), eta=0.0, solver_type="heun"))


def test_euler_ancestral_default_noise_follows_torch_global_rng(gmm, noise):
    # As k-diffusion: one torch.randn_like(x) per step that ends above 0, so a seeded run draws the same numbers.
    x = noise * SIG[0]
    torch.manual_seed(0)
    got = K.sample_euler_ancestral(gmm, x, SIG)
    after = torch.randn(1)
    torch.manual_seed(0)
    expected = ref_euler_ancestral(gmm, x, SIG.tolist(), noise=lambda s, t: torch.randn_like(x))
    assert torch.equal(torch.randn(1), after)
    _close(got, expected)


def test_seeded_runs_reproduce(gmm, noise):
    x = noise * SIG[0]
    runs = {
        "generator": lambda: K.sample_euler_ancestral(gmm, x, SIG, generator=torch.Generator().manual_seed(1)),
        "seed": lambda: K.sample_dpmpp_2m_sde(gmm, x, SIG, seed=1),
        "seed_3m": lambda: K.sample_dpmpp_3m_sde(gmm, x, SIG, seed=[1] * 64),
        "noise_sampler": lambda: K.sample_dpmpp_2m_sde(gmm, x, SIG, noise_sampler=K.default_noise_sampler(x, seed=4)),
    }
    for name, run in runs.items():
        assert torch.equal(run(), run()), name
    assert not torch.equal(K.sample_dpmpp_2m_sde(gmm, x, SIG, seed=1), K.sample_dpmpp_2m_sde(gmm, x, SIG, seed=2))
    torch.manual_seed(7)
    a = K.sample_dpmpp_2m_sde(gmm, x, SIG)
    torch.manual_seed(7)
    assert torch.equal(a, K.sample_dpmpp_2m_sde(gmm, x, SIG))  # seed None: from torch's global generator


def test_brownian_noise_is_one_path_across_step_counts(gmm):
    # With the Brownian tree, 24 and 48 steps are two discretisations of the same SDE path, so they land close;
    # with independent noise they are two different samples.
    x = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    coarse, fine = schedules.karras(24, 0.002, 80.0), schedules.karras(48, 0.002, 80.0)

    def gap(a, b):
        return (a - b).norm(dim=1).mean().item()

    same = gap(K.sample_dpmpp_2m_sde(gmm, x, coarse, seed=5), K.sample_dpmpp_2m_sde(gmm, x, fine, seed=5))
    other = gap(K.sample_dpmpp_2m_sde(gmm, x, coarse, seed=5), K.sample_dpmpp_2m_sde(gmm, x, fine, seed=6))
    fresh = gap(
        K.sample_dpmpp_2m_sde(gmm, x, coarse, noise_sampler=K.default_noise_sampler(x, 5)),
        K.sample_dpmpp_2m_sde(gmm, x, fine, noise_sampler=K.default_noise_sampler(x, 5)),
    )
    assert same < 0.25 * min(other, fresh), (same, other, fresh)
    # And they converge to it: doubling both step counts shrinks the gap (measured 0.91 -> 0.38 -> 0.15).
    coarser = gap(
        K.sample_dpmpp_2m_sde(gmm, x, schedules.karras(12, 0.002, 80.0), seed=5),
        K.sample_dpmpp_2m_sde(gmm, x, coarse, seed=5),
    )
    assert same < 0.6 * coarser, (same, coarser)


def _mixture_moments(gmm):
    w = gmm.log_weights.exp()
    mean = (w[:, None] * gmm.means).sum(0)
    second = sum(wk * (torch.diag(vk) + torch.outer(mk, mk)) for wk, mk, vk in zip(w, gmm.means, gmm.variances))
    return mean, second - torch.outer(mean, mean)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_samplers_sample_the_mixture(gmm, name):
    # n = 8192 samples of a 2-D mixture with coordinate variances ~2.1: the sample mean's std is
    # sqrt(2.1 / n) = 0.016 and a covariance entry's about sqrt(Var(x_j x_k) / n) <= 0.02; 5 of those plus the
    # discretisation bias of 100 steps. Too little noise (s_noise = 0.5) fails the same bounds.
    n = 8192
    x = 80.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    sig = schedules.karras(100, 0.002, 80.0)
    fn = getattr(K, f"sample_{name}")
    mean, cov = _mixture_moments(gmm)

    def error(out):
        return (out.mean(0) - mean).abs().max().item(), (torch.cov(out.T) - cov).abs().max().item()

    kwargs = {"generator": torch.Generator().manual_seed(2)} if name == "euler_ancestral" else {"seed": 2}
    err_mean, err_cov = error(fn(gmm, x, sig, **kwargs))
    assert err_mean < 0.08 and err_cov < 0.12, (err_mean, err_cov)
    damped = fn(gmm, x, sig, s_noise=0.5, **kwargs)
    assert error(damped)[1] > 0.12


# ------------------------------------------------------------------------------------------ API and errors


ALL_SAMPLERS = [K.sample_euler, K.sample_heun, K.sample_dpmpp_2m, K.sample_ipndm, K.sample_euler_ancestral,
                K.sample_dpmpp_2m_sde, K.sample_dpmpp_3m_sde]  # fmt: skip


@pytest.mark.parametrize("fn", ALL_SAMPLERS, ids=lambda f: f.__name__)
def test_callback_dict_and_extra_args(gmm, noise, fn):
    x = noise * SIG[0]
    y = torch.arange(64) % 4
    stochastic = "sde" in fn.__name__ or "ancestral" in fn.__name__
    opts = lambda: {"noise_sampler": Recorded(x.shape)} if stochastic else {}  # noqa: E731
    spy, seen = Spy(gmm), []
    out = fn(spy, x, SIG, extra_args={"class_labels": y}, callback=seen.append, disable=True, **opts())
    assert all(kw.keys() == {"class_labels"} and kw["class_labels"] is y for kw in spy.kwargs)
    assert [d["i"] for d in seen] == list(range(12))
    assert all(set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"} for d in seen)
    assert all(torch.is_tensor(d["sigma"]) and float(d["sigma"]) == float(SIG[d["i"]]) for d in seen)
    assert all(float(d["sigma_hat"]) == float(d["sigma"]) for d in seen)
    assert torch.equal(seen[0]["x"], x)
    first = gmm(x, torch.full((64,), 80.0, dtype=torch.float64), class_labels=y)
    _close(seen[0]["denoised"], first, 1e-12)
    assert out.shape == x.shape and out.dtype == x.dtype
    # The labels reach the model: the class-conditional samples are the conditional model's.
    _close(out, fn(lambda x, s: gmm(x, s, class_labels=y), x, SIG, **opts()))
    assert not torch.allclose(out, fn(gmm, x, SIG, **opts()))


def test_churn_callback_reports_sigma_hat(gmm, noise):
    seen = []
    K.sample_heun(gmm, noise * SIG[0], SIG, callback=seen.append, s_churn=1.0, noise_sampler=Recorded(noise.shape))
    for d in seen:
        assert float(d["sigma_hat"]) == pytest.approx(float(d["sigma"]) * (1 + 1 / 12))


def test_float32_state_and_sigmas(gmm, noise):
    # k-diffusion's usual setting: float32 state and schedule.
    x, sig = (noise * 80).float(), K.get_sigmas_karras(10, 0.002, 80.0)
    assert sig.dtype == torch.float32
    for fn in (K.sample_euler_ancestral, K.sample_dpmpp_2m_sde, K.sample_dpmpp_3m_sde, K.sample_heun):
        seeded = {} if fn is K.sample_heun else {"noise_sampler": K.default_noise_sampler(x, seed=0)}
        out = fn(gmm, x, sig, **seeded)
        seeded = {} if fn is K.sample_heun else {"noise_sampler": K.default_noise_sampler(x, seed=0)}
        ref = fn(gmm, x.double(), sig.double(), **seeded)  # the same normals, in float64
        assert out.dtype == torch.float32
        assert (out.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_schedules_match_their_formulas():
    n, lo, hi = 7, 0.03, 14.6
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    expo = torch.exp(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64))
    poly = torch.exp(math.log(lo) + torch.linspace(1, 0, n, dtype=torch.float64) ** 2 * (math.log(hi) - math.log(lo)))
    t = torch.linspace(1, 1e-3, n, dtype=torch.float64)
    vp = torch.sqrt(torch.exp(19.9 * t**2 / 2 + 0.1 * t) - 1)
    for got, want in [(K.get_sigmas_karras(n, lo, hi), karras), (K.get_sigmas_exponential(n, lo, hi), expo),
                      (K.get_sigmas_polyexponential(n, lo, hi, rho=2.0), poly), (K.get_sigmas_vp(n), vp)]:  # fmt: skip
        assert got.shape == (n + 1,) and got.dtype == torch.get_default_dtype() and got[-1] == 0
        assert torch.allclose(got[:-1].double(), want, rtol=1e-6, atol=0)
    assert torch.allclose(K.get_sigmas_polyexponential(n, lo, hi), K.get_sigmas_exponential(n, lo, hi), rtol=1e-6)
    assert K.get_sigmas_karras(n, lo, hi, device="meta").device.type == "meta"
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        K.get_sigmas_karras(5, 1.0, 0.5)
    with pytest.raises(ValueError, match="positive integer"):
        K.get_sigmas_vp(0)


def test_helpers():
    x, d = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(K.to_d(x, torch.tensor([1.0, 2.0]), d), torch.tensor([[1.0] * 3, [0.5] * 3]))
    assert torch.equal(K.to_d(x, 4.0, d), torch.full((2, 3), 0.25))
    for eta in (0.3, 1.0, 5.0):
        down, up = K.get_ancestral_step(3.0, 2.0, eta)
        assert down**2 + up**2 == pytest.approx(4.0) and 0 <= up <= 2.0
        t_down, t_up = K.get_ancestral_step(torch.tensor(3.0), torch.tensor(2.0), eta)
        assert float(t_down) == pytest.approx(down) and float(t_up) == pytest.approx(up)
    assert K.get_ancestral_step(3.0, 2.0, 0.0) == (2.0, 0.0)
    assert K.get_ancestral_step(3.0, 0.0) == (0.0, 0.0)
    assert K.churn_gamma(5.0, 10, 1.0) == pytest.approx(0.1) and K.churn_gamma(5.0, 1, 40.0) == math.sqrt(2) - 1
    assert K.churn_gamma(5.0, 10, 1.0, s_tmax=4.0) == 0.0
    assert all(hasattr(K, name) for name in K.__all__)
    assert K.BrownianTreeNoiseSampler is fastdiff.brownian.BrownianTreeNoiseSampler


def test_bad_input(gmm, noise):
    x = noise * 80
    with pytest.raises(ValueError, match="strictly decreasing"):
        K.sample_euler(gmm, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        K.sample_dpmpp_2m_sde(gmm, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        K.sample_euler_ancestral(gmm, x, SIG[None])
    with pytest.raises(TypeError, match="x must be a tensor"):
        K.sample_dpmpp_3m_sde(gmm, x.tolist(), SIG)
    with pytest.raises(ValueError, match="model returned shape"):
        K.sample_euler_ancestral(lambda x, s: x[:, :1], x, SIG)
    with pytest.raises(ValueError, match="noise_sampler returned shape \\(64, 3\\)"):
        K.sample_dpmpp_2m_sde(gmm, x, SIG, noise_sampler=lambda s, t: torch.zeros(64, 3))
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun'"):
        K.sample_dpmpp_2m_sde(gmm, x, SIG, solver_type="rk4")
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        K.sample_euler_ancestral(gmm, x, SIG, eta=-1.0)
    with pytest.raises(ValueError, match="s_churn must be"):
        K.sample_heun(gmm, x, SIG, s_churn=-1.0)
    with pytest.raises(ValueError, match="either noise_sampler or generator"):
        K.sample_euler_ancestral(gmm, x, SIG, noise_sampler=Recorded(x.shape), generator=torch.Generator())
    with pytest.raises(TypeError, match="extra_args must be a dict"):
        K.sample_dpmpp_2m(gmm, x, SIG, extra_args=[1])
    with pytest.raises(ValueError, match="max_order must be 1, 2, 3 or 4"):
        K.sample_ipndm(gmm, x, SIG, max_order=5)
