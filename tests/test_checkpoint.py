"""fastdiff.checkpoint: safetensors round trips, atomic writes, pruning, and clear refusals of bad files."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from test_files_support import (
    address_space_limit,
    flip_every_bit,
    make_fifo,
    make_symlink_loop,
    no_hang,
    write_v1,
)
from torch import nn

from fastdiff import checkpoint as ckpt
from fastdiff.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    load_model_weights,
    load_state_into,
    save_checkpoint,
    save_model,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=g)
    return {
        "model.w": w,
        "model.w_tied": w,  # aliased storage, as tied weights are
        "model.view": torch.randn(4, 6, generator=g).t(),  # non-contiguous
        "ema.b": torch.randn(7, generator=g, dtype=torch.float64),
        "optim.0.step": torch.tensor(3.0),  # 0-d
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
        "rng.torch.0": torch.get_rng_state(),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 2),
        "count": torch.arange(4, dtype=torch.int64),
    }


META = {"step": 100, "epoch": 2, "config": {"lr": 2e-4, "betas": [0.9, 0.999], "name": "x"}, "nothing": None}


def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    tensors = _tensors()
    path = save_checkpoint(tmp_path / "one.safetensors", tensors, META)
    loaded, meta = load_checkpoint(path)
    assert meta == META
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert loaded["model.w"].data_ptr() != loaded["model.w_tied"].data_ptr()


def test_directory_save_is_atomic_with_a_latest_pointer(tmp_path):
    run = tmp_path / "run"
    path = save_checkpoint(run, {"a": torch.ones(3)}, {"step": 100})
    assert path == run / "ckpt-000100.safetensors"
    assert (run / "latest").read_text() == "ckpt-000100.safetensors\n"
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-000100.safetensors", "latest"]  # no temporary files
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    tensors, meta = load_checkpoint(run)
    assert meta["step"] == 100 and torch.equal(tensors["a"], torch.ones(3))


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_debris(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, {"a": torch.ones(3)}, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, {"a": torch.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-000001.safetensors", "latest"]
    tensors, meta = load_checkpoint(run)
    assert meta["step"] == 1 and torch.equal(tensors["a"], torch.ones(3))


def test_pointer_is_the_commit_record_and_stale_temps_are_swept(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, {"a": torch.ones(1)}, {"step": 10})
    # A run killed after writing step 20's file but before moving the pointer: step 10 is still the latest.
    save_checkpoint(run / "ckpt-000020.safetensors", {"a": torch.full((1,), 2.0)}, {"step": 20})
    (run / ".ckpt-000030.safetensors.abc.tmp").write_bytes(b"half a file")
    assert ckpt.latest_checkpoint(run) == run / "ckpt-000010.safetensors"
    assert ckpt.remove_stale_temp_files(run) == [run / ".ckpt-000030.safetensors.abc.tmp"]
    (run / "latest").unlink()  # killed before the very first pointer write: the newest complete file wins
    assert ckpt.latest_checkpoint(run) == run / "ckpt-000020.safetensors"
    (run / "latest").write_text("ckpt-000050.safetensors\n")
    with pytest.raises(CheckpointNotFoundError, match="names ckpt-000050.safetensors, which does not exist"):
        load_checkpoint(run)


def test_keeps_the_last_n_checkpoints(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30, 40):
        save_checkpoint(run, {"a": torch.full((2,), float(step))}, {"step": step}, keep=3)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [20, 30, 40]
    save_checkpoint(run, {"a": torch.ones(2)}, {"step": 50})  # default keep=2
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [40, 50]
    assert load_checkpoint(run)[1]["step"] == 50


def test_save_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="meta\\['step'\\]"):
        save_checkpoint(tmp_path / "run", {"a": torch.ones(1)}, {"epoch": 1})
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "x.safetensors", {"a": torch.ones(1)}, {"step": 1, "bad": object()})
    with pytest.raises(TypeError, match="map str to Tensor"):
        save_checkpoint(tmp_path / "x.safetensors", {"a": [1.0]}, {"step": 1})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path / "run", {"a": torch.ones(1)}, {"step": 1}, keep=0)
    assert not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------ bad files


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found: .*nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for callers that catch that
        load_model_weights(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep_bytes", [0, 5, 20, "half", "all-but-one"])
def test_truncated_file_is_refused_with_a_clear_message(tmp_path, keep_bytes):
    path = save_checkpoint(tmp_path / "c.safetensors", _tensors(), META)
    data = path.read_bytes()
    n = {"half": len(data) // 2, "all-but-one": len(data) - 1}.get(keep_bytes, keep_bytes)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"c\.safetensors is truncated or corrupt"):
        load_checkpoint(path)


def test_corrupted_bytes_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", _tensors(), META)
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[-3] ^= 0x55  # inside the tensor data: only the stored checksum can see this
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"c\.safetensors is corrupt: the tensor data (or metadata )?does not"):
        load_checkpoint(path)
    header = bytearray(data)
    header[9] = ord("?")  # inside the JSON header
    path.write_bytes(bytes(header))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + bytes(data[8:]))  # an absurd header length
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


class _Bomb:
    """Unpickling this would call _explode: the test proves the loader never gets that far."""

    def __reduce__(self):
        return (_explode, ())


EXPLODED = []


def _explode():
    EXPLODED.append(True)
    return None


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_file_is_refused_without_being_unpickled(tmp_path, zipfile):
    path = tmp_path / "evil.safetensors"
    torch.save({"w": torch.ones(2), "payload": _Bomb()}, path, _use_new_zipfile_serialization=zipfile)
    for load in (load_checkpoint, load_model_weights):
        with pytest.raises(CheckpointError, match="evil.safetensors is a pickle/torch.save file; fastdiff refuses"):
            load(path)
    assert EXPLODED == []


def test_load_path_never_unpickles(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, _tensors(), {"step": 3})
    save_model(tmp_path / "m.safetensors", nn.Linear(2, 2), {"dim": 2})
    torch.save({"w": torch.ones(2)}, tmp_path / "p.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("a fastdiff load path tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_checkpoint(run)
    load_model_weights(tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "p.safetensors")


def _foreign(path, metadata):
    save_file({"a": torch.ones(2)}, str(path), metadata=metadata)
    return path


def test_wrong_format_or_version_is_refused(tmp_path):
    plain = _foreign(tmp_path / "plain.safetensors", None)
    with pytest.raises(
        CheckpointError, match="plain.safetensors is not a fastdiff-checkpoint file: its format is None"
    ):
        load_checkpoint(plain)
    newer = _foreign(tmp_path / "newer.safetensors", {"format": "fastdiff-checkpoint", "version": "99"})
    with pytest.raises(CheckpointError, match="version '99'; this fastdiff reads versions 1, 2 \\(written by a newer"):
        load_checkpoint(newer)
    model_file = save_model(tmp_path / "m.safetensors", nn.Linear(2, 2), {})
    with pytest.raises(CheckpointError, match="model weights file: use fastdiff.checkpoint.load_model_weights"):
        load_checkpoint(model_file)
    run_file = save_checkpoint(tmp_path / "c.safetensors", {"a": torch.ones(1)}, {"step": 1})
    with pytest.raises(CheckpointError, match="training checkpoint: use fastdiff.checkpoint.load_checkpoint"):
        load_model_weights(run_file)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("../../etc/passwd\n")
    with pytest.raises(CheckpointError, match="latest is corrupt"):
        load_checkpoint(tmp_path / "run")


# ------------------------------------------------------------------------------------------ into modules


def _net(hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(3, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 2))


def test_load_state_into_round_trip_with_prefix(tmp_path):
    src, dst = _net(), _net()
    path = save_checkpoint(tmp_path / "c.safetensors", {f"model.{k}": v for k, v in src.state_dict().items()}, {})
    tensors, _ = load_checkpoint(path)
    load_state_into(dst, tensors, prefix="model.")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_load_state_into_reports_every_mismatch_at_once():
    tensors = {f"model.{k}": v for k, v in _net(hidden=8).state_dict().items()}
    del tensors["model.2.bias"]
    tensors["model.9.weight"] = torch.ones(1)
    tensors["other.x"] = torch.ones(1)  # another prefix: ignored
    with pytest.raises(CheckpointError) as info:
        load_state_into(_net(hidden=6), tensors)
    msg = str(info.value)
    assert "missing keys (1): model.2.bias" in msg
    assert "unexpected keys (1): model.9.weight" in msg
    assert "model.0.weight: checkpoint (8, 3) vs model (6, 3)" in msg
    assert "model.1.running_mean: checkpoint (8,) vs model (6,)" in msg
    assert "other.x" not in msg


def test_load_state_into_non_strict_still_refuses_shape_mismatches():
    tensors = {f"model.{k}": v for k, v in _net().state_dict().items() if k.startswith("0.")}
    dst = _net()
    load_state_into(dst, tensors, strict=False)  # missing keys are fine here
    assert torch.equal(dst[0].weight, tensors["model.0.weight"])
    tensors["model.0.weight"] = torch.ones(2, 2)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_into(_net(), tensors, strict=False)


class _Wrap(nn.Module):
    """Stands in for DistributedDataParallel, which keeps the real network as ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_save_model_ships_weights_and_config(tmp_path):
    net = _net()
    config = {"hidden": 8, "sigma_data": 0.5, "name": "digits"}
    path = save_model(tmp_path / "w" / "model.safetensors", _Wrap(net), config)
    state, cfg = load_model_weights(path)
    assert cfg == config
    assert state.keys() == net.state_dict().keys()  # no "module." prefix
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.safetensors"]
    fresh = _net(cfg["hidden"])
    load_state_into(fresh, state, prefix="")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in net.state_dict().items())
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "fastdiff-model"
    assert json.loads(header["__metadata__"]["meta"]) == {"config": config}


# ------------------------------------------------------------------------------ metadata integrity (issue 18)


def _header(path) -> tuple[int, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8 : 8 + n]


def _edit_header(path, old: bytes, new: bytes) -> None:
    """Replace ``old`` by ``new`` (same length) inside the header, as a hand edit or a bad disk would."""
    assert len(old) == len(new)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    assert data[8 : 8 + n].count(old) == 1, old
    path.write_bytes(data[:8] + data[8 : 8 + n].replace(old, new) + data[8 + n :])


@pytest.mark.parametrize("old,new", [(b"step\\\": 100", b"step\\\": 900"), (b"epoch\\\": 2", b"epoch\\\": 3"),
                                     (b"batch_in_epoch\\\": 7", b"batch_in_epoch\\\": 1")])  # fmt: skip
def test_an_edited_checkpoint_header_is_refused(tmp_path, old, new):
    path = save_checkpoint(tmp_path / "c.safetensors", _tensors(), {"step": 100, "epoch": 2, "batch_in_epoch": 7})
    _edit_header(path, old, new)
    with pytest.raises(CheckpointError, match=r"c\.safetensors is corrupt: .*does not match the checksum"):
        load_checkpoint(path)


def test_an_edited_model_config_is_refused(tmp_path):
    path = save_model(tmp_path / "m.safetensors", nn.Linear(2, 2), {"sigma_data": 0.5, "channels": 16})
    for old, new in [(b'sigma_data\\": 0.5', b'sigma_data\\": 0.4'), (b'channels\\": 16', b'channels\\": 99')]:
        saved = path.read_bytes()
        _edit_header(path, old, new)
        with pytest.raises(CheckpointError, match="does not match the checksum"):
            load_model_weights(path)
        path.write_bytes(saved)
    assert load_model_weights(path)[1] == {"sigma_data": 0.5, "channels": 16}


def test_header_format_version_and_keys_are_covered(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"a": torch.ones(2)}, {"step": 1})
    _, header = _header(path)
    info = json.loads(header)["__metadata__"]
    assert info["version"] == "2" and set(info) == {"format", "version", "sha256", "meta"}
    saved = path.read_bytes()
    _edit_header(path, b'"version":"2"', b'"version":"1"')  # a v1 (tensor-only) digest never equals a v2 one
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(path)
    path.write_bytes(saved)
    _edit_header(path, b'"meta":', b'"meto":')  # a lost key must not read as empty metadata
    with pytest.raises(CheckpointError, match="meta"):
        load_checkpoint(path)


def test_version_1_files_still_load(tmp_path):
    tensors = _tensors()
    path = write_v1(tmp_path / "old.safetensors", tensors, "fastdiff-checkpoint", META)
    loaded, meta = load_checkpoint(path)
    assert meta == META and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    model = write_v1(tmp_path / "m.safetensors", nn.Linear(2, 2).state_dict(), "fastdiff-model", {"config": {"a": 1}})
    assert load_model_weights(model)[1] == {"a": 1}
    flipped = bytearray(model.read_bytes())
    flipped[-1] ^= 1  # version 1 still checks its tensors
    model.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_model_weights(model)


def test_version_1_metadata_must_be_an_object(tmp_path):
    path = write_v1(tmp_path / "m.safetensors", {"a": torch.ones(1)}, "fastdiff-model", [1, 2])
    with pytest.raises(CheckpointError, match="m.safetensors.*metadata.*JSON object"):
        load_model_weights(path)
    path = write_v1(tmp_path / "n.safetensors", {"a": torch.ones(1)}, "fastdiff-model", {"config": [1]})
    with pytest.raises(CheckpointError, match="n.safetensors.*config.*JSON object"):
        load_model_weights(path)


def test_an_absurdly_nested_header_is_refused(tmp_path):
    path = tmp_path / "deep.safetensors"
    body = b"[" * 200_000
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="deep.safetensors is corrupt"):
        load_checkpoint(path)


def _same_checkpoint(tensors, meta):
    def same(result):
        got, got_meta = result
        return (
            got_meta == meta
            and got.keys() == tensors.keys()
            and all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in tensors.items())
        )

    return same


def test_every_bit_flip_of_a_checkpoint_header_is_refused_or_harmless(tmp_path):
    tensors = {"model.w": torch.randn(3, 2), "ema.w": torch.randn(3, 2), "step": torch.tensor(7)}
    meta = {"step": 100, "epoch": 2, "batch_in_epoch": 7, "config": {"lr": 0.0002, "channels": 16}}
    path = save_checkpoint(tmp_path / "c.safetensors", tensors, meta)
    n, _ = _header(path)
    with address_space_limit():
        flip_every_bit(path, range(8 + n), load_checkpoint, _same_checkpoint(tensors, meta))


def test_every_bit_flip_of_a_model_file_header_is_refused_or_harmless(tmp_path):
    net = nn.Linear(3, 2)
    config = {"type": "edm_unet", "channels": 16, "channel_mult": [1, 2], "sigma_data": 0.5, "num_classes": 10}
    path = save_model(tmp_path / "m.safetensors", net, config)
    n, _ = _header(path)
    with address_space_limit():
        flip_every_bit(path, range(8 + n), load_model_weights, _same_checkpoint(net.state_dict(), config))


def test_a_fifo_or_other_special_file_is_refused_without_blocking(tmp_path):
    from fastdiff.ld3 import TeacherPairs

    fifo = make_fifo(tmp_path / "pipe.safetensors")
    with no_hang():
        for load in (load_checkpoint, load_model_weights, TeacherPairs.load):
            with pytest.raises(CheckpointError, match=r"pipe\.safetensors is not a regular file \(a FIFO"):
                load(fifo)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_model_weights(tmp_path)


def test_a_symlink_loop_is_reported_as_one(tmp_path):
    loop = make_symlink_loop(tmp_path / "loop.safetensors")
    with pytest.raises(CheckpointError, match=r"loop\.safetensors.*symlink loop"):
        load_checkpoint(loop)


def test_a_garbled_latest_pointer_is_refused(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, {"a": torch.ones(1)}, {"step": 1})
    (run / "latest").write_bytes(b"\xff\xfe ckpt")
    with pytest.raises(CheckpointError, match="latest is corrupt"):
        load_checkpoint(run)


def test_teacher_pairs_that_do_not_make_pairs_are_refused(tmp_path):
    from fastdiff.ld3 import TEACHER_FORMAT, TeacherPairs

    noise = torch.randn(4, 2)
    for name, tensors in [
        ("labels", {"noise": noise, "target": noise, "labels": torch.zeros(3, dtype=torch.int64)}),
        ("labels", {"noise": noise, "target": noise, "labels": torch.zeros(4)}),
        ("float", {"noise": noise.long(), "target": noise.long()}),
        ("unexpected", {"noise": noise, "target": noise, "extra": noise}),
        ("matching", {"noise": noise, "target": noise[:3]}),
    ]:
        path = write_v1(tmp_path / f"{name}.safetensors", tensors, TEACHER_FORMAT, {})
        with pytest.raises(CheckpointError, match=f"{name}.safetensors.*{name}"):
            TeacherPairs.load(path)
