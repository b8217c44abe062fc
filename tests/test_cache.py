"""Feature caching (fastdiff.cache): a cache that caches nothing is the uncached loop exactly; cached evaluations
never call the skipped blocks; a calibrated plan reproduces its calibration run; caches are kept per pass under
interval guidance; every solver runs cached, in sample and in Sampler alike; and each network adapter's full
evaluation is the network's own forward (fastdiff's UNet, diffusers' UNet2DModel, UNet2DConditionModel in a
Stable Diffusion pipeline, DiT's transformer in its pipeline)."""

import pytest
import torch

import fastdiff
from fastdiff import Guidance, schedules
from fastdiff import cache as fastcache
from fastdiff.models.unet import EDMUNet, UNetConfig

SIGMAS = schedules.karras(8, 0.002, 80.0)
INTERVAL = Guidance(2.0, interval=(0.3, 3.0))  # guides steps 4 and 5 of the 8


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = EDMUNet(UNetConfig.tiny()).eval()
    for p in net.parameters():  # the zero-initialised output layer would make D = c_skip x for every input
        p.data.add_(torch.randn_like(p) * 0.05)
    return net


def _inputs(net, batch=4, seed=0):
    cfg = net.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution, generator=g) * 80
    y = torch.arange(batch) % cfg.num_classes
    return x, {"class_labels": y}, {"class_labels": torch.full_like(y, -1)}


def _deep_calls(net) -> list[int]:
    """A counter of the calls of every block a cached evaluation must skip (hooks on the blocks themselves)."""
    blocks = fastcache.adapter_for(net, fastcache.DeepCache(2))
    calls = [0]
    for _, _, block in blocks.cached:
        block.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls, len(blocks.cached)


def test_specs_parse_and_bad_ones_are_refused():
    assert fastcache.parse("deepcache:3").spec() == "deepcache:3"
    assert fastcache.parse("first_block:0.1:dynamic:taylor").spec() == "first_block:0.1:dynamic:taylor"
    assert isinstance(fastcache.parse("first_block:0.05"), fastcache.FirstBlockCache)
    for bad, match in [("deepcache", "expected one of"), ("deepcache:2.5", "integer"),
                       ("deepcache:0", "positive integer"), ("first_block:x", "not a number"),
                       ("deepcache:2:dynamic", "unknown or repeated"), ("teacache:0.1", "expected one of"),
                       ("first_block:-1", ">= 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            fastcache.parse(bad)


@pytest.mark.parametrize("guidance", [None, INTERVAL, Guidance(2.0, interval=(0.3, 3.0), batch=False)],
                         ids=["unguided", "interval_batched", "interval_separate_passes"])  # fmt: skip
@pytest.mark.parametrize("spec", ["deepcache:1", "first_block:0", "deepcache:1:taylor"])
def test_a_cache_that_caches_nothing_is_the_uncached_loop(unet, guidance, spec):
    x, cond, uncond = _inputs(unet)
    ref = fastdiff.sample(unet, x, SIGMAS, guidance=guidance, cond=cond, uncond=uncond)
    out, stats = fastdiff.sample(unet, x, SIGMAS, guidance=guidance, cond=cond, uncond=uncond, cache=spec,
                                 return_stats=True)  # fmt: skip
    assert torch.equal(out, ref)
    assert stats.cached_evaluations == 0 and stats.full_evaluations == stats.forward_calls


def test_cached_evaluations_never_call_the_skipped_blocks(unet):
    """DeepCache every 3rd evaluation, under an interval: the deep blocks run only on the plan's full evaluations,
    and on the guided steps' first evaluation, where the unconditional pass has nothing cached yet."""
    x, cond, uncond = _inputs(unet)
    calls, n_blocks = _deep_calls(unet.net)
    out, stats = fastdiff.sample(unet, x, SIGMAS, guidance=INTERVAL, cond=cond, uncond=uncond, cache="deepcache:3",
                                 return_stats=True)  # fmt: skip
    # plan: evaluations 0, 3, 6 full; step 4 is the first guided one (its uncond pass has no cache): full too
    assert (stats.full_evaluations, stats.cached_evaluations) == (4, 4)
    assert calls[0] == 4 * n_blocks
    ref = fastdiff.sample(unet, x, SIGMAS, guidance=INTERVAL, cond=cond, uncond=uncond)
    assert not torch.equal(out, ref) and (out - ref).abs().max() < 0.5 * ref.abs().max()


def test_calibrated_plan_reproduces_its_decisions(unet):
    x, cond, uncond = _inputs(unet)
    dynamic, dstats = fastdiff.sample(unet, x, SIGMAS, cond=cond, cache="first_block:0.1:dynamic", return_stats=True)
    cache = fastcache.FirstBlockCache(0.1, calibration=x.shape[0])
    planned, pstats = fastdiff.sample(unet, x, SIGMAS, cond=cond, cache=cache, return_stats=True)
    assert cache.calibrated is not None and len(cache.calibrated) == 8 and not all(cache.calibrated)
    assert sum(cache.calibrated) == pstats.full_evaluations == dstats.full_evaluations
    torch.testing.assert_close(planned, dynamic, rtol=0, atol=0)
    # the plan is kept: a second run makes the same decisions without calibrating again
    frozen = list(cache.calibrated)
    again = fastdiff.sample(unet, x, SIGMAS, cond=cond, cache=cache)
    assert cache.calibrated == frozen and torch.equal(again, planned)


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "unipc", "dpm_2", "euler_ancestral"])
def test_every_solver_runs_cached_alike_in_sample_and_sampler(unet, solver):
    x, cond, uncond = _inputs(unet)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    out, stats = fastdiff.sample(unet, x, SIGMAS, solver=solver, guidance=INTERVAL, cond=cond, uncond=uncond,
                                 cache="deepcache:2", return_stats=True, generator=gen())  # fmt: skip
    sampler = fastdiff.Sampler(unet, solver=solver, sigmas=SIGMAS, guidance=INTERVAL, cache="deepcache:2")
    torch.testing.assert_close(sampler.sample(x, cond, uncond, generator=gen()), out)
    assert stats.full_evaluations + stats.cached_evaluations == stats.forward_calls
    assert stats.cached_evaluations > 0
    assert (sampler.stats().full_evaluations, sampler.stats().cached_evaluations) == (
        stats.full_evaluations, stats.cached_evaluations)  # fmt: skip


def test_taylor_extrapolates_from_the_last_two_full_evaluations():
    store = fastcache._Store()
    store.put(torch.tensor([1.0, 2.0]), 0)
    assert torch.equal(store.get(1, taylor=True), torch.tensor([1.0, 2.0]))  # one evaluation: reused as it is
    store.put(torch.tensor([3.0, 2.0]), 2)
    torch.testing.assert_close(store.get(3, taylor=True), torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(store.get(3, taylor=False), torch.tensor([3.0, 2.0]))


def test_refusals(unet, gmm):
    with pytest.raises(ValueError, match="found no network with a cache adapter in GaussianMixture; supported"):
        fastdiff.Sampler(gmm, sigmas=SIGMAS, cache="deepcache:2")
    with pytest.raises(ValueError, match="reads back to the host, which a CUDA graph cannot do"):
        fastdiff.Sampler(unet, sigmas=SIGMAS, cache="first_block:0.1:dynamic", cuda_graph=True)
    with pytest.raises(ValueError, match="cache= and compile= do not compose"):
        fastdiff.Sampler(unet, sigmas=SIGMAS, cache="deepcache:2", compile=True)
    with pytest.raises(TypeError, match="cache must be"):
        fastdiff.Sampler(unet, sigmas=SIGMAS, cache=3)
    x, cond, _ = _inputs(unet)
    fastdiff.sample(unet, x, SIGMAS, cond=cond, cache="deepcache:2")
    assert not any(isinstance(m, (fastcache._StandIn, fastcache._Signal)) for m in unet.modules())  # removed


# ------------------------------------------------------------------------------------------ diffusers networks

diffusers = pytest.importorskip("diffusers")


def test_diffusers_unet2d_adapter(monkeypatch):
    from fastdiff.denoisers import VPDenoiser

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, num_class_embeds=3,
    ).eval()  # fmt: skip
    model = VPDenoiser(unet, diffusers.DDPMScheduler().alphas_cumprod)
    s = schedules.karras(6, model.sigma_min, model.sigma_max)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * float(s[0])
    cond, uncond = {"class_labels": torch.tensor([0, 1])}, {"class_labels": torch.tensor([2, 2])}
    g = Guidance(2.0)
    ref = fastdiff.sample(model, x, s, guidance=g, cond=cond, uncond=uncond)
    assert torch.equal(fastdiff.sample(model, x, s, guidance=g, cond=cond, uncond=uncond, cache="deepcache:1"), ref)
    calls, n_blocks = _deep_calls(unet)
    out, stats = fastdiff.sample(model, x, s, guidance=g, cond=cond, uncond=uncond, cache="deepcache:2",
                                 return_stats=True)  # fmt: skip
    assert (stats.full_evaluations, stats.cached_evaluations) == (3, 3) and calls[0] == 3 * n_blocks
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.fixture(scope="module")
def tiny():
    import _tiny_pipelines

    return _tiny_pipelines


def sample_pipeline(*args, **kwargs):
    from fastdiff.integrations.diffusers import sample_pipeline

    return sample_pipeline(*args, **kwargs)


def test_stable_diffusion_pipeline_with_deepcache(tiny):
    pipe = tiny.sd()
    kw = dict(steps=6, guidance=Guidance(5.0), generator=torch.Generator().manual_seed(0), output_type="latent")
    ref = sample_pipeline(pipe, "a cat", **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    same = sample_pipeline(pipe, "a cat", cache="deepcache:1", **kw).images
    assert torch.equal(same, ref)
    kw["generator"] = torch.Generator().manual_seed(0)
    calls, n_blocks = _deep_calls(pipe.unet)
    out = sample_pipeline(pipe, "a cat", cache="deepcache:3", **kw).images
    assert calls[0] == 2 * n_blocks and torch.isfinite(out).all() and not torch.equal(out, ref)


def test_dit_pipeline_with_first_block_cache(tiny):
    """The transformer's form: a cached evaluation runs the first block and adds the cached residual of the others,
    which it does not call."""
    pipe = tiny.dit(num_layers=3)
    kw = dict(steps=6, guidance=Guidance(4.0), output_type="latent")

    def run(**extra):
        out = sample_pipeline(pipe, ["goldfish", "tench"], generator=torch.Generator().manual_seed(0), **kw, **extra)
        return out.images

    ref = run()
    assert torch.equal(run(cache="first_block:0"), ref)
    later = [0]
    for block in pipe.transformer.transformer_blocks[1:]:
        block.register_forward_hook(lambda *a: later.__setitem__(0, later[0] + 1))
    cache = fastcache.FirstBlockCache(1e9, dynamic=True, max_cached=2)  # cache whatever max_cached allows
    out = run(cache=cache)
    assert later[0] == 2 * 2  # evaluations 0 and 3 full (at most 2 cached in a row), two blocks each
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    with pytest.raises(ValueError, match="DiTTransformer2DModel is a transformer: use first_block"):
        run(cache="deepcache:2")
