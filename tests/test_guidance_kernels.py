"""The per-sample guidance ops (guidance methods in the fused step) on every backend against their references,
and the fused method path against each method's pure-torch guided estimate."""

import pytest
import torch
from _backends import ran_on

from fastdiff import Guidance, ops
from fastdiff.guidance import guided_estimate, method_weights

DTYPE_PAIRS = [(tx, td) for tx, tds in ops.KERNEL_DTYPES.items() for td in tds]
KERNEL_BACKENDS = [b for b in ("cpu", "triton") if b in ops.available_backends()]
# [B, ...] shapes: per-sample sizes that are and are not multiples of every vector width, and one sample.
SHAPES = [(3, 4, 8, 8), (2, 97), (1, 1025), (5, 1)]


def _inputs(shape, tx, td, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda dtype: (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)  # noqa: E731
    return make(tx), make(td), make(td), [make(tx) for _ in range(3)], make(tx)


def _weights(batch, width, dtype, seed=1):
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _tolerance(same: torch.Tensor, ref: torch.Tensor, dtype) -> float:
    """Twice the error of the reference in the inputs' own dtypes, plus one rounding of the output."""
    return 2 * (same.double() - ref).abs().max().item() + 4 * torch.finfo(dtype).eps * ref.abs().max().item()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tx,td", DTYPE_PAIRS, ids=str)
def test_guidance_sums_match_reference(backend, shape, tx, td, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x, dc, du, _, _ = _inputs(shape, tx, td)
    mix = _weights(shape[0], 6, ops.acc_dtype(x))
    with ran_on(backend):
        got = ops.guidance_sums(x, dc, du, mix)
    assert got.shape == (shape[0], ops.N_SUMS) and got.dtype == ops.acc_dtype(x)
    ref = ops.guidance_sums_reference(x.double(), dc.double(), du.double(), mix.double())
    same = ops.guidance_sums_reference(x, dc, du, mix)
    assert (got.double() - ref).abs().max().item() <= _tolerance(same, ref, ops.acc_dtype(x)) * shape[-1] ** 0.5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tx,td", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("n_history", [0, 3])
@pytest.mark.parametrize("device_coef", [False, True], ids=["host_coef", "tensor_coef"])
def test_per_sample_step_matches_reference(backend, shape, tx, td, n_history, device_coef, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    x, dc, du, history, noise = _inputs(shape, tx, td)
    history = history[:n_history]
    coef = [0.7, 0.0, 0.4, -0.4, 0.35, 0.3, -0.2, 0.15, 0.05][: 6 + n_history]
    guide = _weights(shape[0], 3, ops.acc_dtype(x))
    given = torch.tensor(coef, dtype=ops.acc_dtype(x)) if device_coef else coef
    with ran_on(backend):
        x_next, e = ops.guided_step_per_sample(x, dc, du, history, given, guide, noise)
    assert x_next.dtype == tx and e.dtype == tx and x_next.shape == x.shape
    up = lambda t: t.double()  # noqa: E731
    ref = ops.guided_step_per_sample_reference(up(x), up(dc), up(du), [up(h) for h in history], coef, up(guide),
                                               up(noise))  # fmt: skip
    same = ops.guided_step_per_sample_reference(x, dc, du, history, coef, guide, noise)
    for got, r, s in zip((x_next, e), ref, same):
        assert (got.double() - r).abs().max().item() <= _tolerance(s, r, tx)


def test_per_sample_ops_refuse_bad_weights():
    x, dc, du, _, _ = _inputs((2, 8), torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"mix must be \[B, 6\]"):
        ops.guidance_sums(x, dc, du, torch.zeros(3, 6))
    with pytest.raises(ValueError, match="guide must be torch.float32"):
        ops.guided_step_per_sample(x, dc, du, [], [1.0, 0, 0, 1, 0, 0.0], torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        ops.guidance_sums(x, dc, du[:, :4], torch.zeros(2, 6))


METHOD_CASES = [
    Guidance(3.0, method="rescale", phi=0.7),
    Guidance(3.0, method="apg", eta=0.2, norm_threshold=5.0),
    Guidance(3.0, method="apg", eta=0.0, momentum=-0.5, norm_threshold=4.0),
    Guidance(3.0, method="cfg_zero_star"),
]


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("guidance", METHOD_CASES, ids=repr)
@pytest.mark.parametrize("per_sample_sigma", [False, True], ids=["sigma", "sigma_per_sample"])
def test_fused_method_equals_guided_estimate(backend, guidance, per_sample_sigma, monkeypatch):
    """method_weights + the per-sample step give each method's guided estimate (float64), over three evaluations
    so that APG's momentum is carried."""
    monkeypatch.setenv("FASTDIFF_BACKEND", backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64) * 2
    sigma = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64) if per_sample_sigma else 1.7
    state_ref, state = {}, {}
    for _ in range(3):
        dc, du = torch.randn_like(x), torch.randn_like(x)
        ref = guided_estimate(guidance, x, sigma, dc, du, state_ref)
        u, guide = method_weights(guidance, x, sigma, dc, du, state)
        _, e = ops.guided_step_per_sample(x, dc, u, [], [0.0, 0.0, 0.0, 1.0, 0.0, 1.0], guide)
        assert (e - ref).abs().max().item() <= 1e-12 * ref.abs().max().item()
