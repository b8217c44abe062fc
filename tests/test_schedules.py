import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_files_support import make_fifo, make_symlink_loop, no_hang

from fastdiff import schedules


# The schedules that span [sigma_min, sigma_max] exactly; the others (a model's table, a published table, a flow
# shift, linear_quadratic's formula) are checked against their definitions below.
SPANNING = ["karras", "logsnr_uniform", "time_uniform", "exponential", "polyexponential", "beta", "kl_optimal"]


@pytest.mark.parametrize("name", SPANNING)
@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_shape_order_and_endpoints(name, n):
    s = schedules.get(name, n, 0.002, 80.0)
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    assert s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert torch.isclose(s[0], torch.tensor(80.0, dtype=torch.float64))
    if n > 1:
        assert torch.isclose(s[-2], torch.tensor(0.002, dtype=torch.float64))


def test_karras_matches_the_edm_formula():
    s = schedules.karras(4, 0.002, 80.0, rho=7.0)
    i = torch.arange(4, dtype=torch.float64)
    expected = (80.0 ** (1 / 7) + i / 3 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert torch.allclose(s[:-1], expected)


def test_logsnr_uniform_is_uniform_in_log_sigma():
    s = schedules.logsnr_uniform(9, 0.01, 10.0)[:-1]
    steps = s.log().diff()
    assert torch.allclose(steps, steps[0].expand_as(steps))


def test_time_uniform_is_uniform_in_vp_time():
    s = schedules.time_uniform(6, 0.05, 50.0)[:-1]
    t = schedules.vp_sigma_to_t(s)
    assert torch.allclose(t.diff(), t.diff()[0].expand(5))
    assert torch.allclose(schedules.vp_t_to_sigma(t), s)


@pytest.mark.parametrize(
    "bad,match",
    [
        ([3.0, 2.0, 2.0, 0.0], "strictly decreasing"),
        ([1.0, 2.0, 0.0], "strictly decreasing"),
        ([3.0, float("nan"), 0.0], "NaN or Inf at positions \\[1\\]"),
        ([float("inf"), 1.0, 0.0], "NaN or Inf"),
        ([1.0], "at least 2 entries"),
        ([[1.0, 0.0]], "1-D"),
        ([1.0, -0.5], "negative"),
    ],
)
def test_validate_refuses_bad_schedules(bad, match):
    with pytest.raises(ValueError, match=match):
        schedules.validate(torch.tensor(bad, dtype=torch.float64))


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="positive integer"):
        schedules.karras(0, 0.002, 80.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        schedules.karras(5, 80.0, 0.002)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.get("cosine", 5, 0.002, 80.0)


def test_save_and_load_roundtrip(tmp_path):
    s = schedules.karras(7, 0.002, 80.0)
    path = tmp_path / "learned.json"
    schedules.save(path, s, solver="ipndm", note="test")
    assert torch.equal(schedules.load(path), s)
    assert json.loads(path.read_text())["metadata"] == {"solver": "ipndm", "note": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["learned.json"]  # no temporary left behind


def test_load_refuses_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        schedules.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        schedules.load(bad)
    bad.write_text(json.dumps({"sigmas": [1.0, 0.0]}))
    with pytest.raises(ValueError, match="not a fastdiff schedule file"):
        schedules.load(bad)
    bad.write_text(json.dumps({"format": "fastdiff-schedule", "sigmas": [1.0, 2.0, 0.0]}))
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedules.load(bad)


@pytest.mark.parametrize("space", ["logsnr", "time"])
def test_ld3_parameterisation(space):
    ones = torch.ones(9, dtype=torch.float64)
    s = schedules.ld3_sigmas(ones, 0.002, 80.0, space=space)
    expected = (
        schedules.logsnr_uniform(9, 0.002, 80.0)[:-1]
        if space == "logsnr"
        else torch.linspace(80, 0.002, 9, dtype=torch.float64)
    )
    assert torch.allclose(s, expected.double(), rtol=1e-12)
    xi = torch.randn(9, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    s = schedules.ld3_sigmas(xi, 0.002, 80.0, space=space, append_zero=True)
    assert s.shape == (10,) and s[-1] == 0 and torch.allclose(s[[0, -2]], torch.tensor([80.0, 0.002]).double())
    schedules.validate(s.detach())
    assert torch.autograd.gradcheck(lambda v: schedules.ld3_sigmas(v, 0.002, 80.0, space=space), (xi,))


def test_ld3_errors():
    with pytest.raises(ValueError, match="1-D float tensor"):
        schedules.ld3_sigmas(torch.ones(1), 0.1, 1.0)
    with pytest.raises(ValueError, match="space must be"):
        schedules.ld3_sigmas(torch.ones(4), 0.1, 1.0, space="sigma")


# ------------------------------------------------------------------------------------------ bad input (issue 18)


def _schedule_file(tmp_path, payload, name="s.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def _ok(**extra):
    return {"format": "fastdiff-schedule", "version": 1, "sigmas": [2.0, 1.0, 0.0], **extra}


@pytest.mark.parametrize(
    "payload,match",
    [
        ("[" * 100_000 + "]" * 100_000, "too deeply nested"),
        (_ok(sigmas="2.0, 1.0, 0.0"), "s\\.json: sigmas must be a list of numbers, got a string"),
        (_ok(sigmas=[True, False]), r"s\.json: sigmas\[0\] must be a real number, got True"),
        (_ok(sigmas=["2", "1", "0"]), r"s\.json: sigmas\[0\] must be a real number, got '2'"),
        (_ok(sigmas=[2.0, [1.0], 0.0]), r"\[1\] must be a real number"),
        (_ok(sigmas={"a": 1}), "must be a list of numbers"),
        (_ok(sigmas=None), "must be a list of numbers"),
        ('{"format": "fastdiff-schedule", "sigmas": [2.0, 1e999, 0.0]}', "NaN or Inf"),
        ('{"format": "fastdiff-schedule", "sigmas": [2, 1' + "0" * 5000 + ', 0]}', "not valid JSON"),
        ('{"format": "fastdiff-schedule", "sigmas": [1' + "0" * 400 + ', 0]}', "NaN or Inf|real number"),
        (_ok(eval_sigmas=[True, True, False]), r"s\.json: eval_sigmas\[0\] must be a real number, got True"),
        (_ok(eval_sigmas="x"), "s\\.json: eval_sigmas must be a list of numbers"),
        (_ok(metadata={"solver": "nope", "nfe": 3}), "unknown solver 'nope'"),
        (_ok(metadata={"solver": ["euler"], "nfe": 3}), "solver"),
        (_ok(metadata={"solver": "euler", "nfe": "2"}), "nfe"),
        (_ok(metadata={"solver": "euler", "nfe": True}), "nfe"),
        (_ok(metadata=[1]), "metadata must be a JSON object"),
        ([1, 2], "not a fastdiff schedule file"),
    ],
)  # fmt: skip
def test_bad_schedule_files_name_the_file(tmp_path, payload, match):
    path = _schedule_file(tmp_path, payload)
    for load in (schedules.load, schedules.load_schedule):
        if load is schedules.load and ("eval_sigmas" in match or "solver" in match or "nfe" in match
                                       or "metadata" in match):  # fmt: skip
            continue  # load reads only the sigmas
        with pytest.raises(ValueError, match=match) as info:
            load(path)
        assert str(path) in str(info.value)


def test_a_schedule_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"format": "fastdiff-schedule", "note": "\u00e9", "sigmas": [1.0, 0.0]}'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text"):
        schedules.load(path)


def test_a_fifo_or_a_folder_is_refused_as_a_schedule_without_blocking(tmp_path):
    fifo = make_fifo(tmp_path / "pipe.json")
    with no_hang():
        for load in (schedules.load, schedules.load_schedule, lambda p: schedules.get(str(p), 3, 0.1, 1.0)):
            with pytest.raises(ValueError, match=r"pipe\.json is not a regular file \(a FIFO"):
                load(fifo)
    with pytest.raises(ValueError, match="is a directory"):
        schedules.load(tmp_path)
    with pytest.raises(ValueError, match="symlink loop"):
        schedules.load(make_symlink_loop(tmp_path / "loop.json"))


def test_validate_names_the_problem_of_odd_inputs():
    with pytest.raises(ValueError, match="sigmas is on the meta device.*readable on the host"):
        schedules.validate(torch.tensor([2.0, 1.0, 0.0], device="meta"))
    with pytest.raises(ValueError, match=r"sigmas\[0\] must be a real number, got 'a'"):
        schedules.validate(["a", "b"])
    with pytest.raises(ValueError, match="sigmas must be a list of numbers, got a string"):
        schedules.validate("2 1 0")
    with pytest.raises(ValueError, match=r"sigmas\[1\] must be a real number, got False"):
        schedules.validate([1.0, False])
    with pytest.raises(TypeError, match="sigmas must be real numbers, got dtype torch.bool"):
        schedules.validate(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="sigmas must be real numbers, got dtype bool"):
        schedules.validate(np.array([True, False]))
    s = schedules.validate([np.float32(2.0), torch.tensor(1.0), np.int64(0)])
    assert s.dtype == torch.float64 and s.tolist() == [2.0, 1.0, 0.0]
    assert schedules.validate(np.array([2.0, 0.5, 0.0])).tolist() == [2.0, 0.5, 0.0]


def test_sampler_refuses_a_meta_schedule_clearly(gmm):
    import fastdiff

    with pytest.raises(ValueError, match="meta device"):
        fastdiff.Sampler(gmm, sigmas=torch.tensor([2.0, 1.0, 0.0], device="meta"))


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_schedule_helpers_take_numpy_and_tensor_numbers(name):
    want = schedules.get(name, 5, 0.002, 80.0)
    for n, lo, hi in [(np.int64(5), np.float64(0.002), np.float32(80.0)), (torch.tensor(5), torch.tensor(0.002),
                                                                          torch.tensor(80))]:  # fmt: skip
        got = schedules.get(name, n, lo, hi)
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="the number of steps n must be a positive integer, got True"):
        schedules.get(name, True, 0.002, 80.0)
    with pytest.raises(ValueError, match="sigma_min must be a real number, got True"):
        schedules.get(name, 5, True, 80.0)
    with pytest.raises(ValueError, match="n must be a positive integer, got 5.0"):
        schedules.get(name, 5.0, 0.002, 80.0)
    with pytest.raises(ValueError, match="sigma_max must be a real number"):
        schedules.get(name, 5, 0.002, torch.tensor([80.0, 1.0]))


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the 0/0 that the check catches
def test_ld3_refuses_non_finite_or_saturated_xi():
    for bad in (float("nan"), float("inf"), -float("inf")):
        xi = torch.ones(6, dtype=torch.float64)
        xi[2] = bad
        with pytest.raises(ValueError, match=r"xi contains NaN or Inf at positions \[2\]"):
            schedules.ld3_sigmas(xi, 0.002, 80.0)
    for pos in (0, 3, 5):  # one huge weight: the other steps vanish below float precision
        xi = torch.zeros(6, dtype=torch.float64)
        xi[pos] = 1e4
        with pytest.raises(ValueError, match="xi is saturated"):
            schedules.ld3_sigmas(xi, 0.002, 80.0)
    xi = torch.tensor([0.0, 30.0, 0.0, 0.0], dtype=torch.float64)  # extreme, but still strictly decreasing
    schedules.validate(schedules.ld3_sigmas(xi, 0.002, 80.0))
    with pytest.raises(ValueError, match="xi is saturated"):
        schedules.ld3_sigmas(torch.tensor([0.0, 30.0, 0.0, 0.0]), 0.002, 80.0)  # float32 cannot hold it


def test_a_saved_schedule_carries_a_checksum_that_sees_any_edit(tmp_path):
    path = tmp_path / "learned.json"
    schedules.save(path, torch.tensor([80.0, 40.0, 0.5, 0.0]), solver="euler", nfe=3)
    payload = json.loads(path.read_text())
    assert payload["version"] == 2 and len(payload["sha256"]) == 64
    text = path.read_text()
    for old, new in [
        ("40.0", "50.0"),
        ('"nfe": 3', '"nfe": 4'),
        ('"metadata"', '"metadata_"'),
        ('"version": 2', '"version": 1'),
    ]:
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ValueError, match=f"{path} is corrupt: its contents do not match the checksum"):
            schedules.load_schedule(path)
    path.write_text(text.replace('"sha256"', '"sha257"'))  # a version-2 file must have its checksum
    with pytest.raises(ValueError, match="corrupt"):
        schedules.load(path)
    path.write_text(json.dumps({"format": "fastdiff-schedule", "version": 1, "sigmas": [3.0, 1.0, 0.0]}))
    assert schedules.load(path).tolist() == [3.0, 1.0, 0.0]  # hand-written files need no checksum


# ------------------------------------------------------------------------------------------- named schedules


def _sd_table_comfy() -> torch.Tensor:
    """Stable Diffusion's 1000 discrete sigmas as ComfyUI's ModelSamplingDiscrete builds them (float64 betas,
    float32 cumulative product), ascending in timestep."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(torch.tensor((1.0 - betas).numpy(), dtype=torch.float32), dim=0)
    return ((1 - ac) / ac) ** 0.5


def _comfy_sigma(table, t):
    t = float(t)
    lo, hi = int(np.floor(t)), int(np.ceil(t))
    w = t - lo
    return float(np.exp((1 - w) * np.log(float(table[lo])) + w * np.log(float(table[hi]))))


def _comfy(name, table, steps, **kw):
    """ComfyUI's comfy/samplers.py schedulers, written out from their definitions for SD's table (the model's
    sigma_min/sigma_max are the table's ends, its timestep(sigma) the nearest index)."""
    T = len(table)
    if name == "simple":
        ss = T / steps
        return [float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]
    if name == "ddim_uniform":
        ss, x, out = max(T // steps, 1), 1, [0.0]
        while x < T:
            out.append(float(table[x]))
            x += ss
        return out[::-1]
    if name in ("normal", "sgm_uniform"):
        ts = np.linspace(T - 1, 0, steps + 1)[:-1] if name == "sgm_uniform" else np.linspace(T - 1, 0, steps)
        return [_comfy_sigma(table, t) for t in ts] + [0.0]
    if name == "beta":
        import scipy.stats

        ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (T - 1))
        out, last = [], -1
        for t in ts:
            if t != last:
                out.append(float(table[int(t)]))
            last = t
        return out + [0.0]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["simple", "normal", "sgm_uniform", "ddim_uniform", "beta"])
@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 25, 50])
def test_table_schedules_reproduce_comfyui_on_sd(name, n):
    table = _sd_table_comfy()
    want = _comfy(name, table, n)
    kw = {"sigmas": "sd"} if name == "beta" else {}  # beta's default is diffusers' continuous form
    got = schedules.get(name, n, 0.002, 80.0, **kw)
    if name == "ddim_uniform" and len(want) > n + 1:  # ComfyUI's extra top levels (see ddim_uniform's docstring)
        want = want[len(want) - n - 1 :]
    assert len(got) == n + 1 and got[-1] == 0
    assert np.allclose(got.numpy(), want, rtol=2e-6, atol=0), (got, want)
    # the same from the table given explicitly, as sigmas and as alphas_cumprod
    ac = schedules.sd_alphas_cumprod()
    assert torch.allclose(schedules.get(name, n, 0.002, 80.0, alphas_cumprod=ac), got, rtol=1e-12)
    assert torch.allclose(schedules.get(name, n, 0.002, 80.0, sigmas=((1 - ac) / ac).sqrt()), got, rtol=1e-12)


def test_ddim_uniform_drops_comfyuis_extra_top_level_only():
    table = _sd_table_comfy()
    want = _comfy("ddim_uniform", table, 7)
    assert len(want) == 9  # 1, 143, ..., 995: eight levels for seven steps in ComfyUI
    got = schedules.ddim_uniform(7, 0.002, 80.0)
    assert np.allclose(got.numpy(), want[1:], rtol=2e-6)


def test_table_schedules_use_only_the_levels_in_range():
    ac = schedules.sd_alphas_cumprod()
    table = ((1 - ac) / ac).sqrt()
    inside = table[(table >= 0.1) & (table <= 5.0)]
    s = schedules.simple(4, 0.1, 5.0)
    assert s[0] == inside[-1] and s[:-1].min() >= 0.1
    assert torch.allclose(s, schedules.simple(4, 0.1, 5.0, sigmas=inside), rtol=0)
    n = schedules.normal(3, 0.1, 5.0)
    assert torch.allclose(n[:-1], inside[[-1, (len(inside) - 1) // 2, 0]], rtol=1e-3)


@pytest.mark.parametrize("n", [1, 3, 8, 25])
def test_linear_quadratic_matches_comfyui(n):
    thr, sigma_max = 0.025, 14.6146
    if n == 1:
        want = [1.0, 0.0]
    else:  # comfy/samplers.py linear_quadratic_schedule, from Genmo's Mochi
        ls = n // 2
        lin = [i * thr / ls for i in range(ls)]
        diff = ls - thr * n
        qs = n - ls
        qc = diff / (ls * qs**2)
        lc = thr / ls - 2 * diff / (qs**2)
        const = qc * ls**2
        quad = [qc * i**2 + lc * i + const for i in range(ls, n)]
        want = [1.0 - x for x in lin + quad + [1.0]]
    got = schedules.linear_quadratic(n, 0.002, sigma_max)
    assert np.allclose(got.numpy(), np.array(want) * sigma_max, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_kl_optimal_is_uniform_in_arctan(n):
    s = schedules.kl_optimal(n, 0.03, 14.6)[:-1]
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    assert torch.allclose(s, torch.tan(i * math.atan(0.03) + (1 - i) * math.atan(14.6)), rtol=1e-12)
    assert torch.allclose(s.atan().diff(), s.atan().diff()[0].expand(n - 1))


def _diffusers_vp(n, **flags):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **flags)
    sched.set_timesteps(n)
    ac = sched.alphas_cumprod.double()
    table = ((1 - ac) / ac).sqrt()
    return sched.sigmas.double(), table.min().item(), table.max().item()


@pytest.mark.parametrize(
    "name,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"),
                  ("beta", "use_beta_sigmas")]
)  # fmt: skip
@pytest.mark.parametrize("n", [2, 4, 10, 30])
def test_matches_diffusers_sigma_conversions(name, flag, n):
    # (n = 1 is left out: diffusers' one-step grid is the single timestep 0, so its range collapses to sigma_min)
    want, lo, hi = _diffusers_vp(n, **{flag: True})
    got = schedules.get(name, n, lo, hi)
    assert torch.allclose(got, want, rtol=1e-5, atol=0), (got, want)


@pytest.mark.parametrize("n", [2, 6, 13])
@pytest.mark.parametrize("rho", [0.5, 1.0, 2.5])
def test_polyexponential_matches_k_diffusion(n, rho, k_diffusion):
    want = k_diffusion.get_sigmas_polyexponential(n, 0.03, 14.6, rho=rho).double()
    assert torch.allclose(schedules.polyexponential(n, 0.03, 14.6, rho=rho), want, rtol=1e-5)
    poly1 = schedules.polyexponential(n, 0.03, 14.6, rho=1.0)
    assert torch.allclose(poly1, schedules.exponential(n, 0.03, 14.6), rtol=1e-13, atol=0)


def _loglinear_interp(t_steps, num_steps):  # the AYS authors' helper, written out
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(np.asarray(t_steps)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num_steps), xs, ys))[::-1]


@pytest.mark.parametrize("model,key", [("sd15", "StableDiffusionSigmas"), ("sdxl", "StableDiffusionXLSigmas"),
                                       ("svd", "StableDiffusionVideoSigmas")])  # fmt: skip
def test_align_your_steps_is_diffusers_table_at_ten_steps(model, key):
    from diffusers.schedulers.scheduling_utils import AysSchedules

    got = schedules.get("align_your_steps", 10, 0.002, 80.0, model=model)
    assert got.tolist() == AysSchedules[key]


@pytest.mark.parametrize("model", ["sd15", "sdxl", "svd"])
@pytest.mark.parametrize("n", [1, 4, 7, 15, 32])
def test_align_your_steps_interpolates_log_linearly(model, n):
    want = _loglinear_interp(schedules.AYS_SIGMAS[model], n + 1)
    want[-1] = 0
    got = schedules.align_your_steps(n, 0.002, 80.0, model=model)
    assert np.allclose(got.numpy(), want, rtol=1e-12, atol=0)


def test_gits_table_is_sd_levels_and_interpolates_beyond_twenty():
    sd = _sd_table_comfy().double()
    # GITS searches a 100-step uniform teacher grid of SD 1.5's timesteps: every published level is SD's sigma near
    # timestep 9.99 k (within 3e-5; the authors' interpolation differs slightly), a check of the transcription.
    grid = torch.tensor([_comfy_sigma(sd, 999 * k / 100) for k in range(101)], dtype=torch.float64)
    for k, row in enumerate(schedules.GITS_SIGMAS_SD15, start=2):
        assert len(row) == k + 1 and all(a > b for a, b in zip(row, row[1:]))
        assert all((grid - v).abs().min() < 3e-5 * v for v in row), k
        assert row[0] == pytest.approx(sd[-1].item(), rel=1e-6) and row[-1] == pytest.approx(sd[0].item(), rel=1e-6)
        got = schedules.gits(k, 0.002, 80.0)
        assert got[:-1].tolist() == list(row[:-1]) and got[-1] == 0
    want = _loglinear_interp(schedules.GITS_SIGMAS_SD15[-1], 31)
    want[-1] = 0
    assert np.allclose(schedules.gits(30, 0.002, 80.0).numpy(), want, rtol=1e-12)


def _diffusers_flow(t, **config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    mu = config.pop("mu", None)
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(sigmas=t.tolist(), mu=mu)
    return sched.sigmas.double()


@pytest.mark.parametrize(
    "options,config",
    [
        ({}, {}),
        ({"shift": 3.0}, {"shift": 3.0}),
        ({"mu": 0.8}, {"use_dynamic_shifting": True, "mu": 0.8}),
        ({"mu": 1.7, "time_shift": "linear"}, {"use_dynamic_shifting": True, "mu": 1.7, "time_shift_type": "linear"}),
    ],
)
@pytest.mark.parametrize("n", [1, 5, 28])
def test_flow_shift_matches_diffusers(options, config, n):
    lo, hi = 0.01, 999.0  # flow times 0.0099..0.999
    t = torch.linspace(hi / (1 + hi), lo / (1 + lo), n, dtype=torch.float64)
    want = _diffusers_flow(t, **config)  # shifted flow times, then 0
    got = schedules.flow_shift(n, lo, hi, **options)
    assert torch.allclose(got / (1 + got), want, rtol=1e-5, atol=1e-7)


def test_flow_shift_resolution_dependent_mu():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    assert torch.allclose(
        schedules.flow_shift(8, 0.01, 99.0, image_seq_len=1024), schedules.flow_shift(8, 0.01, 99.0, mu=mu)
    )
    # sigma' = e^mu sigma: the exponential time shift is a constant factor on VE sigmas
    base = schedules.flow_shift(8, 0.01, 99.0)
    assert torch.allclose(schedules.flow_shift(8, 0.01, 99.0, mu=mu), math.exp(mu) * base, rtol=1e-12)


NAMED_RANGE = st.tuples(st.floats(1e-3, 0.5), st.floats(2.0, 200.0))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(name=st.sampled_from(sorted(schedules.SCHEDULES)), n=st.integers(1, 40), rng=NAMED_RANGE)
def test_every_named_schedule_is_n_plus_one_decreasing_to_zero(name, n, rng):
    s = schedules.get(name, n, *rng)
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    assert s[-1] == 0 and (s[1:] < s[:-1]).all() and torch.isfinite(s).all()
    assert schedules.validate(s) is not None


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("beta", {"gamma": 1.0}, "has no option 'gamma'"),
        ("karras", {"model": "sd15"}, "has no option 'model'"),
        ("kl_optimal", {"rho": 2.0}, "its options: none"),
        ("beta", {"alpha": -1.0}, "alpha and beta must be positive"),
        ("align_your_steps", {"model": "sd3"}, "model must be one of"),
        ("gits", {"model": "sdxl"}, "model='sd15'"),
        ("polyexponential", {"rho": 0.0}, "rho must be positive"),
        ("linear_quadratic", {"linear_steps": 0}, "linear_steps must be"),
        ("linear_quadratic", {"threshold_noise": 1.5}, "threshold_noise must lie"),
        ("flow_shift", {"shift": 2.0, "mu": 1.0}, "one of shift, mu and image_seq_len"),
        ("flow_shift", {"time_shift": "cosine"}, "time_shift must be"),
        ("flow_shift", {"shift": -1.0}, "shift must be positive"),
        ("flow_shift", {"mu": -1.0, "time_shift": "linear"}, "needs mu > 0"),
        ("simple", {"sigmas": "sdxl"}, "or 'sd'"),
        ("simple", {"sigmas": [3.0, 2.0, 1.0]}, "strictly increasing"),
        ("simple", {"sigmas": "sd", "alphas_cumprod": [0.9, 0.5]}, "not both"),
        ("normal", {"alphas_cumprod": [0.5, 1.5]}, "alphas_cumprod must be"),
    ],
)
def test_bad_options_are_refused_by_name(name, options, match):
    with pytest.raises(ValueError, match=match):
        schedules.get(name, 6, 0.002, 80.0, **options)


def test_table_schedules_refuse_what_the_table_cannot_give():
    with pytest.raises(ValueError, match="fewer than 2 of the levels"):
        schedules.simple(4, 20.0, 80.0)  # SD's table stops at 14.6
    with pytest.raises(ValueError, match="do not fit"):
        schedules.simple(1001, 0.002, 80.0)
    with pytest.raises(ValueError, match="share a level"):
        schedules.beta(600, 0.002, 80.0, sigmas="sd")
    with pytest.raises(ValueError, match="takes no options|no options"):
        schedules.get("x.json", 4, 0.002, 80.0, rho=3)


def test_options_lists_each_schedules_keywords():
    assert schedules.options("karras") == ("rho",)
    assert schedules.options("align_your_steps") == ("model",)
    assert set(schedules.options("beta")) == {"alpha", "beta", "sigmas", "alphas_cumprod"}


@pytest.mark.parametrize("name,extra", [("beta", []), ("align_your_steps", ["model=sdxl"])])
def test_cli_samples_with_a_named_schedule(name, extra, capsys):
    from fastdiff.cli import main

    args = ["sample", "--model", "gmm", "--schedule", name, "--steps", "6", "-n", "64"]
    for kv in extra:
        args += ["--schedule-option", kv]
    assert main(args) == 0
    assert f"schedule {name} (6 steps" in capsys.readouterr().out


def test_cli_refuses_a_bad_schedule_option(capsys):
    from fastdiff.cli import main

    assert main(["sample", "--model", "gmm", "--schedule", "beta", "--schedule-option", "gamma=2", "-n", "8"]) == 2
    assert "no option 'gamma'" in capsys.readouterr().err
