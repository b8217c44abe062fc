"""fastdiff.sample: callbacks, stats, dtypes, and a clear error for every kind of bad input."""

import pytest
import torch

import fastdiff
from fastdiff import schedules

S = schedules.karras(4, 0.01, 10.0)


def test_callback_receives_each_step(gmm, noise):
    seen = []
    out = fastdiff.sample(gmm, noise * 10, S, solver="heun", callback=seen.append)
    assert [d["i"] for d in seen] == [0, 1, 2, 3]
    assert [d["sigma"] for d in seen] == S[:-1].tolist()
    assert all(d["x"].shape == noise.shape and d["denoised"].shape == noise.shape for d in seen)
    assert torch.equal(seen[-1]["x_next"], out)
    assert torch.allclose(seen[0]["denoised"], gmm(noise * 10, torch.full((64,), 10.0, dtype=torch.float64)))


def test_progress_bar_and_stats(gmm, noise, capsys):
    out, stats = fastdiff.sample(gmm, noise, S, progress=True, return_stats=True)
    assert stats.steps == 4 and stats.nfe == stats.nfe_cond == 4 and stats.forward_calls == 4
    assert "fastdiff dpmpp_2m" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_state_keeps_its_dtype(gmm, noise, dtype):
    out = fastdiff.sample(gmm, (noise * 10).to(dtype), S, solver="unipc")
    ref = fastdiff.sample(gmm, noise * 10, S, solver="unipc")
    assert out.dtype == dtype
    assert (out.double() - ref).abs().max() < (1e-4 if dtype == torch.float32 else 5e-2)


def test_any_tensor_shape(gmm):
    x = torch.randn(6, 1, 2, 1, dtype=torch.float64) * 10
    out = fastdiff.sample(gmm, x, S, solver="dpmpp_3m")
    assert out.shape == x.shape
    assert torch.allclose(out.reshape(6, 2), fastdiff.sample(gmm, x.reshape(6, 2), S, solver="dpmpp_3m"))


class Bad:
    def __init__(self, kind):
        self.kind = kind

    def __call__(self, x, sigma):
        if self.kind == "shape":
            return x[:, :1]
        if self.kind == "dtype":
            return x.long()
        if self.kind == "nan":
            return torch.full_like(x, float("nan"))
        return "not a tensor"


@pytest.mark.parametrize(
    "model,exc,match",
    [
        (Bad("shape"), ValueError, "model returned shape \\(64, 1\\), expected x's shape \\(64, 2\\)"),
        (Bad("dtype"), TypeError, "returned dtype torch.int64"),
        (Bad("type"), TypeError, "model returned str"),
        ("not callable", TypeError, "model must be callable"),
    ],
)
def test_bad_models(noise, model, exc, match):
    with pytest.raises(exc, match=match):
        fastdiff.sample(model, noise, S)


def test_nan_check_is_optional(noise):
    with pytest.raises(FloatingPointError, match="NaN or Inf at step 0 \\(sigma=10\\)"):
        fastdiff.sample(Bad("nan"), noise, S, check_finite=True)
    assert fastdiff.sample(Bad("nan"), noise, S).isnan().all()


def test_bad_inputs(gmm, noise):
    with pytest.raises(TypeError, match="x must be a tensor"):
        fastdiff.sample(gmm, noise.tolist(), S)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        fastdiff.sample(gmm, noise.long(), S)
    with pytest.raises(ValueError, match="non-empty batch"):
        fastdiff.sample(gmm, noise[:0], S)
    with pytest.raises(ValueError, match="strictly decreasing"):
        fastdiff.sample(gmm, noise, S.flip(0))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fastdiff.sample(gmm, noise, torch.tensor([10.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="unknown solver 'dpm'"):
        fastdiff.sample(gmm, noise, S, solver="dpm")
    with pytest.raises(TypeError, match="guidance must be a fastdiff.Guidance"):
        fastdiff.sample(gmm, noise, S, guidance=2.0)


def test_model_output_on_another_device_is_refused(noise):
    meta = lambda x, sigma: torch.empty_like(x, device="meta")  # noqa: E731
    with pytest.raises(ValueError, match="returned a tensor on meta, but x is on cpu"):
        fastdiff.sample(meta, noise, S)


def test_sigmas_on_another_device_are_refused(gmm):
    with pytest.raises(ValueError, match="sigmas are on meta but x is on cpu"):
        fastdiff.sample(gmm, torch.randn(4, 2), S.to("meta"))


# ------------------------------------------------------------------------------------------ cond and uncond


def _labels(n):
    return {"class_labels": torch.arange(n) % 4}


@pytest.mark.parametrize("bad", [torch.arange(64), [("class_labels", torch.arange(64))], "labels"])
def test_cond_that_is_not_a_dict_is_refused(gmm, noise, bad):
    g = fastdiff.Guidance(2.0)
    for kw in ({"cond": bad}, {"cond": _labels(64), "uncond": bad}):
        name = "cond" if kw["cond"] is bad else "uncond"
        with pytest.raises(TypeError, match=f"^{name} must be a dict of keyword arguments for the model"):
            fastdiff.sample(gmm, noise, S, guidance=g, **kw)
        with pytest.raises(TypeError, match=f"^{name} must be a dict of keyword arguments for the model"):
            fastdiff.Sampler(gmm, sigmas=S, guidance=g).sample(noise, **kw)


@pytest.mark.parametrize("batch", [1, 63, 128])
def test_cond_tensor_of_another_batch_is_refused_by_name(gmm, noise, batch):
    """Caught before the first model call, with the key named, rather than inside the model (or broadcast)."""
    calls = []

    def spy(x, sigma, **kw):
        calls.append(1)
        return gmm(x, sigma, **kw)

    g = fastdiff.Guidance(2.0)
    wrong = {"class_labels": torch.arange(batch) % 4}
    msg = rf"\['class_labels'\] has shape \({batch},\): its first dimension must be the batch of x \(64\)"
    with pytest.raises(ValueError, match="cond" + msg):
        fastdiff.sample(spy, noise, S, guidance=g, cond=wrong)
    with pytest.raises(ValueError, match="^uncond" + msg):
        fastdiff.Sampler(spy, sigmas=S, guidance=g).sample(noise, _labels(64), wrong)
    assert calls == []


def test_batch_independent_cond_values_pass(gmm, noise):
    """0-d tensors and non-tensor values are not per sample; they reach the model as they are."""
    seen = []

    def model(x, sigma, class_labels=None, temperature=None, tag=None):
        seen.append((temperature.ndim, tag))
        return gmm(x, sigma, class_labels=class_labels)

    cond = {**_labels(64), "temperature": torch.tensor(1.0), "tag": "c"}
    out = fastdiff.sample(model, noise, S, cond=cond)
    assert torch.isfinite(out).all() and set(seen) == {(0, "c")}


def test_numpy_and_tensor_numbers_are_numbers_for_the_sampler(gmm, noise):
    np = pytest.importorskip("numpy")
    s = fastdiff.Sampler(gmm, sigmas=S, shape=(np.int64(64), torch.tensor(2)), warmup=np.int32(1))
    assert s.shape == (64, 2) and s.warmup == 1 and type(s.warmup) is int
    with pytest.raises(ValueError, match="warmup must be a non-negative integer"):
        fastdiff.Sampler(gmm, sigmas=S, warmup=True)
    with pytest.raises(ValueError, match="shape entries must be a positive integer, got 2.5"):
        fastdiff.Sampler(gmm, sigmas=S, shape=(64, 2.5))
