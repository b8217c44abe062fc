"""Seeded Brownian motion that can be queried at any time, in any order: the noise of the SDE samplers.

:class:`BrownianTree` builds a Brownian motion ``W`` on ``[t0, t1]`` with ``W(t0) = 0`` lazily, by recursive
bisection. ``W(t1) = sqrt(t1 - t0) z_0``; an interval ``[a, b]`` whose ends are known gets its midpoint from the
Brownian bridge,

    W(m) = (W(a) + W(b)) / 2 + sqrt(b - a) / 2 * z_node,     m = (a + b) / 2,

which has the exact conditional law of ``W(m)`` given ``W(a)`` and ``W(b)`` (variance ``(m - a)(b - m) / (b - a)``).
Each normal ``z_node`` comes from its own generator, seeded by a hash of ``(seed, node id)``, so the value at a
point is a function of the seed and the point alone: it does not depend on which points were asked for before,
or in which order. Below the tolerance the path is linear between the two nearest nodes.

:class:`BrownianTreeNoiseSampler` turns a tree over the noise levels into the unit-variance noise an SDE sampler
adds per step, ``(W(t') - W(t)) / sqrt(|t' - t|)``. Because every step reads increments of one path, a schedule
with N steps and one with 2N steps see the same Brownian path, and their samples converge to the same solution.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

__all__ = ["BrownianTree", "BrownianTreeNoiseSampler", "DEFAULT_DEPTH"]

DEFAULT_DEPTH = 32  # default tolerance: leaves of width (t1 - t0) / 2**32


def _node_seed(seed: int, node: int) -> int:
    """A 63-bit generator seed for one node, from a cryptographic hash (stable across platforms and runs)."""
    digest = hashlib.blake2b(f"fastdiff.brownian:{seed}:{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _time(t: float | torch.Tensor, name: str = "t") -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(t.shape)}")
        t = t.item()
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"{name} must be finite, got {t}")
    return t


class BrownianTree:
    """A seeded Brownian motion ``W`` on ``[t0, t1]``, ``W(t0) = 0``, with values shaped like ``x_like``.

    Args:
        x_like: a tensor ``[B, ...]`` whose shape, dtype and device the returned values take.
        t0, t1: the time interval, ``t0 < t1`` (finite).
        seed: an int for one path of the whole shape, or a sequence of ``B`` ints, one independent path per batch
            element (element ``b``'s path then depends only on ``seed[b]``, not on its position or on ``B``).
            None draws an int from torch's global generator.
        tol: the bisection stops at intervals no wider than ``tol``; below it ``W`` is linear between the two
            nodes around a point. Default ``(t1 - t0) / 2**32``. Its effect: an increment over an interval of
            length ``dt`` has variance ``dt (1 - delta)`` with ``0 <= delta <= tol / (2 dt)`` (the part of the
            bridge inside the two partly covered leaves is missing), so any interval much longer than ``tol``
            has the right law, and increments over intervals shorter than ``tol`` are too small. With the default
            a query descends 32 levels; each level that is not cached costs one normal draw of ``x_like``'s size.
        cache_size: how many node values are kept (least recently used are dropped first). Values do not depend
            on the cache, only the time does. Default ``2 * depth + 8``, enough to keep two root-to-leaf paths,
            so that a sampler stepping through ``t_0, t_1, ...`` never draws a node twice. Memory:
            ``cache_size * x_like.numel() * 8`` bytes.

    The normals are drawn by torch's CPU generator in float32 (five times faster than float64, and far more
    precise than any sampler needs), so the path does not depend on the device or dtype of ``x_like``; the path
    is built and kept in float64, and :meth:`__call__` and :meth:`at` convert the result to ``x_like``'s dtype and
    device at the end. Increments are differences of point values, so ``W(a, c) = W(a, b) + W(b, c)`` holds to
    float64 rounding. Besides the nodes, the last 4 points asked for are kept.
    """

    def __init__(
        self,
        x_like: torch.Tensor,
        t0: float | torch.Tensor,
        t1: float | torch.Tensor,
        seed: int | Sequence[int] | None = None,
        *,
        tol: float | None = None,
        cache_size: int | None = None,
    ):
        if not isinstance(x_like, torch.Tensor) or x_like.ndim < 1:
            raise ValueError("x_like must be a tensor with a batch dimension [B, ...]")
        self.t0, self.t1 = _time(t0, "t0"), _time(t1, "t1")
        if not self.t0 < self.t1:
            raise ValueError(f"a Brownian tree needs t0 < t1, got t0={self.t0:g}, t1={self.t1:g}")
        self.shape, self.dtype, self.device = tuple(x_like.shape), x_like.dtype, x_like.device
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()))
        try:
            self.batched = isinstance(seed, Sequence) or (isinstance(seed, torch.Tensor) and seed.ndim > 0)
            self.seeds = [operator.index(s) for s in seed] if self.batched else [operator.index(seed)]
        except TypeError:
            raise TypeError(f"seed must be an int, a sequence of ints or None, got {seed!r}") from None
        if self.batched and len(self.seeds) != self.shape[0]:
            raise ValueError(f"per-element seeds: got {len(self.seeds)} seeds for a batch of {self.shape[0]}")
        span = self.t1 - self.t0
        self.tol = span * 2.0**-DEFAULT_DEPTH if tol is None else float(tol)
        if not (self.tol > 0 and math.isfinite(self.tol)):
            raise ValueError(f"tol must be positive, got {tol}")
        self.depth = max(0, math.ceil(math.log2(span / self.tol)))
        self.cache_size = 2 * self.depth + 8 if cache_size is None else int(cache_size)
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # node id -> W(midpoint)
        self._points: OrderedDict[float, torch.Tensor] = OrderedDict()  # the last few points asked for
        self._zero = torch.zeros(self.shape, dtype=torch.float64)
        self._end = math.sqrt(span) * self._normal(0)  # W(t1); node 0 is reserved for it

    def _normal(self, node: int) -> torch.Tensor:
        """The standard normals of one node, drawn in float32 on the CPU and returned as float64, shaped like
        ``x_like``."""
        if not self.batched:
            g = torch.Generator().manual_seed(_node_seed(self.seeds[0], node))
            return torch.randn(self.shape, generator=g).double()
        rows = []
        for s in self.seeds:
            g = torch.Generator().manual_seed(_node_seed(s, node))
            rows.append(torch.randn(self.shape[1:], generator=g))
        return torch.stack(rows).double()

    def _midpoint(self, node: int, a: float, b: float, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
        """``W((a + b) / 2)`` for the interval ``[a, b]`` numbered ``node`` (root 1, children 2n and 2n + 1)."""
        w = self._cache.get(node)
        if w is not None:
            self._cache.move_to_end(node)
            return w
        w = 0.5 * (wa + wb) + (0.5 * math.sqrt(b - a)) * self._normal(node)
        self._cache[node] = w
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return w

    def _check(self, t: float) -> float:
        # A point a rounding error outside (a transform evaluated twice) is read at the end it belongs to.
        slack = 1e-12 * max(abs(self.t0), abs(self.t1))
        if not self.t0 - slack <= t <= self.t1 + slack:
            raise ValueError(f"Brownian tree queried at t={t:g}, outside its interval [{self.t0:g}, {self.t1:g}]")
        return min(max(t, self.t0), self.t1)

    def value64(self, t: float | torch.Tensor) -> torch.Tensor:
        """``W(t)`` as float64 on the CPU, shape of ``x_like``."""
        t = self._check(_time(t))
        w = self._points.get(t)
        if w is None:
            w = self._points[t] = self._descend(t)
            if len(self._points) > 4:
                self._points.popitem(last=False)
        return w

    def _descend(self, t: float) -> torch.Tensor:
        a, b, wa, wb, node = self.t0, self.t1, self._zero, self._end, 1
        for _ in range(self.depth):
            if t == a or t == b:
                break
            m = 0.5 * (a + b)
            if not a < m < b:  # float resolution reached
                break
            wm = self._midpoint(node, a, b, wa, wb)
            if t == m:
                return wm
            if t < m:
                b, wb, node = m, wm, 2 * node
            else:
                a, wa, node = m, wm, 2 * node + 1
        if t == a:
            return wa
        if t == b:
            return wb
        return wa + ((t - a) / (b - a)) * (wb - wa)

    def increment64(self, s: float | torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """``W(t) - W(s)`` as float64 on the CPU (either order of ``s`` and ``t``)."""
        w_s = self.value64(s)
        return self.value64(t) - w_s

    def at(self, t: float | torch.Tensor) -> torch.Tensor:
        """``W(t)``, shape, dtype and device of ``x_like``."""
        return self.value64(t).to(device=self.device, dtype=self.dtype)

    def __call__(self, s: float | torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """The increment ``W(t) - W(s)``, shape, dtype and device of ``x_like``; ``s > t`` gives the negated
        increment of ``[t, s]``."""
        return self.increment64(s, t).to(device=self.device, dtype=self.dtype)


def _identity(sigma: torch.Tensor) -> torch.Tensor:
    return sigma


class BrownianTreeNoiseSampler:
    """Unit-variance noise for an SDE step from one seeded Brownian path over the noise levels.

    ``noise_sampler(sigma, sigma_next)`` returns ``(W(t') - W(t)) / sqrt(|t' - t|)`` with ``t = transform(sigma)``,
    ``t' = transform(sigma_next)``: a standard normal tensor shaped like ``x``, and the increments of
    consecutive steps are independent. Two schedules over the same range read the same path, so a run with N
    steps and one with 2N steps are two discretisations of one SDE solution.

    Args:
        x: ``[B, ...]``, the state; the noise takes its shape, dtype and device.
        sigma_min, sigma_max: the range of noise levels that will be queried (the smallest positive sigma of a
            schedule and its first).
        seed: an int, a list of ``B`` ints (one path per batch element), or None to draw one from torch's
            global generator; see :class:`BrownianTree`.
        transform: the time of a noise level, applied to a float64 0-d tensor (identity by default: time is
            sigma). It must be monotonic on ``[sigma_min, sigma_max]``.
        **tree_options: ``tol`` and ``cache_size`` of :class:`BrownianTree`.

    The normals are fastdiff's own (hashed per-node generators): k-diffusion's ``BrownianTreeNoiseSampler``
    (torchsde) gives the same distribution and the same consistency across step counts, not the same numbers for
    the same seed.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: float | torch.Tensor,
        sigma_max: float | torch.Tensor,
        seed: int | Sequence[int] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] = _identity,
        **tree_options,
    ):
        if not callable(transform):
            raise TypeError("transform must be callable, mapping a noise level to a time")
        self.transform = transform
        t0, t1 = sorted((self._t(sigma_min), self._t(sigma_max)))
        self.tree = BrownianTree(x, t0, t1, seed, **tree_options)

    def _t(self, sigma: float | torch.Tensor) -> float:
        return _time(self.transform(torch.tensor(_time(sigma, "sigma"), dtype=torch.float64)), "transform(sigma)")

    def __call__(self, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
        t, t_next = self._t(sigma), self._t(sigma_next)
        if t == t_next:
            raise ValueError(f"noise for an empty interval: transform(sigma) = transform(sigma_next) = {t:g}")
        w = self.tree.increment64(t, t_next) / math.sqrt(abs(t_next - t))
        return w.to(device=self.tree.device, dtype=self.tree.dtype)
