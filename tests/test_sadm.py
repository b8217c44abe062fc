"""SADM (fastdiff.train.sadm): the structural distance, the two players' gradients, the runtime's adversary,
resume, batch-size errors and a tiny training run."""

import copy
import csv
import itertools
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from fastdiff import models
from fastdiff.checkpoint import latest_checkpoint, load_checkpoint
from fastdiff.models.unet import EDMUNet, UNetConfig
from fastdiff.train import TrainConfig, recipes, train
from fastdiff.train.sadm import (
    AFFINITIES,
    DISTANCES,
    SADMConfig,
    SADMLoss,
    StructureEncoder,
    affinity,
    build_encoder,
    structural_distance,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 8, 8)


def _images(n=8, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _encoder(seed=0, **kw):
    torch.manual_seed(seed)
    return StructureEncoder(1, (8, 16), 16, **kw)


@pytest.mark.parametrize("kind,dist", list(itertools.product(AFFINITIES, DISTANCES)))
def test_the_distance_is_zero_for_identical_batches_and_invariant_to_a_shared_permutation(kind, dist):
    cfg = SADMConfig(affinity=kind, distance=dist)
    loss = SADMLoss(cfg, _encoder())
    real, fake, sigma = _images(seed=1), _images(seed=2), torch.rand(8) + 0.1
    with torch.no_grad():
        assert float(loss.gap(loss.encoder, real, real, sigma)) == pytest.approx(0.0, abs=1e-6)
        gap = loss.gap(loss.encoder, real, fake, sigma)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
        permuted = loss.gap(loss.encoder, real[perm], fake[perm], sigma[perm])
    assert float(gap) > 1e-4
    torch.testing.assert_close(permuted, gap, rtol=1e-5, atol=1e-7)
    # a different permutation of one side only is a different pairing: the distance changes
    with torch.no_grad():
        assert abs(float(loss.gap(loss.encoder, real, fake[perm], sigma)) - float(gap)) > 1e-5


def test_affinities_and_distances_against_direct_formulas():
    f = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    u = f / f.norm(dim=1, keepdim=True)
    cos = u @ u.T
    d = torch.cdist(u, u)
    off = ~torch.eye(5, dtype=torch.bool)  # the diagonal never enters a distance
    torch.testing.assert_close(affinity(f, "cosine"), cos)
    torch.testing.assert_close(affinity(f, "l2")[off], -d[off], atol=2e-5, rtol=0)
    torch.testing.assert_close(affinity(f, "gaussian", 0.7), torch.exp(-(d**2) / (2 * 0.49)), atol=1e-6, rtol=0)

    a, b = affinity(f), affinity(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(structural_distance(a, b, "l1"), (a - b).abs()[off].sum() / 20)
    torch.testing.assert_close(structural_distance(a, b, "l2"), ((a - b) ** 2)[off].sum() / 20)
    kl = 0.0
    for i in range(5):
        j = [k for k in range(5) if k != i]
        p, q = torch.softmax(a[i, j] / 0.1, 0), torch.softmax(b[i, j] / 0.1, 0)
        kl += float((p * (p / q).log()).sum()) / 5
    assert float(structural_distance(a, b, "kl", 0.1)) == pytest.approx(kl, rel=1e-5)
    # finite gradients everywhere, also for two identical features (rows 0 and 1) under the l2 affinity
    for kind, dist in itertools.product(AFFINITIES, DISTANCES):
        g = torch.tensor([[2.0, 1, 1, 1], [2, 1, 1, 1], [1, 3, 0, 1]], requires_grad=True)
        structural_distance(affinity(g, kind), affinity(torch.randn(3, 4), kind), dist).backward()
        assert torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0, (kind, dist)


def test_a_batch_without_structure_is_refused():
    loss = SADMLoss(SADMConfig(), _encoder())
    with pytest.raises(ValueError, match="a batch of 1 has none.*at least 2"):
        loss.gap(loss.encoder, _images(1), _images(1), torch.ones(1))
    kl = SADMLoss(SADMConfig(distance="kl"), _encoder())
    with pytest.raises(ValueError, match="a batch of 2 has none for distance 'kl'.*at least 3"):
        kl.gap(kl.encoder, _images(2), _images(2), torch.ones(2))
    cfg = TrainConfig(steps=1, batch_size=1, out_dir="unused", progress=False)
    with pytest.raises(ValueError, match="--batch-size must be at least 2"):
        recipes.train_sadm("digits", cfg, SADMConfig(), size="tiny", resolution=8)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="affinity must be one of"):
        SADMConfig(affinity="dot")
    with pytest.raises(ValueError, match="distance must be one of"):
        SADMConfig(distance="w1")
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        SADMConfig(lam=-1)
    with pytest.raises(ValueError, match="d_updates must be >= 1"):
        SADMConfig(d_updates=0)
    with pytest.raises(ValueError, match="takes \\[B, 1, H, W\\]"):
        _encoder()(torch.zeros(2, 3, 8, 8), torch.ones(2))
    with pytest.raises(ValueError, match="call it as encoder\\(x, sigma\\)"):
        _encoder()(torch.zeros(2, 1, 8, 8))
    assert _encoder(use_sigma=False)(torch.zeros(2, 1, 8, 8)).shape == (2, 16)
    assert SADMConfig.from_dict(SADMConfig(distance="kl").to_dict()) == SADMConfig(distance="kl")


def test_discriminator_updates_raise_the_gap_on_a_fixed_batch():
    """The discriminator's loss is -gap: a few Adam steps on fixed real and predicted batches raise the gap."""
    loss = SADMLoss(SADMConfig(), _encoder())
    real, fake, sigma = _images(seed=1), _images(seed=1) * 0.3, torch.full((8,), 0.5)
    opt = torch.optim.Adam(loss.encoder.parameters(), lr=1e-2)
    before = float(loss.gap(loss.encoder, real, fake, sigma).detach())
    for _ in range(20):
        opt.zero_grad()
        (-loss.gap(loss.encoder, real, fake, sigma)).backward()
        opt.step()
    assert float(loss.gap(loss.encoder, real, fake, sigma).detach()) > before + 0.05


def _model(seed=0):
    torch.manual_seed(seed)
    cfg = UNetConfig.tiny().to_dict()
    return EDMUNet(UNetConfig.from_dict({**cfg, "resolution": 8, "in_channels": 1, "num_classes": 10}))


def _data(n=32):
    g = torch.Generator().manual_seed(5)
    return torch.utils.data.TensorDataset(torch.rand(n, *SHAPE, generator=g) * 2 - 1, torch.arange(n) % 10)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    now = module.state_dict()
    return {k for k in before if not torch.equal(before[k], now[k])}


def test_ascent_changes_only_the_discriminator_and_descent_only_the_denoiser(tmp_path):
    model, loss = _model(), SADMLoss(SADMConfig(lam=1.0), _encoder())
    seen = {}
    model_loss, disc_loss = loss.__call__, loss.discriminator_loss

    def spy_model_loss(m, batch, g):
        seen["model_at_descent"], seen["encoder_at_descent"] = _snapshot(model), _snapshot(loss.encoder)
        assert not any(p.requires_grad for p in loss.encoder.parameters())
        return model_loss(m, batch, g)

    def spy_disc_loss(enc, m, batch, g):
        assert not any(p.requires_grad for p in model.parameters())
        return disc_loss(enc, m, batch, g)

    loss.adversary.loss_fn = spy_disc_loss
    m0, e0 = _snapshot(model), _snapshot(loss.encoder)
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-3, out_dir=str(tmp_path / "run"), progress=False)
    train(model, spy_model_loss, _data(), cfg, adversary=loss.adversary)
    # ascent ran first: it changed the encoder and left the denoiser as it was
    assert _changed(m0, model)
    assert _changed(m0, _model_from(seen["model_at_descent"])) == set()
    assert _changed(e0, _model_from(seen["encoder_at_descent"], loss.encoder)) != set()
    # descent changed the denoiser and left the encoder where ascent put it, with no gradient in it
    assert _changed(seen["encoder_at_descent"], loss.encoder) == set()
    assert all(p.grad is None for p in loss.encoder.parameters())
    assert all(p.requires_grad for p in model.parameters())


def _model_from(state, like=None):
    m = copy.deepcopy(like if like is not None else _model())
    m.load_state_dict(state)
    return m


def _sadm_run(tmp_path, name, steps, every=1000, ema=0.999, amp=False, **options):
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, checkpoint_every=every, log_every=1, ema_decay=ema,
                      amp=amp, out_dir=str(tmp_path / name), progress=False)  # fmt: skip
    sadm = SADMConfig(encoder_channels=(8, 16), feature_dim=16, **options)
    return recipes.train_sadm("digits", cfg, sadm, size="tiny", resolution=8)


def test_resume_restores_both_players_both_optimizers_and_the_rng(tmp_path):
    opts = {"warmup": 2, "d_updates": 2, "gradient_penalty": 1.0}
    _sadm_run(tmp_path, "straight", 6, **opts)
    _sadm_run(tmp_path, "resumed", 3, every=3, **opts)
    _sadm_run(tmp_path, "resumed", 6, every=3, **opts)
    a, meta_a = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    b, meta_b = load_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    assert a.keys() == b.keys()
    for prefix in ("model.", "ema.", "adv.", "optim.", "adv_optim.", "rng."):
        names = [k for k in a if k.startswith(prefix)]
        assert names, prefix
        assert all(torch.equal(a[k], b[k]) for k in names), prefix
    assert meta_a["adversary_optimizer"] == meta_b["adversary_optimizer"]

    def rows(name):
        with open(tmp_path / name / "log.csv") as f:
            return [{k: v for k, v in r.items() if k != "time_s"} for r in csv.DictReader(f)]

    assert rows("straight") == rows("resumed")
    # the warm-up: no structure term and no discriminator logs for the first two steps
    first, third = rows("straight")[0], rows("straight")[2]
    assert first["structure_gap"] == "nan" and first["adv_loss"] == ""
    assert float(third["structure_gap"]) > 0 and float(third["adv_structure_gap"]) > 0
    assert float(third["adv_penalty"]) > 0


@pytest.mark.parametrize("distance", DISTANCES)
def test_bf16_runs_with_every_distance_and_the_gradient_penalty(tmp_path, distance):
    _sadm_run(tmp_path, "run", 3, amp=True, distance=distance, affinity="gaussian", gradient_penalty=1.0)
    with open(tmp_path / "run" / "log.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert all(math.isfinite(float(last[k])) for k in ("loss", "structure_gap", "adv_loss", "adv_penalty"))


def test_a_checkpoint_without_an_adversary_is_not_resumed_as_sadm(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=8, out_dir=str(tmp_path / "run"), progress=False)
    recipes.train_edm("digits", cfg, size="tiny", resolution=8)
    cfg.steps = 3
    with pytest.raises(ValueError, match="holds no adversary's state, but this run has an adversary"):
        recipes.train_sadm("digits", cfg, SADMConfig(), size="tiny", resolution=8)


def test_a_tiny_cpu_run_lowers_the_denoising_loss(tmp_path):
    """The EDM loss on a fixed batch with fixed draws is lower after 60 SADM steps than at initialisation."""
    path = _sadm_run(tmp_path, "run", 60, ema=0.0, lam=0.1)  # EMA decay 0: the exported weights are the trained
    trained = models.get(path)
    initial = recipes._initial_unet(trained.config, 0, None, None)
    from fastdiff.data import DigitsDataset

    ds = DigitsDataset(8)
    batch = (ds.images[:256], ds.labels[:256])
    loss = SADMLoss(SADMConfig(), build_encoder(SADMConfig(), SHAPE))
    with torch.no_grad():
        before = loss(initial, batch, torch.Generator().manual_seed(3))[1]["loss_denoise"]
        after = loss(trained, batch, torch.Generator().manual_seed(3))[1]["loss_denoise"]
    assert float(after) < 0.7 * float(before)
    assert (tmp_path / "run" / "players.png").stat().st_size > 10_000


def test_fine_tuning_the_builtin_model_on_held_out_classes_from_the_cli(tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "ft"
    args = ["train", "sadm", "--init", "digits", "--classes", "7,8,9", "--steps", "2", "--batch-size", "4",
            "--lr", "1e-4", "--warmup", "0", "--out-dir", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    from fastdiff.data import DigitsDataset

    n = int((DigitsDataset(16).labels >= 7).sum())
    assert 500 < n < 600 and f"data digits: {n} images" in capsys.readouterr().err
    tuned, builtin = load_file(out / "model.safetensors"), models.builtin_digits().state_dict()
    assert tuned.keys() == builtin.keys()
    # two small steps away from the built-in weights, not a fresh network
    assert max(float((tuned[k] - builtin[k]).abs().max()) for k in tuned) < 0.05
    assert any(not torch.equal(tuned[k], builtin[k]) for k in tuned)
    assert main(["sample", "--model", str(out / "model.safetensors"), "-n", "4", "--steps", "3", "--no-teacher"]) == 0

    capsys.readouterr()
    assert main(["train", "sadm", "--init", "digits", "--resolution", "8", "--out-dir", str(tmp_path / "x")]) == 2
    assert re.search("was made for .*'resolution': 16.*the data has .*'resolution': 8", capsys.readouterr().err)
    assert main(["train", "edm", "--classes", "3,12", "--out-dir", str(tmp_path / "y")]) == 2
    assert "non-empty subset of 0..9" in capsys.readouterr().err


def test_interval_guidance_samples_a_sadm_model(tmp_path):
    """A SADM-trained model is an ordinary fastdiff model: guided sampling in an interval spends the documented
    NFE."""
    import fastdiff

    path = _sadm_run(tmp_path, "run", 2)
    model = models.get(path)
    sig = fastdiff.schedules.karras(6, 0.002, 80.0)
    g = fastdiff.Guidance(2.0, interval=(0.3, 5.0))
    cond, uncond = {"class_labels": torch.arange(4)}, {"class_labels": torch.full((4,), -1)}
    with torch.no_grad():
        out, stats = fastdiff.sample(model, torch.randn(4, *SHAPE) * 80, sig, solver="dpmpp_2m", guidance=g,
                                     cond=cond, uncond=uncond, return_stats=True)  # fmt: skip
    inside = int(((sig[:-1] > 0.3) & (sig[:-1] <= 5.0)).sum())
    assert torch.isfinite(out).all() and 0 < inside < 6
    assert (stats.nfe_cond, stats.nfe_uncond) == (6, inside)


def test_a_diverging_discriminator_stops_the_run_and_bad_settings_are_refused(tmp_path):
    from fastdiff.train.edm import EDMLoss
    from fastdiff.train.runtime import Adversary

    def diverging(enc, model, batch, generator):
        return enc(batch[0], torch.ones(batch[0].shape[0])).sum() * math.nan, {}

    cfg = TrainConfig(steps=2, batch_size=8, log_every=1, out_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(FloatingPointError, match="diverged at step 1: the adversary's loss=nan"):
        train(_model(), EDMLoss(), _data(), cfg, adversary=Adversary(_encoder(), diverging))
    with pytest.raises(ValueError, match="Adversary.updates must be an integer >= 1"):
        train(_model(), EDMLoss(), _data(), cfg, adversary=Adversary(_encoder(), diverging, updates=0))
    with pytest.raises(ValueError, match="nn.Module with trainable parameters"):
        train(_model(), EDMLoss(), _data(), cfg, adversary=Adversary(_encoder().requires_grad_(False), diverging))
