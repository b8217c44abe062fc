"""The ODE solvers taken from k-diffusion and ComfyUI: dpm_2, lms, deis, res_multistep, gradient_estimation.

dpm_2 and lms run against the installed k-diffusion's own ``sample_dpm_2`` and ``sample_lms``. ComfyUI is not a
dependency, so deis, res_multistep and gradient_estimation run against plain float64 loops written here from
ComfyUI's update equations (``comfy/k_diffusion/sampling.py`` and ``deis.py``), with no fastdiff solver code. All
on the exact Gaussian-mixture denoiser, through both ``fastdiff.sample`` and ``fastdiff.Sampler``.
"""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

import fastdiff
from fastdiff import schedules, solvers

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = 1e-10  # float64 throughout: the loops agree to rounding (~1e-15); a wrong coefficient shows at 1e-3
SCHEDULES = {
    "karras5": schedules.karras(5, 0.002, 80.0),
    "karras12": schedules.karras(12, 0.002, 80.0),
    "karras12_no_zero": schedules.karras(12, 0.002, 80.0)[:-1],
    "logsnr8": schedules.logsnr_uniform(8, 0.002, 80.0),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float64
    return ((a - b).abs().max() / b.abs().max()).item()


def _both_loops(gmm, x, sigmas, solver):
    """fastdiff.sample's result with the denoised estimates its callback saw, and fastdiff.Sampler's result."""
    seen = []
    host = fastdiff.sample(gmm, x, sigmas, solver=solver, callback=seen.append)
    device = fastdiff.Sampler(gmm, solver=solver, sigmas=sigmas).sample(x)
    return host, device, [d["denoised"] for d in seen]


def _call(model, x, s):
    return model(x, torch.full((x.shape[0],), float(s), dtype=x.dtype))


def _lagrange(tau, nodes, j):
    """The Lagrange basis polynomial of ``nodes[j]`` at ``tau`` (a float or an array)."""
    return math.prod((tau - nodes[k]) / (nodes[j] - nodes[k]) for k in range(len(nodes)) if k != j)


# --------------------------------------------------------------------------------- k-diffusion: dpm_2, lms


KD_CASES = [("dpm_2", {}), *[("lms", {"order": k}) for k in (1, 2, 3, 4)]]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name,opts", KD_CASES, ids=[f"{n}{o.get('order', '')}" for n, o in KD_CASES])
def test_matches_k_diffusion(gmm, noise, k_diffusion, name, opts, schedule):
    sigmas = SCHEDULES[schedule]
    x = noise * 80.0
    seen = []
    ref = getattr(k_diffusion, f"sample_{name}")(gmm, x.clone(), sigmas, disable=True, callback=seen.append, **opts)
    host, device, denoised = _both_loops(gmm, x, sigmas, solvers.get(name, **opts))
    assert _rel_err(host, ref) <= TIGHT
    assert _rel_err(device, ref) <= TIGHT
    assert len(denoised) == len(seen)
    for d, kd in zip(denoised, seen):  # the callbacks see the first evaluation of each step
        assert _rel_err(d, kd["denoised"]) <= TIGHT


def test_lms_steps_into_zero_with_the_multistep_rule(gmm, noise):
    # k-diffusion 0.1.1 applies its multistep rule on the last step too (ComfyUI returns D there instead).
    sigmas = SCHEDULES["karras5"]
    seen = []
    out = fastdiff.sample(gmm, noise * 80.0, sigmas, solver="lms", callback=seen.append)
    assert _rel_err(out, seen[-1]["denoised"]) > 1e-6


def test_lms_weights_are_k_diffusions_quadrature():
    # k-diffusion's linear_multistep_coeff: quad of the Lagrange basis over [sigma_i, sigma_{i+1}].
    sig = schedules.karras(9, 0.002, 80.0).tolist()
    for i in range(len(sig) - 1):
        n = min(4, i + 1)
        nodes = [sig[i - k] for k in range(n)]
        weights = [integrate.quad(_lagrange, sig[i], sig[i + 1], args=(nodes, j), epsrel=1e-13)[0] for j in range(n)]
        a, b = solvers.lms_coefficients(sig, i, 4)
        # x' = x + sum_j w_j d_{i-j}, d_i = (x - D_i) / sigma_i
        want = [1 + weights[0] / sig[i], -weights[0] / sig[i], *weights[1:]]
        assert [a, *b] == pytest.approx(want, rel=1e-12, abs=1e-12 * sig[i])


# ------------------------------------------------------------------------- ComfyUI: plain-float64 references


def ref_gradient_estimation(model, x, sig, ge_gamma=2.0):
    """ComfyUI's sample_gradient_estimation (no CFG++): Euler, plus (ge_gamma - 1)(d - d_old) dt after step 0;
    the step to 0 returns D."""
    d_old = None
    for i in range(len(sig) - 1):
        den = _call(model, x, sig[i])
        d = (x - den) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = den
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - d_old) * dt
        d_old = d
    return x


def ref_res_multistep(model, x, sig):
    """ComfyUI's sample_res_multistep (eta = 0, so sigma_down = sigma_{i+1}, and no CFG++): Euler on the first
    step and into 0; otherwise x' = e^{-h} x + h (b1 D + b2 D_old) in t = -log sigma, with c2 = (t_prev - t_old)/h,
    b1 = phi1(-h) - phi2(-h)/c2, b2 = phi2(-h)/c2."""
    phi1 = lambda t: math.expm1(t) / t  # noqa: E731
    phi2 = lambda t: (phi1(t) - 1.0) / t  # noqa: E731
    t_fn = lambda s: -math.log(s)  # noqa: E731
    old_den, old_sigma_down = None, None
    for i in range(len(sig) - 1):
        den = _call(model, x, sig[i])
        sigma_down = sig[i + 1]
        if sigma_down == 0 or old_den is None:
            x = x + (x - den) / sig[i] * (sigma_down - sig[i])
        else:
            t, t_old, t_next, t_prev = t_fn(sig[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sig[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            b1 = phi1(-h) - phi2(-h) / c2
            b2 = phi2(-h) / c2
            x = math.exp(-h) * x + h * (b1 * den + b2 * old_den)
        old_den, old_sigma_down = den, sigma_down
    return x


# DEIS "tab" (ComfyUI's deis.py): sigma -> t through a VP-SDE fitted to sigma(1e-3) = 0.002, sigma(1) = 80; the
# weights are int_{t_i}^{t_{i+1}} integrand(tau) l_j(tau) dtau with integrand = -1/2 (d log alpha / dtau) /
# sqrt(alpha (1 - alpha)), alpha(tau) = exp(-beta_d tau^2 / 2 - beta_min tau), l_j the Lagrange basis on t_{i-k}.
EPS_S, SIGMA_MIN, SIGMA_MAX = 1e-3, 0.002, 80.0
BETA_D = 2 * (math.log(SIGMA_MIN**2 + 1) / EPS_S - math.log(SIGMA_MAX**2 + 1)) / (EPS_S - 1)
BETA_MIN = math.log(SIGMA_MAX**2 + 1) - 0.5 * BETA_D


def _edm2t(sigma):
    return (math.sqrt(BETA_MIN**2 + 2 * BETA_D * math.log(sigma**2 + 1)) - BETA_MIN) / BETA_D


def _deis_integrand(tau):
    alpha = np.exp(-0.5 * BETA_D * tau**2 - BETA_MIN * tau)
    d_log_alpha = -(BETA_D * tau + BETA_MIN)
    return -0.5 * d_log_alpha / np.sqrt(alpha * (1 - alpha))


def _quad(t0, t1, nodes, j):
    """One weight by adaptive quadrature, to ~1e-13."""
    f = lambda tau: _deis_integrand(tau) * _lagrange(tau, nodes, j)  # noqa: E731
    return integrate.quad(f, t0, t1, epsabs=0, epsrel=1e-13)[0]


def _riemann(t0, t1, nodes, j, n=10_000):
    """ComfyUI's own rule: the integrand at the n points of linspace(t0, t1, n), summed, times (t1 - t0) / n."""
    taus = np.linspace(t0, t1, n)
    return float(np.sum(_deis_integrand(taus) * _lagrange(taus, nodes, j)) * (t1 - t0) / n)


def deis_weights(sig, max_order, rule=_quad):
    """Every step's DEIS weights by ``rule`` (none for the step into 0, where ComfyUI takes an Euler step)."""
    ts = [_edm2t(s) for s in sig]
    out = []
    for i in range(len(sig) - 1):
        nodes = [ts[i - k] for k in range(min(i + 1, max_order))]
        out.append([] if sig[i + 1] == 0 else [rule(ts[i], ts[i + 1], nodes, j) for j in range(len(nodes))])
    return out


def ref_deis(model, x, sig, weights, max_order=3):
    """ComfyUI's sample_deis: Euler on the first step and into 0, else x' = x + sum_j w_j d_{i-j}."""
    ds = []
    for i in range(len(sig) - 1):
        d = (x - _call(model, x, sig[i])) / sig[i]
        order = 1 if sig[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x = x + (sig[i + 1] - sig[i]) * d
        else:
            x = x + sum(w * dj for w, dj in zip(weights[i], [d, *reversed(ds)]))
        ds = (ds + [d])[-(max_order - 1) :] if max_order > 1 else []
    return x


COMFY_CASES = [
    ("gradient_estimation", {}),
    ("gradient_estimation", {"ge_gamma": 1.5}),
    ("res_multistep", {}),
    *[("deis", {"max_order": k}) for k in (1, 2, 3, 4)],
]


def _comfy_reference(gmm, x, sig, name, opts):
    if name == "gradient_estimation":
        return ref_gradient_estimation(gmm, x, sig, **opts)
    if name == "res_multistep":
        return ref_res_multistep(gmm, x, sig)
    return ref_deis(gmm, x, sig, deis_weights(sig, opts["max_order"]), opts["max_order"])


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name,opts", COMFY_CASES, ids=[f"{n}{list(o.values())}" for n, o in COMFY_CASES])
def test_matches_comfyui_update_equations(gmm, noise, name, opts, schedule):
    sigmas = SCHEDULES[schedule]
    x = noise * 80.0
    ref = _comfy_reference(gmm, x, sigmas.tolist(), name, opts)
    host, device, _ = _both_loops(gmm, x, sigmas, solvers.get(name, **opts))
    assert _rel_err(host, ref) <= TIGHT
    assert _rel_err(device, ref) <= TIGHT


def test_deis_differs_from_comfyuis_riemann_sum_by_its_quadrature_error(gmm, noise):
    # ComfyUI's 10,000-point sum is off by O(1e-4) (2e-5 here) relative in the weights; fastdiff integrates to rounding.
    sig = SCHEDULES["karras12"].tolist()
    exact, riemann = deis_weights(sig, 3), deis_weights(sig, 3, _riemann)
    rel = max(abs(r - e) / abs(e) for ws, rs in zip(exact, riemann) for e, r in zip(ws, rs) if len(ws) > 1)
    assert 1e-6 < rel < 1e-3
    out = fastdiff.sample(gmm, noise * 80.0, SCHEDULES["karras12"], solver="deis")
    assert _rel_err(out, ref_deis(gmm, noise * 80.0, sig, riemann)) < 1e-3


def test_deis_weights_reach_rounding_down_to_tiny_sigmas():
    # The Gauss-Legendre rule where the integrand is least smooth: steps that end far below DEIS's own sigma_min,
    # where sigma'(t) nearly meets its branch point (there scipy's quad in t loses digits; mpmath's tanh-sinh at 30
    # digits does not).
    mp = pytest.importorskip("mpmath")
    with mp.workdps(30):
        eps_s, sigma_min, sigma_max = (mp.mpf(v) for v in (EPS_S, SIGMA_MIN, SIGMA_MAX))
        beta_d = 2 * (mp.log(sigma_min**2 + 1) / eps_s - mp.log(sigma_max**2 + 1)) / (eps_s - 1)
        beta_min = mp.log(sigma_max**2 + 1) - beta_d / 2

        def t_of(sigma):
            return (mp.sqrt(beta_min**2 + 2 * beta_d * mp.log(mp.mpf(sigma) ** 2 + 1)) - beta_min) / beta_d

        def integrand(tau):
            alpha = mp.exp(-beta_d * tau**2 / 2 - beta_min * tau)
            return (beta_d * tau + beta_min) / 2 / mp.sqrt(alpha * (1 - alpha))

        def weight(nodes, j, span):
            return float(mp.quad(lambda tau: integrand(tau) * _lagrange(tau, nodes, j), span))

        sig = [2.0, 0.5, 0.1, 0.02, 1e-3, 1e-8, 0.0]
        for i in range(1, len(sig) - 2):
            nodes = [t_of(sig[i - k]) for k in range(min(i + 1, 4))]
            want = [weight(nodes, j, [t_of(sig[i]), t_of(sig[i + 1])]) for j in range(len(nodes))]
            _, b = solvers.deis_coefficients(sig, i, 4)
            got = [-b[0] * sig[i], *b[1:]]  # x' = x + sum_j w_j d_{i-j}: b_0 = -w_0 / sigma_i
            assert got == pytest.approx(want, rel=0, abs=1e-14 * (sig[i] - sig[i + 1]))


def test_deis_logrho_weights_are_the_integrals_they_define():
    """DEIS in log-rho (diffusers' form): each weight is int_{s_i}^{s_{i+1}} l_j(log s) ds, taken in closed form
    (lagrange_exp_integrals); checked against scipy's quad on the definition, and differentiable in the sigmas."""
    from fastdiff.solvers.multistep import deis_logrho_coefficients, lagrange_exp_integrals

    sig = SCHEDULES["karras12"].tolist()
    for i in (2, 5, 9):
        for order in (2, 3, 4):
            _, b = deis_logrho_coefficients(sig, i, order)
            weights = [-b[0] * sig[i], *b[1:]]
            n = min(order, i + 1)  # the warm-up
            assert len(weights) == n
            logs = [math.log(sig[i - k]) for k in range(n)]
            for j, w in enumerate(weights):

                def basis(s, j=j, logs=logs, n=n):
                    v = math.log(s)
                    return math.prod((v - logs[k]) / (logs[j] - logs[k]) for k in range(n) if k != j)

                expected, _ = integrate.quad(basis, sig[i], sig[i + 1], epsabs=0, epsrel=1e-13)
                assert w == pytest.approx(expected, rel=1e-10, abs=1e-13)
    nodes = torch.tensor([0.0, 0.4, 0.9], dtype=torch.float64, requires_grad=True)
    h = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda u, hh: torch.stack(lagrange_exp_integrals(list(u.unbind()), hh)), (nodes, h))
