"""Cas-DM: the stop-gradient and the loss terms' gradients, r, the blended denoiser, training, resume, errors."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastdiff
from fastdiff.checkpoint import latest_checkpoint, load_checkpoint
from fastdiff.models.unet import UNetConfig
from fastdiff.train import TrainConfig, recipes
from fastdiff.train.cascade import (
    CascadeConfig,
    CascadeLoss,
    CascadeModel,
    build_cascade,
    check_metric,
    load_cascade,
    posterior_weight,
    pseudo_huber,
    save_cascade,
    vp_alphas_cumprod,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (1, 8, 8)
UNET = UNetConfig.tiny()  # 8x8, 10 classes


def _model(seed=0, **options):
    torch.manual_seed(seed)
    cfg = CascadeConfig(metric=options.pop("metric", "pseudo_huber"), **options)
    return build_cascade(cfg, UNET, SHAPE)


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def _perturb(model):
    """Random weights everywhere (the UNets' last convolutions start at zero, which would hide gradients)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def test_metric_sends_no_gradient_to_theta_and_theta_sees_the_plain_eps_loss():
    model = _perturb(_model())
    x0, y = _batch()
    t = torch.linspace(0, 999, 6)
    ab = model.alphas_cumprod[t.long()].float().reshape(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)
    pseudo_huber(model(x_t, t, class_labels=y).x0_phi, x0).mean().backward()
    assert all(g.abs().max() == 0 for g in _grads(model.theta))
    assert any(g.abs().max() > 0 for g in _grads(model.phi))

    # theta's gradients from the whole loss equal those of a plain eps loss on the same batch and draws
    model.zero_grad()
    CascadeLoss(model.config, SHAPE)(model, (x0, y), torch.Generator().manual_seed(0))[0].backward()
    whole = _grads(model.theta)
    model.zero_grad()
    g = torch.Generator().manual_seed(0)  # the loss's draws, in its order: t, noise, label dropout
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    y = torch.where(torch.rand(6, generator=g) < model.config.label_dropout, torch.full_like(y, -1), y)
    ab = model.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    eps = model.theta(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t.float(), class_labels=y)
    nn.functional.mse_loss(eps, noise).backward()
    for a, b in zip(whole, _grads(model.theta)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_phi_receives_theta_estimate_with_the_gradient_stopped():
    model = _perturb(_model(clip_phi_input=None))
    seen = {}
    model.phi.register_forward_pre_hook(lambda m, args: seen.update(inp=args[0]))
    x0, y = _batch()
    t = torch.full((6,), 400.0)
    out = model(x0, t, class_labels=y)
    assert out.x0_theta.requires_grad and not seen["inp"].requires_grad
    torch.testing.assert_close(seen["inp"][:, 1:], out.x0_theta.detach())  # [x_t, sg(x0_theta)]
    torch.testing.assert_close(seen["inp"][:, :1], x0)


def test_r_lies_in_the_unit_interval_and_its_loss_reaches_only_phi():
    model = _perturb(_model())
    x0, y = _batch()
    r = model(x0 * 3, torch.linspace(0, 999, 6), class_labels=y).r
    assert r.shape == (6, 1, 8, 8) and (r >= 0).all() and (r <= 1).all()
    model.zero_grad()
    c2 = posterior_weight(model.alphas_cumprod).float()
    t = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(0))
    out = model(x0, t.float(), class_labels=y)
    blend = out.r * out.x0_phi.detach() + (1 - out.r) * out.x0_theta.detach()
    (c2[t] * (blend - x0).square().flatten(1).mean(1)).mean().backward()
    assert all(g.abs().max() == 0 for g in _grads(model.theta))
    assert any(g.abs().max() > 0 for g in _grads(model.phi))


def test_degenerate_blends_give_theta_or_phi():
    """r pinned at 0 (a very negative r logit bias) makes the model theta's eps-DDPM; r at 1 makes it phi's x0."""
    model = _perturb(_model())
    den = model.denoiser()
    x = torch.randn(4, *SHAPE) * 3
    sigma = torch.full((4,), 2.0)
    y = torch.arange(4)
    theta_only = fastdiff.denoisers.VPDenoiser(
        lambda x_vp, t, **c: model.theta(x_vp, t, **c), model.alphas_cumprod, prediction="eps"
    )
    with torch.no_grad():
        model.phi.unet.conv_out.bias[1] = -1e4
        torch.testing.assert_close(den(x, sigma, class_labels=y), theta_only(x, sigma, class_labels=y))
        model.phi.unet.conv_out.bias[1] = 1e4
        t = den.sigma_to_t(sigma).float()
        x_vp = x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()
        expected = model(x_vp, t, class_labels=y).x0_phi
        torch.testing.assert_close(den(x, sigma, class_labels=y), expected)


@pytest.mark.parametrize("solver", sorted(fastdiff.SOLVERS))
def test_every_solver_samples_the_blended_denoiser_with_interval_guidance(solver, tmp_path):
    model = _perturb(_model())
    path = save_cascade(tmp_path / "cas.safetensors", model)
    den = fastdiff.models.get(path)
    x = torch.randn(3, *SHAPE)
    sig = fastdiff.schedules.karras(4, den.sigma_min, den.sigma_max)
    g = fastdiff.Guidance(2.0, interval=(0.5, 5.0))
    cond, uncond = {"class_labels": torch.arange(3)}, {"class_labels": torch.full((3,), -1)}
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the same noise for the stochastic solvers)
    with torch.no_grad():
        out, stats = fastdiff.sample(den, x * sig[0], sig, solver=solver, guidance=g, cond=cond, uncond=uncond,
                                     return_stats=True, generator=seeded())  # fmt: skip
        direct = fastdiff.sample(model.denoiser(), x * sig[0], sig, solver=solver, guidance=g, cond=cond,
                                 uncond=uncond, generator=seeded())  # fmt: skip
    assert torch.isfinite(out).all() and 0 < stats.nfe_uncond < stats.nfe_cond
    torch.testing.assert_close(out, direct)  # the saved file is the same model


def test_schedules_and_weights():
    ab = vp_alphas_cumprod("linear", 1000)
    assert ab.shape == (1000,) and abs(float(1 - ab[0]) - 1e-4) < 1e-12
    cos = vp_alphas_cumprod("cosine", 1000)
    assert (cos[1:] < cos[:-1]).all() and cos[-1] > 0
    c2 = posterior_weight(ab)
    assert abs(float(c2[0]) - 1) < 1e-12  # the first step's posterior mean is x0 itself
    t = 500
    beta = 1 - ab[t] / ab[t - 1]
    assert abs(float(c2[t]) - float(ab[t - 1] * beta**2 / (1 - ab[t]) ** 2)) < 1e-15
    a, b = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    torch.testing.assert_close(pseudo_huber(a, b), torch.full((2,), (0.25 + 0.00054**2) ** 0.5 - 0.00054))


def _train(tmp_path, name, steps, variant="cascade", **kwargs):
    cfg = TrainConfig(steps=steps, batch_size=16, lr=2e-3, seed=0, checkpoint_every=kwargs.pop("every", 1000),
                      out_dir=str(tmp_path / name), progress=False, ema_decay=kwargs.pop("ema", 0.999))  # fmt: skip
    cas = CascadeConfig(variant=variant, metric="pseudo_huber")
    return recipes.train_cascade("digits", cfg, cas, size="tiny", resolution=8, **kwargs)


def test_a_tiny_cpu_run_lowers_every_loss_term(tmp_path):
    """Every term of the loss, evaluated on one fixed batch with fixed draws, is lower after 60 steps than for
    the same network at its initialisation (the training logs themselves are too noisy: t is drawn per step)."""
    path = _train(tmp_path, "run", 60, ema=0.0)  # EMA decay 0: the exported weights are the trained ones
    trained = load_cascade(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the recipe's initialisation
        initial = build_cascade(trained.config, trained.unet_config, SHAPE)
    from fastdiff.data import DigitsDataset

    ds = DigitsDataset(8)
    batch = (ds.images[:256], ds.labels[:256])
    loss = CascadeLoss(trained.config, SHAPE)
    with torch.no_grad():
        before = loss(initial, batch, torch.Generator().manual_seed(3))[1]
        after = loss(trained, batch, torch.Generator().manual_seed(3))[1]
    for term in ("loss_eps", "loss_x0", "loss_metric", "loss_r"):
        assert after[term] < before[term], (term, float(before[term]), float(after[term]))


def test_resume_continues_identically(tmp_path):
    straight = _train(tmp_path, "straight", 6)
    _train(tmp_path, "resumed", 3, every=3)
    resumed = _train(tmp_path, "resumed", 6, every=3)
    a, b = load_file(straight), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_staged_training_freezes_theta_in_the_second_stage(tmp_path):
    path = _train(tmp_path, "staged", 6, staged=3)
    model = load_cascade(path)

    tensors, _ = load_checkpoint(latest_checkpoint(tmp_path / "staged" / "theta"))
    ema = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.theta.")}
    assert ema
    # Stage 2 starts from stage 1's EMA weights and never changes theta's weights...
    phi_stage, _ = load_checkpoint(latest_checkpoint(tmp_path / "staged" / "phi"))
    assert all(torch.equal(phi_stage[f"model.{k}"], v) for k, v in ema.items())
    # ...so its EMA of theta stays there up to the EMA update's float rounding
    assert all(torch.allclose(model.state_dict()[k], v, rtol=1e-6, atol=1e-7) for k, v in ema.items())
    assert (tmp_path / "staged" / "phi" / "log.csv").exists()


def test_bad_networks_and_metrics_fail_at_build():
    class Net(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

        def forward(self, x, t, class_labels=None):
            return self.conv(x)

    with pytest.raises(ValueError, match=r"phi must return \[2, 2, 8, 8\].*x0_phi, then r logits"):
        CascadeModel(Net(1, 1), Net(2, 1), CascadeConfig(), SHAPE)
    with pytest.raises(ValueError, match="theta cannot take input"):
        CascadeModel(Net(3, 1), Net(2, 2), CascadeConfig(), SHAPE)
    with pytest.raises(ValueError, match="takes no phi"):
        CascadeModel(Net(1, 1), Net(2, 2), CascadeConfig(variant="ddpm"), SHAPE)
    CascadeModel(Net(1, 3), None, CascadeConfig(variant="dual"), SHAPE)  # eps, x0 and one r channel

    def needs_32px(a, b):
        if a.shape[-1] < 32:
            raise RuntimeError("input is smaller than the network's receptive field")
        return (a - b).flatten(1).mean(1)

    with pytest.raises(ValueError, match=r"lpips metric cannot take images of shape \[1, 8, 8\]"):
        check_metric(needs_32px, "lpips", SHAPE)
    with pytest.raises(ValueError, match="variant must be one of"):
        CascadeConfig(variant="triple")
    with pytest.raises(ValueError, match="metric must be one of"):
        CascadeConfig(metric="ssim")


def test_the_cli_samples_a_cascade_model_file(tmp_path, capsys):
    """`fastdiff sample --model FILE` on a Cas-DM file: the sigma range defaults to the DDPM grid's (0.01..80 here;
    EDM's 0.002 lies below the grid)."""
    from fastdiff.cli import main

    path = save_cascade(tmp_path / "cas.safetensors", _perturb(_model()))
    assert main(["sample", "--model", str(path), "-n", "4", "--steps", "3", "--no-teacher"]) == 0
    assert "NFE            3 per sample" in capsys.readouterr().out
