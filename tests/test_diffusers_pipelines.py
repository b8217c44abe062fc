"""Prompt-level sampling of real diffusers pipelines (SD 1.x, SDXL, SD3, Flux, DiT) built from config, with text
encoders and tokenizers made in tests/_tiny_pipelines.py. The reference is each pipeline's own ``__call__`` with
FastDiffScheduler swapped in (fastdiff's default solver, DPM-Solver++(2M)), from the same seed: the two must give
the same latents to float32 rounding (1e-5 of the largest entry; 2e-7 to 1.3e-6 measured)."""

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import _tiny_pipelines as tiny  # noqa: E402

from fastdiff.integrations.diffusers import FastDiffScheduler, PipelineSampler, sample_pipeline  # noqa: E402
from fastdiff.integrations.diffusers_pipelines import FluxFamily, family_of  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

REL = 1e-5
PROMPTS = ["a photo of a cat", "red house"]
STEPS = 6


def _close(got, expected, rel=REL):
    return (got - expected).abs().max() <= rel * expected.abs().max()


def _seed():
    return torch.Generator().manual_seed(0)


def _pipeline_call(pipe, output_type="latent", **call):
    """The pipeline's own loop with FastDiffScheduler (default solver) in place of its scheduler."""
    original = pipe.scheduler
    pipe.scheduler = FastDiffScheduler.from_config(original.config, solver="dpmpp_2m")
    try:
        return pipe(**call, num_inference_steps=STEPS, generator=_seed(), output_type=output_type).images
    finally:
        pipe.scheduler = original


def _ours(pipe, prompt, output_type="latent", **kwargs):
    return sample_pipeline(pipe, prompt, steps=STEPS, generator=_seed(), output_type=output_type, **kwargs)


@pytest.fixture(scope="module")
def sd():
    return tiny.sd()


@pytest.fixture(scope="module")
def sdxl():
    return tiny.sdxl()


@pytest.fixture(scope="module")
def sd3():
    return tiny.sd3()


@pytest.fixture(scope="module")
def flux():
    return tiny.flux()


@pytest.fixture(scope="module")
def dit():
    return tiny.dit()


# --------------------------------------------------------------------------- each family equals its pipeline


@pytest.mark.parametrize("negative,n", [(None, 1), (["blue sky", "tree"], 2)])
def test_stable_diffusion_prompts(sd, negative, n):
    expected = _pipeline_call(sd, prompt=PROMPTS, negative_prompt=negative, guidance_scale=5.0,
                              num_images_per_prompt=n)  # fmt: skip
    out = _ours(sd, PROMPTS, negative_prompt=negative, guidance=5.0, num_images_per_prompt=n)
    assert out.images.shape == (2 * n, 4, 16, 16)
    assert _close(out.images, expected)
    assert out.nfe == (STEPS, STEPS)


def test_stable_diffusion_v_prediction():
    pipe = tiny.sd(prediction="v_prediction")
    expected = _pipeline_call(pipe, prompt=PROMPTS, guidance_scale=3.0)
    assert _close(_ours(pipe, PROMPTS, guidance=3.0).images, expected)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "euler"])
def test_edm_scheduled_pipeline(solver):
    """An SD pipeline with diffusers' EDM scheduler (a network preconditioned as EDM: c_in x, timestep
    log(sigma) / 4, D = c_skip x + c_out F): the pipeline path wraps the network in EDMPrecond and equals the
    pipeline's own loop with FastDiffScheduler."""
    pipe = tiny.sd(diffusers.EDMDPMSolverMultistepScheduler(sigma_max=80.0))
    original = pipe.scheduler
    pipe.scheduler = FastDiffScheduler.from_config(original.config, solver=solver)
    expected = pipe(prompt=PROMPTS, guidance_scale=4.0, num_inference_steps=STEPS, generator=_seed(),
                    output_type="latent").images  # fmt: skip
    pipe.scheduler = original
    out = _ours(pipe, PROMPTS, guidance=4.0, solver=solver)
    assert _close(out.images, expected)
    v_pipe = tiny.sd(diffusers.EDMEulerScheduler(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="v_prediction"):
        PipelineSampler(v_pipe)


def test_sdxl_prompts_and_added_conditioning(sdxl):
    """SDXL's text_embeds (the second encoder's pooled projection) and time_ids (sizes and crop), for the
    default sizes and for given ones, negative sizes included.

    diffusers builds the negative time ids as ``cat([negative, positive]).repeat(batch, 1)``, which interleaves
    them across a batch of several prompts (its second unconditional row gets the positive ids); fastdiff gives
    each pass its own, so the comparison with negative sizes is at one prompt, where the two agree."""
    expected = _pipeline_call(sdxl, prompt=PROMPTS, guidance_scale=5.0, height=16, width=16)
    assert _close(_ours(sdxl, PROMPTS, guidance=5.0).images, expected)
    sizes = dict(original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(16, 16))
    second = ["green tree", "bird"]
    expected = _pipeline_call(sdxl, prompt=PROMPTS, prompt_2=second, guidance_scale=5.0, **sizes)
    assert _close(_ours(sdxl, PROMPTS, prompt_2=second, guidance=5.0, **sizes).images, expected)
    sizes.update(negative_original_size=(32, 32), negative_target_size=(16, 16))
    expected = _pipeline_call(sdxl, prompt=PROMPTS[:1], guidance_scale=5.0, **sizes)
    assert _close(_ours(sdxl, PROMPTS[:1], guidance=5.0, **sizes).images, expected)
    c = PipelineSampler(sdxl, steps=STEPS, guidance=5.0).conditioning(PROMPTS, **sizes)
    assert c.cond["time_ids"].tolist() == [[64, 48, 4, 2, 16, 16]] * 2
    assert c.uncond["time_ids"].tolist() == [[32, 32, 0, 0, 16, 16]] * 2
    assert c.cond["text_embeds"].shape == (2, 32)  # the pooled projection of text_encoder_2


def test_sd3_prompts(sd3):
    expected = _pipeline_call(sd3, prompt=PROMPTS, negative_prompt=["blue", "sky"], guidance_scale=4.0)
    out = _ours(sd3, PROMPTS, negative_prompt=["blue", "sky"], guidance=4.0)
    assert out.images.shape == (2, 4, 8, 8)
    assert _close(out.images, expected)


def test_sd3_with_dynamic_shifting_takes_the_resolution_shift():
    """An SD3 config with use_dynamic_shifting: the pipeline computes mu from its token count; so does the
    sampler, at each size it is built for."""
    pipe = tiny.sd3(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=4,
                                                               max_image_seq_len=64))  # fmt: skip
    for size in (8, 16):
        expected = _pipeline_call(pipe, prompt=PROMPTS, guidance_scale=4.0, height=size, width=size)
        assert _close(_ours(pipe, PROMPTS, guidance=4.0, height=size, width=size).images, expected)
    small, large = (PipelineSampler(pipe, steps=STEPS, height=s, width=s).sigmas for s in (8, 16))
    assert (large[1:-1] > small[1:-1]).all()  # more tokens, more shift towards noise


def test_flux_distilled_guidance_without_an_unconditional_pass(flux):
    expected = _pipeline_call(flux, prompt=PROMPTS, guidance_scale=3.5, height=16, width=16, max_sequence_length=8)
    calls = []
    handle = flux.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(len(k["hidden_states"])),
                                                        with_kwargs=True)  # fmt: skip
    try:
        out = _ours(flux, PROMPTS, guidance=3.5, height=16, width=16, max_sequence_length=8)
    finally:
        handle.remove()
    assert out.images.shape == (2, 64, 16)  # packed: (16/2)^2 patches of 4 x 4 channels
    assert _close(out.images, expected)
    assert out.nfe == (STEPS, 0) and calls == [2] * STEPS
    other = _ours(flux, PROMPTS, guidance=1.5, height=16, width=16, max_sequence_length=8).images
    assert not _close(other, expected)  # the guidance input is used
    assert _close(_ours(flux, PROMPTS, height=16, width=16, max_sequence_length=8).images, expected)  # 3.5 default


def test_flux_noise_levels_follow_the_pipeline(flux):
    """Flux's levels: linspace(1, 1/n, n) shifted by mu of the token count, as FluxPipeline asks its scheduler."""
    for size in (16, 32):
        runner = PipelineSampler(flux, steps=STEPS, height=size, width=size)
        tokens = (size // 2) ** 2
        reference = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler.config)
        mu = fastdiff.schedules.dynamic_shift_mu(tokens, 0.5, 1.15, 4, 64)
        reference.set_timesteps(sigmas=torch.linspace(1, 1 / STEPS, STEPS).tolist(), mu=mu)
        t = runner.sigmas / (1 + runner.sigmas)
        assert torch.allclose(t[1:].float(), reference.sigmas[1:], atol=1e-6)
        assert runner.latent_shape(3) == (3, tokens, 16)


def test_flux_decodes_like_the_pipeline(flux):
    call = dict(prompt=PROMPTS[:1], height=16, width=16, max_sequence_length=8)
    expected = _pipeline_call(flux, output_type="pt", **call)
    assert _close(_ours(flux, call.pop("prompt"), output_type="pt", **call).images, expected, 1e-4)


def test_dit_class_names_and_ids(dit):
    """DiTPipeline decodes always (no latent output): images in [0, 1] compared to 1e-4."""
    expected = _pipeline_call(dit, output_type="pt", class_labels=[1, 207], guidance_scale=4.0)
    out = _ours(dit, ["goldfish", 207], guidance=4.0, output_type="pt")
    assert out.images.shape == (2, 3, 8, 8)
    assert _close(out.images, expected, 1e-4)
    arrays = _ours(dit, [1, 207], guidance=4.0, output_type="np").images
    assert arrays.shape == (2, 8, 8, 3) and _close(torch.from_numpy(arrays), expected.permute(0, 2, 3, 1), 1e-4)


def test_prompts_reach_the_network(sd, sdxl, sd3, flux, dit):
    """Another prompt gives other latents, for every family (the encoder's output, DiT's label, is used)."""
    flux_kw = dict(height=16, width=16, max_sequence_length=8)
    for pipe, prompts, kw in ((sd, ("a cat", "a dog"), {}), (sdxl, ("a cat", "a dog"), {}),
                              (sd3, ("a cat", "a dog"), {}), (flux, ("a cat", "a dog"), flux_kw),
                              (dit, (1, 207), dict(output_type="pt"))):  # fmt: skip
        a, b = (_ours(pipe, [p], **kw).images for p in prompts)
        assert not _close(a, b, 1e-3), type(pipe).__name__


def test_interval_guidance_with_prompts_spends_the_documented_nfe(sdxl):
    guidance = fastdiff.Guidance(5.0, interval=(0.5, 3.0))
    runner = PipelineSampler(sdxl, steps=8, guidance=guidance)
    guided = [0.5 < s <= 3.0 for s in runner.sigmas.tolist()[:-1]]
    assert 0 < sum(guided) < 8
    out = runner(PROMPTS, generator=_seed(), output_type="latent")
    assert out.nfe == (8, sum(guided))
    assert torch.isfinite(out.images).all()


def test_sample_pipeline_takes_the_interval_guider(sd):
    """fastdiff's diffusers guider (IntervalGuidance) as sample_pipeline's guidance: the same run as
    fastdiff.Guidance with its interval."""
    from fastdiff.integrations.diffusers import IntervalGuidance

    guider = IntervalGuidance(5.0, (0.5, 3.0), scheduler=sd.scheduler)
    a = _ours(sd, PROMPTS, guidance=guider)
    b = _ours(sd, PROMPTS, guidance=fastdiff.Guidance(5.0, (0.5, 3.0)))
    assert torch.equal(a.images, b.images) and a.nfe == b.nfe and 0 < a.nfe[1] < STEPS


def test_families_by_class(sd, sdxl, sd3, flux, dit):
    names = [family_of(p).name for p in (sd, sdxl, sd3, flux, dit)]
    assert names == ["StableDiffusion", "StableDiffusionXL", "StableDiffusion3", "Flux", "DiT"]
    assert family_of(object()).name == "generic"


# ------------------------------------------------------------------------------------------ errors


def test_bad_requests_are_refused_by_name(sd, flux, dit):
    with pytest.raises(TypeError, match="prompt_embeds="):
        sample_pipeline(sd, torch.zeros(1, 7, 32))
    with pytest.raises(TypeError, match="unknown option 'prompt_3'"):
        sample_pipeline(sd, PROMPTS, prompt_3="x", steps=2)
    with pytest.raises(ValueError, match="negative_prompt is not used"):
        sample_pipeline(flux, PROMPTS, negative_prompt="x", steps=2, height=16, width=16)
    with pytest.raises(ValueError, match="no interval"):
        PipelineSampler(flux, guidance=fastdiff.Guidance(3.5, interval=(0.1, 2.0)))
    with pytest.raises(ValueError, match="null class"):
        sample_pipeline(dit, [1], negative_prompt=[2], steps=2)
    with pytest.raises(ValueError, match="goldfish"):
        sample_pipeline(dit, ["no such class"], steps=2)
    runner = PipelineSampler(flux, steps=2, height=16, width=16)
    with pytest.raises(ValueError, match=r"needs \(1, 64, 16\)"):
        runner(PROMPTS[:1], latents=torch.randn(1, 16, 16), max_sequence_length=8)


def test_a_pipeline_without_its_text_encoder_asks_for_embeddings():
    pipe = tiny.sd()
    pipe.text_encoder = None
    with pytest.raises(ValueError, match="no text_encoder: pass prompt_embeds"):
        sample_pipeline(pipe, PROMPTS, steps=2)


def test_flux_without_a_guidance_input_refuses_guidance():
    pipe = tiny.flux(guidance_embeds=False)
    with pytest.raises(ValueError, match="guidance_embeds=False"):
        PipelineSampler(pipe, guidance=3.5)
    expected = _pipeline_call(pipe, prompt=PROMPTS, height=16, width=16, max_sequence_length=8)
    assert _close(_ours(pipe, PROMPTS, height=16, width=16, max_sequence_length=8).images, expected)


def test_prompts_need_a_known_pipeline_class():
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2)  # fmt: skip
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline.*cond= and uncond="):
        sample_pipeline(pipe, "a cat", steps=2)
    assert isinstance(family_of(pipe), type(family_of(object())))
    assert not isinstance(family_of(pipe), FluxFamily)


def test_a_network_with_diffusers_own_cache_hooks_samples_as_in_its_pipeline(flux):
    """diffusers' First-Block-Cache hooks (``enable_cache``) keep their state in a named context that its pipelines
    set around each call; sample_pipeline sets one too, so the hooks work and give what the pipeline's own loop
    gives with the same hooks."""
    kw = dict(height=16, width=16, max_sequence_length=8)
    plain = _ours(flux, PROMPTS, guidance=3.5, **kw).images
    flux.transformer.enable_cache(diffusers.FirstBlockCacheConfig(threshold=1e9))  # reuse after the first call
    try:
        expected = _pipeline_call(flux, prompt=PROMPTS, guidance_scale=3.5, **kw)
        out = _ours(flux, PROMPTS, guidance=3.5, **kw).images
    finally:
        flux.transformer.disable_cache()
    assert _close(out, expected) and not _close(out, plain)
