"""fastdiff.Sampler: the device-resident loop agrees with fastdiff.sample, its plan is fixed at build, schedule
updates reach the buffers in place, and the loop never reads a device value on the host.

The no-sync property is checked on the ``meta`` device, where tensors have no data: any ``.item()``,
``.tolist()``, ``bool(tensor)`` or copy to the host raises there, and every op's output is watched. The same
loop then has nothing to sync on a GPU (tests/test_gpu.py checks that with torch's sync debug mode)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff import denoisers, schedules
from fastdiff.models.unet import EDMUNet, UNetConfig
from fastdiff.sampler import make_plan

S = schedules.karras(12, 0.002, 80.0)
EDM2_INTERVAL = (0.28, 2.9)


def _labels(n, generator=None):
    y = torch.randint(0, 4, (n,), generator=generator or torch.Generator().manual_seed(1))
    return {"class_labels": y}, {"class_labels": torch.full_like(y, -1)}


GUIDANCE = {
    "none": lambda gmm: None,
    "cfg": lambda gmm: fastdiff.Guidance(2.5),
    "interval": lambda gmm: fastdiff.Guidance(3.0, interval=EDM2_INTERVAL),
    "interval_no_restart": lambda gmm: fastdiff.Guidance(3.0, interval=EDM2_INTERVAL, restart=False),
    "unbatched": lambda gmm: fastdiff.Guidance(2.0, interval=(0.5, 20.0), batch=False),
    "uncond_model": lambda gmm: fastdiff.Guidance(2.0, uncond_model=lambda x, s, **kw: gmm(x * 0.9, s)),
}


@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("solver", list(fastdiff.SOLVERS))
def test_sampler_equals_sample(gmm, noise, solver, guidance):
    g = GUIDANCE[guidance](gmm)
    cond, uncond = _labels(noise.shape[0]) if g is not None else (None, None)
    seeded = lambda: torch.Generator().manual_seed(5)  # noqa: E731  (the stochastic solvers draw the same noise)
    ref = fastdiff.sample(gmm, noise * 80, S, solver=solver, guidance=g, cond=cond, uncond=uncond, generator=seeded())
    sampler = fastdiff.Sampler(gmm, solver=solver, sigmas=S, guidance=g)
    out = sampler.sample(noise * 80, cond, uncond, generator=seeded())
    # float64 rounding: Sampler's coefficients are computed by tensor ops, sample's on host floats (sa_solver's
    # exponential integrals differ by up to 8e-14 relative)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-12)
    assert sampler.nfe == fastdiff.count_nfe(solver, S, g)


def test_trajectory_is_every_step(gmm, noise):
    g = fastdiff.Guidance(2.0, interval=EDM2_INTERVAL)
    cond, uncond = _labels(noise.shape[0])
    seen = []
    fastdiff.sample(gmm, noise * 80, S, solver="unipc", guidance=g, cond=cond, uncond=uncond, callback=seen.append)
    out, traj = fastdiff.Sampler(gmm, solver="unipc", sigmas=S, guidance=g).sample(
        noise * 80, cond, uncond, trajectory=True
    )
    assert traj.shape == (len(S), *noise.shape)
    torch.testing.assert_close(traj[0], noise * 80, rtol=0, atol=0)
    torch.testing.assert_close(traj[1:], torch.stack([d["x_next"] for d in seen]), rtol=0, atol=1e-12)
    assert torch.equal(traj[-1], out)


def test_edm2_interval_plan_is_fixed_at_build(gmm):
    """32 Heun steps on the EDM schedule with guidance in (0.28, 2.9]: the plan names the guided steps, the
    history segments and the NFE before anything runs."""
    sig = schedules.karras(32, 0.002, 80.0)
    g = fastdiff.Guidance(2.0, interval=EDM2_INTERVAL)
    sampler = fastdiff.Sampler(gmm, solver="heun", sigmas=sig, guidance=g)
    plan = sampler.plan
    host = sig.tolist()
    assert plan.guided == tuple(0.28 < s <= 2.9 for s in host[:-1])
    first, last = plan.guided.index(True), len(plan.guided) - 1 - plan.guided[::-1].index(True)
    assert all(plan.guided[first : last + 1]) and first > 0 and last < 31  # one contiguous window
    assert plan.starts == tuple(0 if i < first else first if i <= last else last + 1 for i in range(32))
    assert plan.evaluations == (2,) * 31 + (1,) and plan.final_zero
    guided_evals = sum(2 for i in range(first, last + 1))
    assert sampler.nfe == (63, guided_evals)
    cond, uncond = _labels(8)
    sampler.sample(torch.randn(8, 2, dtype=torch.float64) * 80, cond, uncond)
    assert sampler.stats().forward_calls == 63  # batched: one forward per evaluation
    assert sampler.stats().guided_steps == list(range(first, last + 1))
    # the coefficient table holds every step's stages on the schedule's device
    assert sampler._table.shape == (32, 2, 6 + fastdiff.ops.MAX_HISTORY)
    assert sampler.n_history == [[0, 1]] * 31 + [[0]]


class _Watch(TorchDispatchMode):
    """Records every op; fails on any output that is not on the meta device (a copy to the host)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                raise AssertionError(f"{func} produced a tensor on {t.device} inside the loop")
        return out


def _meta_run(model, solver, guidance, x, cond=None, uncond=None):
    """Both paths of the step: the registered op (``Sampler.run`` with x requiring grad: autograd's path, LD3's, the
    op's fake kernel) and the direct forward (``Sampler.sample``, which records no autograd even for such an x: the
    eager path, the reference with coefficients left on the device)."""
    sampler = fastdiff.Sampler(model, solver=solver, sigmas=schedules.karras(10, 0.002, 80.0), guidance=guidance)
    with _Watch() as watch:
        out = sampler.run(x.requires_grad_(True), dict(cond or {}), dict(uncond or {}), *sampler._device_buffers(x))
    assert out.device.type == "meta" and out.shape == x.shape and out.grad_fn is not None
    assert "fastdiff.guided_step.default" in watch.ops
    with _Watch() as eager:
        out = sampler.sample(x, cond, uncond)
    assert out.device.type == "meta" and out.shape == x.shape and out.grad_fn is None
    assert "fastdiff.guided_step.default" not in eager.ops
    return watch.ops + eager.ops


@pytest.mark.parametrize("solver", list(fastdiff.SOLVERS))
def test_loop_never_reads_the_device_builtin_unet(solver, one_thread):
    net = EDMUNet(UNetConfig.tiny()).to("meta")
    y = torch.randint(0, 10, (3,)).to("meta")
    g = fastdiff.Guidance(2.0, interval=EDM2_INTERVAL)
    ops = _meta_run(net, solver, g, torch.empty(3, 1, 8, 8, device="meta"), {"class_labels": y},
                    {"class_labels": torch.full((3,), -1, device="meta")})  # fmt: skip
    assert "aten._local_scalar_dense.default" not in ops


def test_loop_never_reads_the_device_gmm_and_separate_uncond_model(gmm):
    model = type(gmm)(gmm.means, gmm.variances.sqrt(), gmm.log_weights.exp(), gmm.classes).to("meta")
    g = fastdiff.Guidance(2.0, uncond_model=lambda x, s, **kw: model(x, s))
    y = torch.zeros(5, dtype=torch.long, device="meta")
    _meta_run(model, "dpmpp_3m", g, torch.empty(5, 2, device="meta", dtype=torch.float64), {"class_labels": y})


def test_loop_never_reads_the_device_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
        num_class_embeds=3,
    )  # fmt: skip
    sched = diffusers.DDPMScheduler()
    model = denoisers.VPDenoiser(unet, sched.alphas_cumprod).to("meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    g = fastdiff.Guidance(4.0, interval=(0.5, 5.0))
    sampler = fastdiff.Sampler(model, solver="unipc", sigmas=schedules.karras(6, 0.03, 14.0), guidance=g)
    with _Watch():
        out = sampler.sample(torch.empty(2, 4, 8, 8, device="meta"), {"class_labels": y}, {"class_labels": y + 2})
    assert out.shape == (2, 4, 8, 8)


def test_the_meta_check_catches_a_sync():
    """The check can fail: a model that reads a device value on the host is caught."""

    def syncing(x, sigma):
        if sigma[0].item() > 1:  # a data-dependent branch: a host sync on a GPU
            return x * 0.5
        return x

    with pytest.raises(RuntimeError, match="meta"):
        _meta_run(syncing, "euler", None, torch.empty(2, 3, device="meta"))


def test_set_sigmas_with_the_same_plan_updates_the_buffers_in_place(gmm, noise):
    g = fastdiff.Guidance(2.0, interval=EDM2_INTERVAL)
    cond, uncond = _labels(noise.shape[0])
    sampler = fastdiff.Sampler(gmm, solver="dpmpp_2m", sigmas=S, guidance=g)
    sampler.sample(noise * 80, cond, uncond)
    sig_buf, table_buf = sampler._device_buffers(noise)
    new = S.clone()
    new[1:-1] *= torch.linspace(0.97, 1.03, len(S) - 2, dtype=torch.float64)  # same guided steps
    assert make_plan("dpmpp_2m", new.tolist(), g) == sampler.plan
    sampler.set_sigmas(new)
    assert sampler._device_buffers(noise)[0] is sig_buf and sampler._device_buffers(noise)[1] is table_buf
    torch.testing.assert_close(sig_buf, new, rtol=0, atol=0)
    ref = fastdiff.sample(gmm, noise * 80, new, solver="dpmpp_2m", guidance=g, cond=cond, uncond=uncond)
    torch.testing.assert_close(sampler.sample(noise * 80, cond, uncond), ref, rtol=0, atol=1e-12)


def test_set_sigmas_with_a_new_plan_rebuilds(gmm, noise):
    g = fastdiff.Guidance(2.0, interval=EDM2_INTERVAL)
    cond, uncond = _labels(noise.shape[0])
    sampler = fastdiff.Sampler(gmm, solver="heun", sigmas=S, guidance=g)
    old = sampler._device_buffers(noise)
    new = schedules.karras(7, 0.002, 80.0)
    sampler.set_sigmas(new)
    assert sampler.plan.steps == 7 and sampler._device_buffers(noise)[1] is not old[1]
    ref = fastdiff.sample(gmm, noise * 80, new, solver="heun", guidance=g, cond=cond, uncond=uncond)
    torch.testing.assert_close(sampler.sample(noise * 80, cond, uncond), ref, rtol=0, atol=1e-12)


def test_the_schedule_is_copied(gmm, noise):
    sig = S.clone()
    sampler = fastdiff.Sampler(gmm, solver="euler", sigmas=sig)
    before = sampler.sample(noise * 80)
    sig.mul_(2)  # the caller's tensor, changed after the build, does not reach the sampler
    assert torch.equal(sampler.sample(noise * 80), before)
    assert torch.equal(sampler.sigmas, S)


def test_float32_state_uses_float32_buffers(gmm, noise):
    sampler = fastdiff.Sampler(gmm, solver="ipndm", sigmas=S)
    out = sampler.sample((noise * 80).float())
    assert out.dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in sampler._device_buffers(out))
    ref = fastdiff.sample(gmm, noise * 80, S, solver="ipndm")
    assert (out.double() - ref).abs().max() < 1e-3


def test_bad_input_is_refused_clearly(gmm, noise):
    with pytest.raises(TypeError, match="callable"):
        fastdiff.Sampler(object(), sigmas=S)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fastdiff.Sampler(gmm, sigmas=S.flip(0))
    with pytest.raises(TypeError, match="Guidance"):
        fastdiff.Sampler(gmm, sigmas=S, guidance=2.0)
    sampler = fastdiff.Sampler(gmm, sigmas=S, shape=(4, 2))
    with pytest.raises(ValueError, match=r"built for shape \(4, 2\)"):
        sampler.sample(noise)
    with pytest.raises(ValueError, match="needs cond"):
        fastdiff.Sampler(gmm, sigmas=S, guidance=fastdiff.Guidance(2.0)).sample(noise)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fastdiff.Sampler(gmm, sigmas=S, cuda_graph=True).sample(noise)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fastdiff.sample(gmm, noise, S, cuda_graph=True)
    with pytest.raises(ValueError, match="example x"):
        fastdiff.Sampler(gmm, sigmas=S).capture()
    with pytest.raises(ValueError, match="callback"):
        fastdiff.sample(gmm, noise, S, cuda_graph=True, callback=print)
    with pytest.raises(ValueError, match="own CUDA graphs"):
        fastdiff.Sampler(gmm, sigmas=S, cuda_graph=True, compile={"mode": "reduce-overhead"})


def test_a_model_can_refuse_a_schedule_at_build():
    model = denoisers.VPDenoiser(lambda x, t: x, torch.linspace(0.999, 0.01, 100).cumprod(0))
    with pytest.raises(ValueError, match="outside the model's range"):
        fastdiff.Sampler(model, sigmas=schedules.karras(5, 0.002, 1e4))
    with pytest.raises(ValueError, match="outside the model's range"):
        fastdiff.sample(model, torch.randn(2, 3), schedules.karras(5, 0.002, 1e4))


def test_compiled_model_gives_the_eager_result(gmm, noise):
    g = fastdiff.Guidance(2.0, interval=EDM2_INTERVAL)
    cond, uncond = _labels(noise.shape[0])
    ref = fastdiff.sample(gmm, noise * 80, S, solver="dpmpp_2m", guidance=g, cond=cond, uncond=uncond)
    out, stats = fastdiff.sample(
        gmm, noise * 80, S, solver="dpmpp_2m", guidance=g, cond=cond, uncond=uncond, compile=True, return_stats=True
    )
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert (stats.nfe_cond, stats.nfe_uncond) == fastdiff.count_nfe("dpmpp_2m", S, g)


@pytest.mark.parametrize("solver", ["heun", "ipndm", "unipc"])
def test_decoupled_evaluation_sigmas(gmm, noise, solver):
    """LD3's evaluation sigmas move where the model is called; the coefficients keep the schedule's sigmas."""
    ev = S.clone()
    ev[1:-2] *= 1.05  # the endpoints and the final 0 stay
    cond, _ = _labels(noise.shape[0])
    ref = fastdiff.sample(gmm, noise * 80, S, solver=solver, cond=cond, eval_sigmas=ev)
    out = fastdiff.Sampler(gmm, solver=solver, sigmas=S, eval_sigmas=ev).sample(noise * 80, cond)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    plain = fastdiff.sample(gmm, noise * 80, S, solver=solver, cond=cond)
    assert torch.equal(fastdiff.sample(gmm, noise * 80, S, solver=solver, cond=cond, eval_sigmas=S), plain)
    assert (out - plain).abs().max() > 1e-6  # they really moved the evaluations
    with pytest.raises(ValueError, match="eval_sigmas has 12 entries, sigmas 13"):
        fastdiff.Sampler(gmm, sigmas=S, eval_sigmas=ev[:-1])
    with pytest.raises(ValueError, match="positive wherever the model is evaluated"):
        fastdiff.sample(gmm, noise, S, eval_sigmas=torch.zeros_like(S))
