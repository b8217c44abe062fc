"""Sampling is inference: no sampling entry point returns a tensor with autograd history, for a model whose
parameters require gradients (with grad mode on, as it is by default), so a real UNet does not keep every step's
activations. The one differentiable loop, ``Sampler.run`` (LD3's), still records when asked."""

import pytest
import torch

import fastdiff
from fastdiff import denoisers, k_diffusion, schedules
from fastdiff.models.unet import EDMUNet, UNetConfig

SIGMAS = schedules.karras(6, 0.002, 80.0)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = EDMUNet(UNetConfig.tiny())
    assert all(p.requires_grad for p in net.parameters())
    return net


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g) * 80
    y = torch.tensor([1, 2])
    return x, {"class_labels": y}, {"class_labels": torch.full_like(y, -1)}


def _no_history(out: torch.Tensor) -> None:
    assert torch.is_grad_enabled()
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("solver", sorted(fastdiff.SOLVERS))
def test_sample_and_sampler(unet, inputs, solver):
    x, cond, uncond = inputs
    g = fastdiff.Guidance(2.0, interval=(0.28, 20.0))
    _no_history(fastdiff.sample(unet, x, SIGMAS, solver=solver, guidance=g, cond=cond, uncond=uncond))
    sampler = fastdiff.Sampler(unet, solver=solver, sigmas=SIGMAS, guidance=g)
    out, traj = sampler.sample(x.requires_grad_(), cond, uncond, trajectory=True)  # even for noise that needs grad
    _no_history(out)
    _no_history(traj)


def test_vp_denoiser_and_separate_uncond_model(unet, inputs):
    x, cond, uncond = inputs
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    vp = denoisers.VPDenoiser(lambda z, t, **kw: net(z), torch.linspace(0.9999, 0.01, 1000))
    g = fastdiff.Guidance(2.0, uncond_model=vp)
    sig = schedules.karras(5, vp.sigma_min, vp.sigma_max)
    _no_history(fastdiff.sample(vp, x[:, :1] / 80 * sig[0], sig, guidance=g, cond={}, uncond={}))
    _no_history(fastdiff.sample(unet, x, SIGMAS, guidance=fastdiff.Guidance(2.0, uncond_model=unet), cond=cond,
                                uncond=uncond))  # fmt: skip


@pytest.mark.parametrize("name", [n for n in k_diffusion.__all__ if n.startswith("sample_")])
def test_k_diffusion_samplers(unet, inputs, name):
    x, cond, _ = inputs
    sampler = getattr(k_diffusion, name)
    # DPM-Solver's samplers take the sigma range and choose their own steps.
    args = {"sample_dpm_fast": (0.002, 80.0, 3), "sample_dpm_adaptive": (0.002, 80.0)}.get(name, (SIGMAS,))
    _no_history(sampler(unet, x, *args, extra_args=cond, disable=True))


def test_diffusers_scheduler_and_pipeline_paths():
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.integrations.diffusers import FastDiffScheduler, sample_pipeline

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=5,
    )  # fmt: skip
    ddpm = diffusers.DDPMScheduler(clip_sample=False)  # the pipeline path refuses clipping under guidance
    scheduler = FastDiffScheduler.from_config(ddpm.config, solver="dpmpp_2m")
    scheduler.set_timesteps(4)
    x = torch.randn(2, 3, 8, 8) * scheduler.init_noise_sigma
    y = torch.tensor([1, 2])
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t, class_labels=y).sample
        assert out.requires_grad  # the network itself records, as it would in a user's loop
        x = scheduler.step(out, t, x).prev_sample
        _no_history(x)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=ddpm)
    res = sample_pipeline(pipe, cond={"class_labels": y}, uncond={"class_labels": torch.tensor([4, 4])},
                          latents=torch.randn(2, 3, 8, 8), guidance=fastdiff.Guidance(2.0), steps=3)  # fmt: skip
    _no_history(res.images)


def test_codi_consistency_sampling(unet):
    from fastdiff.train.codi import CoDiConfig, CoDiStudent, get_condition, student_solver

    student = CoDiStudent(unet, get_condition("class", 1))
    z = torch.randn(2, 1, 8, 8) * 80
    solver = student_solver(student, CoDiConfig(condition="class"))
    _no_history(fastdiff.sample(student, z, torch.tensor([80.0, 1.0, 0.0]), solver=solver,
                                cond={"class_labels": torch.tensor([1, 2])}))  # fmt: skip


def test_sampler_run_stays_differentiable(unet, inputs):
    """LD3's path: the loop over explicit (learnable) sigmas and coefficients records, and gradients reach them."""
    x, cond, uncond = inputs
    sampler = fastdiff.Sampler(unet, solver="dpmpp_2m", sigmas=SIGMAS)
    sig, table = (t.clone().requires_grad_() for t in sampler._device_buffers(x))
    out = sampler.run(x, cond, uncond, sig, table)
    assert out.grad_fn is not None
    out.square().mean().backward()
    assert sig.grad is not None and table.grad is not None and table.grad.abs().sum() > 0
