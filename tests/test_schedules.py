import json

import numpy as np
import pytest
import torch
from test_files_support import make_fifo, make_symlink_loop, no_hang

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


# ------------------------------------------------------------------------------------------ bad input (issue 18)


def _schedule_file(tmp_path, payload, name="s.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def _ok(**extra):
    return {"format": "fastdiff-schedule", "version": 1, "sigmas": [2.0, 1.0, 0.0], **extra}


@pytest.mark.parametrize(
    "payload,match",
    [
        ("[" * 100_000 + "]" * 100_000, "too deeply nested"),
        (_ok(sigmas="2.0, 1.0, 0.0"), "s\\.json: sigmas must be a list of numbers, got a string"),
        (_ok(sigmas=[True, False]), r"s\.json: sigmas\[0\] must be a real number, got True"),
        (_ok(sigmas=["2", "1", "0"]), r"s\.json: sigmas\[0\] must be a real number, got '2'"),
        (_ok(sigmas=[2.0, [1.0], 0.0]), r"\[1\] must be a real number"),
        (_ok(sigmas={"a": 1}), "must be a list of numbers"),
        (_ok(sigmas=None), "must be a list of numbers"),
        ('{"format": "fastdiff-schedule", "sigmas": [2.0, 1e999, 0.0]}', "NaN or Inf"),
        ('{"format": "fastdiff-schedule", "sigmas": [2, 1' + "0" * 5000 + ', 0]}', "not valid JSON"),
        ('{"format": "fastdiff-schedule", "sigmas": [1' + "0" * 400 + ', 0]}', "NaN or Inf|real number"),
        (_ok(eval_sigmas=[True, True, False]), r"s\.json: eval_sigmas\[0\] must be a real number, got True"),
        (_ok(eval_sigmas="x"), "s\\.json: eval_sigmas must be a list of numbers"),
        (_ok(metadata={"solver": "nope", "nfe": 3}), "unknown solver 'nope'"),
        (_ok(metadata={"solver": ["euler"], "nfe": 3}), "solver"),
        (_ok(metadata={"solver": "euler", "nfe": "2"}), "nfe"),
        (_ok(metadata={"solver": "euler", "nfe": True}), "nfe"),
        (_ok(metadata=[1]), "metadata must be a JSON object"),
        ([1, 2], "not a fastdiff schedule file"),
    ],
)  # fmt: skip
def test_bad_schedule_files_name_the_file(tmp_path, payload, match):
    path = _schedule_file(tmp_path, payload)
    for load in (schedules.load, schedules.load_schedule):
        if load is schedules.load and ("eval_sigmas" in match or "solver" in match or "nfe" in match
                                       or "metadata" in match):  # fmt: skip
            continue  # load reads only the sigmas
        with pytest.raises(ValueError, match=match) as info:
            load(path)
        assert str(path) in str(info.value)


def test_a_schedule_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"format": "fastdiff-schedule", "note": "\u00e9", "sigmas": [1.0, 0.0]}'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text"):
        schedules.load(path)


def test_a_fifo_or_a_folder_is_refused_as_a_schedule_without_blocking(tmp_path):
    fifo = make_fifo(tmp_path / "pipe.json")
    with no_hang():
        for load in (schedules.load, schedules.load_schedule, lambda p: schedules.get(str(p), 3, 0.1, 1.0)):
            with pytest.raises(ValueError, match=r"pipe\.json is not a regular file \(a FIFO"):
                load(fifo)
    with pytest.raises(ValueError, match="is a directory"):
        schedules.load(tmp_path)
    with pytest.raises(ValueError, match="symlink loop"):
        schedules.load(make_symlink_loop(tmp_path / "loop.json"))


def test_validate_names_the_problem_of_odd_inputs():
    with pytest.raises(ValueError, match="sigmas is on the meta device.*readable on the host"):
        schedules.validate(torch.tensor([2.0, 1.0, 0.0], device="meta"))
    with pytest.raises(ValueError, match=r"sigmas\[0\] must be a real number, got 'a'"):
        schedules.validate(["a", "b"])
    with pytest.raises(ValueError, match="sigmas must be a list of numbers, got a string"):
        schedules.validate("2 1 0")
    with pytest.raises(ValueError, match=r"sigmas\[1\] must be a real number, got False"):
        schedules.validate([1.0, False])
    with pytest.raises(TypeError, match="sigmas must be real numbers, got dtype torch.bool"):
        schedules.validate(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="sigmas must be real numbers, got dtype bool"):
        schedules.validate(np.array([True, False]))
    s = schedules.validate([np.float32(2.0), torch.tensor(1.0), np.int64(0)])
    assert s.dtype == torch.float64 and s.tolist() == [2.0, 1.0, 0.0]
    assert schedules.validate(np.array([2.0, 0.5, 0.0])).tolist() == [2.0, 0.5, 0.0]


def test_sampler_refuses_a_meta_schedule_clearly(gmm):
    import fastdiff

    with pytest.raises(ValueError, match="meta device"):
        fastdiff.Sampler(gmm, sigmas=torch.tensor([2.0, 1.0, 0.0], device="meta"))


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
def test_schedule_helpers_take_numpy_and_tensor_numbers(name):
    want = schedules.get(name, 5, 0.002, 80.0)
    for n, lo, hi in [(np.int64(5), np.float64(0.002), np.float32(80.0)), (torch.tensor(5), torch.tensor(0.002),
                                                                          torch.tensor(80))]:  # fmt: skip
        got = schedules.get(name, n, lo, hi)
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="the number of steps n must be a positive integer, got True"):
        schedules.get(name, True, 0.002, 80.0)
    with pytest.raises(ValueError, match="sigma_min must be a real number, got True"):
        schedules.get(name, 5, True, 80.0)
    with pytest.raises(ValueError, match="n must be a positive integer, got 5.0"):
        schedules.get(name, 5.0, 0.002, 80.0)
    with pytest.raises(ValueError, match="sigma_max must be a real number"):
        schedules.get(name, 5, 0.002, torch.tensor([80.0, 1.0]))


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the 0/0 that the check catches
def test_ld3_refuses_non_finite_or_saturated_xi():
    for bad in (float("nan"), float("inf"), -float("inf")):
        xi = torch.ones(6, dtype=torch.float64)
        xi[2] = bad
        with pytest.raises(ValueError, match=r"xi contains NaN or Inf at positions \[2\]"):
            schedules.ld3_sigmas(xi, 0.002, 80.0)
    for pos in (0, 3, 5):  # one huge weight: the other steps vanish below float precision
        xi = torch.zeros(6, dtype=torch.float64)
        xi[pos] = 1e4
        with pytest.raises(ValueError, match="xi is saturated"):
            schedules.ld3_sigmas(xi, 0.002, 80.0)
    xi = torch.tensor([0.0, 30.0, 0.0, 0.0], dtype=torch.float64)  # extreme, but still strictly decreasing
    schedules.validate(schedules.ld3_sigmas(xi, 0.002, 80.0))
    with pytest.raises(ValueError, match="xi is saturated"):
        schedules.ld3_sigmas(torch.tensor([0.0, 30.0, 0.0, 0.0]), 0.002, 80.0)  # float32 cannot hold it


def test_a_saved_schedule_carries_a_checksum_that_sees_any_edit(tmp_path):
    path = tmp_path / "learned.json"
    schedules.save(path, torch.tensor([80.0, 40.0, 0.5, 0.0]), solver="euler", nfe=3)
    payload = json.loads(path.read_text())
    assert payload["version"] == 2 and len(payload["sha256"]) == 64
    text = path.read_text()
    for old, new in [
        ("40.0", "50.0"),
        ('"nfe": 3', '"nfe": 4'),
        ('"metadata"', '"metadata_"'),
        ('"version": 2', '"version": 1'),
    ]:
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ValueError, match=f"{path} is corrupt: its contents do not match the checksum"):
            schedules.load_schedule(path)
    path.write_text(text.replace('"sha256"', '"sha257"'))  # a version-2 file must have its checksum
    with pytest.raises(ValueError, match="corrupt"):
        schedules.load(path)
    path.write_text(json.dumps({"format": "fastdiff-schedule", "version": 1, "sigmas": [3.0, 1.0, 0.0]}))
    assert schedules.load(path).tolist() == [3.0, 1.0, 0.0]  # hand-written files need no checksum
