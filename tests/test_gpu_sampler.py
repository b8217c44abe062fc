"""GPU checks of fastdiff.Sampler: a replayed CUDA graph equals the eager loop at every step, the eager loop
makes no host sync, schedule updates need no recapture, and capture fails clearly. Run with `pytest -m gpu`.

The CUDA kernels are forced in every test (the no-sync tests also run Triton), and the eager runs prove that the
forced backend did the work (tests/_backends.py). The cases that need only fastdiff never skip for a missing
diffusers."""

import pytest
import torch
from _backends import ran_on

import fastdiff
from fastdiff import denoisers, models, schedules
from fastdiff.models.unet import EDMUNet, UNetConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIGMAS = schedules.karras(12, 0.002, 80.0)
INTERVAL = fastdiff.Guidance(2.0, interval=(0.28, 2.9))


def _unet(seed=0):
    torch.manual_seed(seed)
    net = EDMUNet(UNetConfig.tiny()).cuda().eval()
    for p in net.parameters():  # the zero-initialised output layer would make D = c_skip x for every input
        p.data.add_(torch.randn_like(p) * 0.02)
    return net


def _inputs(batch=4, seed=0, res=8):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, 1, res, res, device="cuda", generator=g) * 80
    y = torch.randint(0, 10, (batch,), device="cuda", generator=g)
    return x, {"class_labels": y}, {"class_labels": torch.full_like(y, -1)}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.fixture(autouse=True)
def _cuda_kernels(monkeypatch):
    """The loop tests run on the CUDA kernels (the no-sync tests also on Triton), and must: a run that fell back to
    the reference would prove nothing about them."""
    monkeypatch.setenv("FASTDIFF_BACKEND", "cuda")


@pytest.mark.parametrize("solver", sorted(fastdiff.ODE_SOLVERS))
def test_replay_equals_eager_at_every_step(solver):
    net = _unet()
    eager = fastdiff.Sampler(net, solver=solver, sigmas=SIGMAS, guidance=INTERVAL)
    graph = fastdiff.Sampler(net, solver=solver, sigmas=SIGMAS, guidance=INTERVAL, cuda_graph=True)
    for seed in (0, 1):  # the second replay takes new noise and new labels
        x, cond, uncond = _inputs(seed=seed)
        with ran_on("cuda", at_least=12):
            ref, ref_traj = eager.sample(x, cond, uncond, trajectory=True)
        out, traj = graph.sample(x, cond, uncond, trajectory=True)
        for i in range(len(SIGMAS)):
            _close(traj[i], ref_traj[i])
        _close(out, ref)


def test_builtin_digits_model_replays_its_eager_result():
    net = models.get("digits").cuda()
    sampler = fastdiff.Sampler(net, solver="dpmpp_2m", sigmas=schedules.karras(10, 0.002, 80.0),
                               guidance=fastdiff.Guidance(1.5), cuda_graph=True)  # fmt: skip
    x, cond, uncond = _inputs(batch=16, res=16)
    eager = fastdiff.sample(net, x, sampler.sigmas, solver="dpmpp_2m", guidance=fastdiff.Guidance(1.5), cond=cond,
                            uncond=uncond)  # fmt: skip
    _close(sampler.sample(x, cond, uncond), eager)


def _assert_no_host_sync(model, x, cond, uncond, backend, monkeypatch):
    """Every solver's eager loop on ``model``, on ``backend``, under torch's sync debug mode: a host sync raises."""
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    for solver in sorted(fastdiff.ODE_SOLVERS):
        sampler = fastdiff.Sampler(model, solver=solver, sigmas=schedules.karras(8, 0.03, 14.0), guidance=INTERVAL)
        sampler.sample(x, cond, uncond)  # first call: buffers are copied to the GPU, outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with ran_on(backend, at_least=8):
                sampler.sample(x, cond, uncond)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_eager_loop_makes_no_host_sync(backend, monkeypatch):
    """fastdiff's own UNet (EDM preconditioning) and a plain callable model: needs nothing beyond fastdiff."""
    net = _unet()
    _assert_no_host_sync(net, *_inputs(), backend, monkeypatch)
    _assert_no_host_sync(lambda x, sigma, **kw: net(x, sigma, **kw), *_inputs(), backend, monkeypatch)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_eager_loop_makes_no_host_sync_with_a_diffusers_unet(backend, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, num_class_embeds=3,
    ).cuda()  # fmt: skip
    vp = denoisers.VPDenoiser(unet, diffusers.DDPMScheduler().alphas_cumprod).cuda()
    y = torch.zeros(2, dtype=torch.long, device="cuda")
    x = torch.randn(2, 4, 8, 8, device="cuda") * 14
    _assert_no_host_sync(vp, x, {"class_labels": y}, {"class_labels": y + 2}, backend, monkeypatch)


def test_schedule_update_needs_no_recapture_unless_the_plan_changes():
    net = _unet()
    x, cond, uncond = _inputs()
    sampler = fastdiff.Sampler(net, solver="heun", sigmas=SIGMAS, guidance=INTERVAL, cuda_graph=True)
    sampler.sample(x, cond, uncond)
    graph = sampler._graph
    new = SIGMAS.clone()
    new[1:-1] *= torch.linspace(0.98, 1.02, len(SIGMAS) - 2, dtype=torch.float64)
    sampler.set_sigmas(new)
    assert sampler.plan.guided == fastdiff.Sampler(net, solver="heun", sigmas=SIGMAS, guidance=INTERVAL).plan.guided
    out = sampler.sample(x, cond, uncond)
    assert sampler._graph is graph  # replayed, not recaptured
    _close(out, fastdiff.sample(net, x, new, solver="heun", guidance=INTERVAL, cond=cond, uncond=uncond))
    changed = schedules.karras(7, 0.002, 80.0)
    sampler.set_sigmas(changed)
    out = sampler.sample(x, cond, uncond)
    assert sampler._graph is not graph
    _close(out, fastdiff.sample(net, x, changed, solver="heun", guidance=INTERVAL, cond=cond, uncond=uncond))


def test_shape_change_recaptures_or_is_refused():
    net = _unet()
    sampler = fastdiff.Sampler(net, solver="dpmpp_2m", sigmas=SIGMAS, guidance=INTERVAL, cuda_graph=True)
    for batch in (4, 6, 4):
        x, cond, uncond = _inputs(batch=batch, seed=batch)
        eager = fastdiff.Sampler(net, solver="dpmpp_2m", sigmas=SIGMAS, guidance=INTERVAL)
        _close(sampler.sample(x, cond, uncond), eager.sample(x, cond, uncond))
    fixed = fastdiff.Sampler(net, sigmas=SIGMAS, guidance=INTERVAL, shape=(4, 1, 8, 8), cuda_graph=True)
    fixed.capture(*_inputs(batch=4))
    with pytest.raises(ValueError, match="built for shape"):
        fixed.sample(*_inputs(batch=6))


def test_capture_failure_is_clear_and_eager_still_works():
    net = _unet()

    def syncing(x, sigma, **kw):
        if float(sigma[0]) > 1e3:  # reads a device value on the host: not capturable
            return x
        return net(x, sigma, **kw)

    x, cond, uncond = _inputs()
    with pytest.raises(fastdiff.CaptureError, match="could not be captured"):
        fastdiff.Sampler(syncing, sigmas=SIGMAS, guidance=INTERVAL, cuda_graph=True).sample(x, cond, uncond)
    out = fastdiff.Sampler(syncing, sigmas=SIGMAS, guidance=INTERVAL).sample(x, cond, uncond)
    _close(out, fastdiff.Sampler(net, sigmas=SIGMAS, guidance=INTERVAL).sample(x, cond, uncond))


@pytest.mark.parametrize("how", ["separate_uncond_model", "unbatched", "batched"])
def test_guidance_forms_in_the_captured_loop(how):
    net, small = _unet(0), _unet(1)
    g = {
        "separate_uncond_model": fastdiff.Guidance(2.0, interval=(0.28, 2.9), uncond_model=small),
        "unbatched": fastdiff.Guidance(2.0, interval=(0.28, 2.9), batch=False),
        "batched": INTERVAL,
    }[how]
    x, cond, uncond = _inputs()
    ref = fastdiff.sample(net, x, SIGMAS, solver="unipc", guidance=g, cond=cond, uncond=uncond)
    _close(fastdiff.sample(net, x, SIGMAS, solver="unipc", guidance=g, cond=cond, uncond=uncond, cuda_graph=True), ref)


def test_compile_composes_with_capture():
    net = _unet()
    x, cond, uncond = _inputs()
    ref = fastdiff.sample(net, x, SIGMAS, solver="dpmpp_2m", guidance=INTERVAL, cond=cond, uncond=uncond)
    sampler = fastdiff.Sampler(net, solver="dpmpp_2m", sigmas=SIGMAS, guidance=INTERVAL, compile=True, cuda_graph=True)
    torch.testing.assert_close(sampler.sample(x, cond, uncond), ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


STOCHASTIC = sorted(name for name, cls in fastdiff.SOLVERS.items() if not cls.ode)


@pytest.mark.parametrize("solver", STOCHASTIC)
@pytest.mark.parametrize("own_generator", [True, False])
def test_captured_stochastic_loop_equals_eager_with_the_same_seed(solver, own_generator):
    """The noise is drawn inside the graph: a replay from a generator seeded s equals the eager loop from s (the
    first call, which captures, too), and replays from different seeds differ."""
    net = _unet()
    x, cond, uncond = _inputs()
    eager = fastdiff.Sampler(net, solver=solver, sigmas=SIGMAS, guidance=INTERVAL)
    graph = fastdiff.Sampler(net, solver=solver, sigmas=SIGMAS, guidance=INTERVAL, cuda_graph=True)
    assert graph.plan.noisy

    def seeded(sampler, seed):
        if own_generator:
            return sampler.sample(x, cond, uncond, generator=gen.manual_seed(seed))
        torch.cuda.manual_seed(seed)
        return sampler.sample(x, cond, uncond)

    gen = torch.Generator(device="cuda")
    with ran_on("cuda", at_least=12):
        ref5 = seeded(eager, 5)
    ref6 = seeded(eager, 6)
    first = seeded(graph, 5)  # captures, then replays
    _close(first, ref5)
    _close(seeded(graph, 6), ref6)
    _close(seeded(graph, 5), ref5)
    assert (ref5 - ref6).abs().max() > 1e-2 * ref5.abs().max()
    again = seeded(graph, 6) if own_generator else graph.sample(x, cond, uncond)  # the generator moved on
    assert own_generator == torch.allclose(again, ref6)


def test_host_noise_sampler_is_refused_under_capture_but_not_eagerly():
    net = _unet()
    x, cond, uncond = _inputs()
    drawn = []

    def host(sigma, sigma_next):
        drawn.append((sigma, sigma_next))
        return torch.randn_like(x)

    graph = fastdiff.Sampler(net, solver="euler_ancestral", sigmas=SIGMAS, guidance=INTERVAL, cuda_graph=True)
    with pytest.raises(ValueError, match="noise_sampler runs on the host"):
        graph.sample(x, cond, uncond, noise_sampler=host)
    fastdiff.Sampler(net, solver="euler_ancestral", sigmas=SIGMAS, guidance=INTERVAL).sample(
        x, cond, uncond, noise_sampler=host
    )
    assert len(drawn) == len(SIGMAS) - 2  # every step but the one to 0


METHODS = {
    "rescale": fastdiff.Guidance(2.0, interval=(0.28, 2.9), method="rescale", phi=0.7),
    "apg": fastdiff.Guidance(2.0, interval=(0.28, 2.9), method="apg", eta=0.0, momentum=-0.5, norm_threshold=20.0),
    "cfg_zero_star": fastdiff.Guidance(2.0, method="cfg_zero_star", zero_init_steps=2),
    "cfg_pp": fastdiff.Guidance(0.6, interval=(0.28, 2.9), method="cfg_pp"),
}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_guidance_methods_replay_equals_eager_and_the_reference(method, backend, monkeypatch):
    """Each guidance method in the captured loop equals the eager loop (twice: APG's momentum starts afresh), the
    eager loop makes no host sync, and the kernels' result equals the pure-torch reference's."""
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    net, g = _unet(), METHODS[method]
    eager = fastdiff.Sampler(net, solver="dpmpp_2m", sigmas=SIGMAS, guidance=g)
    graph = fastdiff.Sampler(net, solver="dpmpp_2m", sigmas=SIGMAS, guidance=g, cuda_graph=True)
    for seed in (0, 1):
        x, cond, uncond = _inputs(seed=seed)
        eager.sample(x, cond, uncond)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with ran_on(backend, at_least=12):
                ref = eager.sample(x, cond, uncond)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _close(graph.sample(x, cond, uncond), ref)
        monkeypatch.setenv("FASTDIFF_BACKEND", "torch")
        _close(fastdiff.sample(net, x, SIGMAS, solver="dpmpp_2m", guidance=g, cond=cond, uncond=uncond), ref)
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)


@pytest.mark.parametrize("spec", ["deepcache:2", "first_block:0.05", "deepcache:2:taylor"])
def test_captured_cached_loop_equals_the_eager_cached_loop(spec):
    """A cached loop's plan is fixed before it runs (a first-block cache calibrates first, eagerly), so the
    captured loop replays it: under interval guidance, with batched cond+uncond."""
    net = _unet()
    eager = fastdiff.Sampler(net, solver="dpmpp_2m", sigmas=SIGMAS, guidance=INTERVAL, cache=spec)
    graph = fastdiff.Sampler(net, solver="dpmpp_2m", sigmas=SIGMAS, guidance=INTERVAL, cache=spec, cuda_graph=True)
    for seed in (0, 1):
        x, cond, uncond = _inputs(seed=seed)
        ref = eager.sample(x, cond, uncond)
        _close(graph.sample(x, cond, uncond), ref)
        assert graph.stats().cached_evaluations == eager.stats().cached_evaluations > 0
