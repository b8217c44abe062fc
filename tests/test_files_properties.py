"""Property tests of every file loader (issue 18): a damaged file is refused with the loader's documented error, or
loads as exactly what was saved. Never another exception type, a hang, or a huge allocation.

Damage is byte flips, overwritten bytes, truncation, insertions and deletions (one to three of them, positions
biased towards the headers, where a change steers loading), plus random JSON for schedules. Each property runs
a few hundred derandomized examples in the default run (about 10 s in all, 2 idle cores) and thousands under
``-m slow`` (about 3 minutes).

Formats without a checksum cannot tell changed data from real data: a ``.npy`` file's pixels and a JPEG's are
whatever the bytes say. There the property is weaker, and says so: the header's claims (shape, dtype, labels) are
kept or refused, and only the damaged pixels may differ.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_files_support import address_space_limit, no_hang

from fastdiff import schedules
from fastdiff.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint, save_model
from fastdiff.data import ArrayDataset, ImageFolderDataset
from fastdiff.ld3 import TeacherPairs
from fastdiff.models.unet import EDMUNet, UNetConfig, load_unet, save_unet
from fastdiff.train.cascade import CascadeConfig, build_cascade, load_cascade, save_cascade
from fastdiff.train.codi import CoDiConfig, CoDiStudent, get_condition, load_student, save_student

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK, LONG = 6, 100  # examples per unit of a property: the default run, and the slow one


def _runs(quick: int):
    """Two cases of a property: ``quick`` examples in the default run, ``LONG`` times as many marked slow."""
    long = pytest.param(quick * LONG, id="long", marks=pytest.mark.slow)
    return pytest.mark.parametrize("examples", [pytest.param(quick * QUICK, id="quick"), long])


def _settings(examples: int):
    # derandomize: CI sees the same examples every run; no database, so a run never depends on an earlier one
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck))  # fmt: skip


# ------------------------------------------------------------------------------------------------ damage


def _damage(size: int, hot: tuple[int, int] | None = None):
    """One to three edits of a file of ``size`` bytes; half the positions fall in ``hot`` (a header) if given."""
    anywhere = st.integers(0, size - 1)
    pos = anywhere if hot is None else st.one_of(st.integers(hot[0], max(hot[0], hot[1] - 1)), anywhere)
    edit = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, st.integers(0, 255)),
        st.tuples(st.just("truncate"), anywhere),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=12)),
        st.tuples(st.just("delete"), pos, st.integers(1, 12)),
    )
    return st.lists(edit, min_size=1, max_size=3)


def _apply(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, *arg in edits:
        if not b:
            break
        if kind == "flip":
            b[pos % len(b)] ^= 1 << arg[0]
        elif kind == "set":
            b[pos % len(b)] = arg[0]
        elif kind == "truncate":
            del b[pos % len(b) :]
        elif kind == "insert":
            p = pos % (len(b) + 1)
            b[p:p] = arg[0]
        else:
            p = pos % len(b)
            del b[p : p + arg[0]]
    return bytes(b)


def _only_in_place_before(edits, end: int) -> bool:
    """Whether every edit overwrote bytes in place, all before offset ``end``."""
    return all(kind in ("flip", "set") and pos < end for kind, pos, *_ in edits)


def _fuzz_file(path, data: bytes, edits, load, same, error=CheckpointError):
    """Write damaged ``data`` to ``path``; ``load`` must raise ``error`` naming the file, or give what ``same``
    accepts (called with the result and the edits)."""
    path.write_bytes(_apply(data, edits))
    try:
        result = load(path)
    except error as exc:
        assert path.name in str(exc), f"the error does not name the file: {exc}"
        return
    assert same(result, edits), f"{edits}: loaded with different contents"


def _run(examples, strategy, check):
    """``check(example)`` for ``examples`` draws of ``strategy``, under the hang and allocation guards."""

    @_settings(examples)
    @given(strategy)
    def run(example):
        check(example)

    with no_hang(600), address_space_limit():
        run()


def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _equal_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- checkpoints, models


@_runs(120)
def test_damaged_checkpoints_are_refused_or_identical(tmp_path, examples):
    tensors = {"model.w": torch.randn(4, 3), "ema.w": torch.randn(4, 3), "opt.step": torch.tensor(5),
               "rng": torch.get_rng_state()[:64], "mask": torch.tensor([True, False])}  # fmt: skip
    meta = {"step": 120, "epoch": 3, "batch_in_epoch": 7, "config": {"lr": 2e-4, "sigma_data": 0.5}}
    data = save_checkpoint(tmp_path / "ok.safetensors", tensors, meta).read_bytes()

    def same(result, edits):
        return result[1] == meta and _equal_tensors(result[0], tensors)

    _run(examples, _damage(len(data), (0, _header_end(data))),
         lambda edits: _fuzz_file(tmp_path / "c.safetensors", data, edits, load_checkpoint, same))  # fmt: skip


@_runs(80)
def test_damaged_model_files_are_refused_or_identical(tmp_path, examples):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    config = {"type": "edm_unet", "channels": 16, "channel_mult": [1, 2], "sigma_data": 0.5}
    data = save_model(tmp_path / "ok.safetensors", net, config).read_bytes()

    def same(result, edits):
        return result[1] == config and _equal_tensors(result[0], net.state_dict())

    _run(examples, _damage(len(data), (0, _header_end(data))),
         lambda edits: _fuzz_file(tmp_path / "m.safetensors", data, edits, load_model_weights, same))  # fmt: skip


def _typed(tmp_path, examples, model, save, load, extra=lambda a, b: True):
    data = save(tmp_path / "ok.safetensors", model).read_bytes()
    want = {k: v.clone() for k, v in model.state_dict().items()}

    def same(result, edits):
        return _equal_tensors(result.state_dict(), want) and result.provenance == "fuzz" and extra(result, model)

    _run(examples, _damage(len(data), (0, _header_end(data))),
         lambda edits: _fuzz_file(tmp_path / "t.safetensors", data, edits, load, same))  # fmt: skip


@_runs(40)
def test_damaged_unet_files_are_refused_or_identical(tmp_path, examples):
    model = EDMUNet(UNetConfig.tiny())
    _typed(tmp_path, examples, model, lambda p, m: save_unet(p, m, provenance="fuzz"), load_unet,
           lambda a, b: a.config == b.config)  # fmt: skip


@_runs(25)
def test_damaged_cascade_files_are_refused_or_identical(tmp_path, examples):
    model = build_cascade(CascadeConfig(metric="l2"), UNetConfig.tiny(), (1, 8, 8))

    def same(a, b):
        return (a.config, a.unet_config, a.image_shape) == (b.config, b.unet_config, b.image_shape)

    _typed(tmp_path, examples, model, lambda p, m: save_cascade(p, m, provenance="fuzz"), load_cascade, same)


@_runs(25)
def test_damaged_codi_files_are_refused_or_identical(tmp_path, examples):
    student = CoDiStudent(EDMUNet(UNetConfig.tiny()), get_condition("lowres4+class", 1), "zero_conv", 10)
    config = CoDiConfig(intervals=8)
    _typed(tmp_path, examples, student, lambda p, m: save_student(p, m, config, provenance="fuzz"), load_student,
           lambda a, b: a.codi_config == config and a.condition.name == b.condition.name)  # fmt: skip


@_runs(60)
def test_damaged_teacher_pairs_are_refused_or_identical(tmp_path, examples):
    pairs = TeacherPairs(torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64),
                         torch.arange(5) % 3, {"model": "gmm", "solver": "heun", "steps": 32, "seed": 0})  # fmt: skip
    data = pairs.save(tmp_path / "ok.safetensors").read_bytes()

    def same(result, edits):
        got = {"noise": result.noise, "target": result.target, "labels": result.labels}
        want = {"noise": pairs.noise, "target": pairs.target, "labels": pairs.labels}
        return result.metadata == pairs.metadata and _equal_tensors(got, want)

    _run(examples, _damage(len(data), (0, _header_end(data))),
         lambda edits: _fuzz_file(tmp_path / "p.safetensors", data, edits, TeacherPairs.load, same))  # fmt: skip


# ------------------------------------------------------------------------------------------------ schedules


@_runs(120)
def test_damaged_schedule_files_are_refused_or_identical(tmp_path, examples):
    path = tmp_path / "ok.json"
    sigmas, ev = schedules.karras(4, 0.002, 80.0), schedules.karras(4, 0.003, 80.0)
    schedules.save(path, sigmas, ev, solver="heun", nfe=7, model="gmm", note="caf\u00e9")
    data = path.read_bytes()
    want = schedules.load_schedule(path)

    def same(got, edits):
        return (torch.equal(got.sigmas, want.sigmas) and torch.equal(got.eval_sigmas, want.eval_sigmas)
                and got.metadata == want.metadata)  # fmt: skip

    def check(edits):
        _fuzz_file(tmp_path / "s.json", data, edits, schedules.load_schedule, same, ValueError)

    _run(examples, _damage(len(data)), check)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_NUMBERS = st.lists(st.one_of(st.floats(-1, 100), st.integers(-1, 100), st.booleans()), max_size=6)
_SIGMAS = _NUMBERS | _NUMBERS.map(lambda v: sorted(v, reverse=True)) | _JSON
_SCHEDULE = st.one_of(
    _JSON,
    st.fixed_dictionaries(
        {"format": st.just("fastdiff-schedule"), "sigmas": _SIGMAS},
        optional={"version": st.sampled_from([1, 2, 3, "1", True, None]), "eval_sigmas": _SIGMAS,
                  "metadata": st.fixed_dictionaries({}, optional={"solver": st.sampled_from(["euler", "heun", "x", 3]),
                                                                  "nfe": _JSON | st.integers(0, 9)}) | _JSON,
                  "sha256": st.text(max_size=4)},
    ),
)  # fmt: skip


@_runs(150)
def test_random_json_is_refused_or_a_valid_schedule(tmp_path, examples):
    path = tmp_path / "r.json"

    def check(payload):
        path.write_text(json.dumps(payload))
        try:
            got = schedules.load_schedule(path)
        except ValueError as exc:
            assert str(path) in str(exc), f"the error does not name the file: {exc}"
            return
        schedules.validate(got.sigmas)  # what loads is a valid schedule
        assert got.sigmas.dtype == torch.float64 and isinstance(got.metadata, dict)

    _run(examples, _SCHEDULE, check)


# ------------------------------------------------------------------------------------------------- datasets


@_runs(100)
def test_damaged_npy_files_are_refused_or_keep_their_header(tmp_path, examples):
    path = tmp_path / "ok.npy"
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4), dtype=np.uint8)
    np.save(path, images)
    data = path.read_bytes()
    data_start = 10 + int.from_bytes(data[8:10], "little")
    want = ArrayDataset(path)

    def same(got, edits):
        # .npy has no checksum: damaged pixels load as they are, but the header's claims hold or are refused
        if got.images.shape != want.images.shape or not torch.equal(got.labels, want.labels):
            return False
        return torch.equal(got.images, want.images) or not _only_in_place_before(edits, data_start)

    _run(examples, _damage(len(data), (0, data_start)),
         lambda edits: _fuzz_file(tmp_path / "a.npy", data, edits, ArrayDataset, same, ValueError))  # fmt: skip


@_runs(100)
def test_damaged_npz_files_are_refused_or_identical(tmp_path, examples):
    path = tmp_path / "ok.npz"
    rng = np.random.default_rng(1)
    np.savez(path, images=rng.integers(0, 256, (4, 3, 4, 4), dtype=np.uint8), labels=np.array([0, 2, 1, 2]))
    data = path.read_bytes()
    want = ArrayDataset(path)
    with zipfile.ZipFile(path) as z:
        directory = z.start_dir  # the central directory steers the reading; the CRC-32s cover the arrays

    def same(got, edits):
        return (torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
                and got.num_classes == want.num_classes)  # fmt: skip

    _run(examples, _damage(len(data), (directory, len(data))),
         lambda edits: _fuzz_file(tmp_path / "a.npz", data, edits, ArrayDataset, same, ValueError))  # fmt: skip


@_runs(30)
def test_damaged_images_are_refused_named_or_keep_the_folder_shape(tmp_path, examples):
    src = tmp_path / "ok"
    rng = np.random.default_rng(2)
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(src / cls / "x.png")
    Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(src / "b" / "y.jpg", quality=90)
    want = ImageFolderDataset(src)
    folder = tmp_path / "fuzz"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for f in (src / cls).iterdir():
            (folder / cls / f.name).write_bytes(f.read_bytes())
    png, jpg = (src / "a" / "x.png").read_bytes(), (src / "b" / "y.jpg").read_bytes()

    def check(example):
        which, edits = example
        target, data = (folder / "a" / "x.png", png) if which == "png" else (folder / "b" / "y.jpg", jpg)
        target.write_bytes(_apply(data, edits))
        try:
            got = ImageFolderDataset(folder)
        except ValueError as exc:
            assert target.name in str(exc), f"the error does not name the file: {exc}"
        else:
            # PNG and JPEG pixels carry no checksum PIL verifies: the set keeps its files, shape and labels
            assert got.images.shape == want.images.shape and torch.equal(got.labels, want.labels)
            assert got.images.min() >= -1 and got.images.max() <= 1
        target.write_bytes(data)

    strategy = st.one_of(st.tuples(st.just("png"), _damage(len(png), (0, 64))),
                         st.tuples(st.just("jpg"), _damage(len(jpg), (0, 200))))  # fmt: skip
    _run(examples, strategy, check)
