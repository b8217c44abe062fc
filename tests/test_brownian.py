"""The seeded Brownian tree: determinism, order independence, additivity, the law of its increments, per-element
seeds, the tolerance's effect, and the noise sampler built on it.

Statistical checks average over n independent normals (the elements of a large tensor). A sample mean of n
standard normals has standard deviation 1/sqrt(n) and a sample variance sqrt(2/n); the bounds are 5 of those
standard deviations, which a correct tree exceeds with probability below 1e-6 per check. The seeds are fixed,
so every run draws the same numbers: the bounds say why the check is not a coincidence of the seed.
"""

import math
import random

import pytest
import torch

from fastdiff.brownian import BrownianTree, BrownianTreeNoiseSampler

pytestmark = pytest.mark.usefixtures("one_thread")

N = 32768  # normals per statistical check
MEAN_TOL = 5 / math.sqrt(N)  # 0.028
VAR_TOL = 5 * math.sqrt(2 / N)  # 0.039


@pytest.fixture(scope="module")
def big():
    return torch.zeros(8, N // 8, dtype=torch.float64)


def _points(k, t0=0.0, t1=10.0, seed=0):
    rng = random.Random(seed)
    return [t0 + (t1 - t0) * rng.random() for _ in range(k)] + [t0, t1, 0.5 * (t0 + t1)]


def test_same_seed_same_path_in_any_query_order():
    x = torch.zeros(3, 5, dtype=torch.float64)
    pts = _points(40)
    first = BrownianTree(x, 0.0, 10.0, seed=7)
    values = {t: first.at(t) for t in pts}
    shuffled = pts[:]
    random.Random(1).shuffle(shuffled)
    for tree in (BrownianTree(x, 0.0, 10.0, seed=7), BrownianTree(x, 0.0, 10.0, seed=7, cache_size=1)):
        for t in reversed(shuffled):  # another order, and with a cache that forgets at once
            assert torch.equal(tree.at(t), values[t])
    other = BrownianTree(x, 0.0, 10.0, seed=8)
    assert not torch.equal(other.at(pts[0]), values[pts[0]])
    assert torch.equal(first.at(0.0), torch.zeros_like(x))  # W(t0) = 0


def test_increments_add_up():
    tree = BrownianTree(torch.zeros(4, 100, dtype=torch.float64), 0.002, 80.0, seed=3)
    for a, b, c in [(0.002, 1.0, 80.0), (0.5, 0.5000001, 0.7), (3.0, 17.0, 17.5)]:
        whole, parts = tree(a, c), tree(a, b) + tree(b, c)
        assert (whole - parts).abs().max() < 1e-12 * whole.abs().max()
        assert torch.equal(tree(c, a), -tree(a, c))  # s > t: the increment of [t, s], negated


def test_increments_are_standard_normal_and_independent(big):
    tree = BrownianTree(big, 0.0, 1.0, seed=11)
    bounds = [0.0, 0.013, 0.2, 0.21, 0.6, 1.0]
    zs = []
    for s, t in zip(bounds, bounds[1:]):
        z = tree(s, t) / math.sqrt(t - s)
        assert abs(z.mean().item()) < MEAN_TOL, (s, t)
        assert abs(z.var().item() - 1) < VAR_TOL, (s, t)
        zs.append(z.flatten())
    # Disjoint intervals, adjacent or not: the sample correlation of independent normals has std 1/sqrt(n).
    for j in range(len(zs)):
        for k in range(j + 1, len(zs)):
            corr = torch.corrcoef(torch.stack([zs[j], zs[k]]))[0, 1].item()
            assert abs(corr) < MEAN_TOL, (j, k, corr)


@pytest.mark.parametrize("s,t", [(0.002, 80.0), (0.002, 0.003), (1.0, 1.01), (30.0, 31.5), (79.0, 79.9)])
def test_variance_of_an_increment_is_its_length(big, s, t):
    tree = BrownianTree(big, 0.002, 80.0, seed=5)
    var = tree(s, t).var().item()
    assert abs(var / (t - s) - 1) < VAR_TOL


def test_covariance_is_brownian(big):
    # Cov(W(s), W(t)) = min(s, t) - t0: the values at two times share the part of the path up to the earlier one.
    tree = BrownianTree(big, 1.0, 5.0, seed=2)
    ws, wt = tree.at(2.0).flatten(), tree.at(4.5).flatten()
    cov = (ws * wt).mean().item()
    # (ws * wt) has variance Var(ws) Var(wt) + Cov^2 = 1 * 3.5 + 1 = 4.5 per element.
    assert abs(cov - 1.0) < 5 * math.sqrt(4.5 / N)


def test_per_element_seeds():
    x = torch.zeros(3, 1000, dtype=torch.float64)
    tree = BrownianTree(x, 0.0, 1.0, seed=[10, 20, 30])
    swapped = BrownianTree(x[:2], 0.0, 1.0, seed=[30, 10])  # another batch size and other positions
    for t in (0.25, 0.7, 1.0):
        w, w2 = tree.at(t), swapped.at(t)
        assert torch.equal(w2[0], w[2]) and torch.equal(w2[1], w[0])
        assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    # Each element is its own path: the elements of one time are uncorrelated across seeds.
    a, b = tree(0.0, 1.0)[0], tree(0.0, 1.0)[1]
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(1000)


def test_tolerance_effect_is_as_documented():
    # Leaves of [0, 1] with tol = 0.1 have width 1/16; inside a leaf W is linear, so an increment over dt within
    # one leaf of width L is (dt / L) * (W(leaf end) - W(leaf start)): variance dt^2 / L instead of dt.
    tree = BrownianTree(torch.zeros(1, N, dtype=torch.float64), 0.0, 1.0, seed=1, tol=0.1)
    assert tree.depth == 4
    leaf, dt = 1 / 16, 0.01
    var = tree(0.0, dt).var().item()
    assert abs(var / (dt**2 / leaf) - 1) < VAR_TOL
    # An interval of whole leaves is exact.
    assert abs(tree(0.25, 0.5).var().item() / 0.25 - 1) < VAR_TOL


def test_output_follows_x_like_and_path_does_not_depend_on_it():
    w64 = BrownianTree(torch.zeros(2, 50, dtype=torch.float64), 0.0, 2.0, seed=4)(0.3, 1.7)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = BrownianTree(torch.zeros(2, 50, dtype=dtype), 0.0, 2.0, seed=4)(0.3, 1.7)
        assert w.dtype == dtype and w.device == w64.device
        assert torch.equal(w, w64.to(dtype))


def test_cache_stays_bounded():
    tree = BrownianTree(torch.zeros(2, 3), 0.0, 1.0, seed=0)
    for t in torch.linspace(1, 0, 200).tolist():
        tree.at(t)
    assert len(tree._cache) <= tree.cache_size == 2 * tree.depth + 8


def test_bad_input():
    x = torch.zeros(2, 3)
    tree = BrownianTree(x, 0.5, 2.0, seed=0)
    for t in (0.4, 2.1, -1.0):
        with pytest.raises(ValueError, match=r"queried at t=.*outside its interval \[0.5, 2\]"):
            tree.at(t)
    with pytest.raises(ValueError, match="outside its interval"):
        tree(1.0, 3.0)
    with pytest.raises(ValueError, match="needs t0 < t1"):
        BrownianTree(x, 1.0, 1.0)
    with pytest.raises(ValueError, match="must be finite"):
        BrownianTree(x, 0.0, float("inf"))
    with pytest.raises(ValueError, match="got 3 seeds for a batch of 2"):
        BrownianTree(x, 0.0, 1.0, seed=[1, 2, 3])
    with pytest.raises(TypeError, match="seed must be an int"):
        BrownianTree(x, 0.0, 1.0, seed=1.5)
    with pytest.raises(ValueError, match="tol must be positive"):
        BrownianTree(x, 0.0, 1.0, tol=0.0)


# ---------------------------------------------------------------------------------------------- noise sampler


def test_noise_sampler_is_unit_normal_and_one_path_across_step_counts(big):
    ns = BrownianTreeNoiseSampler(big, 0.002, 80.0, seed=9)
    z = ns(80.0, 10.0)
    assert z.shape == big.shape and z.dtype == big.dtype
    assert abs(z.mean().item()) < MEAN_TOL and abs(z.var().item() - 1) < VAR_TOL
    # A coarse step's noise is the normalised sum of the fine steps' noises: the same Brownian path.
    s0, s1, s2 = 5.0, 2.0, 0.002
    coarse = ns(s0, s2) * math.sqrt(s0 - s2)
    fine = ns(s0, s1) * math.sqrt(s0 - s1) + ns(s1, s2) * math.sqrt(s1 - s2)
    assert (coarse - fine).abs().max() < 1e-12 * coarse.abs().max()
    # Tensors as k-diffusion passes them (0-d, float32) read the same times.
    assert torch.equal(ns(torch.tensor(80.0), torch.tensor(10.0)), z)


def test_noise_sampler_transform_and_seed():
    x = torch.zeros(4, 500, dtype=torch.float64)
    # A decreasing transform (time = -log sigma) works too: the interval is sorted.
    ns = BrownianTreeNoiseSampler(x, 0.01, 10.0, seed=3, transform=lambda s: -s.log())
    z = ns(10.0, 1.0)
    direct = ns.tree(-math.log(10.0), -math.log(1.0)) / math.sqrt(math.log(10.0))
    assert (z - direct).abs().max() < 1e-12
    torch.manual_seed(123)
    a = BrownianTreeNoiseSampler(x, 0.01, 10.0)(3.0, 2.0)
    torch.manual_seed(123)
    b = BrownianTreeNoiseSampler(x, 0.01, 10.0)(3.0, 2.0)
    assert torch.equal(a, b)  # seed None: drawn from torch's global generator
    with pytest.raises(ValueError, match="outside its interval"):
        BrownianTreeNoiseSampler(x, 0.01, 10.0, seed=0)(20.0, 5.0)
    with pytest.raises(ValueError, match="empty interval"):
        BrownianTreeNoiseSampler(x, 0.01, 10.0, seed=0)(2.0, 2.0)
