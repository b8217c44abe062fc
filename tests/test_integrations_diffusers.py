"""fastdiff inside diffusers: FastDiffScheduler against diffusers' own schedulers, the pipeline path against the
scheduler loop, and the scheduler's public interface. Models are built from config (no downloads).

Tolerances. diffusers steps in float32. On the Gaussian mixture (samples of unit scale) float32 rounding over
10-20 steps moves samples by about 1e-6, so 5e-5 (max abs) leaves room for that and nothing else: a wrong
coefficient shows up at 1e-3 or more (tests/test_parity_diffusers.py checks that the tolerance separates
solvers). Random-weight UNets give latents of scale 5-40, compared relative to their largest entry (1e-5).
"""

import inspect
import json
import re

import pytest
import torch
from _vp_mixture import MixtureNet

import fastdiff
from fastdiff import denoisers, schedules

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")  # diffusers' Stable Diffusion pipelines import it

from fastdiff.integrations.diffusers import (  # noqa: E402
    FastDiffScheduler,
    UNREPRODUCED,
    PipelineSampler,
    sample_pipeline,
)

TOL = 5e-5
REL = 1e-5
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}

CASES = [
    # (diffusers scheduler, its options, fastdiff solver, fastdiff solver options)
    ("EulerDiscreteScheduler", {}, "euler", {}),
    ("HeunDiscreteScheduler", {}, "heun", {}),
    ("DDIMScheduler", dict(set_alpha_to_one=True, clip_sample=False), "ddim", {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=2), "dpmpp_2m", {}),
    ("UniPCMultistepScheduler", dict(solver_order=2), "unipc", {}),
    ("UniPCMultistepScheduler", dict(solver_order=3), "unipc", {"order": 3}),
]


def _mixture_loop(scheduler, net, steps, x, labels, w=2.0):
    """A diffusers pipeline's denoising loop (as in StableDiffusionPipeline.__call__) with classifier-free
    guidance on a class-conditional network: batch [uncond, cond], guided output, ``scheduler.step``."""
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    y = torch.cat([torch.full_like(labels, -1), labels])
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        out_u, out_c = net(inp, t, class_labels=y).chunk(2)
        x = scheduler.step(out_u + w * (out_c - out_u), t, x).prev_sample
    return x


def _noise_and_labels(n=32):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 2, 1, 1, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("steps", [6, 10])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("cls,opts,solver,solver_opts", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_scheduler_matches_diffusers(gmm, prediction, cls, opts, solver, solver_opts, steps):
    reference = getattr(diffusers, cls)(**SD, prediction_type=prediction, **opts)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), PREDICTIONS[prediction])
    x, labels = _noise_and_labels()
    expected = _mixture_loop(reference, net, steps, x, labels)
    ours = FastDiffScheduler.from_config(reference.config, solver=solver, solver_options=solver_opts)
    got = _mixture_loop(ours, net, steps, x, labels)
    assert len(ours.timesteps) == len(reference.timesteps)
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize("steps", [4, 8, 14, 16, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_deis_multistep_reproduces_the_source(gmm, steps, order, prediction):
    """DEISMultistepScheduler -> deis with deis_mode="logrho": epsilon extrapolated by a polynomial in log sigma
    and integrated over sigma (diffusers' closed forms, fastdiff's exact Lagrange-times-exponential integrals),
    warming up from first order, lowering the last orders below 15 steps, ending at the smallest training sigma.

    diffusers keeps its sigmas in float32, and its third-order update amplifies their rounding: 3e-3 at w = 3 on
    16 steps. With its sigmas promoted to float64 after set_timesteps (as here) the two agree to TOL (5e-8
    unguided)."""
    reference = _sigmas_in_float64(diffusers.DEISMultistepScheduler(**SD_LINSPACE, prediction_type=prediction,
                                                             solver_order=order))  # fmt: skip
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), PREDICTIONS[prediction])
    x, labels = _noise_and_labels()
    x = x.double()
    ours = FastDiffScheduler.from_config(reference.config)
    assert (ours.solver.name, ours.solver.deis_mode, ours.solver.max_order) == ("deis", "logrho", order)
    expected = _mixture_loop(reference, net, steps, x, labels, w=3.0)
    assert (_mixture_loop(ours, net, steps, x, labels, w=3.0) - expected).abs().max() < TOL
    if order > 1 and steps == 8:  # the tab form (ComfyUI's) is another method
        tab = FastDiffScheduler.from_config(reference.config, solver="deis", solver_options={"deis_mode": "tab"})
        assert (_mixture_loop(tab, net, steps, x, labels, w=3.0) - expected).abs().max() > 100 * TOL


@pytest.mark.parametrize("steps", [5, 8, 14, 16, 20])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpm_solver_lowers_its_final_orders_as_diffusers_does(gmm, steps, order, final):
    """DPM-Solver++(2M/3M) from a DPMSolverMultistep config takes its ``lower_order_final`` (diffusers' default):
    below 15 steps the last step is first order (also when it ends at sigma_min) and, for 3M, the one before it
    second order; from 15 steps on the orders stay. Without the option (fastdiff's default, k-diffusion's
    behaviour) 3M at 8 steps ends elsewhere by far more than the tolerance."""
    reference = diffusers.DPMSolverMultistepScheduler(**SD, solver_order=order, final_sigmas_type=final)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), "eps")
    x, labels = _noise_and_labels()
    ours = FastDiffScheduler.from_config(reference.config)
    assert ours.solver.name == f"dpmpp_{order}m" and ours.solver.lower_order_final
    expected = _mixture_loop(reference, net, steps, x, labels)
    assert (_mixture_loop(ours, net, steps, x, labels) - expected).abs().max() < TOL
    if order == 3 and steps == 8 and final == "zero":
        plain = FastDiffScheduler.from_config(reference.config, solver="dpmpp_3m", solver_options={
            "lower_order_final": False})  # fmt: skip
        assert (_mixture_loop(plain, net, steps, x, labels) - expected).abs().max() > 100 * TOL


def test_default_noise_levels_follow_the_source_scheduler():
    """From DPM-Solver's config the scheduler steps through DPM-Solver's timesteps, which differ from Euler's."""
    dpm = diffusers.DPMSolverMultistepScheduler(**SD)
    euler = diffusers.EulerDiscreteScheduler(**SD)
    for source in (dpm, euler):
        ours = FastDiffScheduler.from_config(source.config, solver="euler")
        ours.set_timesteps(10)
        source.set_timesteps(10)
        assert torch.equal(ours.timesteps, source.timesteps.float())
    assert not torch.equal(dpm.timesteps.float(), euler.timesteps.float())


# ------------------------------------------------------------------------------------------ real pipelines


@pytest.fixture(scope="module")
def sd_parts():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    return unet, vae, embeds


def _sd_pipe(sd_parts, scheduler):
    unet, vae, _ = sd_parts
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_pipe(pipe, embeds, steps=8, output_type="latent", w=5.0):
    pe, ne = embeds
    return pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=steps, height=16, width=16,
        output_type=output_type, guidance_scale=w, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def _close(got, expected):
    return (got - expected).abs().max() <= REL * expected.abs().max()


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("cls,solver", [("EulerDiscreteScheduler", "euler"), ("HeunDiscreteScheduler", "heun"),
                                        ("DPMSolverMultistepScheduler", "dpmpp_2m")])  # fmt: skip
def test_stable_diffusion_pipeline_with_fastdiff_scheduler(sd_parts, prediction, cls, solver):
    """A real StableDiffusionPipeline (UNet and VAE from config, text embeddings given) gives the same latents
    with FastDiffScheduler as with the diffusers scheduler it replaces, and sample_pipeline (fastdiff's loop,
    guidance at every step) gives them too."""
    reference = getattr(diffusers, cls)(**SD, prediction_type=prediction)
    pipe = _sd_pipe(sd_parts, reference)
    expected = _run_pipe(pipe, sd_parts[2])
    pipe.scheduler = FastDiffScheduler.from_config(reference.config, solver=solver)
    assert _close(_run_pipe(pipe, sd_parts[2]), expected)
    out = sample_pipeline(
        pipe, prompt_embeds=sd_parts[2][0], negative_prompt_embeds=sd_parts[2][1], guidance=5.0, solver=solver,
        steps=8, generator=torch.Generator().manual_seed(0), output_type="latent",
    )  # fmt: skip
    assert _close(out.images, expected)


def _count_rows(module):
    """A forward pre-hook recording the batch rows each call of ``module`` sees, and its handle."""
    rows = []

    def hook(m, args, kwargs):
        rows.append(len(kwargs["sample"] if "sample" in kwargs else args[0]))

    return rows, module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun"])
def test_sample_pipeline_interval_guidance_spends_the_documented_nfe(sd_parts, solver):
    """Guidance in (lo, hi] runs the unconditional half of the batch only on steps whose start sigma lies in the
    interval; elsewhere the UNet sees the conditional batch alone. Counted at the UNet."""
    pipe = _sd_pipe(sd_parts, diffusers.EulerDiscreteScheduler(**SD))
    lo, hi = 0.5, 3.0
    runner = PipelineSampler(pipe, solver=solver, steps=8, guidance=fastdiff.Guidance(5.0, interval=(lo, hi)))
    sigmas = runner.sigmas.tolist()
    evals = [1 if (solver != "heun" or s1 == 0) else 2 for s1 in sigmas[1:]]
    guided = [lo < s <= hi for s in sigmas[:-1]]
    assert 0 < sum(guided) < len(guided)
    nfe = (sum(evals), sum(e for e, g in zip(evals, guided) if g))
    unet = sd_parts[0]
    rows, handle = _count_rows(unet)
    try:
        pe, ne = sd_parts[2]
        out = runner(prompt_embeds=pe, negative_prompt_embeds=ne, generator=torch.Generator().manual_seed(0),
                     output_type="latent")  # fmt: skip
    finally:
        handle.remove()
    batch = sd_parts[2][0].shape[0]
    assert out.nfe == nfe
    assert sum(rows) == batch * (nfe[0] + nfe[1])
    assert len(rows) == nfe[0]  # the guided steps batch cond and uncond into one call


def test_sample_pipeline_decodes_like_the_pipeline(sd_parts):
    reference = diffusers.DPMSolverMultistepScheduler(**SD)
    pipe = _sd_pipe(sd_parts, FastDiffScheduler.from_config(reference.config, solver="dpmpp_2m"))
    expected = _run_pipe(pipe, sd_parts[2], output_type="pt")
    pe, ne = sd_parts[2]
    out = sample_pipeline(pipe, prompt_embeds=pe, negative_prompt_embeds=ne, guidance=5.0, steps=8,
                          generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    assert out.images.shape == expected.shape == (2, 3, 16, 16)
    assert (out.images - expected).abs().max() < 1e-4
    pil = sample_pipeline(pipe, prompt_embeds=pe, negative_prompt_embeds=ne, guidance=5.0, steps=4).images
    assert len(pil) == 2 and pil[0].size == (16, 16)


def test_sample_pipeline_needs_negative_embeddings_to_guide(sd_parts):
    pipe = _sd_pipe(sd_parts, diffusers.EulerDiscreteScheduler(**SD))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sample_pipeline(pipe, prompt_embeds=sd_parts[2][0], guidance=5.0, steps=4)
    with pytest.raises(TypeError, match="neither a unet nor a transformer"):
        sample_pipeline(object(), prompt_embeds=sd_parts[2][0])


def test_class_conditional_unet2d_through_sample_pipeline(gmm):
    """A class-conditional UNet2DModel (no text, no VAE): sample_pipeline with class labels equals fastdiff.sample
    on the same network behind VPDenoiser."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=5,
    )  # fmt: skip
    scheduler = diffusers.DDPMScheduler(clip_sample=False)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    y, y_null = torch.tensor([1, 3]), torch.tensor([4, 4])
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    guidance = fastdiff.Guidance(3.0, interval=(0.3, 5.0))
    out = sample_pipeline(pipe, cond={"class_labels": y}, uncond={"class_labels": y_null}, latents=latents,
                          guidance=guidance, solver="unipc", steps=6)  # fmt: skip
    den = denoisers.VPDenoiser(lambda x, t, **c: unet(x, t, **c).sample, scheduler.alphas_cumprod)
    ours = FastDiffScheduler.from_config(scheduler.config, solver="unipc")
    ours.set_timesteps(6)
    with torch.no_grad():
        expected = fastdiff.sample(den, latents * (1 + ours.sigmas[0].double() ** 2).sqrt().float(), ours.sigmas,
                                   solver="unipc", guidance=guidance, cond={"class_labels": y},
                                   uncond={"class_labels": y_null})  # fmt: skip
    assert _close(out.images, expected)


# ------------------------------------------------------------------------------------------ flow matching


@pytest.fixture(scope="module")
def sd3_pipe():
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(16,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), shift_factor=0.06,
    )  # fmt: skip
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    embeds = [torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)]
    pooled = [torch.randn(1, 8, generator=g), torch.randn(1, 8, generator=g)]
    return pipe, embeds, pooled


def _run_sd3(pipe, embeds, pooled):
    return pipe(
        prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], pooled_prompt_embeds=pooled[0],
        negative_pooled_prompt_embeds=pooled[1], num_inference_steps=6, height=8, width=8, output_type="latent",
        guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip


def test_flow_matching_pipeline(sd3_pipe):
    """SD3-style pipeline: FastDiffScheduler(euler) equals FlowMatchEulerDiscreteScheduler (same shifted
    schedule), sample_pipeline equals the scheduler loop for a multistep solver, and Heun is refused from t = 1."""
    pipe, embeds, pooled = sd3_pipe
    original = pipe.scheduler
    expected = _run_sd3(pipe, embeds, pooled)
    try:
        pipe.scheduler = FastDiffScheduler.from_config(original.config, solver="euler")
        assert pipe.scheduler.prediction == "flow"
        assert _close(_run_sd3(pipe, embeds, pooled), expected)
        pipe.scheduler = FastDiffScheduler.from_config(original.config, solver="dpmpp_2m")
        loop = _run_sd3(pipe, embeds, pooled)
        out = sample_pipeline(
            pipe, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], pooled_prompt_embeds=pooled[0],
            negative_pooled_prompt_embeds=pooled[1], guidance=4.0, solver="dpmpp_2m", steps=6,
            generator=torch.Generator().manual_seed(0), output_type="latent",
        )  # fmt: skip
        assert _close(out.images, loop)
        with pytest.raises(ValueError, match="Heun"):
            FastDiffScheduler.from_config(original.config, solver="heun").set_timesteps(6)
    finally:
        pipe.scheduler = original


# --------------------------------------------------------------------------------- the scheduler's interface


def test_config_round_trip(tmp_path, gmm):
    reference = diffusers.DPMSolverMultistepScheduler(**SD)
    ours = FastDiffScheduler.from_config(reference.config, solver="unipc", solver_options={"order": 3})
    ours.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FastDiffScheduler" and saved["solver"] == "unipc"
    loaded = FastDiffScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), "eps")
    x, labels = _noise_and_labels()
    assert torch.equal(_mixture_loop(loaded, net, 8, x, labels), _mixture_loop(ours, net, 8, x, labels))
    # diffusers' own schedulers load the saved config (compatibility both ways)
    back = diffusers.DPMSolverMultistepScheduler.from_config(loaded.config)
    assert back.config.beta_schedule == "scaled_linear"
    assert "DPMSolverMultistepScheduler" in ours.compatibles or "DPMSolverMultistepScheduler" in [
        c.__name__ for c in ours.compatibles
    ]


def test_public_interface(gmm):
    sched = FastDiffScheduler(**SD, solver="heun")
    assert sched.init_noise_sigma == 1.0 and sched.order == 2 and len(sched) == 1000
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(2), 1, torch.zeros(2))
    sched.set_timesteps(5)
    assert len(sched.timesteps) == 9  # two evaluations a step, one on the step to 0
    x = torch.randn(4, 2, 1, 1)
    assert sched.scale_model_input(x, sched.timesteps[0]) is x
    net = MixtureNet(gmm, sched.alphas_cumprod, "eps")
    t = sched.timesteps[0]
    as_dict = sched.step(net(x, t), t, x)
    sched.set_timesteps(5)
    as_tuple = sched.step(net(x, t), t, x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.prev_sample)
    assert as_dict.prev_sample.shape == x.shape and as_dict.pred_original_sample.shape == x.shape
    with pytest.raises(ValueError, match="unknown solver"):
        FastDiffScheduler(solver="plms")
    with pytest.raises(ValueError, match="prediction_type"):
        FastDiffScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="schedule must be"):
        FastDiffScheduler(schedule="cosine")


def test_add_noise_matches_the_training_forward_process():
    sched = FastDiffScheduler(**SD)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    ab = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    assert torch.allclose(sched.add_noise(x0, noise, t), ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-6)
    flow = FastDiffScheduler(shift=3.0)
    tf = torch.tensor([250.0, 500.0, 1000.0])
    expected = (1 - tf / 1000).reshape(-1, 1, 1, 1) * x0 + (tf / 1000).reshape(-1, 1, 1, 1) * noise
    assert torch.allclose(flow.scale_noise(x0, tf, noise), expected, atol=1e-6)


def test_named_and_learned_schedules(gmm, tmp_path):
    """A named fastdiff schedule spans the model's training range; a learned schedule file is used as saved,
    evaluation sigmas included. Both equal fastdiff.sample on the same network behind VPDenoiser."""
    sched = FastDiffScheduler(**SD, solver="dpmpp_2m", schedule="karras")
    net = MixtureNet(gmm, sched.alphas_cumprod, "eps")
    den = denoisers.VPDenoiser(net, sched.alphas_cumprod)
    x = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loop(s):
        s.set_timesteps(s.num_inference_steps or 7)
        z = x * s.init_noise_sigma
        for t in s.timesteps:
            z = s.step(net(s.scale_model_input(z, t), t), t, z).prev_sample
        return z

    # The network sees diffusers' float32 timesteps, fastdiff.sample's VPDenoiser float64 ones: 1e-6 covers that.
    sig = schedules.karras(7, den.sigma_min, den.sigma_max)
    expected = fastdiff.sample(den, x * (1 + sig[0] ** 2).sqrt(), sig, solver="dpmpp_2m")
    assert (loop(sched) - expected).abs().max() < 1e-6

    learned = torch.tensor([10.0, 3.0, 1.2, 0.4, 0.0], dtype=torch.float64)
    evals = torch.tensor([9.0, 3.3, 1.0, 0.5, 0.0], dtype=torch.float64)
    path = tmp_path / "learned.json"
    schedules.save(path, learned, eval_sigmas=evals, solver="dpmpp_2m", nfe=4)
    sched = FastDiffScheduler(**SD, solver="dpmpp_2m", learned_schedule=str(path))
    expected = fastdiff.sample(den, x * (1 + learned[0] ** 2).sqrt(), learned, solver="dpmpp_2m", eval_sigmas=evals)
    sched.set_timesteps()
    assert (loop(sched) - expected).abs().max() < 1e-6
    with pytest.raises(ValueError, match="4 steps"):
        sched.set_timesteps(10)


def test_begin_index_starts_mid_schedule(gmm):
    """Image-to-image: the pipeline noises an image to the k-th timestep with add_noise and sets the begin
    index; the solver starts there (first order, fresh history), as fastdiff.sample on the tail of the schedule."""
    sched = FastDiffScheduler(**SD, solver="dpmpp_2m")
    sched.set_timesteps(10)
    net = MixtureNet(gmm, sched.alphas_cumprod, "eps")
    den = denoisers.VPDenoiser(net, sched.alphas_cumprod)
    x0 = torch.randn(8, 2, 1, 1, dtype=torch.float64)
    noise = torch.randn(8, 2, 1, 1, dtype=torch.float64)
    k = 4
    z = sched.add_noise(x0, noise, sched.timesteps[k : k + 1].repeat(8))
    sched.set_begin_index(k)
    for t in sched.timesteps[k:]:
        z = sched.step(net(z, t), t, z).prev_sample
    tail = sched.sigmas[k:].double()
    start = x0 + tail[0] * noise
    assert (z - fastdiff.sample(den, start, tail, solver="dpmpp_2m")).abs().max() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun"])
def test_pipeline_sampler_cuda_graph_equals_eager(sd_parts, solver):
    """The pipeline path captured as one CUDA graph (interval guidance, cond+uncond batched on the guided steps)
    replays what the eager loop computes, for new latents and new embeddings without a recapture."""
    import copy

    unet, vae, (pe, ne) = copy.deepcopy(sd_parts)
    pipe = _sd_pipe((unet.cuda(), vae.cuda(), None), diffusers.DPMSolverMultistepScheduler(**SD))
    guidance = fastdiff.Guidance(5.0, interval=(0.5, 3.0))
    eager = PipelineSampler(pipe, solver=solver, steps=8, guidance=guidance)
    graph = PipelineSampler(pipe, solver=solver, steps=8, guidance=guidance, cuda_graph=True)
    captured = None
    for seed in (0, 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        latents = torch.randn(2, 4, 16, 16, device="cuda", generator=g)
        kw = dict(latents=latents, output_type="latent")
        a = eager(prompt_embeds=pe.cuda() + seed, negative_prompt_embeds=ne.cuda(), **kw).images
        b = graph(prompt_embeds=pe.cuda() + seed, negative_prompt_embeds=ne.cuda(), **kw).images
        assert _close(b, a)
        captured = captured or graph.sampler._graph
        assert graph.sampler._graph is captured  # replayed with the new inputs, not recaptured


# ------------------------------------------------------------------------------ a faithful swap (issue 20, item 1)

SD_LINSPACE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # diffusers' default spacing
NATIVE = [
    # (diffusers scheduler, its options, steps): FastDiffScheduler.from_config(config) with no solver= picks the
    # fastdiff solver that reproduces it.
    ("EulerDiscreteScheduler", dict(timestep_spacing="linspace"), 8),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing"), 8),
    ("HeunDiscreteScheduler", dict(timestep_spacing="linspace"), 6),
    ("HeunDiscreteScheduler", dict(timestep_spacing="trailing", clip_sample=True, clip_sample_range=0.8), 6),
    ("DDIMScheduler", {}, 10),  # diffusers' defaults: clip_sample=True, set_alpha_to_one=True
    ("DDIMScheduler", dict(set_alpha_to_one=False, clip_sample_range=0.7, timestep_spacing="leading"), 10),
    ("DDIMScheduler", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.2), 10),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, dynamic_thresholding_ratio=0.9), 10),
    ("DPMSolverMultistepScheduler", dict(solver_order=3), 16),
    ("DPMSolverMultistepScheduler", dict(solver_order=1), 10),
    ("UniPCMultistepScheduler", dict(solver_order=3), 10),
    ("UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), 10),
    ("UniPCMultistepScheduler", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), 10),
    ("LMSDiscreteScheduler", dict(timestep_spacing="linspace"), 10),
]


def _in_float64(scheduler):
    """diffusers' scheduler with its float32 tables promoted, so that it steps float64 samples in float64."""
    for name in ("alphas_cumprod", "final_alpha_cumprod", "alpha_t", "sigma_t", "lambda_t"):
        if isinstance(getattr(scheduler, name, None), torch.Tensor):
            setattr(scheduler, name, getattr(scheduler, name).double())
    return scheduler


def _sigmas_in_float64(scheduler):
    """:func:`_in_float64`, and the sigmas each ``set_timesteps`` makes promoted too (diffusers keeps them in
    float32, which its higher-order updates amplify)."""
    scheduler = _in_float64(scheduler)
    set_timesteps = scheduler.set_timesteps

    def set_timesteps_float64(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        scheduler.sigmas = scheduler.sigmas.double()

    scheduler.set_timesteps = set_timesteps_float64
    return scheduler


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("cls,opts,steps", NATIVE, ids=lambda v: v if isinstance(v, str) else None)
def test_from_config_alone_reproduces_the_source(gmm, prediction, cls, opts, steps):
    """No solver given: the swap follows the source's method, its starting noise, its final noise level and its
    clipping or thresholding of x0, so the loop's result is diffusers' own.

    Run in float64: clipping x0 while keeping the network's noise direction (DDIM) drives the guided mixture off
    its data, where its denoiser is steep, and float32 rounding of diffusers' tables (1e-7 relative) grows to
    1e-4 at the end (measured at w = 4). In float64 DDIM agrees to 1e-12; DPM-Solver, UniPC and Heun keep some
    float32 tables (sigmas, lambdas), which leaves up to 4e-6."""
    reference = _in_float64(getattr(diffusers, cls)(**SD_LINSPACE, prediction_type=prediction, **opts))
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), PREDICTIONS[prediction])
    x, labels = _noise_and_labels()
    x = x.double()
    # LMS's keys are also KDPM2's: its config alone is ambiguous, the scheduler itself is not
    ours = FastDiffScheduler.from_config(reference if cls == "LMSDiscreteScheduler" else reference.config)
    expected = _mixture_loop(reference, net, steps, x, labels, w=4.0)
    got = _mixture_loop(ours, net, steps, x, labels, w=4.0)
    assert float(ours.init_noise_sigma) == pytest.approx(
        float(reference.init_noise_sigma) / float((1 + ours.sigmas[0].double() ** 2).sqrt())
        if cls in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler") else 1.0, rel=1e-6
    )  # fmt: skip
    assert (got - expected).abs().max() < TOL


@pytest.mark.parametrize(
    "opts",
    [dict(clip_sample=True, clip_sample_range=0.7), dict(thresholding=True, dynamic_thresholding_ratio=0.9)],
)
def test_clipping_and_thresholding_change_the_result(gmm, opts):
    """The x0 transforms matter on this problem (so the parity above tests them): without them diffusers' DDIM
    ends elsewhere by far more than the tolerance."""
    net_ab = diffusers.DDIMScheduler(**SD_LINSPACE).alphas_cumprod.double()
    net = MixtureNet(gmm, net_ab, "eps")
    x, labels = _noise_and_labels()
    on = _mixture_loop(diffusers.DDIMScheduler(**SD_LINSPACE, **opts), net, 10, x, labels, w=4.0)
    off = _mixture_loop(diffusers.DDIMScheduler(**SD_LINSPACE, clip_sample=False), net, 10, x, labels, w=4.0)
    assert (on - off).abs().max() > 100 * TOL


def test_starting_noise_follows_timestep_spacing():
    """diffusers' Euler starts from sigma_max with "linspace"/"trailing" and from sqrt(1 + sigma_max^2) with
    "leading"; the swap's init_noise_sigma (model space, x_vp = x / sqrt(1 + sigma^2)) is the same start."""
    from_max = lambda s: s / (1 + s**2) ** 0.5  # noqa: E731
    for spacing, expected in (("linspace", from_max), ("trailing", from_max), ("leading", lambda s: 1.0)):
        ref = diffusers.EulerDiscreteScheduler(**SD_LINSPACE, timestep_spacing=spacing, steps_offset=1)
        ours = FastDiffScheduler.from_config(ref.config, solver="dpmpp_2m")
        ours.set_timesteps(7)
        s = float(ours.sigmas[0])
        assert ours.init_noise_sigma == pytest.approx(expected(s), rel=1e-12)
    # a fastdiff schedule is not the source's: it starts from the exact sqrt(1 + sigma_max^2)
    ours = FastDiffScheduler.from_config(ref.config, solver="euler", schedule="karras")
    ours.set_timesteps(7)
    assert ours.init_noise_sigma == 1.0


def _seeded_loop(scheduler, net, x, labels, steps, seed=3):
    """An unguided pipeline loop whose scheduler draws its noise from a seeded generator passed to ``step``."""
    scheduler.set_timesteps(steps)
    z, g = x * scheduler.init_noise_sigma, torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        z = scheduler.step(net(scheduler.scale_model_input(z, t), t, class_labels=labels), t, z, generator=g)
        z = z.prev_sample
    return z


def test_euler_ancestral_draws_the_same_noise(gmm):
    """EulerAncestralDiscreteScheduler -> euler_ancestral: with the same generator passed to step, the same
    noise is drawn in the same order, so the trajectories agree."""
    reference = diffusers.EulerAncestralDiscreteScheduler(**SD_LINSPACE)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), "eps")
    x, labels = _noise_and_labels()

    def loop(s):
        return _seeded_loop(s, net, x, labels, 8)

    ours = FastDiffScheduler.from_config(reference.config)
    assert ours.solver.name == "euler_ancestral"
    assert (loop(ours) - loop(reference)).abs().max() < TOL


@pytest.mark.parametrize(
    "cls,opts,solver",
    [
        ("KDPM2DiscreteScheduler", {}, "dpm_2"),
        ("KDPM2DiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, use_karras_sigmas=True), "dpm_2"),
        ("KDPM2AncestralDiscreteScheduler", {}, "dpm_2_ancestral"),
        ("KDPM2AncestralDiscreteScheduler", dict(timestep_spacing="trailing"), "dpm_2_ancestral"),
        ("DPMSolverSDEScheduler", dict(noise_sampler_seed=5), "dpmpp_sde"),
        ("DPMSolverSDEScheduler", dict(noise_sampler_seed=11, use_karras_sigmas=True), "dpmpp_sde"),
    ],
)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_schedulers_that_evaluate_between_levels_reproduce_the_source(gmm, cls, opts, solver, prediction):
    """KDPM2 -> dpm_2, KDPM2Ancestral -> dpm_2_ancestral and DPMSolverSDE -> dpmpp_sde evaluate the model at
    the log-sigma midpoint between levels: the swap's timesteps interleave the same midpoints, the ancestral one
    draws the same noise from the generator in the same order, and the SDE one follows the same torchsde
    Brownian path (its noise_sampler_seed, queried where diffusers queries it). Float64 samples.

    Documented difference: diffusers interpolates a midpoint's network timestep in float32 (712.9999 where
    fastdiff has 713.0: at eta = 1 the ancestral midpoint is the next level itself); fastdiff in float64. With
    the network given the same timesteps the trajectories agree to TOL; with each its own, to 2e-4 (9e-5
    measured, KDPM2Ancestral with trailing spacing at w = 3)."""
    reference = getattr(diffusers, cls)(**SD_LINSPACE, prediction_type=prediction, **opts)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), PREDICTIONS[prediction])
    x, labels = _noise_and_labels()
    x = x.double()
    reference.set_timesteps(7)
    reference_timesteps = reference.timesteps.double()

    def loop(s, network_timesteps=None, w=3.0):
        s.set_timesteps(7)
        z, g = x * s.init_noise_sigma, torch.Generator().manual_seed(3)
        y = torch.cat([torch.full_like(labels, -1), labels])
        kw = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}  # as pipelines pass it
        for t, tn in zip(s.timesteps, s.timesteps if network_timesteps is None else network_timesteps):
            out_u, out_c = net(s.scale_model_input(torch.cat([z, z]), t), tn, class_labels=y).chunk(2)
            z = s.step(out_u + w * (out_c - out_u), t, z, **kw).prev_sample
        return z

    ours = FastDiffScheduler.from_config(reference)  # a live scheduler: KDPM2's config alone is also LMS's
    assert ours.solver.name == solver
    expected = loop(reference)
    assert (loop(ours, reference_timesteps) - expected).abs().max() < TOL
    assert (loop(ours) - expected).abs().max() < 2e-4
    assert len(ours.timesteps) == len(reference.timesteps) == 13  # 6 two-evaluation steps, Euler to 0
    assert torch.allclose(ours.timesteps.double(), reference_timesteps, rtol=0, atol=2e-3)


@pytest.mark.parametrize("opts", [{}, dict(original_inference_steps=20, timestep_scaling=0.01)])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_lcm_scheduler_reproduces_the_source(gmm, opts, prediction):
    """LCMScheduler -> lcm: the boundary condition f = c_out x0 + c_skip x_vp at timestep * timestep_scaling
    (applied to the network's estimate, as diffusers does), re-noised to the next of LCM's skipping timesteps with
    the generator's noise; the last step returns f. At the default timestep_scaling (10) the boundary is below
    1e-7 at these timesteps; at 0.01 it matters: without it the result moves by far more than the tolerance."""
    reference = diffusers.LCMScheduler(**SD_LINSPACE, prediction_type=prediction, **opts)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), PREDICTIONS[prediction])
    x, labels = _noise_and_labels()
    x = x.double()

    def loop(s):
        return _seeded_loop(s, net, x, labels, 4)

    ours = FastDiffScheduler.from_config(reference)  # a live scheduler: LCM's config alone is also TCD's
    assert ours.solver.name == "lcm"
    expected = loop(reference)
    assert (loop(ours) - expected).abs().max() < TOL
    if opts:
        ours._lcm_scaling = None
        assert (loop(ours) - expected).abs().max() > 100 * TOL


@pytest.mark.parametrize("steps", [5, 6, 7, 12, 20])
@pytest.mark.parametrize("order,solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint"),
                                               (3, "heun")])  # fmt: skip
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpm_solver_singlestep_reproduces_the_source(gmm, steps, order, solver_type, final):
    """DPMSolverSinglestepScheduler -> dpmpp_singlestep: the same order list (groups of 1, 2, ... order steps,
    the last group shortened, the step to 0 first order), each step a singlestep update from its group's first
    level through the estimates since. Float64 samples, diffusers' sigmas promoted to float64 as for DEIS."""
    reference = _sigmas_in_float64(
        diffusers.DPMSolverSinglestepScheduler(
            **SD_LINSPACE, solver_order=order, solver_type=solver_type, final_sigmas_type=final
        )
    )
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), "eps")
    x, labels = _noise_and_labels()
    x = x.double()
    ours = FastDiffScheduler.from_config(reference.config)
    assert (ours.solver.name, ours.solver.order, ours.solver.solver_type) == ("dpmpp_singlestep", order, solver_type)
    expected = _mixture_loop(reference, net, steps, x, labels, w=3.0)
    assert (_mixture_loop(ours, net, steps, x, labels, w=3.0) - expected).abs().max() < TOL


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_sde_dpm_solver_reproduces_the_source(gmm, steps, solver_type):
    """DPMSolverMultistep with algorithm_type="sde-dpmsolver++" (DPM++ 2M SDE) -> dpmpp_2m_sde with eta = 1: one
    draw a step from the generator, in the same order. In float32, where diffusers draws its noise (it steps in
    float32 whatever the sample's dtype): relative to the samples' scale, as the pipeline tests."""
    reference = diffusers.DPMSolverMultistepScheduler(**SD_LINSPACE, algorithm_type="sde-dpmsolver++",
                                                      solver_type=solver_type)  # fmt: skip
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), "eps")
    x, labels = _noise_and_labels()
    ours = FastDiffScheduler.from_config(reference.config)
    assert (ours.solver.name, ours.solver.eta, ours.solver.solver_type) == ("dpmpp_2m_sde", 1.0, solver_type)
    expected = _seeded_loop(reference, net, x, labels, steps)
    assert _close(_seeded_loop(ours, net, x, labels, steps), expected)
    assert not _close(_seeded_loop(ours, net, x, labels, steps, seed=4), expected)


@pytest.mark.parametrize("opts", [dict(set_alpha_to_one=True), dict(set_alpha_to_one=False, timestep_spacing="leading",
                                                                      steps_offset=1)])  # fmt: skip
def test_ddim_eta_is_reproduced_and_other_solvers_refuse_it(gmm, opts):
    """Pipelines pass their eta to a scheduler whose step takes it: DDIM with eta > 0 is the stochastic DDIM
    step, euler_ancestral with that eta in this form, drawing the same noise; a solver without eta refuses it."""
    reference = diffusers.DDIMScheduler(**SD_LINSPACE, clip_sample=False, **opts)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), "eps")
    x, labels = _noise_and_labels()
    x = x.double()

    def loop(s, eta):
        s.set_timesteps(8)
        z, g = x * s.init_noise_sigma, torch.Generator().manual_seed(3)
        for t in s.timesteps:
            out = net(s.scale_model_input(z, t), t, class_labels=labels)
            z = s.step(out, t, z, eta=eta, generator=g).prev_sample
        return z

    ours = FastDiffScheduler.from_config(reference.config)
    assert "eta" in inspect.signature(ours.step).parameters  # so pipelines pass it
    for eta in (0.0, 0.5, 1.0):
        assert (loop(ours, eta) - loop(reference, eta)).abs().max() < TOL
    with pytest.raises(ValueError, match="eta=0.5 .* dpmpp_2m"):
        loop(FastDiffScheduler.from_config(reference.config, solver="dpmpp_2m"), 0.5)


@pytest.mark.parametrize("steps", [2, 4, 8])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_tcd_scheduler_reproduces_the_source(gmm, steps, prediction):
    """TCDScheduler -> tcd: its estimates carried back to timestep floor((1 - gamma) t_next) of the model's own
    grid and noised forward with the generator's draws; gamma is the eta the pipeline passes to step (None: 0.3,
    TCD's default); the last step ends at timestep 0's level, with no noise. gamma = 0 is DDIM."""
    reference = diffusers.TCDScheduler(**SD_LINSPACE, prediction_type=prediction)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), PREDICTIONS[prediction])
    x, labels = _noise_and_labels()
    x = x.double()

    def loop(s, **kw):
        s.set_timesteps(steps)
        z, g = x * s.init_noise_sigma, torch.Generator().manual_seed(3)
        for t in s.timesteps:
            z = s.step(net(s.scale_model_input(z, t), t, class_labels=labels), t, z, generator=g, **kw).prev_sample
        return z

    ours = FastDiffScheduler.from_config(reference)  # a live scheduler: TCD's config alone is also LCM's
    assert ours.solver.name == "tcd"
    for kw in ({}, {"eta": 0.0}, {"eta": 0.3}, {"eta": 1.0}):
        assert (loop(ours, **kw) - loop(reference, **kw)).abs().max() < TOL, kw
    assert ours.sigmas[-1] == pytest.approx(float(ours._grid.sigma_min))  # timestep 0's level


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("orders", [(1, 1), (2, 2), (3, 3), (2, 4), (3, 1)])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_sa_solver_reproduces_the_source(gmm, steps, orders, prediction):
    """SASolverScheduler -> sa_solver: the stochastic Adams predictor and (from the second step) the Adams-Moulton
    corrector with the previous step's noise, orders warming up and lowered at the end, tau = 1 on timesteps
    200-800 (as sigmas of the grid): the same draws from the generator, one a step."""
    p, c = orders
    reference = _sigmas_in_float64(diffusers.SASolverScheduler(**SD_LINSPACE, prediction_type=prediction,
                                                        predictor_order=p, corrector_order=c))  # fmt: skip
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), PREDICTIONS[prediction])
    x, labels = _noise_and_labels()
    x = x.double()
    ours = FastDiffScheduler.from_config(reference.config)
    assert (ours.solver.name, ours.solver.predictor_order, ours.solver.corrector_order) == ("sa_solver", p, c)
    expected = _seeded_loop(reference, net, x, labels, steps)
    assert (_seeded_loop(ours, net, x, labels, steps) - expected).abs().max() < TOL
    assert (_seeded_loop(ours, net, x, labels, steps, seed=4) - expected).abs().max() > 100 * TOL  # tau > 0 draws


def test_dpmpp_sde_swapped_in_draws_one_brownian_path_per_generator(gmm):
    """dpmpp_sde in place of another scheduler: its two nested draws a step come from one Brownian tree whose
    seed is drawn from the step's generator, so the same generator repeats the run and another changes it."""
    source = diffusers.EulerDiscreteScheduler(**SD_LINSPACE)
    net = MixtureNet(gmm, source.alphas_cumprod.double(), "eps")
    x, labels = _noise_and_labels()

    def loop(seed):
        return _seeded_loop(FastDiffScheduler.from_config(source.config, solver="dpmpp_sde"), net, x, labels, 6, seed)

    assert torch.equal(loop(1), loop(1))
    assert not torch.allclose(loop(1), loop(2))


def test_solver_order_fills_the_same_solver_options():
    """A UniPC config's solver_order/solver_type/lower_order_final become fastdiff UniPC's options when the
    solver is unipc and solver_options leaves them unset; with another solver they describe what is replaced."""
    cfg = diffusers.UniPCMultistepScheduler(**SD, solver_order=3, solver_type="bh1", lower_order_final=False).config
    s = FastDiffScheduler.from_config(cfg, solver="unipc").solver
    assert (s.order, s.variant, s.lower_order_final) == (3, "bh1", False)
    assert FastDiffScheduler.from_config(cfg, solver="unipc", solver_options={"order": 1}).solver.order == 1
    assert FastDiffScheduler.from_config(cfg, solver="euler").solver.name == "euler"
    dpm = diffusers.DPMSolverMultistepScheduler(**SD, solver_order=3).config
    assert FastDiffScheduler.from_config(dpm).solver.name == "dpmpp_3m"


@pytest.mark.parametrize(
    "cls,opts,match",
    [
        ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order=3"),
        (
            "DPMSolverMultistepScheduler",
            dict(algorithm_type="sde-dpmsolver++", final_sigmas_type="sigma_min"),
            "final_sigmas_type='sigma_min'",
        ),  # fmt: skip
        ("DPMSolverMultistepScheduler", dict(solver_type="heun"), "solver_type='heun'"),
        ("UniPCMultistepScheduler", dict(disable_corrector=[0]), "disable_corrector"),
        ("UniPCMultistepScheduler", dict(predict_x0=False), "predict_x0"),
        ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True), "stochastic_sampling"),
        ("FlowMatchEulerDiscreteScheduler", dict(invert_sigmas=True), "invert_sigmas"),
        ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver"),
        ("EDMDPMSolverMultistepScheduler", dict(solver_type="heun"), "solver_type='heun'"),
        ("EDMDPMSolverMultistepScheduler", dict(prediction_type="sample"), "prediction_type='sample'"),
        ("EDMEulerScheduler", dict(final_sigmas_type="sigma_min"), "final_sigmas_type='sigma_min'"),
        ("PNDMScheduler", {}, "no fastdiff solver reproduces PNDMScheduler"),
    ]
    + [(cls, {}, f"no fastdiff solver reproduces {cls}: {re.escape(why[:30])}") for cls, why in UNREPRODUCED.items()],
)
def test_keys_the_swap_cannot_reproduce_are_refused_by_name(cls, opts, match):
    """Each refusal names the key or the scheduler and why (the scheduler itself is passed: some configs are
    shared by several classes, see the test below)."""
    source = getattr(diffusers, cls)(**opts)
    with pytest.raises(ValueError, match=match):
        FastDiffScheduler.from_config(source)


def test_a_config_shared_by_schedulers_that_step_differently_is_refused():
    """LMS's config keys are also KDPM2's and KDPM2Ancestral's, LCM's are TCD's: a config alone could be either,
    so without solver= it is refused rather than silently stepped as LMS; the scheduler itself, a config naming
    its class, or an explicit solver go through. DDIM and DDIMParallel share keys and method: no refusal."""
    for cls in ("KDPM2DiscreteScheduler", "LMSDiscreteScheduler", "TCDScheduler"):
        with pytest.raises(ValueError, match="LMSDiscreteScheduler|LCMScheduler"):
            FastDiffScheduler.from_config(getattr(diffusers, cls)().config)
    lms = diffusers.LMSDiscreteScheduler()
    assert FastDiffScheduler.from_config(lms).solver.name == "lms"
    assert FastDiffScheduler.from_config({**lms.config, "_class_name": "LMSDiscreteScheduler"}).solver.name == "lms"
    assert FastDiffScheduler.from_config(lms.config, solver="euler").solver.name == "euler"
    assert FastDiffScheduler.from_config(diffusers.KDPM2DiscreteScheduler()).solver.name == "dpm_2"
    assert FastDiffScheduler.from_config(diffusers.DDIMScheduler().config).solver.name == "ddim"


class _FlowMixtureNet:
    """The Gaussian mixture as a flow-matching network: ``(x_t, t in [0, 1000]) -> v = eps - x0`` with
    ``x_t = (1 - t) x0 + t eps``, through the exact denoiser at ``sigma = t / (1 - t)`` (t = 1 taken at 1 - 1e-9,
    where the estimate is the mixture's mean to 1e-9)."""

    def __init__(self, gmm):
        self.gmm = gmm

    def __call__(self, xt, t, class_labels=None):
        dtype, xt = xt.dtype, xt.double()
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(xt.shape[0]) / 1000
        tt = tt.clamp(max=1 - 1e-9).reshape(-1, 1, 1, 1)
        d = self.gmm(xt / (1 - tt), (tt / (1 - tt)).flatten(), class_labels=class_labels)
        return ((xt - (1 - tt) * d) / tt - d).to(dtype)


@pytest.mark.parametrize(
    "opts,mu",
    [
        (dict(use_dynamic_shifting=True), 0.8),  # Flux: mu from the image's sequence length
        (dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.3, max_shift=1.5), 1.1),
        (dict(shift=3.0, shift_terminal=0.1), None),  # SD3.5-style terminal stretch
        (dict(use_dynamic_shifting=True, shift_terminal=0.05, use_karras_sigmas=True), 0.5),
        (dict(shift=1.0), None),  # every key at its default: diffusers drops them all from the config
    ],
)
def test_flow_match_euler_dynamic_shifting_reproduces_the_source(gmm, opts, mu):
    """FlowMatchEulerDiscreteScheduler -> euler, with ``mu`` passed to ``set_timesteps`` as Flux and SD3
    pipelines pass it: the shifted (exponential or linear), terminal-stretched, Karras-converted flow times are
    the source's, and the trajectory is its own (float64 samples; diffusers keeps float32 sigmas: about 5e-7)."""
    reference = diffusers.FlowMatchEulerDiscreteScheduler(**opts)
    net = _FlowMixtureNet(gmm)
    x, labels = _noise_and_labels()
    x = x.double()
    kw = {} if mu is None else {"mu": mu}

    def loop(s):
        s.set_timesteps(7, **kw)
        z = x.clone()
        for t in s.timesteps:
            z = s.step(net(z, t, class_labels=labels), t, z).prev_sample
        return z, s.timesteps

    ours = FastDiffScheduler.from_config(reference.config)
    assert ours.prediction == "flow" and ours.solver.name == "euler"
    (got, t_ours), (expected, t_ref) = loop(ours), loop(reference)
    assert torch.allclose(t_ours, t_ref.float())
    assert (got - expected).abs().max() < TOL
    if mu is not None:
        with pytest.raises(ValueError, match="mu"):
            FastDiffScheduler.from_config(reference.config).set_timesteps(7)


@pytest.mark.parametrize("opts", [dict(shift=1.0), dict(shift=3.0)])
def test_flow_match_heun_reproduces_the_source(gmm, opts):
    """FlowMatchHeunDiscreteScheduler -> heun with time="flow": the trapezoid in flow time on x_t, from t = 1,
    two evaluations a step and one (Euler) on the step to 0. fastdiff's default Heun, the trapezoid in sigma, is
    another method, unbounded from t = 1: refused there, naming the flow form."""
    reference = diffusers.FlowMatchHeunDiscreteScheduler(**opts)
    net = _FlowMixtureNet(gmm)
    x, labels = _noise_and_labels()
    x = x.double()

    def loop(s):
        s.set_timesteps(5)
        z = x.clone()
        for t in s.timesteps:
            z = s.step(net(z, t, class_labels=labels), t, z).prev_sample
        return z

    ours = FastDiffScheduler.from_config(reference)
    assert ours.solver.name == "heun" and ours.solver.time == "flow" and ours.order == 2
    expected = loop(reference)
    assert (loop(ours) - expected).abs().max() < TOL
    assert torch.allclose(ours.timesteps.double(), reference.timesteps.double(), rtol=1e-6)
    sigma_heun = FastDiffScheduler.from_config(reference.config, solver="heun", prediction_type="flow")
    with pytest.raises(ValueError, match="time='flow'"):
        sigma_heun.set_timesteps(5)


def test_pipeline_path_refuses_clipping_under_guidance_and_applies_it_without(gmm, sd_parts):
    """Guided, the pipeline path refuses a clipping config; unguided, each estimate is clipped as the
    FastDiffScheduler loop clips it (StableDiffusionPipeline itself resets clip_sample, so it is set after)."""
    pipe = _sd_pipe(sd_parts, diffusers.DDIMScheduler(**SD))
    pipe.scheduler = diffusers.DDIMScheduler(**SD, clip_sample=True, clip_sample_range=0.5)
    with pytest.raises(ValueError, match="clip_sample"):
        PipelineSampler(pipe, solver="ddim", steps=4, guidance=5.0)
    pe = sd_parts[2][0]
    latents = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    out = sample_pipeline(pipe, prompt_embeds=pe, steps=4, latents=latents, output_type="latent").images
    ours = FastDiffScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")
    ours.set_timesteps(4)
    z = latents * ours.init_noise_sigma
    with torch.no_grad():
        for t in ours.timesteps:
            z = ours.step(sd_parts[0](z, t, encoder_hidden_states=pe).sample, t, z).prev_sample
    assert _close(out, z)
    one = sample_pipeline(pipe, prompt_embeds=pe, steps=4, latents=latents, output_type="latent", guidance=1.0)
    assert _close(one.images, out)  # guidance 1 is no guidance: clipped as well
    pipe.scheduler = diffusers.DDIMScheduler(**SD, clip_sample=False)
    plain = sample_pipeline(pipe, prompt_embeds=pe, steps=4, latents=latents, output_type="latent").images
    assert not _close(plain, out)  # the clipping mattered


class _EDMMixtureNet:
    """The Gaussian mixture as a raw EDM network ``F(c_in x, c_noise)`` behind diffusers' EDM preconditioning:
    ``D = c_skip x + c_out F`` (``c_out`` negated for v_prediction), ``c_noise = log(sigma) / 4``, solved for F
    from the exact denoiser."""

    def __init__(self, gmm, sigma_data, v):
        self.gmm, self.sd, self.v = gmm, sigma_data, v

    def __call__(self, x_in, t, class_labels=None):
        dtype, x_in = x_in.dtype, x_in.double()
        s = torch.exp(4 * torch.as_tensor(t, dtype=torch.float64)).reshape(-1).expand(x_in.shape[0])
        s = s.reshape(-1, 1, 1, 1)
        root = (s**2 + self.sd**2).sqrt()
        x = x_in * root
        d = self.gmm(x, s.flatten(), class_labels=class_labels)
        f = (d - self.sd**2 / root**2 * x) / (s * self.sd / root)
        return (-f if self.v else f).to(dtype)


@pytest.mark.parametrize(
    "cls,opts,solver,steps",
    [
        ("EDMEulerScheduler", {}, "euler", 10),
        ("EDMEulerScheduler", dict(sigma_schedule="exponential", sigma_max=20.0, sigma_data=0.7), "euler", 10),
        ("EDMEulerScheduler", dict(rho=5.0, prediction_type="v_prediction"), "euler", 8),
        ("EDMDPMSolverMultistepScheduler", {}, "dpmpp_2m", 10),
        ("EDMDPMSolverMultistepScheduler", dict(solver_order=1, sigma_schedule="exponential"), "ddim", 10),
        (
            "EDMDPMSolverMultistepScheduler",
            dict(solver_order=3, rho=5.0, prediction_type="v_prediction"),
            "dpmpp_3m",
            16,
        ),
        ("EDMDPMSolverMultistepScheduler", dict(thresholding=True, dynamic_thresholding_ratio=0.9), "dpmpp_2m", 10),
    ],
)
def test_edm_schedulers_reproduce_the_source(gmm, cls, opts, solver, steps):
    """EDMEulerScheduler -> euler, EDMDPMSolverMultistepScheduler -> ddim/dpmpp_2m/dpmpp_3m per solver_order, on
    the source's Karras or exponential sigmas (sigma_min/max, rho), with its input preconditioning c_in, its
    timesteps log(sigma) / 4, its output preconditioning (sigma_data, epsilon or v_prediction) and its start
    sqrt(sigma_max^2 + 1). Float64 samples; diffusers keeps float32 sigmas (agreement about 8e-7). Order 3 agrees
    from 15 steps on (below, diffusers' lower_order_final lowers the last steps' order, as in
    test_dpmpp_3m_matches_diffusers_from_15_steps)."""
    reference = getattr(diffusers, cls)(**opts)
    net = _EDMMixtureNet(gmm, reference.config.sigma_data, reference.config.prediction_type == "v_prediction")
    x, labels = _noise_and_labels()
    x = x.double()
    ours = FastDiffScheduler.from_config(reference.config)
    assert ours.solver.name == solver
    assert ours.init_noise_sigma == pytest.approx(reference.init_noise_sigma, rel=1e-12)
    expected = _mixture_loop(reference, net, steps, x, labels)
    got = _mixture_loop(ours, net, steps, x, labels)
    assert torch.allclose(ours.timesteps, reference.timesteps.float())
    assert (got - expected).abs().max() < TOL
    # the noise levels are EDM's: x0 + sigma * noise at timestep log(sigma) / 4
    x0, noise = torch.randn(3, 2, 1, 1).double(), torch.randn(3, 2, 1, 1).double()
    t = reference.timesteps[:3]
    assert torch.allclose(ours.add_noise(x0, noise, t), reference.add_noise(x0, noise, t), atol=1e-5)


def test_edm_scheduler_takes_a_fastdiff_schedule():
    """A fastdiff schedule under an EDM source spans the source's sigma_min..sigma_max, starts from
    sqrt(1 + sigma_0^2) and calls the network at log(sigma) / 4."""
    reference = diffusers.EDMEulerScheduler(sigma_min=0.01, sigma_max=40.0)
    ours = FastDiffScheduler.from_config(reference.config, solver="heun", schedule="karras")
    ours.set_timesteps(6)
    assert float(ours.sigmas[0]) == pytest.approx(40.0) and float(ours.sigmas[-2]) == pytest.approx(0.01)
    assert ours.init_noise_sigma == pytest.approx((1 + 40.0**2) ** 0.5)
    assert torch.allclose(ours.timesteps[:2].double(), ours.sigmas[:2].double().log() / 4)  # Heun: s0, then s1


# ------------------------------------------------------------------------------ a diffusers guider (issue 21)


@pytest.mark.parametrize("solver,cls", [("euler", "EulerDiscreteScheduler"),
                                        ("dpmpp_2m", "DPMSolverMultistepScheduler")])  # fmt: skip
def test_interval_guider_in_diffusers_loop_equals_fastdiff_sampler(gmm, solver, cls):
    """IntervalGuidance in a diffusers-style loop (the guider says how many batches to run, then combines them)
    guides the steps whose sigma lies in the interval and runs the conditional batch alone elsewhere; the loop
    equals fastdiff.Sampler with Guidance(w, interval) (restart=False: diffusers' multistep schedulers keep their
    history across the switches)."""
    from fastdiff.integrations.diffusers import IntervalGuidance

    reference = getattr(diffusers, cls)(**SD_LINSPACE)
    net = MixtureNet(gmm, reference.alphas_cumprod.double(), "eps")
    x, labels = _noise_and_labels()
    x = x.double()
    lo, hi, w = 0.5, 4.0, 3.0
    guider = IntervalGuidance(w, (lo, hi), scheduler=reference)
    scheduler = FastDiffScheduler.from_config(reference.config, solver=solver)
    scheduler.set_timesteps(8)
    z, uncond_calls = x * scheduler.init_noise_sigma, 0
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(step=i, num_inference_steps=8, timestep=t)
        pred_cond = net(scheduler.scale_model_input(z, t), t, class_labels=labels)
        pred_uncond = None
        if guider.num_conditions == 2:
            uncond_calls += 1
            pred_uncond = net(scheduler.scale_model_input(z, t), t, class_labels=torch.full_like(labels, -1))
        z = scheduler.step(guider.forward(pred_cond, pred_uncond).pred, t, z).prev_sample

    sigmas = scheduler.sigmas.double()
    guided = [lo < s <= hi for s in sigmas.tolist()[:-1]]
    assert uncond_calls == sum(guided) and 0 < sum(guided) < 8
    den = denoisers.VPDenoiser(lambda a, b, **c: net(a, b, **c), reference.alphas_cumprod)
    g = fastdiff.Guidance(w, (lo, hi), restart=False)
    start = x * scheduler.init_noise_sigma * (1 + sigmas[0] ** 2).sqrt()  # the loop's start, as a VE state
    ours = fastdiff.Sampler(den, solver=solver, sigmas=sigmas, guidance=g).sample(
        start, {"class_labels": labels}, {"class_labels": torch.full_like(labels, -1)}
    )
    assert (ours / (1 + sigmas[-1] ** 2).sqrt() - z).abs().max() < TOL
    assert guider.to_guidance().interval == (lo, hi)
    with pytest.raises(ValueError, match="needs the pipeline's scheduler"):
        IntervalGuidance(w, (lo, hi))
