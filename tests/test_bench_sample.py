"""The end-to-end sampling benchmark (`fastdiff bench sample`): its baselines compute what fastdiff computes, and the
command runs through and writes its results.

The baselines are only a fair comparison if they run the same solver on the same model. The k-diffusion-style
loops (and the timed fastdiff.Sampler) are checked against fastdiff.sample on the exact mixture in float64; the
diffusers scheduler loops against fastdiff on the digits UNet (diffusers' EDM schedulers around its raw network)
and on a small random diffusers UNet (eps prediction on SD's schedule), both in float32, where rounding over 6-10
steps stays near 1e-6 of the samples' scale and a wrong coefficient shows at 1e-3 or more.
"""

import csv
import math
import subprocess
import sys

import pytest
import torch

import fastdiff
from fastdiff import denoisers, schedules
from fastdiff.bench import baselines, loops
from fastdiff.cli import main

diffusers = pytest.importorskip("diffusers")

SOLVERS = ["euler", "heun", "dpmpp_2m"]


def _class_cond(labels, null):
    return {"class_labels": labels}, {"class_labels": torch.full_like(labels, null)}


@pytest.mark.parametrize("scale", [None, 2.5], ids=["no_guidance", "cfg"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_kdiff_loops_match_fastdiff_on_the_mixture(gmm, noise, solver, scale):
    sigmas = schedules.karras(10, 0.002, 80.0)
    x = noise * sigmas[0]
    cond, uncond = _class_cond(torch.arange(len(x)) % gmm.num_classes, -1)
    guidance = fastdiff.Guidance(scale) if scale else None
    expected = fastdiff.sample(gmm, x, sigmas, solver=solver, guidance=guidance, cond=cond, uncond=uncond)
    sampler = fastdiff.Sampler(gmm, solver=solver, sigmas=sigmas, guidance=guidance)
    engine = sampler.sample(x, cond, uncond)
    if scale:
        got = baselines.KDIFF_SAMPLERS[solver](
            baselines.CFGDenoiser(gmm, scale), x, sigmas, {"cond": cond, "uncond": uncond}
        )
    else:
        got = baselines.KDIFF_SAMPLERS[solver](gmm, x, sigmas, cond)
    assert got.dtype == torch.float64 and got.shape == x.shape
    # float64 throughout: the loops agree to rounding (measured 1e-14); a wrong coefficient shows at 1e-3.
    assert (got - expected).abs().max() < 1e-9 * expected.abs().max()
    assert (engine - expected).abs().max() < 1e-9 * expected.abs().max()


def test_kdiff_heun_costs_2n_minus_1_evaluations(gmm, noise):
    calls = []

    def counted(x, sigma, **kw):
        calls.append(len(x))
        return gmm(x, sigma, **kw)

    baselines.sample_heun(counted, noise * 80.0, schedules.karras(7, 0.002, 80.0))
    assert len(calls) == 13 == fastdiff.count_nfe("heun", schedules.karras(7, 0.002, 80.0))[0]


@pytest.fixture(scope="module")
def digits():
    return fastdiff.models.get("digits")


@pytest.mark.parametrize("scale", [None, 2.0], ids=["no_guidance", "cfg"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler"])
def test_diffusers_edm_schedulers_match_fastdiff_on_digits(digits, one_thread, solver, scale):
    """diffusers' EDM preconditioning (sigma_data 0.5) around the raw UNet equals fastdiff's EDMPrecond."""
    scheduler = baselines.edm_scheduler(solver)
    sigmas = baselines.scheduler_sigmas(scheduler, 10)
    assert torch.allclose(sigmas, schedules.karras(10, 0.002, 80.0), rtol=1e-6)  # the same Karras schedule
    n = 6
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    cond, uncond = _class_cond(torch.arange(n), -1)
    got = baselines.diffusers_loop(digits.net, scheduler, x, 10, cond, uncond, scale)
    guidance = fastdiff.Guidance(scale) if scale else None
    expected = fastdiff.sample(digits, x, sigmas, solver=solver, guidance=guidance, cond=cond, uncond=uncond)
    assert (got - expected).abs().max() < 2e-5  # samples of scale 1; measured 2.5e-6


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=11,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("solver", SOLVERS)
def test_diffusers_vp_loop_matches_fastdiff_on_a_diffusers_unet(one_thread, solver):
    """The diffusers rows: the scheduler loop with CFG and fastdiff's VPDenoiser around the same network agree."""
    unet = _tiny_unet()
    scheduler = baselines.vp_scheduler(solver)
    sigmas = baselines.scheduler_sigmas(scheduler, 6)
    den = denoisers.VPDenoiser(unet, scheduler.alphas_cumprod, prediction="eps")
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, uncond = _class_cond(torch.arange(3), 10)
    with torch.no_grad():
        got = baselines.diffusers_loop(unet, scheduler, noise * scheduler.init_noise_sigma, 6, cond, uncond, 3.0)
        # DPM-Solver's samples live in VP space (x / sqrt(1 + sigma^2)), Euler's and Heun's in VE space.
        x = noise * (float(scheduler.init_noise_sigma) if solver != "dpmpp_2m" else math.sqrt(1 + sigmas[0] ** 2))
        guidance = fastdiff.Guidance(3.0)
        expected = fastdiff.sample(den, x, sigmas, solver=solver, guidance=guidance, cond=cond, uncond=uncond)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()  # measured 5e-7 relative


def test_forward_plan_counts_batched_and_unguided_forwards():
    assert loops.forward_plan("kdiff_eager", 4, (10, 10)) == (8,) * 10
    assert loops.forward_plan("diffusers", 4, (10, 10)) == (8,) * 10
    assert loops.forward_plan("fastdiff_scheduler", 4, (10, 10)) == (8,) * 10
    assert loops.forward_plan("pipeline_interval", 4, (10, 3)) == (8,) * 3 + (4,) * 7
    assert loops.forward_plan("fastdiff_interval", 4, (10, 3)) == (8,) * 3 + (4,) * 7


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_sample_cli_writes_csv_plot_and_table(capsys, tmp_path, k_diffusion):
    rc = main(["bench", "sample", "--preset", "cpu", "--models", "null,digits", "--batches", "1", "--steps", "3",
               "--reps", "1", "--scenarios", "e2e", "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    rows = _read(tmp_path / "sample_loops.csv")
    assert list(rows[0]) == loops.COLUMNS
    assert [(r["model"], r["variant"]) for r in rows] == [(m, v) for m in ("null", "digits") for v in loops.VARIANTS]
    for r in rows:
        assert r["device"] == "cpu" and r["date"] and r["peak_mem_mb"] == "n/a"
        skipped = {
            "fastdiff_graph": "skipped: CUDA graphs need a CUDA device",
            "pipeline_interval": "skipped: the pipeline path runs diffusers networks",
        }
        if r["model"] == "digits":
            skipped["fastdiff_scheduler"] = (
                "skipped: FastDiffScheduler drives DDPM-family networks; the digits model is an EDM network"
            )
        if r["variant"] in skipped:
            assert r["note"] == skipped[r["variant"]] and r["total_ms"] == "nan"
            continue
        assert r["note"] == "", r["note"]
        assert float(r["total_ms"]) > 0 and float(r["model_ms"]) > 0 and math.isfinite(float(r["overhead_us_per_step"]))
        assert int(r["nfe_cond"]) == 3
        if r["variant"] == "fastdiff_interval":
            assert 0 <= int(r["nfe_uncond"]) < 3 and "cfg on (0.28, 2.9]" in r["guidance"]
        else:
            assert int(r["nfe_uncond"]) == 3 and r["guidance"] == "cfg every step"
    assert (tmp_path / "sample_loops.png").read_bytes()[:4] == b"\x89PNG"
    assert "| e2e | digits | 1x16x16 | 1 | dpmpp_2m, 3 | kdiff_eager | 3+3 |" in out
    assert "skipped: CUDA graphs need a CUDA device" in out


def test_scheduler_and_pipeline_rows_on_a_diffusers_unet(one_thread):
    """The FastDiffScheduler row runs the diffusers loop (CFG every step), the pipeline row PipelineSampler with
    interval guidance; both on the same tiny UNet2DModel."""
    rows = loops.bench_sample("cpu", models="unet", batches=[1], steps=4, reps=1, scenarios="e2e",
                              variants="diffusers,fastdiff_scheduler,pipeline_interval", progress=False)  # fmt: skip
    by = {r["variant"]: r for r in rows}
    assert all(r["note"] == "" and r["total_ms"] > 0 for r in rows), [r["note"] for r in rows]
    assert (by["fastdiff_scheduler"]["nfe_cond"], by["fastdiff_scheduler"]["nfe_uncond"]) == (4, 4)
    assert by["pipeline_interval"]["nfe_cond"] == 4 and 0 < by["pipeline_interval"]["nfe_uncond"] < 4
    assert by["pipeline_interval"]["guidance"] == "cfg on (0.28, 2.9]"


def test_edm2_interval_scenario_reports_the_unconditional_fraction(one_thread):
    rows = loops.bench_sample("cpu", scenarios="edm2_interval", variants="fastdiff_eager,fastdiff_interval", reps=1,
                              progress=False)  # fmt: skip
    assert [(r["solver"], r["steps"], r["nfe_cond"], r["nfe_uncond"]) for r in rows] == [
        ("heun", 32, 63, 63), ("heun", 32, 63, 14)]  # fmt: skip
    assert all(r["total_ms"] > 0 for r in rows)
    summary = loops.edm2_summary(rows)
    assert "runs 14 unconditional evaluations of 63 (22% of full CFG's 63)" in summary
    assert "against full CFG" in summary


def test_bench_sample_rejects_unknown_names(capsys):
    assert main(["bench", "sample", "--models", "sdxl"]) == 2
    assert "unknown model 'sdxl'" in capsys.readouterr().err
    assert main(["bench", "sample", "--variants", "fast"]) == 2
    assert "unknown variant 'fast'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_sample_gpu_variants_run_and_graphs_capture():
    rows = loops.bench_sample("gpu", models="null,digits", batches=[2], resolutions=[64], steps=4, reps=2,
                              scenarios="e2e", progress=False)  # fmt: skip
    for r in rows:
        if r["variant"] == "pipeline_interval" or (r["variant"] == "fastdiff_scheduler" and r["model"] == "digits"):
            assert r["note"].startswith("skipped"), r["note"]
            continue
        assert r["note"] == "", (r["model"], r["variant"], r["note"])
        assert r["total_ms"] > 0 and r["peak_mem_mb"] != "n/a"
    graph = {r["model"]: r for r in rows if r["variant"] == "fastdiff_graph"}
    assert "CUDA graph" in graph["digits"]["guidance"]


def test_a_model_that_cannot_be_built_is_recorded_and_the_rest_runs(monkeypatch):
    """A GPU session must not lose its other rows because one model family cannot be built there."""
    real = loops.build_workload

    def build(family, *args):
        if family == "dit":
            raise ModuleNotFoundError("No module named 'diffusers'")
        return real(family, *args)

    monkeypatch.setattr(loops, "build_workload", build)
    rows = loops.bench_sample("cpu", models="dit,null", batches=[1], steps=2, reps=1, scenarios="e2e",
                              variants="fastdiff_eager", progress=False)  # fmt: skip
    assert [(r["model"], r["note"]) for r in rows] == [
        ("dit", "failed: ModuleNotFoundError: No module named 'diffusers'"), ("null", "")]  # fmt: skip
    assert rows[1]["total_ms"] > 0
    assert "| e2e | dit | 4x8x8 | 1 | dpmpp_2m, 2 | fastdiff_eager | – |" in loops.markdown_table(rows)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps", [4, 8, 20, 25, 40])
def test_vp_schedule_without_diffusers_is_the_schedulers(solver, steps):
    """The diffusers-family rows share the schedule of diffusers' scheduler, computed by fastdiff so that the rows
    which do not run diffusers do not need it."""
    assert torch.equal(baselines.sd_alphas_cumprod(), baselines.vp_scheduler(solver).alphas_cumprod)
    assert torch.equal(baselines.vp_sigmas(solver, steps), baselines.scheduler_sigmas(baselines.vp_scheduler(solver),
                                                                                       steps))  # fmt: skip


def test_k_diffusion_peer_is_the_pypi_package_and_computes_what_fastdiff_computes(gmm, noise, k_diffusion):
    """The `kdiffusion` rows run k-diffusion's own sample_dpmpp_2m (the installed package, imported without its
    training stack), which on the exact mixture gives fastdiff's result to float64 rounding: the timed loops do the
    same work."""
    K = k_diffusion
    assert K.__file__.endswith("site-packages/k_diffusion/sampling.py") and K.__name__ == "k_diffusion.sampling"
    sigmas = schedules.karras(12, 0.002, 80.0)
    cond, uncond = _class_cond(torch.arange(len(noise)) % gmm.num_classes, -1)
    cfg = baselines.CFGDenoiser(gmm, 2.5)
    theirs = K.sample_dpmpp_2m(cfg, noise * 80.0, sigmas, extra_args={"cond": cond, "uncond": uncond}, disable=True)
    ours = fastdiff.Sampler(gmm, solver="dpmpp_2m", sigmas=sigmas, guidance=fastdiff.Guidance(2.5)).sample(
        noise * 80.0, cond, uncond
    )
    assert (theirs - ours).abs().max() < 1e-9 * ours.abs().max()


def test_overhead_scenario_pairs_fastdiff_with_each_peer(one_thread, k_diffusion):
    """The loop-overhead comparison runs both pairs and states the ratio and the 1/3 target (a benchmark: the
    numbers are not asserted)."""
    rows = loops.bench_sample("cpu", scenarios="overhead", reps=2, progress=False)
    got = [(r["model"], r["variant"], r["steps"], r["batch"], r["shape"]) for r in rows]
    assert got == [("null_edm", "kdiffusion", 40, 1, "4x8x8"), ("null_edm", "fastdiff_eager", 40, 1, "4x8x8"),
                   ("null", "diffusers", 40, 1, "4x8x8"), ("null", "fastdiff_eager", 40, 1, "4x8x8")]  # fmt: skip
    assert all(r["note"] == "" and r["total_ms"] > 0 and r["threads"] == 1 for r in rows), [r["note"] for r in rows]
    assert rows[0]["library"].startswith("k-diffusion 0.1") and rows[2]["library"].startswith("diffusers ")
    summary = loops.overhead_summary(rows).splitlines()
    assert len(summary) == 3 and "against k-diffusion 0.1" in summary[1] and "against diffusers" in summary[2]
    assert all("(target <= 1/3: " in line for line in summary[1:])


def test_rows_that_do_not_need_diffusers_run_without_it(tmp_path):
    """With diffusers unimportable, the null and digits rows run and never import it; the rows that need it say so,
    and the command still succeeds (nothing failed)."""
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "from fastdiff.cli import main\n"
        f"rc = main(['bench', 'sample', '--preset', 'cpu', '--models', 'null,digits,unet', '--batches', '1', '--steps',"
        f" '3', '--reps', '1', '--scenarios', 'e2e', '--out', {str(tmp_path)!r}, '--no-progress'])\n"
        "assert sys.modules['diffusers'] is None\n"
        "sys.exit(rc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _read(tmp_path / "sample_loops.csv")
    needs = "skipped: needs diffusers (pip install 'fastdiff[diffusers]')"
    for r in rows:
        if r["model"] == "unet" or r["variant"] in ("diffusers", "fastdiff_scheduler", "pipeline_interval"):
            assert r["note"].startswith(needs), (r["model"], r["variant"], r["note"])
        elif r["variant"] == "kdiffusion":
            assert r["note"] == "" or r["note"].startswith("skipped: needs k-diffusion"), r["note"]
        elif r["variant"] != "fastdiff_graph":
            assert r["note"] == "" and float(r["total_ms"]) > 0, (r["model"], r["variant"], r["note"])
