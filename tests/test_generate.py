"""Seeded, shardable image generation: same images whatever the batching or sharding, each index once."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff

from fastdiff import generate, schedules
from fastdiff.models.unet import EDMUNet, UNetConfig, save_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_unet_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_unet(path, EDMUNet(UNetConfig.tiny()).eval())
    return path


def test_noise_of_a_sample_depends_only_on_seed_and_index():
    a = generate.sample_noise(torch.tensor([0, 1, 2, 3]), (1, 8, 8), seed=5)
    b = generate.sample_noise(torch.tensor([3, 1]), (1, 8, 8), seed=5)
    assert torch.equal(a[3], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], generate.sample_noise(torch.tensor([0]), (1, 8, 8), seed=6)[0])


def test_labels_balanced_fixed_and_checked():
    idx = torch.arange(23)
    assert torch.equal(generate.sample_labels(idx, 10, None), idx % 10)
    assert (generate.sample_labels(idx, 10, 7) == 7).all()
    with pytest.raises(ValueError, match="class must lie in"):
        generate.sample_labels(idx, 10, 10)
    with pytest.raises(ValueError, match="unconditional"):
        generate.sample_labels(idx, 0, 3)


@pytest.mark.parametrize("solver", ["euler", "dpmpp_sde"])
def test_batching_does_not_change_the_images(tiny_unet_path, solver):
    """Sample i's image depends on (seed, i) only, its stochastic steps' noise included."""
    from fastdiff import models

    model = models.get(tiny_unet_path)
    sigmas = schedules.karras(3, 0.002, 80.0)
    kw = dict(shape=(1, 8, 8), num_classes=10, solver=solver, seed=1)
    whole = generate.generate(model, torch.arange(7), sigmas, batch_size=7, **kw)
    parts = generate.generate(model, torch.arange(7), sigmas, batch_size=3, **kw)
    torch.testing.assert_close(whole.images, parts.images, rtol=1e-5, atol=1e-5)
    assert whole.images.shape == (7, 1, 8, 8) and whole.nfe == (5 if solver == "dpmpp_sde" else 3)
    assert whole.images.min() >= -1 and whole.images.max() <= 1
    if solver == "dpmpp_sde":  # the steps draw from the samples' generators; other noise gives other images
        own = generate.SampleNoise(torch.arange(7), (1, 8, 8), 1)  # the samples' own generators, as generate()
        x = (own.draw() * sigmas[0]).float()
        cond = {"class_labels": whole.labels}
        fresh = fastdiff.sample(model, x, sigmas, solver=solver, cond=cond, generator=torch.Generator().manual_seed(9))
        assert not torch.allclose(fresh.clamp(-1, 1), whole.images, atol=1e-3)
        again = fastdiff.sample(model, x, sigmas, solver=solver, cond=cond, noise_sampler=own.like(x))
        torch.testing.assert_close(again.clamp(-1, 1), whole.images, rtol=1e-5, atol=1e-5)


def test_shards_merge_into_each_index_once(tmp_path):
    n, world = 11, 3
    for rank in range(world):
        idx = generate.shard(n, rank, world)
        images = torch.rand(len(idx), 1, 4, 4) * 2 - 1
        generate.write_part(tmp_path, generate.Generated(images, idx % 10, idx, 1), rank, world)
    out = generate.merge_parts(tmp_path, n, world)
    z = np.load(out, allow_pickle=False)
    assert (z["indices"] == np.arange(n)).all() and z["images"].shape == (n, 4, 4, 1)
    assert (z["labels"] == np.arange(n) % 10).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_merge_reports_duplicates_and_missing(tmp_path):
    for rank, idx in enumerate([torch.tensor([0, 1]), torch.tensor([1, 3])]):
        generate.write_part(tmp_path, generate.Generated(torch.zeros(2, 1, 2, 2), None, idx, 1), rank, 2)
    with pytest.raises(RuntimeError, match=r"duplicated \[1\], missing \[2\]"):
        generate.merge_parts(tmp_path, 4, 2)
    with pytest.raises(FileNotFoundError, match="part-002-of-003"):
        generate.merge_parts(tmp_path, 4, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_sharded_sampling_matches_one_process(tmp_path, tiny_unet_path):
    # `-n`, not `--n`: torchrun's own parser rejects `--n` as an ambiguous abbreviation before fastdiff sees it.
    args = ["sample", "--model", str(tiny_unet_path), "--solver", "euler", "--steps", "3", "-n", "13",
            "--batch-size", "4", "--no-teacher"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "fastdiff", *args, "--out-dir", str(tmp_path / "two")]  # fmt: skip
    res = subprocess.run(run, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    single = [sys.executable, "-m", "fastdiff", *args, "--out-dir", str(tmp_path / "one")]
    res = subprocess.run(single, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two, one = (np.load(tmp_path / d / "samples.npz", allow_pickle=False) for d in ("two", "one"))
    assert (two["indices"] == np.arange(13)).all()
    assert np.abs(two["images"].astype(int) - one["images"].astype(int)).max() <= 1  # uint8 rounding only
    assert (two["labels"] == one["labels"]).all()


def test_a_condition_tensor_follows_the_sample_index():
    """Sample i takes condition row i mod M, whatever the batching; the unconditional pass takes zeros."""
    condition = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def denoiser(x, sigma, cond, class_labels):  # D = its condition: the last Euler step returns it
        return cond.to(x.dtype)

    sigmas = schedules.karras(2, 0.002, 80.0)
    kw = dict(shape=(1, 4, 4), num_classes=10, solver="euler", condition=condition)
    whole = generate.generate(denoiser, torch.arange(7), sigmas, batch_size=7, **kw)
    parts = generate.generate(denoiser, torch.arange(7), sigmas, batch_size=2, **kw)
    assert torch.equal(whole.images, condition[torch.arange(7) % 3]) and torch.equal(parts.images, whole.images)
    cond, uncond = generate.label_kwargs(torch.tensor([4, 2]), condition[:2])
    assert torch.equal(cond["cond"], condition[:2]) and torch.equal(cond["class_labels"], torch.tensor([4, 2]))
    assert torch.equal(uncond["cond"], torch.zeros(2, 1, 4, 4)) and (uncond["class_labels"] == -1).all()
    assert generate.label_kwargs(None, None) == (None, None)
    with pytest.raises(ValueError, match="condition holds no rows"):
        generate.generate(denoiser, torch.arange(2), sigmas, **{**kw, "condition": condition[:0]})
