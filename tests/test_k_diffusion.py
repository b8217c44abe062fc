"""fastdiff.k_diffusion against k-diffusion 0.1.1.post1 itself (``k_diffusion.sampling``, the PyPI package).

Every sampler runs beside k-diffusion's on the exact Gaussian-mixture denoiser: in float64 with the same explicit
noise (or, for churn, the same global seed), where the two agree to rounding (~1e-14; a wrong coefficient shows at
1e-3), callbacks and noise-sampler arguments included; and with the default noise from the same
``torch.manual_seed``, where the same draws must come out (the Brownian tree's too) and leave the global generator
where k-diffusion leaves it. The rest checks fastdiff's own promises: the mapping onto the core solvers, the
extensions (``generator=``, ``seed=``), NumPy arguments and the errors.
"""

import inspect
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import k_diffusion as K
from fastdiff import schedules, solvers

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:Should have:UserWarning")]

SIG = schedules.karras(12, 0.002, 80.0)
TIGHT = 1e-10  # float64: the two libraries agree to rounding (~1e-14); a wrong coefficient shows at 1e-3
# float32: each library's float32 result is ~1e-6 from its float64 one on this mixture (measured up to 2.7e-6 for
# fastdiff, 1.2e-6 for k-diffusion: the op's float32 arithmetic, and the mixture's steep posterior amplifying
# rounding), so the two agree to a few 1e-6 (measured up to 4.8e-6); a wrong or missing draw is O(1).
FLOAT32 = 2e-5


@pytest.fixture
def float64_default():
    """k-diffusion's DPM-Solver computes its times in torch's default dtype: float64 for the tight comparison."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300)).item()


def _close(a, b, tol=TIGHT):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert _rel(a, b) <= tol, _rel(a, b)


def _same_value(a, b, tol=TIGHT) -> bool:
    """Two callback entries: tensors of any shape or numbers, equal to ``tol`` relative."""
    if isinstance(b, torch.Tensor) and b.ndim > 0:
        return a.shape == b.shape and _rel(a, b) <= tol
    return abs(float(a) - float(b)) <= tol * max(abs(float(b)), 1e-300)


def _same_callbacks(ours, theirs, tol=TIGHT, loose=()):
    """Callback dicts entry by entry: the same keys, integers equal, values to ``tol`` (keys in ``loose`` to
    ``1e-5``)."""
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in b:
            if isinstance(b[key], int):
                assert a[key] == b[key], key
            else:
                assert _same_value(a[key], b[key], 1e-5 if key in loose else tol), (key, a[key], b[key])


class Recorded:
    """A noise sampler that returns pre-drawn standard normals (in ``dtype``) in order and records its arguments."""

    def __init__(self, shape, n=256, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.zs = [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]
        self.calls = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((sigma, sigma_next))
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


# --------------------------------------------------------------------------------------------- the API


def _defined_in(module) -> list[str]:
    """The public names a module defines itself (not its imports)."""
    return sorted(n for n in dir(module) if not n.startswith("_") and getattr(getattr(module, n), "__module__", None)
                  == module.__name__)  # fmt: skip


NOT_PROVIDED = {"log_likelihood"}  # an ODE likelihood estimate (torchdiffeq), not a sampler; see the module docstring


def test_every_kdiffusion_name_is_here_with_its_signature(k_diffusion):
    names = _defined_in(k_diffusion)
    samplers = [n for n in names if n.startswith("sample_")]
    assert len(samplers) == 13 and {"DPMSolver", "BrownianTreeNoiseSampler", "linear_multistep_coeff"} <= set(names)
    for name in sorted(set(names) - NOT_PROVIDED):
        assert callable(getattr(K, name, None)), name
        assert name in K.__all__, name
    for name in samplers:
        theirs = list(inspect.signature(getattr(k_diffusion, name)).parameters.values())
        ours = list(inspect.signature(getattr(K, name)).parameters.values())
        # k-diffusion's parameters in its order, with its defaults; fastdiff's extensions only after them.
        assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
            (p.name, p.kind, p.default) for p in theirs
        ], name
        assert all(p.default is not inspect.Parameter.empty for p in ours[len(theirs) :]), name
    for cls in ("DPMSolver", "PIDStepSizeController", "BatchedBrownianTree", "BrownianTreeNoiseSampler"):
        theirs = [n for n, v in vars(getattr(k_diffusion, cls)).items() if not n.startswith("_") and callable(v)]
        assert all(callable(getattr(getattr(K, cls), n, None)) for n in theirs), (cls, theirs)
    assert set(K.__all__) <= set(dir(K))


# -------------------------------------------------------------------- fixed schedules: float64, given noise


SCHEDULES = {
    "karras12": SIG,
    "exp7": schedules.logsnr_uniform(7, 0.03, 14.6),
    "vp9": schedules.vp_t_to_sigma(torch.linspace(1, 1e-3, 9, dtype=torch.float64), 0.1, 20.0),  # no final 0
}
CASES = [
    ("euler", {}),
    ("euler", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.007}),
    ("heun", {}),
    ("heun", {"s_churn": 1.0, "s_tmax": 5.0}),
    ("dpm_2", {}),
    ("dpm_2", {"s_churn": 3.0, "s_tmin": 0.3}),
    ("euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("dpm_2_ancestral", {}),
    ("dpm_2_ancestral", {"eta": 3.0}),  # sigma_down = 0 on some steps: k-diffusion's Euler fallback, no draw
    ("lms", {}),
    ("lms", {"order": 2}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.0, "s_noise": 0.5}),
    ("dpmpp_sde", {}),
    ("dpmpp_sde", {"eta": 0.5, "r": 0.3}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"eta": 0.7, "solver_type": "heun"}),
    ("dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp_3m_sde", {}),
    ("dpmpp_3m_sde", {"eta": 0.5, "s_noise": 1.1}),
    ("dpmpp_3m_sde", {"eta": 0.0}),
]
CHURN = {"euler", "heun", "dpm_2"}  # their noise is torch.randn_like(x) from the global generator in k-diffusion


def _opts_id(case):
    name, opts = case
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name,opts", CASES, ids=[_opts_id(c) for c in CASES])
def test_float64_equals_kdiffusion_given_the_noise(k_diffusion, gmm, noise, schedule, name, opts):
    sig = SCHEDULES[schedule]
    x = noise * sig[0]
    runs = []
    for module in (K, k_diffusion):
        seen = []
        given = {} if name in CHURN or name in ("dpmpp_2m", "lms") else {"noise_sampler": Recorded(x.shape)}
        torch.manual_seed(3)  # the churn noise
        out = getattr(module, f"sample_{name}")(gmm, x, sig, callback=seen.append, disable=True, **opts, **given)
        runs.append((out, seen, given.get("noise_sampler"), torch.randn(1)))
    (ours, seen, ns, after), (theirs, seen_kd, ns_kd, after_kd) = runs
    _close(ours, theirs)
    _same_callbacks(seen, seen_kd)
    assert torch.equal(after, after_kd)  # the global generator advanced as k-diffusion's
    if ns is not None:  # the same draws, asked with the same arguments (the schedule's own 0-d tensors)
        assert len(ns.calls) == len(ns_kd.calls)
        for ours_args, their_args in zip(ns.calls, ns_kd.calls):
            assert all(isinstance(a, torch.Tensor) and a.dtype == b.dtype for a, b in zip(ours_args, their_args))
            assert [float(a) for a in ours_args] == [float(b) for b in their_args]


# --------------------------------------------------------- default noise: the same global seed, the same draws


SEEDED = [
    ("euler", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 10.0}),  # churn limited to some steps: draws at all
    ("heun", {"s_churn": 1.0, "s_tmin": 0.3, "s_tmax": 5.0}),
    ("dpm_2", {"s_churn": 3.0, "s_tmax": 20.0}),
    ("euler", {}),  # no churn: k-diffusion still draws every step
    ("euler_ancestral", {}),
    ("dpm_2_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 0.5}),
    ("dpmpp_sde", {}),  # the Brownian tree, its seed drawn from the global generator
    ("dpmpp_sde", {"r": 0.3}),
    ("dpmpp_2m_sde", {}),
    ("dpmpp_2m_sde", {"eta": 0.0}),  # no noise, but the tree is built (and its seed drawn) as in k-diffusion
    ("dpmpp_3m_sde", {}),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TIGHT), (torch.float32, FLOAT32)], ids=["float64", "float32"])
@pytest.mark.parametrize("name,opts", SEEDED, ids=[_opts_id(c) for c in SEEDED])
def test_same_global_seed_gives_kdiffusions_samples(k_diffusion, gmm, dtype, tol, name, opts):
    sig = k_diffusion.get_sigmas_karras(12, 0.002, 80.0).to(dtype)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)).to(dtype) * sig[0]
    runs = []
    for module in (K, k_diffusion):
        torch.manual_seed(5)
        runs.append((getattr(module, f"sample_{name}")(gmm, x, sig, disable=True, **opts), torch.randn(1)))
    (ours, after), (theirs, after_kd) = runs
    assert ours.dtype == dtype
    _close(ours, theirs, tol)
    assert torch.equal(after, after_kd)


@pytest.mark.usefixtures("float64_default")  # k-diffusion's float32 times cost it ~1e-3 here; see below
@pytest.mark.parametrize("name,opts", [("dpm_fast", {"n": 9, "eta": 1.0}), ("dpm_fast", {"n": 6}),
                                       ("dpm_adaptive", {"eta": 0.5}), ("dpm_adaptive", {})])  # fmt: skip
def test_dpm_solver_same_global_seed(k_diffusion, gmm, noise, name, opts):
    # One randn_like(x) per (accepted) step, eta = 0 included, from the global generator, as k-diffusion draws.
    runs = []
    for module in (K, k_diffusion):
        torch.manual_seed(5)
        out = getattr(module, f"sample_{name}")(gmm, noise * 80.0, 0.002, 80.0, disable=True, **opts)
        runs.append((out, torch.randn(1)))
    (ours, after), (theirs, after_kd) = runs
    _close(ours, theirs, 1e-9)
    assert torch.equal(after, after_kd)


# ---------------------------------------------------------------------- DPM-Solver-fast and adaptive


DPM_CASES = [
    ("dpm_fast", {"n": 10}),
    ("dpm_fast", {"n": 12, "eta": 0.6}),
    ("dpm_fast", {"n": 7, "eta": 1.0, "s_noise": 0.9}),
    ("dpm_fast", {"n": 2}),
    ("dpm_adaptive", {}),
    ("dpm_adaptive", {"order": 2}),
    ("dpm_adaptive", {"eta": 0.8, "rtol": 0.01, "atol": 0.001}),
    ("dpm_adaptive", {"order": 2, "eta": 1.0, "pcoeff": 0.2, "icoeff": 0.6, "dcoeff": 0.1, "h_init": 0.2}),
]


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("name,opts", DPM_CASES, ids=[_opts_id(c) for c in DPM_CASES])
def test_dpm_solver_equals_kdiffusion_given_the_noise(k_diffusion, gmm, noise, name, opts):
    adaptive = name == "dpm_adaptive"
    runs = []
    for module in (K, k_diffusion):
        seen, ns = [], Recorded(noise.shape)
        extra = {"return_info": True} if adaptive else {}
        out = getattr(module, f"sample_{name}")(gmm, noise * 80.0, 0.002, 80.0, callback=seen.append, disable=True,
                                                noise_sampler=ns, **opts, **extra)  # fmt: skip
        runs.append((out, seen, ns.calls))
    (ours, seen, calls), (theirs, seen_kd, calls_kd) = runs
    if adaptive:
        (ours, info), (theirs, info_kd) = ours, theirs
        assert info == info_kd and info["n_accept"] > 0 and info["n_reject"] > 0
        # The error estimate is the difference of two solutions that agree to ~1e-8 at sigma = 80, so rounding
        # of x (1e-16) is ~1e-8 of it in both libraries; the step sizes it sets, and so the times, inherit ~1e-10.
        _same_callbacks(seen, seen_kd, tol=2e-9, loose={"error"})
    else:
        _same_callbacks(seen, seen_kd)
    _close(ours, theirs)
    assert len(calls) == len(calls_kd) == len(seen) - (info["n_reject"] if adaptive else 0)  # every (accepted) step
    assert all(math.isclose(float(a), float(b), rel_tol=1e-9) for c, ck in zip(calls, calls_kd) for a, b in zip(c, ck))


@pytest.mark.usefixtures("float64_default")
def test_dpm_solver_pieces(k_diffusion, gmm, noise):
    # Reverse sampling (sigma_min above sigma_max: encoding, from 0.5 up to 20) as k-diffusion runs it; no eta there.
    x = noise * 0.5
    _close(K.sample_dpm_fast(gmm, x, 20.0, 0.5, 12), k_diffusion.sample_dpm_fast(gmm, x, 20.0, 0.5, 12))
    _close(K.sample_dpm_adaptive(gmm, x, 20.0, 0.5), k_diffusion.sample_dpm_adaptive(gmm, x, 20.0, 0.5), 1e-9)
    with pytest.raises(ValueError, match="eta must be 0 for reverse sampling"):
        K.sample_dpm_adaptive(gmm, x, 20.0, 0.5, eta=0.5)
    # The fast solver's orders spend exactly n evaluations.
    for nfe in range(1, 14):
        orders = fastdiff.solvers.adaptive.fast_orders(nfe)
        assert sum(orders) == nfe and orders == sorted(orders, reverse=True) and set(orders) <= {1, 2, 3}
    # A rejected step costs its evaluations and changes nothing; the controller's classic form is (1/err)^(1/k).
    pid = K.PIDStepSizeController(0.1, 0.0, 1.0, 0.0, order=3)
    assert pid.propose_step(0.5) and pid.h == pytest.approx(0.1 * (1 + math.atan(2 ** (1 / 3) - 1)))
    assert not pid.propose_step(100.0)
    assert pid.errs[1] == pytest.approx(2.0)  # the rejected error is not history


# ------------------------------------------------------------------------------------- the Brownian tree


def test_brownian_tree_is_kdiffusions(k_diffusion):
    x = torch.zeros(4, 3, dtype=torch.float64)
    for seed in (7, [1, 2, 3, 4]):
        ours, theirs = (
            K.BrownianTreeNoiseSampler(x, 0.01, 50.0, seed),
            k_diffusion.BrownianTreeNoiseSampler(x, 0.01, 50.0, seed),
        )
        for a, b in [(50.0, 20.0), (3.0, 2.5), (0.5, 0.01), (2.5, 3.0), (torch.tensor(7.0), torch.tensor(1.0))]:
            z = ours(a, b)
            assert z.shape == x.shape and z.dtype == x.dtype and torch.equal(z, theirs(a, b))
    # One path per batch element: element b's noise depends on its seed alone.
    batched = K.BrownianTreeNoiseSampler(x, 0.01, 50.0, [1, 2, 3, 4])(4.0, 3.0)
    alone = K.BrownianTreeNoiseSampler(x[:1], 0.01, 50.0, [3])(4.0, 3.0)
    assert torch.equal(batched[2:3], alone)
    for seeds in (np.arange(1, 5), torch.arange(1, 5)):  # NumPy and tensor seeds too
        assert torch.equal(K.BrownianTreeNoiseSampler(x, 0.01, 50.0, seeds)(4.0, 3.0), batched)
    assert torch.equal(K.BrownianTreeNoiseSampler(x, 0.01, 50.0, np.int64(7))(4.0, 3.0),
                       K.BrownianTreeNoiseSampler(x, 0.01, 50.0, 7)(4.0, 3.0))  # fmt: skip
    # A transform of sigma (k-diffusion's keyword), and the default seed drawn from the global generator.
    log = lambda s: s.log()  # noqa: E731
    torch.manual_seed(9)
    ours = K.BrownianTreeNoiseSampler(x, 0.01, 50.0, transform=log)
    torch.manual_seed(9)
    theirs = k_diffusion.BrownianTreeNoiseSampler(x, 0.01, 50.0, transform=log)
    assert torch.equal(ours(5.0, 1.0), theirs(5.0, 1.0))
    # Built on the CPU, the same numbers, moved to x's device.
    assert torch.equal(K.BrownianTreeNoiseSampler(x, 0.01, 50.0, 7, cpu=True)(4.0, 3.0),
                       k_diffusion.BrownianTreeNoiseSampler(x, 0.01, 50.0, 7)(4.0, 3.0))  # fmt: skip
    tree = K.BatchedBrownianTree(x, 2.0, 1.0, seed=3)  # t0 > t1: the increments change sign
    assert torch.equal(tree(1.0, 1.5), -k_diffusion.BatchedBrownianTree(x, 2.0, 1.0, seed=3)(1.5, 1.0))
    with pytest.raises(ValueError, match="one per batch element"):
        K.BrownianTreeNoiseSampler(x, 0.01, 50.0, [1, 2])


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
    # And they converge to it: doubling both step counts shrinks the gap.
    coarser = gap(
        K.sample_dpmpp_2m_sde(gmm, x, schedules.karras(12, 0.002, 80.0), seed=5),
        K.sample_dpmpp_2m_sde(gmm, x, coarse, seed=5),
    )
    assert same < 0.6 * coarser, (same, coarser)


# ------------------------------------------------------------------------ the mapping onto fastdiff's solvers


MAPPED = ["euler", "heun", "dpm_2", "euler_ancestral", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
          "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ipndm"]  # fmt: skip


@pytest.mark.parametrize("name", MAPPED)
def test_each_sampler_runs_the_core_solver_of_its_name(gmm, noise, monkeypatch, name):
    asked, ran = [], []
    real_get, real_sample = solvers.get, fastdiff.sample

    def get(solver, **options):
        if isinstance(solver, str):
            asked.append(solver)
        return real_get(solver, **options)

    monkeypatch.setattr(K.solvers, "get", get)
    monkeypatch.setattr(K, "sample", lambda *a, **kw: ran.append(kw["solver"].name) or real_sample(*a, **kw))
    given = lambda: {"noise_sampler": Recorded(noise.shape)} if "ancestral" in name or "sde" in name else {}  # noqa: E731
    out = getattr(K, f"sample_{name}")(gmm, noise * 80.0, SIG, **given())
    assert asked[0] == name
    assert ran == ([] if name in CHURN else [name])  # churn wraps the solver's own step
    # The same solver through fastdiff.sample gives the same sample, bit for bit (churn without churn too).
    assert torch.equal(out, real_sample(gmm, noise * 80.0, SIG, solver=real_get(name), **given()))


def test_dpmpp_3m_eta0_is_fastdiff_3m_but_for_kdiffusions_second_step(gmm, noise):
    sig = SIG.tolist()
    ours, fastdiff_3m = K.KDiffusionDPMSolverPP3M(), solvers.DPMSolverPP3M()
    for i in range(len(sig) - 1):
        a, b = ours.coefficients(sig, i)
        if i == 1:  # k-diffusion: phi_2(h) (D - D_1) / r; fastdiff/diffusers: the 2M midpoint weight (1 - e^-h) / 2r
            h = math.log(sig[1] / sig[2])
            r = math.log(sig[0] / sig[1]) / h
            assert b[1] == pytest.approx(-(math.expm1(-h) / h + 1) / r, rel=1e-12)
            assert fastdiff_3m.coefficients(sig, i)[1][1] == pytest.approx(math.expm1(-h) / (2 * r), rel=1e-12)
        else:
            assert (a, b) == fastdiff_3m.coefficients(sig, i)
    seen = []
    K.sample_dpmpp_3m_sde(gmm, noise * 80.0, SIG, eta=0.0, callback=seen.append)
    assert len(seen) == 12


def test_stochastic_step_is_one_fused_op_with_the_noise(gmm, noise, monkeypatch):
    calls = []
    real = fastdiff.ops.guided_step

    def counting(x, d, d_uncond, history, **kw):
        calls.append(kw["noise"] is not None)
        return real(x, d, d_uncond, history, **kw)

    monkeypatch.setattr(fastdiff.ops, "guided_step", counting)
    for fn in (K.sample_euler_ancestral, K.sample_dpmpp_2m_sde, K.sample_dpmpp_3m_sde):
        calls.clear()
        fn(gmm, noise * 80.0, SIG, noise_sampler=Recorded(noise.shape))
        assert calls == [True] * 11 + [False]  # one op a step; the step to 0 returns D and draws nothing


# ------------------------------------------------------------------------------------ fastdiff's extensions


def test_seeded_runs_reproduce(gmm, noise):
    x = noise * SIG[0]
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    runs = {
        "generator": lambda: K.sample_euler_ancestral(gmm, x, SIG, generator=g()),
        "generator_2s": lambda: K.sample_dpmpp_2s_ancestral(gmm, x, SIG, generator=g()),
        "churn_generator": lambda: K.sample_dpm_2(gmm, x, SIG, s_churn=1.0, generator=g()),
        "seed": lambda: K.sample_dpmpp_2m_sde(gmm, x, SIG, seed=1),
        "seed_sde": lambda: K.sample_dpmpp_sde(gmm, x, SIG, seed=1),
        "seed_3m": lambda: K.sample_dpmpp_3m_sde(gmm, x[:4], SIG, seed=[1, 2, 3, 4]),  # a tree per element: slow
        "noise_sampler": lambda: K.sample_dpmpp_2m_sde(gmm, x, SIG, noise_sampler=K.default_noise_sampler(x, seed=4)),
    }
    for name, run in runs.items():
        assert torch.equal(run(), run()), name
    assert not torch.equal(K.sample_dpmpp_2m_sde(gmm, x, SIG, seed=1), K.sample_dpmpp_2m_sde(gmm, x, SIG, seed=2))
    # generator= draws what the global generator would draw from the same seed.
    torch.manual_seed(1)
    assert torch.equal(K.sample_heun(gmm, x, SIG, s_churn=1.0), K.sample_heun(gmm, x, SIG, s_churn=1.0, generator=g()))


def test_churn_noise_sampler_is_asked_for_churned_steps_only(gmm, noise):
    ns = Recorded(noise.shape)
    seen = []
    K.sample_heun(gmm, noise * 80.0, SIG, s_churn=2.0, s_tmin=0.05, s_tmax=10.0, noise_sampler=ns, callback=seen.append)
    churned = [d for d in seen if float(d["sigma_hat"]) != float(d["sigma"])]
    assert 0 < len(churned) == len(ns.calls) < 12
    for d, (sigma, sigma_hat) in zip(churned, ns.calls):
        assert float(sigma) == float(d["sigma"]) and float(sigma_hat) == pytest.approx(float(sigma) * (1 + 2 / 12))


def _mixture_moments(gmm):
    w = gmm.log_weights.exp()
    mean = (w[:, None] * gmm.means).sum(0)
    second = sum(wk * (torch.diag(vk) + torch.outer(mk, mk)) for wk, mk, vk in zip(w, gmm.means, gmm.variances))
    return mean, second - torch.outer(mean, mean)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"])
def test_stochastic_samplers_sample_the_mixture(gmm, name):
    # n = 4096 samples of a 2-D mixture with coordinate variances ~2.1: the sample mean's std is
    # sqrt(2.1 / n) = 0.023 and a covariance entry's about sqrt(Var(x_j x_k) / n) <= 0.03; 3.5 of those plus the
    # discretisation bias of 50 steps. Too little noise (s_noise = 0.5) fails the same bounds.
    n = 4096
    x = 80.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    sig = schedules.karras(50, 0.002, 80.0)
    fn = getattr(K, f"sample_{name}")
    mean, cov = _mixture_moments(gmm)

    def error(out):
        return (out.mean(0) - mean).abs().max().item(), (torch.cov(out.T) - cov).abs().max().item()

    noise = lambda: {"noise_sampler": K.default_noise_sampler(x, seed=2)}  # noqa: E731
    err_mean, err_cov = error(fn(gmm, x, sig, **noise()))
    assert err_mean < 0.08 and err_cov < 0.12, (err_mean, err_cov)
    damped = fn(gmm, x, sig, s_noise=0.5, **noise())
    assert error(damped)[1] > 0.12


# ------------------------------------------------------------------------------------ API, NumPy and errors


ALL_SAMPLERS = [getattr(K, f"sample_{name}") for name in MAPPED]


@pytest.mark.parametrize("fn", ALL_SAMPLERS, ids=lambda f: f.__name__)
def test_callback_dict_and_extra_args(gmm, noise, fn):
    x = noise * SIG[0]
    y = torch.arange(64) % 4
    stochastic = "sde" in fn.__name__ or "ancestral" in fn.__name__
    opts = lambda: {"noise_sampler": Recorded(x.shape)} if stochastic else {}  # noqa: E731
    spy, seen = Spy(gmm), []
    torch.manual_seed(0)
    out = fn(spy, x, SIG, extra_args={"class_labels": y}, callback=seen.append, disable=True, **opts())
    assert all(kw.keys() == {"class_labels"} and kw["class_labels"] is y for kw in spy.kwargs)
    assert [d["i"] for d in seen] == list(range(12))
    assert all(set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"} for d in seen)
    assert all(torch.is_tensor(d["sigma"]) and float(d["sigma"]) == float(SIG[d["i"]]) for d in seen)
    assert torch.equal(seen[0]["x"], x)
    first = gmm(x, torch.full((64,), 80.0, dtype=torch.float64), class_labels=y)
    _close(seen[0]["denoised"], first, 1e-12)
    assert out.shape == x.shape and out.dtype == x.dtype
    # The labels reach the model: the class-conditional samples are the conditional model's.
    torch.manual_seed(0)
    _close(out, fn(lambda x, s: gmm(x, s, class_labels=y), x, SIG, **opts()))
    assert not torch.allclose(out, fn(gmm, x, SIG, **opts()))


@pytest.mark.usefixtures("float64_default")
def test_numpy_numbers_and_arrays(k_diffusion, gmm, noise):
    n, lo, hi = np.int64(7), np.float32(0.03), np.float64(14.6)
    for name in ("karras", "exponential", "polyexponential"):
        ours = getattr(K, f"get_sigmas_{name}")(n, lo, hi)
        assert torch.allclose(ours, getattr(k_diffusion, f"get_sigmas_{name}")(7, float(lo), 14.6), rtol=1e-12)
    assert torch.allclose(K.get_sigmas_vp(np.int32(7), np.float64(19.9)), k_diffusion.get_sigmas_vp(7), rtol=1e-12)
    x = noise * 80.0
    sig = SIG.numpy()
    assert torch.equal(K.sample_lms(gmm, x, SIG, order=np.int64(3)), K.sample_lms(gmm, x, SIG, order=3))
    assert torch.equal(K.sample_dpmpp_2m(gmm, x, sig), K.sample_dpmpp_2m(gmm, x, SIG))  # a NumPy schedule
    assert torch.equal(K.sample_dpmpp_2m(gmm, x, SIG.tolist()), K.sample_dpmpp_2m(gmm, x, SIG))  # a list
    given = lambda: {"noise_sampler": Recorded(x.shape)}  # noqa: E731
    assert torch.equal(K.sample_dpmpp_sde(gmm, x, sig, eta=np.float64(0.5), r=np.float32(0.25), **given()),
                       K.sample_dpmpp_sde(gmm, x, SIG, eta=0.5, r=float(np.float32(0.25)), **given()))  # fmt: skip
    torch.manual_seed(0)
    a = K.sample_euler(gmm, x, sig, s_churn=np.float32(1.5), s_tmin=np.float64(0.1), s_noise=np.int64(1))
    torch.manual_seed(0)
    assert torch.equal(a, K.sample_euler(gmm, x, SIG, s_churn=1.5, s_tmin=0.1, s_noise=1.0))
    assert torch.equal(K.sample_dpm_fast(gmm, x, np.float64(0.002), 80.0, np.int64(6)),
                       K.sample_dpm_fast(gmm, x, 0.002, 80.0, 6))  # fmt: skip
    assert K.sample_dpm_adaptive(gmm, x, 0.002, 80.0, order=np.int64(2), return_info=True)[1]["nfe"] > 0
    assert K.linear_multistep_coeff(np.int64(3), sig, np.int64(4), 1) == pytest.approx(
        k_diffusion.linear_multistep_coeff(3, sig, 4, 1), rel=1e-9
    )


@pytest.mark.usefixtures("float64_default")
def test_schedules_and_helpers_match_kdiffusion(k_diffusion):
    n, lo, hi, kd = 7, 0.03, 14.6, k_diffusion
    for got, want in [(K.get_sigmas_karras(n, lo, hi), kd.get_sigmas_karras(n, lo, hi)),
                      (K.get_sigmas_karras(n, lo, hi, rho=3.0), kd.get_sigmas_karras(n, lo, hi, rho=3.0)),
                      (K.get_sigmas_exponential(n, lo, hi), kd.get_sigmas_exponential(n, lo, hi)),
                      (K.get_sigmas_polyexponential(n, lo, hi, rho=2.0), kd.get_sigmas_polyexponential(n, lo, hi, 2.0)),
                      (K.get_sigmas_vp(n), kd.get_sigmas_vp(n))]:  # fmt: skip
        assert got.shape == want.shape and got.dtype == want.dtype and got[-1] == 0
        assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert K.get_sigmas_karras(n, lo, hi, device="meta").device.type == "meta"
    x, d = torch.randn(2, 3), torch.randn(2, 3)
    for sigma in (torch.tensor([1.0, 2.0]), torch.tensor(4.0)):
        assert torch.allclose(K.to_d(x, sigma, d), k_diffusion.to_d(x, sigma, d))
    for eta in (0.0, 0.3, 1.0, 5.0):
        for s, s_next in [(3.0, 2.0), (torch.tensor(3.0), torch.tensor(2.0)), (3.0, 0.0)]:
            assert [float(v) for v in K.get_ancestral_step(s, s_next, eta)] == pytest.approx(
                [float(v) for v in k_diffusion.get_ancestral_step(s, s_next, eta)], rel=1e-6
            )
    t = SIG.numpy()
    for order, i in [(1, 0), (2, 3), (4, 7), (4, 11)]:  # 11: the step to 0
        for j in range(order):
            assert K.linear_multistep_coeff(order, t, i, j) == pytest.approx(
                k_diffusion.linear_multistep_coeff(order, t, i, j), rel=1e-9, abs=1e-12
            )
    with pytest.raises(ValueError, match="too high for step"):
        K.linear_multistep_coeff(3, t, 1, 0)
    assert K.churn_gamma(5.0, 10, 1.0) == pytest.approx(0.1) and K.churn_gamma(5.0, 1, 40.0) == math.sqrt(2) - 1
    assert K.churn_gamma(5.0, 10, 1.0, s_tmax=4.0) == 0.0
    torch.manual_seed(3)
    z = K.default_noise_sampler(x)(1.0, 0.5)
    torch.manual_seed(3)
    assert torch.equal(z, k_diffusion.default_noise_sampler(x)(1.0, 0.5))
    assert torch.equal(K.default_noise_sampler(x, seed=2)(1.0, 0.5), K.default_noise_sampler(x, seed=2)(1.0, 0.5))


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
    with pytest.raises(ValueError, match="model returned shape"):
        K.sample_dpm_fast(lambda x, s: x[:, :1], x, 0.002, 80.0, 5)
    with pytest.raises(ValueError, match="noise_sampler returned shape \\(64, 3\\)"):
        K.sample_dpmpp_2m_sde(gmm, x, SIG, noise_sampler=lambda s, t: torch.zeros(64, 3))
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun'"):
        K.sample_dpmpp_2m_sde(gmm, x, SIG, solver_type="rk4")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        K.sample_euler_ancestral(gmm, x, SIG, eta=-1.0)
    with pytest.raises(ValueError, match="s_churn must be >= 0"):
        K.sample_heun(gmm, x, SIG, s_churn=-1.0)
    with pytest.raises(ValueError, match="s_tmin <= s_tmax"):
        K.sample_dpm_2(gmm, x, SIG, s_churn=1.0, s_tmin=5.0, s_tmax=1.0)
    with pytest.raises(ValueError, match="r must be in"):
        K.sample_dpmpp_sde(gmm, x, SIG, r=0.0)
    with pytest.raises(ValueError, match="either noise_sampler or generator"):
        K.sample_euler_ancestral(gmm, x, SIG, noise_sampler=Recorded(x.shape), generator=torch.Generator())
    with pytest.raises(ValueError, match="either noise_sampler or seed"):
        K.sample_dpmpp_3m_sde(gmm, x, SIG, noise_sampler=Recorded(x.shape), seed=1)
    with pytest.raises(TypeError, match="extra_args must be a dict"):
        K.sample_dpmpp_2m(gmm, x, SIG, extra_args=[1])
    with pytest.raises(ValueError, match="max_order must be 1, 2, 3 or 4"):
        K.sample_ipndm(gmm, x, SIG, max_order=5)
    with pytest.raises(ValueError, match="order must be"):
        K.sample_lms(gmm, x, SIG, order=0)
    with pytest.raises(ValueError, match="sigma_min and sigma_max must be positive"):
        K.sample_dpm_fast(gmm, x, 0.0, 80.0, 5)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        K.sample_dpm_fast(gmm, x, 0.002, 80.0, 0)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        K.sample_dpm_adaptive(gmm, x, 0.002, 80.0, order=1)
    with pytest.raises(ValueError, match="rtol and atol cannot both be 0"):
        K.sample_dpm_adaptive(gmm, x, 0.002, 80.0, rtol=0.0, atol=0.0)
    with pytest.raises(FloatingPointError, match="error estimate is nan"):  # not an endless loop of rejections
        K.sample_dpm_adaptive(lambda x, s: x * math.nan, x, 0.002, 80.0)
    with pytest.raises(ValueError, match="the number of steps n must be a positive integer"):
        K.get_sigmas_vp(0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        K.get_sigmas_karras(5, 1.0, 0.5)


def test_default_noise_sampler_draws_independently_as_k_diffusions(gmm, k_diffusion):
    """default_noise_sampler gives a fresh randn_like at every call, as k-diffusion's does, even where
    sample_dpmpp_sde asks for nested intervals (fastdiff's own default noise would compose those): the same seed
    gives k-diffusion's samples."""
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80
    sig = schedules.karras(6, 0.002, 80.0)
    outs = []
    for lib in (K, k_diffusion):
        torch.manual_seed(11)
        outs.append(lib.sample_dpmpp_sde(gmm, x, sig, disable=True, noise_sampler=lib.default_noise_sampler(x)))
    assert _rel(outs[0], outs[1]) < 1e-10
