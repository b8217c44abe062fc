"""The shared training runtime: exact resume after SIGKILL, DDP, EMA, clipping, bf16, warmup, config errors."""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import TensorDataset

from fastdiff import checkpoint as ckpt
from fastdiff.train import TrainConfig, distributed_context, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_train_worker.py"


@pytest.fixture(autouse=True)
def _keep_global_rng():
    # train() seeds torch's global RNG on a fresh run; other tests must not notice.
    with torch.random.fork_rng():
        yield


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _worker(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(p: subprocess.Popen, timeout: float = 60) -> None:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tiny(n: int = 24, dim: int = 4, dropout: float = 0.0) -> tuple[nn.Module, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, dim, generator=g), torch.arange(n))
    model = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, dim))
    return model, data


def _mse(model, batch, generator):
    x, _ = batch
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    loss = ((model(x + 0.5 * noise) - x) ** 2).mean()
    return loss, {"noise_std": noise.std()}


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(steps=3, batch_size=4, out_dir=str(tmp_path / "run"), progress=False, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------ exact resume


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    ref_dir, run_dir, marker = tmp_path / "ref", tmp_path / "run", tmp_path / "hanging"
    ref = _worker(ref_dir)  # uninterrupted, runs beside the one we kill
    victim = _worker(run_dir, "--hang-at", "25", "--marker", str(marker))
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert victim.poll() is None, victim.communicate()[0]
            assert time.monotonic() < deadline, "worker never reached step 25"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=30)
        assert victim.returncode == -signal.SIGKILL
    except BaseException:
        for p in (victim, ref):  # no stray workers outliving a failed test
            p.kill()
            p.communicate()
        raise
    assert (run_dir / "latest").read_text().strip() == "ckpt-000020.safetensors"
    assert [int(r["step"]) for r in _rows(run_dir / "log.csv")] == list(range(1, 25))
    # What a kill in the middle of a checkpoint write leaves behind; the resumed run must clear it.
    (run_dir / ".ckpt-000030.safetensors.x1y2.tmp").write_bytes(b"partial")

    _finish(_worker(run_dir))
    _finish(ref)

    a, meta_a = ckpt.load_checkpoint(ref_dir)
    b, meta_b = ckpt.load_checkpoint(run_dir)
    assert meta_a["step"] == meta_b["step"] == 40
    assert (meta_a["epoch"], meta_a["batch_in_epoch"]) == (meta_b["epoch"], meta_b["batch_in_epoch"])
    assert a.keys() == b.keys()
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("optim.") for k in a)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert differing == [], f"resumed run differs from the uninterrupted one in {differing}"

    names = sorted(p.name for p in run_dir.iterdir())
    assert names == ["ckpt-000030.safetensors", "ckpt-000040.safetensors", "latest", "log.csv"]
    rows_a, rows_b = _rows(ref_dir / "log.csv"), _rows(run_dir / "log.csv")
    assert [int(r["step"]) for r in rows_b] == list(range(1, 41))
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "time_s"} == {k: v for k, v in rb.items() if k != "time_s"}


def test_resume_in_process_extends_a_finished_run_and_never_unpickles(tmp_path, monkeypatch):
    model, data = _tiny(dropout=0.3)
    train(model, _mse, data, _cfg(tmp_path, steps=3, checkpoint_every=2))

    def refuse(*args, **kwargs):
        raise AssertionError("the resume path must not unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    again = train(_tiny(dropout=0.3)[0], _mse, data, _cfg(tmp_path, steps=3))
    assert again.step == 3  # already done: returns at once
    more = train(_tiny(dropout=0.3)[0], _mse, data, _cfg(tmp_path, steps=5, checkpoint_every=2))
    assert more.step == 5
    assert [int(r["step"]) for r in _rows(tmp_path / "run" / "log.csv")] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------ DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_agree_and_draw_disjoint_shards(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out)]
    # 52 items over 2 ranks: 26 each, 6 batches of 4 (2 dropped): 6 steps are exactly one epoch.
    cmd += ["--steps", "6", "--batch-size", "4", "--checkpoint-every", "3", "--record"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr

    seen = [json.loads((out / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(s) for s in seen] == [24, 24]
    assert all(len(set(s)) == 24 for s in seen)  # no item twice within an epoch
    assert not set(seen[0]) & set(seen[1]), "the ranks' data shards overlap"

    w0, cfg0 = ckpt.load_model_weights(out / "final-rank0.safetensors")
    w1, cfg1 = ckpt.load_model_weights(out / "final-rank1.safetensors")
    assert (cfg0, cfg1) == ({"rank": 0}, {"rank": 1})
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the ranks' weights diverged"
    tensors, meta = ckpt.load_checkpoint(out)
    assert meta["step"] == 6 and meta["world_size"] == 2
    assert all(torch.equal(tensors[f"model.{k}"], w0[k]) for k in w0)
    assert not torch.equal(tensors["rng.loss.0"], tensors["rng.loss.1"])  # each rank draws its own noise
    assert [int(r["step"]) for r in _rows(out / "log.csv")] == list(range(1, 7))  # rank 0 alone logs


def test_ddp_keeps_an_adversary_in_sync(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out)]
    cmd += ["--steps", "5", "--batch-size", "4", "--checkpoint-every", "5", "--record", "--adversary"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    a0, _ = ckpt.load_model_weights(out / "adversary-rank0.safetensors")
    a1, _ = ckpt.load_model_weights(out / "adversary-rank1.safetensors")
    assert all(torch.equal(a0[k], a1[k]) for k in a0), "the ranks' adversaries diverged"
    tensors, meta = ckpt.load_checkpoint(out)
    assert all(torch.equal(tensors[f"adv.{k}"], a0[k]) for k in a0)
    torch.manual_seed(8)
    initial = torch.nn.Linear(6, 4).state_dict()
    assert not torch.equal(initial["weight"], a0["weight"])  # it played (from step 3 on)
    rows = _rows(out / "log.csv")
    assert [r["adv_loss"] == "" for r in rows] == [True, True, False, False, False]


def test_distributed_context_reads_torchrun_variables(monkeypatch):
    ctx = distributed_context("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed_context("cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (1, 2, 1, False)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        distributed_context("cpu")


# ------------------------------------------------------------------------------------------ the pieces


def test_ema_after_one_step(tmp_path):
    model, data = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = train(model, _mse, data, _cfg(tmp_path, steps=1, ema_decay=0.75))
    after = model.state_dict()
    assert not torch.equal(after["0.weight"], before["0.weight"])
    for k in before:
        expected = 0.75 * before[k] + 0.25 * after[k]
        torch.testing.assert_close(state.ema[k], expected, rtol=0, atol=1e-7)
        assert state.ema[k].dtype == torch.float32
    ema_model = state.ema_model()
    assert not ema_model.training and not any(p.requires_grad for p in ema_model.parameters())
    torch.testing.assert_close(ema_model.state_dict()["3.bias"], state.ema["3.bias"])
    saved, _ = ckpt.load_checkpoint(tmp_path / "run")
    assert torch.equal(saved["ema.0.weight"], state.ema["0.weight"])


def test_grad_clip_caps_the_norm_and_logs_the_unclipped_one(tmp_path):
    model, data = _tiny()
    n_params = sum(p.numel() for p in model.parameters())

    def steep(model, batch, generator):
        return 100.0 * sum(p.sum() for p in model.parameters()), {}

    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(model, steep, data, _cfg(tmp_path, steps=2, grad_clip=0.5))
    finally:
        handle.remove()
    assert len(norms) == 2 and all(n <= 0.5 * (1 + 1e-5) for n in norms)
    logged = [float(r["grad_norm"]) for r in _rows(tmp_path / "run" / "log.csv")]
    assert logged == pytest.approx([100.0 * n_params**0.5] * 2, rel=1e-5)


def test_bf16_autocast_path_runs(tmp_path):
    model, data = _tiny()
    seen = {}

    def loss_fn(model, batch, generator):
        x, _ = batch
        out = model(x)
        seen["enabled"] = torch.is_autocast_enabled("cpu")
        seen["dtype"] = out.dtype
        return ((out.float() - x) ** 2).mean(), {}

    state = train(model, loss_fn, data, _cfg(tmp_path, steps=2, amp=True))
    assert seen == {"enabled": True, "dtype": torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    assert torch.isfinite(torch.tensor(state.last_logs["loss"]))


def test_warmup_is_linear_then_flat(tmp_path):
    model, data = _tiny()
    train(model, _mse, data, _cfg(tmp_path, steps=6, lr=1e-3, warmup_steps=4))
    lrs = [float(r["lr"]) for r in _rows(tmp_path / "run" / "log.csv")]
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3])


def test_extra_trainable_module_is_optimised_and_checkpointed(tmp_path):
    model, data = _tiny()
    scale = nn.Linear(4, 4)
    start = scale.weight.detach().clone()

    def loss_fn(model, batch, generator):
        x, _ = batch
        return ((scale(model(x)) - x) ** 2).mean(), {}

    train(model, loss_fn, data, _cfg(tmp_path, steps=2), extra_modules={"scale": scale})
    assert not torch.equal(scale.weight, start)
    tensors, meta = ckpt.load_checkpoint(tmp_path / "run")
    assert torch.equal(tensors["extra.scale.weight"], scale.weight.detach())
    assert len(meta["optimizer"]["param_groups"]) == 2


def test_generic_dataset_collates_image_label_pairs(tmp_path):
    items = [(torch.full((2, 3), float(i)), i) for i in range(10)]
    seen = []

    def loss_fn(model, batch, generator):
        x, labels = batch
        assert isinstance(batch, tuple) and x.shape == (5, 2, 3) and labels.dtype == torch.int64
        seen.append(labels.tolist())
        return model(x).pow(2).mean(), {}

    train(nn.Linear(3, 3), loss_fn, items, _cfg(tmp_path, steps=4, batch_size=5))
    assert sorted(seen[0] + seen[1]) == list(range(10)) and sorted(seen[2] + seen[3]) == list(range(10))
    assert seen[:2] != seen[2:]  # a fresh permutation each epoch


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    model, data = _tiny()
    train(model, _mse, data, _cfg(tmp_path, steps=2, tensorboard=True))
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": -1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"warmup_steps": -2}, "warmup_steps"),
        ({"keep": 0}, "keep"),
    ],
)
def test_bad_config_is_refused(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        _cfg(tmp_path, **change)


def test_batch_larger_than_the_shard_is_refused(tmp_path):
    model, data = _tiny(n=6)
    with pytest.raises(ValueError, match="batch_size=8 is larger than this process's shard"):
        train(model, _mse, data, _cfg(tmp_path, batch_size=8))


@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [
        (lambda m, b, g: m(b[0]).mean(), TypeError, r"\(loss, logs_dict\)"),
        (lambda m, b, g: (m(b[0]), {}), ValueError, "scalar loss"),
        (lambda m, b, g: (m(b[0]).mean() * float("nan"), {}), FloatingPointError, "diverged at step 1"),
    ],
)
def test_bad_loss_is_refused(tmp_path, loss_fn, error, match):
    model, data = _tiny()
    with pytest.raises(error, match=match):
        train(model, loss_fn, data, _cfg(tmp_path))


def test_checkpoint_of_another_model_is_refused_on_resume(tmp_path):
    model, data = _tiny()
    train(model, _mse, data, _cfg(tmp_path, steps=1))
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.0), nn.Linear(5, 4))
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatches.*0\.weight: checkpoint \(8, 4\) vs model"):
        train(other, _mse, data, _cfg(tmp_path, steps=2))


# ------------------------------------------------------------------------------------------ one run per directory


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_run_on_a_live_directory_is_refused_and_a_killed_ones_lock_is_not(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "hanging"
    first = _worker(run_dir, "--hang-at", "12", "--marker", str(marker))
    try:
        _wait_for(marker, first)  # step 12: past its first checkpoint (step 10), the lock held
        in_flight = run_dir / ".ckpt-000020.safetensors.a1b2c3d4.tmp"  # as if it were writing its next one
        in_flight.write_bytes(b"half a checkpoint")
        log_before = (run_dir / "log.csv").read_text()

        second = _worker(run_dir)
        out, _ = second.communicate(timeout=60)
        assert second.returncode != 0
        assert "in use by another training run" in out and f"pid {first.pid} " in out, out
        assert "_train_worker.py" in out  # the holder's command line
        # The refused run touched nothing: not the in-flight file, not the log, not the checkpoints.
        assert in_flight.exists() and (run_dir / "log.csv").read_text() == log_before
        assert (run_dir / "latest").read_text().strip() == "ckpt-000010.safetensors"
        # Nor does anyone else's stale-file cleanup while the run lives.
        assert ckpt.remove_stale_temp_files(run_dir) == [] and in_flight.exists()

        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    except BaseException:
        first.kill()
        first.communicate()
        raise
    # The kernel dropped the dead run's lock: the next run takes the directory, resumes and clears the leftover.
    _finish(_worker(run_dir))
    assert not in_flight.exists()
    _, meta = ckpt.load_checkpoint(run_dir)
    assert meta["step"] == 40
    assert [int(r["step"]) for r in _rows(run_dir / "log.csv")] == list(range(1, 41))
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "ckpt-000030.safetensors", "ckpt-000040.safetensors", "latest", "log.csv"
    ]  # fmt: skip


def test_run_lock_is_reentrant_and_kept_for_exports(tmp_path):
    import fcntl

    from fastdiff.train import runtime

    model, data = _tiny()
    lock_file = tmp_path / "run" / ckpt.RUN_LOCK

    def held_by_someone() -> bool:
        fd = os.open(lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    with runtime.keep_run_locks():
        train(model, _mse, data, _cfg(tmp_path, steps=2))
        assert held_by_someone()  # still ours: the export goes here
        (tmp_path / "run" / ".model.safetensors.x.tmp").write_bytes(b"ours, in flight")
        assert [p.name for p in ckpt.remove_stale_temp_files(tmp_path / "run")] == [".model.safetensors.x.tmp"]
        train(model, _mse, data, _cfg(tmp_path, steps=3))  # the same process may run again
    assert not lock_file.exists()
    train(model, _mse, data, _cfg(tmp_path, steps=4))
    assert not lock_file.exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    model, data = _tiny()
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="run directory .*run exists and is not a directory"):
        train(model, _mse, data, _cfg(tmp_path))


def test_ddp_run_on_a_live_directory_ends_on_every_rank(tmp_path):
    from fastdiff.train import runtime

    out = tmp_path / "ddp"
    out.mkdir()
    lock = runtime._acquire_run_lock(out)  # this process plays the live run
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out), "--steps", "2"]
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        runtime._release_run_lock(lock)
    text = p.stdout + p.stderr
    assert p.returncode != 0
    assert f"in use by another training run (pid {os.getpid()} " in text, text
    assert "rank 0 could not take the run directory" in text, text  # rank 1 says why it stops, and stops
    assert not list(out.glob("ckpt-*"))
