import json

import pytest
import torch

from fastdiff import schedules


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_shape_order_and_endpoints(name, n):
    s = schedules.get(name, n, 0.002, 80.0)
    assert s.shape == (n + 1,) and s.dtype == torch.float64
    assert s[-1] == 0 and (s[1:] < s[:-1]).all()
    assert torch.isclose(s[0], torch.tensor(80.0, dtype=torch.float64))
    if n > 1:
        assert torch.isclose(s[-2], torch.tensor(0.002, dtype=torch.float64))


def test_karras_matches_the_edm_formula():
    s = schedules.karras(4, 0.002, 80.0, rho=7.0)
    i = torch.arange(4, dtype=torch.float64)
    expected = (80.0 ** (1 / 7) + i / 3 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert torch.allclose(s[:-1], expected)


def test_logsnr_uniform_is_uniform_in_log_sigma():
    s = schedules.logsnr_uniform(9, 0.01, 10.0)[:-1]
    steps = s.log().diff()
    assert torch.allclose(steps, steps[0].expand_as(steps))


def test_time_uniform_is_uniform_in_vp_time():
    s = schedules.time_uniform(6, 0.05, 50.0)[:-1]
    t = schedules.vp_sigma_to_t(s)
    assert torch.allclose(t.diff(), t.diff()[0].expand(5))
    assert torch.allclose(schedules.vp_t_to_sigma(t), s)


@pytest.mark.parametrize(
    "bad,match",
    [
        ([3.0, 2.0, 2.0, 0.0], "strictly decreasing"),
        ([1.0, 2.0, 0.0], "strictly decreasing"),
        ([3.0, float("nan"), 0.0], "NaN or Inf at positions \\[1\\]"),
        ([float("inf"), 1.0, 0.0], "NaN or Inf"),
        ([1.0], "at least 2 entries"),
        ([[1.0, 0.0]], "1-D"),
        ([1.0, -0.5], "negative"),
    ],
)
def test_validate_refuses_bad_schedules(bad, match):
    with pytest.raises(ValueError, match=match):
        schedules.validate(torch.tensor(bad, dtype=torch.float64))


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError, match="positive integer"):
        schedules.karras(0, 0.002, 80.0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        schedules.karras(5, 80.0, 0.002)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.get("cosine", 5, 0.002, 80.0)


def test_save_and_load_roundtrip(tmp_path):
    s = schedules.karras(7, 0.002, 80.0)
    path = tmp_path / "learned.json"
    schedules.save(path, s, solver="ipndm", note="test")
    assert torch.equal(schedules.load(path), s)
    assert json.loads(path.read_text())["metadata"] == {"solver": "ipndm", "note": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["learned.json"]  # no temporary left behind


def test_load_refuses_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        schedules.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        schedules.load(bad)
    bad.write_text(json.dumps({"sigmas": [1.0, 0.0]}))
    with pytest.raises(ValueError, match="not a fastdiff schedule file"):
        schedules.load(bad)
    bad.write_text(json.dumps({"format": "fastdiff-schedule", "sigmas": [1.0, 2.0, 0.0]}))
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedules.load(bad)


@pytest.mark.parametrize("space", ["logsnr", "time"])
def test_ld3_parameterisation(space):
    ones = torch.ones(9, dtype=torch.float64)
    s = schedules.ld3_sigmas(ones, 0.002, 80.0, space=space)
    expected = (
        schedules.logsnr_uniform(9, 0.002, 80.0)[:-1]
        if space == "logsnr"
        else torch.linspace(80, 0.002, 9, dtype=torch.float64)
    )
    assert torch.allclose(s, expected.double(), rtol=1e-12)
    xi = torch.randn(9, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    s = schedules.ld3_sigmas(xi, 0.002, 80.0, space=space, append_zero=True)
    assert s.shape == (10,) and s[-1] == 0 and torch.allclose(s[[0, -2]], torch.tensor([80.0, 0.002]).double())
    schedules.validate(s.detach())
    assert torch.autograd.gradcheck(lambda v: schedules.ld3_sigmas(v, 0.002, 80.0, space=space), (xi,))


def test_ld3_errors():
    with pytest.raises(ValueError, match="1-D float tensor"):
        schedules.ld3_sigmas(torch.ones(1), 0.1, 1.0)
    with pytest.raises(ValueError, match="space must be"):
        schedules.ld3_sigmas(torch.ones(4), 0.1, 1.0, space="sigma")
