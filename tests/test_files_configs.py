"""Model-file configurations (issue 18): an implausible UNet, cascade or CoDi config is refused, naming the field,
before anything is allocated; a model file whose config does not fit its weights is refused before the model is
built at full size."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_files_support import (
    address_space_limit,
    flip_every_bit,
    header_positions,
    make_fifo,
    make_symlink_loop,
    no_hang,
    write_v1,
)

from fastdiff import checkpoint
from fastdiff.checkpoint import CheckpointError
from fastdiff.models.unet import EDMUNet, UNetConfig, load_unet, save_unet
from fastdiff.train.cascade import CascadeConfig, build_cascade, load_cascade, save_cascade
from fastdiff.train.codi import CoDiConfig, CoDiStudent, get_condition, load_student, save_student

TINY = UNetConfig.tiny().to_dict()
pytestmark = pytest.mark.usefixtures("one_thread")
_INVALID = "(?i)bad.safetensors has an invalid [a-z_]+ config: .*{}"


@pytest.mark.parametrize(
    "field,value",
    [
        ("channels", 10**6), ("channels", 16.5), ("channels", "16"), ("channels", True), ("channels", None),
        ("channels", 0), ("resolution", -8), ("resolution", 2**40), ("in_channels", 10**7), ("out_channels", 0),
        ("out_channels", 2.0), ("num_blocks", 10**6), ("head_channels", 0), ("num_classes", -1),
        ("num_classes", 10**12), ("channel_mult", "124"), ("channel_mult", [1, 2.5]), ("channel_mult", []),
        ("channel_mult", [1, 10**6]), ("channel_mult", 4), ("attention_levels", [1.0]), ("attention_levels", "1"),
        ("dropout", "0.1"), ("dropout", math.nan), ("sigma_data", math.inf), ("sigma_data", "0.5"),
        ("sigma_data", True), ("sigma_data", -0.5),
    ],
)  # fmt: skip
def test_unet_config_refuses_implausible_fields_by_name(field, value):
    with address_space_limit(), pytest.raises(ValueError, match=field):
        UNetConfig.from_dict({**TINY, field: value})


def test_unet_config_refuses_a_network_too_big_to_be_plausible():
    with address_space_limit(), pytest.raises(ValueError, match="parameters"):
        UNetConfig(resolution=64, channels=8192, channel_mult=(1, 2, 4, 8), num_blocks=4)


def test_unet_config_takes_numpy_and_tensor_integers():
    numbers = {"channels": np.int64(8), "resolution": torch.tensor(8), "sigma_data": np.float32(0.5)}
    cfg = UNetConfig.from_dict({**TINY, **numbers})
    assert cfg == UNetConfig.tiny() and type(cfg.channels) is int and type(cfg.sigma_data) is float
    json.dumps(cfg.to_dict())


def _v1_model_file(tmp_path, name, model_path, edit):
    """A legacy (version 1) copy of the model file at ``model_path`` with its config changed by ``edit``."""
    tensors, config = checkpoint.load_model_weights(model_path)
    edit(config)
    return write_v1(tmp_path / name, tensors, checkpoint.MODEL_FORMAT, {"config": config})


def test_a_legacy_unet_file_with_a_damaged_config_is_refused_before_allocating(tmp_path):
    good = save_unet(tmp_path / "u.safetensors", EDMUNet(UNetConfig.tiny()))
    # 8 -> 8200 is one flipped bit: the network it describes would take tens of GB
    huge = _v1_model_file(tmp_path, "huge.safetensors", good, lambda c: c.update(channels=8 | 8192))
    wide = _v1_model_file(tmp_path, "wide.safetensors", good, lambda c: c.update(channels=8 | 64))
    with address_space_limit():
        with pytest.raises(CheckpointError, match="huge.safetensors has an invalid edm_unet config: .*channels"):
            load_unet(huge)
        with pytest.raises(CheckpointError, match="(?s)wide.safetensors.*shape mismatches"):
            load_unet(wide)


@pytest.fixture(scope="module")
def cascade_file(tmp_path_factory):
    model = build_cascade(CascadeConfig(metric="l2"), UNetConfig.tiny(), (1, 8, 8))
    return save_cascade(tmp_path_factory.mktemp("cascade") / "cas.safetensors", model)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.pop("image_shape"), "image_shape"),
        (lambda c: c.update(image_shape=[1, 10**6, 10**6]), "image_shape"),
        (lambda c: c.update(image_shape="1x8x8"), "image_shape"),
        (lambda c: c["cascade"].update(timesteps=10**10), "timesteps"),
        (lambda c: c["cascade"].update(lam="1"), "lam"),
        (lambda c: c["cascade"].update(lbm=1.0), "lbm"),
        (lambda c: c.update(cascade=[1]), "cascade"),
        (lambda c: c["unet"].update(channels=10**6), "channels"),
    ],
)  # fmt: skip
def test_a_cascade_file_with_a_damaged_config_is_refused(tmp_path, cascade_file, edit, match):
    bad = _v1_model_file(tmp_path, "bad.safetensors", cascade_file, edit)
    with address_space_limit(), pytest.raises(CheckpointError, match=_INVALID.format(match)):
        load_cascade(bad)


@pytest.fixture(scope="module")
def codi_file(tmp_path_factory):
    student = CoDiStudent(EDMUNet(UNetConfig.tiny()), get_condition("lowres4+class", 1), "zero_conv", 10)
    return save_student(tmp_path_factory.mktemp("codi") / "codi.safetensors", student, CoDiConfig())


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.pop("cond_channels"), "cond_channels"),
        (lambda c: c.update(num_classes=10**12), "num_classes"),
        (lambda c: c.update(uses_labels="yes"), "uses_labels"),
        (lambda c: c["codi"].update(intervals=10**10), "intervals"),
        (lambda c: c["codi"].update(condition=5), "condition"),
        (lambda c: c["codi"].update(sigma_max="80"), "sigma_max"),
        (lambda c: c["codi"].update(rho=-7.0), "rho"),
        (lambda c: c.update(codi=None), "codi"),
    ],
)  # fmt: skip
def test_a_codi_file_with_a_damaged_config_is_refused(tmp_path, codi_file, edit, match):
    bad = _v1_model_file(tmp_path, "bad.safetensors", codi_file, edit)
    with address_space_limit(), pytest.raises(CheckpointError, match=_INVALID.format(match)):
        load_student(bad)


def test_cascade_and_codi_configs_check_their_fields():
    with pytest.raises(ValueError, match="unknown CascadeConfig fields \\['lbm'\\]"):
        CascadeConfig.from_dict({"lbm": 1.0})
    with pytest.raises(ValueError, match="timesteps"):
        CascadeConfig(timesteps=2.5)
    with pytest.raises(ValueError, match="label_dropout"):
        CascadeConfig(label_dropout=True)
    with pytest.raises(ValueError, match="intervals"):
        CoDiConfig(intervals=True)
    with pytest.raises(ValueError, match="w_max"):
        CoDiConfig(w_max=math.nan)
    assert CoDiConfig(intervals=np.int64(4)).intervals == 4


def test_a_legacy_typed_model_file_still_loads_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = EDMUNet(UNetConfig.tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    new = save_unet(tmp_path / "new.safetensors", model, provenance="test")
    old = _v1_model_file(tmp_path, "old.safetensors", new, lambda c: None)
    a, b = load_unet(new), load_unet(old)
    assert a.provenance == b.provenance == "test" and a.config == b.config == model.config
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.equal(a(x, sigma), b(x, sigma)) and torch.equal(a(x, sigma), model(x, sigma))


def test_the_shipped_weights_have_their_metadata_checksummed():
    from fastdiff import models

    for path in (models.DIGITS_UNET, models.DIGITS_CLASSIFIER):
        assert checkpoint._read_versioned(path, checkpoint.MODEL_FORMAT)[2] == "2", path
    assert models.get("digits").config == UNetConfig.small()


def test_models_get_refuses_special_paths(tmp_path):
    from fastdiff import models

    fifo = make_fifo(tmp_path / "pipe.safetensors")
    with no_hang(), pytest.raises(CheckpointError, match=r"pipe\.safetensors is not a regular file \(a FIFO"):
        models.get(fifo)
    loop = make_symlink_loop(tmp_path / "loop.safetensors")
    with pytest.raises(CheckpointError, match=r"loop\.safetensors is a symlink loop"):
        models.get(str(loop))
    with pytest.raises(CheckpointError, match="not found"):
        models.get(tmp_path / "missing.safetensors")


# Every bit of a typed model file's header: refused, or the very model that was saved. The default run flips every
# bit of the metadata (the UNet's) or of a sample of it, and of a sample of the tensor entries (a few seconds); the
# slow run flips them all (minutes).
def _strides(meta: int, rest: int):
    quick = pytest.param((meta, rest), id="sampled")
    return pytest.mark.parametrize("strides", [quick, pytest.param((1, 1), id="every", marks=pytest.mark.slow)])


def _description(model) -> tuple:
    """What a typed model file's config sets, besides the weights."""
    names = ("config", "unet_config", "image_shape", "codi_config", "sigma_data", "provenance")
    return tuple(getattr(model, n, None) for n in names)


def _same_model(model):
    want = {k: v.clone() for k, v in model.state_dict().items()}
    described = _description(model)

    def same(got):
        state = got.state_dict()
        weights = state.keys() == want.keys() and all(torch.equal(state[k], v) for k, v in want.items())
        return weights and _description(got) == described

    return same


@_strides(2, 61)
def test_every_header_bit_flip_of_a_unet_file_is_refused_or_harmless(tmp_path, strides):
    path = save_unet(tmp_path / "u.safetensors", EDMUNet(UNetConfig.tiny()))
    with address_space_limit():
        flip_every_bit(path, header_positions(path, *strides), load_unet, _same_model(load_unet(path)))


@_strides(9, 307)
def test_every_header_bit_flip_of_cascade_and_codi_files_is_refused_or_harmless(
    tmp_path, cascade_file, codi_file, strides
):
    for path, load in ((cascade_file, load_cascade), (codi_file, load_student)):
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes())
        with address_space_limit():
            flip_every_bit(copy, header_positions(copy, *strides), load, _same_model(load(path)))
