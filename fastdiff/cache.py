"""Feature caching: reuse part of a network's computation from an earlier evaluation, on a plan fixed in advance.

Two forms, each a :class:`Cache` that ``fastdiff.sample``, :class:`fastdiff.Sampler` and ``sample_pipeline`` take
as ``cache=`` (an object, or a spec string as the CLI takes it, :func:`parse`):

* :class:`DeepCache` (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free"): a UNet's shallow blocks
  run at every evaluation; its deep blocks (the encoder below the first level, the middle, the decoder above the
  last level) run only on full evaluations, and cached ones reuse their outputs. ``"deepcache:N"``: every N-th
  evaluation is full.
* :class:`FirstBlockCache` (First-Block-Cache, as diffusers and ParaAttention ship it): the first block runs at
  every evaluation; where its output changed by less than ``threshold`` (relative mean absolute change) since the
  last full evaluation, the rest is skipped. A transformer adds the cached residual of the skipped blocks to the
  first block's output; a UNet reuses its deep blocks' outputs as DeepCache does. ``"first_block:T"`` decides
  from a calibration run and freezes the decisions into a plan (:meth:`FirstBlockCache.calibrate`);
  ``"first_block:T:dynamic"`` decides at every evaluation, which reads a value back to the host (a sync) and so
  refuses ``cuda_graph=True``.

Either takes ``taylor=True`` (``":taylor"``): a cached evaluation extrapolates the cached outputs to first order from
the last two full evaluations (TaylorSeer, Liu et al. 2025) instead of reusing the last ones as they are.

**The plan.** Evaluation ``k`` of a run (the k-th call of the conditional model: every stage of every step, Heun's
second evaluation included) is full or cached by ``plan[k]``, fixed before the run, so that the loop branches only
on host values and a cached loop is captured in a CUDA graph like any other. Caches are kept per pass: the
conditional and the unconditional pass each reuse their own features (a batched cond+uncond call stores and reuses
both halves), and a pass with nothing cached yet (the first guided step of an interval) is evaluated in full.

**Adapters.** :func:`adapter_for` finds the network inside a model (``EDMUNet``, ``VPDenoiser`` and the pipeline
wrappers included) and names its blocks: fastdiff's :class:`~fastdiff.models.unet.UNet`, diffusers'
``UNet2DModel`` and ``UNet2DConditionModel`` (DeepCache and first-block), ``DiTTransformer2DModel`` (first-block).
Cached blocks are not called at all: while a run lasts, each is replaced by a stand-in that returns its stored
output on cached evaluations and calls the block (and stores its output) on full ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastdiff.arguments import as_int, as_real

# ------------------------------------------------------------------------------------------------- the caches


class Cache:
    """Which evaluations of a run are full, and how a cached one reuses the network's features (base class)."""

    kind = ""
    taylor = False
    dynamic = False

    def plan(self, evaluations: int) -> list[bool] | None:
        """``[evaluations]``: True where the evaluation is full; None for a cache that decides as it runs."""
        raise NotImplementedError

    def spec(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()!r})"


class DeepCache(Cache):
    """Every ``interval``-th evaluation full (the first included), the others reuse the deep blocks' outputs.

    Args:
        interval: N >= 1; 1 is no caching (every evaluation full, the same result as no cache).
        taylor: extrapolate the cached outputs from the last two full evaluations (first order).
    """

    kind = "deepcache"

    def __init__(self, interval: int, *, taylor: bool = False):
        self.interval = as_int(interval, "deepcache interval", 1)
        self.taylor = bool(taylor)

    def plan(self, evaluations: int) -> list[bool]:
        return [k % self.interval == 0 for k in range(evaluations)]

    def spec(self) -> str:
        return f"deepcache:{self.interval}" + (":taylor" if self.taylor else "")


class FirstBlockCache(Cache):
    """Skip all but the first block where its output changed little since the last full evaluation.

    Args:
        threshold: the relative mean absolute change of the first block's output (over the whole batch) below
            which an evaluation is cached; 0 caches nothing.
        dynamic: decide at every evaluation (one host read each: no CUDA graph). Otherwise the decisions come from
            a calibration run (:meth:`calibrate`, run by the samplers on the first ``calibration`` noises of their
            first batch) and are frozen into a plan.
        calibration: how many of the first batch's samples the calibration run takes.
        max_cached: at most this many cached evaluations in a row (the change is measured against the last full
            evaluation, so drift accumulates).
        taylor: as :class:`DeepCache`.
    """

    kind = "first_block"

    def __init__(
        self,
        threshold: float,
        *,
        dynamic: bool = False,
        calibration: int = 4,
        max_cached: int = 3,
        taylor: bool = False,
    ):
        self.threshold = as_real(threshold, "first_block threshold")
        if self.threshold < 0:
            raise ValueError(f"first_block threshold must be >= 0, got {threshold!r}")
        self.dynamic = bool(dynamic)
        self.calibration = as_int(calibration, "calibration samples", 1)
        self.max_cached = as_int(max_cached, "max_cached", 0)
        self.taylor = bool(taylor)
        self.calibrated: list[bool] | None = None
        self._recorder: _Recorder | None = None  # set while a calibration run records its decisions

    def plan(self, evaluations: int) -> list[bool] | None:
        if self.dynamic or self.calibrated is None:
            return None
        if len(self.calibrated) != evaluations:
            raise ValueError(f"this FirstBlockCache was calibrated for {len(self.calibrated)} evaluations, the run "
                             f"makes {evaluations}; calibrate it again (or use a new one)")  # fmt: skip
        return list(self.calibrated)

    def decide(self, change: float, cached_in_a_row: int) -> bool:
        """Whether an evaluation whose first block changed by ``change`` runs in full."""
        return change > self.threshold or cached_in_a_row >= self.max_cached

    def calibrate(self, run) -> list[bool]:
        """Run ``run()`` (a sampling run with this cache in dynamic mode, recording) and freeze its decisions."""
        self.calibrated = None
        recorder = _Recorder()
        with _recording(self, recorder):
            run()
        self.calibrated = [recorder.decisions[k] for k in range(len(recorder.decisions))]
        return self.calibrated

    def spec(self) -> str:
        return f"first_block:{self.threshold:g}" + (":dynamic" if self.dynamic else "") + (
            ":taylor" if self.taylor else "")  # fmt: skip


@dataclass
class _Recorder:
    """A calibration run's decisions by evaluation: full where any of its calls (the passes) was full."""

    decisions: dict[int, bool] = field(default_factory=dict)

    def record(self, k: int, full: bool) -> None:
        self.decisions[k] = self.decisions.get(k, False) or full


@contextlib.contextmanager
def _recording(cache: FirstBlockCache, recorder: _Recorder):
    old = cache.dynamic, cache._recorder
    cache.dynamic, cache._recorder = True, recorder
    try:
        yield
    finally:
        cache.dynamic, cache._recorder = old


def parse(spec: str | Cache | None) -> Cache | None:
    """A cache from its spec string: ``deepcache:N``, ``first_block:T``, each optionally followed by ``:taylor``,
    and ``first_block:T:dynamic``; a :class:`Cache` passes through, None is no cache."""
    if spec is None or isinstance(spec, Cache):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"cache must be a fastdiff.cache.Cache or a spec string, got {type(spec).__name__}")
    kind, _, rest = spec.strip().partition(":")
    parts = rest.split(":") if rest else []
    forms = "deepcache:N[:taylor], first_block:T[:dynamic][:taylor]"
    if kind not in ("deepcache", "first_block") or not parts:
        raise ValueError(f"cache spec {spec!r}: expected one of {forms}")
    flags = set(parts[1:])
    allowed = {"taylor"} | ({"dynamic"} if kind == "first_block" else set())
    if flags - allowed or len(flags) != len(parts) - 1:
        raise ValueError(f"cache spec {spec!r}: unknown or repeated options {parts[1:]}; expected one of {forms}")
    try:
        value = float(parts[0])
    except ValueError:
        raise ValueError(f"cache spec {spec!r}: {parts[0]!r} is not a number; expected one of {forms}") from None
    if kind == "deepcache":
        if not value.is_integer():
            raise ValueError(f"cache spec {spec!r}: the interval must be an integer >= 1")
        return DeepCache(int(value), taylor="taylor" in flags)
    return FirstBlockCache(value, dynamic="dynamic" in flags, taylor="taylor" in flags)


def needs_calibration(cache: Cache | None, evaluations: int) -> bool:
    """Whether ``cache`` is a calibrated first-block cache without a plan for a run of ``evaluations``."""
    return (isinstance(cache, FirstBlockCache) and not cache.dynamic
            and (cache.calibrated is None or len(cache.calibrated) != evaluations))  # fmt: skip


def calibration_inputs(cache: FirstBlockCache, x: torch.Tensor, cond: dict, uncond: dict):
    """The first ``cache.calibration`` samples of ``x`` and the batched tensors among the keyword arguments."""
    c, b = min(cache.calibration, x.shape[0]), x.shape[0]

    def cut(kwargs: dict) -> dict:
        return {k: v[:c] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b else v
                for k, v in kwargs.items()}  # fmt: skip

    return x[:c], cut(cond), cut(uncond)


# ------------------------------------------------------------------------------------------------ the adapters


@dataclass
class Blocks:
    """Where a network's computation is cut, each block given as ``(parent, attribute or index, block)``, the slot a
    stand-in takes. ``signal``: the first block, whose output decides a first-block cache; ``cached``: the blocks a
    cached evaluation does not call, in call order; ``residual``: a transformer's
    form, where the cached blocks are a chain from the signal block's output and a cached evaluation adds their
    stored residual (``last output - signal output``) to the signal's output (else each cached block's stored
    output stands in for it: a UNet's)."""

    signal: tuple[nn.Module, str, nn.Module]
    cached: list[tuple[nn.Module, str, nn.Module]]
    residual: bool = False


def _children(parent: nn.Module, name: str) -> list[tuple[nn.Module, str, nn.Module]]:
    seq = getattr(parent, name)
    return [(seq, str(i), block) for i, block in enumerate(seq)]


def _fastdiff_unet(net) -> Blocks:
    """fastdiff's UNet: the shallow blocks are the first level's down blocks and the last level's up blocks."""
    cfg = net.config
    per_block = 2 if 0 in cfg.attention_levels else 1
    down = cfg.num_blocks * per_block
    up = (cfg.num_blocks + 1) * per_block
    if len(cfg.channel_mult) < 2:
        raise ValueError("DeepCache needs a UNet with at least two levels (channel_mult of length >= 2)")
    downs = _children(net, "down")
    return Blocks(downs[0], downs[down:] + _children(net, "mid") + _children(net, "up")[: len(net.up) - up])


def _diffusers_unet(net) -> Blocks:
    """diffusers' UNet2DModel and UNet2DConditionModel: the first down block and the last up block are shallow."""
    downs = _children(net, "down_blocks")
    cached = downs[1:]
    if getattr(net, "mid_block", None) is not None:
        cached.append((net, "mid_block", net.mid_block))
    cached += _children(net, "up_blocks")[:-1]
    if len(net.down_blocks) < 2:
        raise ValueError("DeepCache needs a UNet with at least two down blocks")
    return Blocks(downs[0], cached)


def _diffusers_transformer(net) -> Blocks:
    slots = _children(net, "transformer_blocks")
    if len(slots) < 2:
        raise ValueError("first-block caching needs a transformer with at least two blocks")
    return Blocks(slots[0], slots[1:], residual=True)


def _known() -> list[tuple[type, Any, str]]:
    """(network class, adapter, name) for every network family with an adapter, the importable ones."""
    from fastdiff.models.unet import UNet

    known = [(UNet, _fastdiff_unet, "fastdiff UNet")]
    try:
        import diffusers
    except ImportError:
        return known
    known += [(diffusers.UNet2DModel, _diffusers_unet, "UNet2DModel"),
              (diffusers.UNet2DConditionModel, _diffusers_unet, "UNet2DConditionModel"),
              (diffusers.DiTTransformer2DModel, _diffusers_transformer, "DiTTransformer2DModel")]  # fmt: skip
    return known


def adapter_for(model, cache: Cache) -> Blocks:
    """The :class:`Blocks` of the one network inside ``model`` that has an adapter; raises a ValueError naming the
    supported families when there is none (or more than one)."""
    known = _known()
    modules = model.modules() if isinstance(model, nn.Module) else []
    found = {id(m): (m, adapt) for m in modules for cls, adapt, _ in known if type(m) is cls}
    names = ", ".join(name for _, _, name in known)
    if len(found) != 1:
        what = "no network" if not found else f"{len(found)} networks"
        raise ValueError(f"cache={cache.spec()!r}: found {what} with a cache adapter in {type(model).__name__}; "
                         f"supported: {names}")  # fmt: skip
    net, adapt = next(iter(found.values()))
    blocks = adapt(net)
    if cache.kind == "deepcache" and blocks.residual:
        raise ValueError(f"DeepCache reuses a UNet's deep features; {type(net).__name__} is a transformer: use "
                         "first_block:T")  # fmt: skip
    return blocks


# ---------------------------------------------------------------------------------------------------- a run


def _split(value, half: int, part: int):
    """The ``part`` (0 or 1) batch half of a block's output (a tensor or a tuple of them)."""
    if isinstance(value, torch.Tensor):
        return value[part * half : (part + 1) * half]
    return type(value)(_split(v, half, part) for v in value)


def _join(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return type(a)(_join(u, v) for u, v in zip(a, b))


def _combine(fn, *values):
    """``fn`` applied leaf by leaf to outputs of the same structure."""
    if isinstance(values[0], torch.Tensor):
        return fn(*values)
    return type(values[0])(_combine(fn, *leaves) for leaves in zip(*values))


class _Store:
    """One block's stored outputs for one pass: the last full evaluation's (and, for TaylorSeer, the one before),
    with their evaluation indices."""

    def __init__(self):
        self.last = self.previous = None
        self.k_last = self.k_previous = -1

    def put(self, value, k: int) -> None:
        self.previous, self.k_previous = self.last, self.k_last
        self.last, self.k_last = value, k

    def get(self, k: int, taylor: bool = False):
        if not taylor or self.previous is None:
            return self.last
        t = (k - self.k_last) / (self.k_last - self.k_previous)
        return _combine(lambda f1, f0: f1 + t * (f1 - f0), self.last, self.previous)


class CacheRun:
    """One sampling run's cache state: the plan, what each pass has stored, and the evaluation in progress. The
    sampling loop calls :meth:`at` before each model call; the installed stand-ins read it."""

    def __init__(self, cache: Cache, evaluations: int, batch: int):
        self.cache, self.batch = cache, batch
        self.plan = cache.plan(evaluations)
        self.stores: dict[tuple[int, str], _Store] = {}  # (block index, pass) -> outputs; -1: the signal block
        self.full_count = self.cached_count = 0
        self.k, self.passes, self.full = 0, ("cond",), True
        self.last_full: dict[str, int] = {}  # pass -> its last full evaluation
        self._cached_in_a_row = 0
        self._signal_now = None  # the first block's output at this evaluation

    def at(self, k: int, passes: Sequence[str]) -> None:
        """Evaluation ``k`` of the conditional model begins, for ``passes`` (``("cond",)``, ``("uncond",)`` or a
        batched ``("cond", "uncond")``)."""
        self.k, self.passes = k, tuple(passes)
        ready = all(p in self.last_full for p in self.passes)
        if self.plan is not None:
            self.full = self.plan[k] or not ready
            self._count()
        else:
            self.full = None if ready else True  # decided by the signal block (dynamic), or full
            if self.full:
                self._count()

    def counts(self) -> tuple[int, int]:
        """``(full, cached)`` forward calls of the cached network so far."""
        return self.full_count, self.cached_count

    def _count(self) -> None:
        if self.full:
            self.full_count += 1
            for p in self.passes:
                self.last_full[p] = self.k
        else:
            self.cached_count += 1

    # --- the stand-ins' side

    def _store(self, index: int, value) -> None:
        if len(self.passes) == 1:
            self.stores.setdefault((index, self.passes[0]), _Store()).put(value, self.k)
            return
        half = self.batch
        for part, p in enumerate(self.passes):
            self.stores.setdefault((index, p), _Store()).put(_split(value, half, part), self.k)

    def _stored(self, index: int):
        taylor = self.cache.taylor and index >= 0  # the first block's own output is compared, not extrapolated
        values = [self.stores[(index, p)].get(self.k, taylor) for p in self.passes]
        return values[0] if len(values) == 1 else _join(*values)

    def signal(self, value) -> None:
        """The first block's output ``value`` at this evaluation: decides a dynamic evaluation, and is kept for
        a transformer's residual and the next decision."""
        if self.full is None:  # dynamic: compare with the last full evaluation's first-block output
            before = self._stored(-1)
            change = ((value - before).abs().mean() / before.abs().mean().clamp_min(1e-12)).item()
            self.full = self.cache.decide(change, self._cached_in_a_row)
            self._count()
        recorder = getattr(self.cache, "_recorder", None)  # DeepCache has none
        if recorder is not None:
            recorder.record(self.k, self.full)
        self._cached_in_a_row = 0 if self.full else self._cached_in_a_row + 1
        if self.full:
            self._store(-1, value)
        self._signal_now = value


class _Wrapper(nn.Module):
    """A block in the network's place that answers for it: networks read their blocks' attributes as they run
    (diffusers' UNets: ``block.resnets``, ``block.has_cross_attention``)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _StandIn(_Wrapper):
    """A cached block: on a full evaluation the block itself (its output stored), on a cached one its stored output
    (a UNet's block), or the first block's output plus the stored residual (the first cached block of a
    transformer) or its input unchanged (the other cached blocks of a transformer)."""

    def __init__(self, block: nn.Module, run: CacheRun, index: int, residual: bool, first: bool, last: bool):
        super().__init__()
        self.block, self.run, self.index = block, run, index
        self.residual, self.first, self.last = residual, first, last

    def forward(self, *args, **kwargs):
        run = self.run
        if run.full:
            out = self.block(*args, **kwargs)
            if not self.residual:
                run._store(self.index, out)
            elif self.last:  # the residual of the cached chain, from the first block's output
                run._store(0, _combine(lambda o, s: o - s, out, run._signal_now))
            return out
        if not self.residual:
            return run._stored(self.index)
        if self.first:
            return _combine(lambda s, r: s + r, run._signal_now, run._stored(0))
        return args[0] if args else next(iter(kwargs.values()))


class _Signal(_Wrapper):
    def __init__(self, block: nn.Module, run: CacheRun):
        super().__init__()
        self.block, self.run = block, run

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        self.run.signal(out[0] if isinstance(out, tuple) else out)
        return out


def _set(parent: nn.Module, name: str, module: nn.Module) -> None:
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


@contextlib.contextmanager
def attached(cache: Cache, blocks: Blocks, evaluations: int, batch: int) -> Iterator[CacheRun]:
    """Install ``cache``'s stand-ins in the network's ``blocks`` (:func:`adapter_for`) for one run of
    ``evaluations`` evaluations of batch ``batch`` (per pass), and remove them afterwards."""
    run = CacheRun(cache, evaluations, batch)
    uses_signal = cache.kind == "first_block" or blocks.residual
    originals = list(blocks.cached)
    for i, (parent, name, block) in enumerate(originals):
        _set(parent, name, _StandIn(block, run, i, blocks.residual, i == 0, i == len(originals) - 1))
    parent, name, signal = blocks.signal
    if uses_signal:
        _set(parent, name, _Signal(signal, run))
    try:
        yield run
    finally:
        for slot in originals:
            _set(*slot)
        if uses_signal:
            _set(parent, name, signal)


__all__ = ["Cache", "DeepCache", "FirstBlockCache", "parse", "adapter_for", "attached", "CacheRun", "Blocks"]
