"""The training loop every fastdiff trainer (EDM, Cas-DM, SADM, CoDi, LD3) runs: one loop, exact resume.

A trainer supplies a model, a loss and a dataset; :func:`train` does everything else:

- **Data order.** Each epoch is a permutation drawn from a generator seeded by ``(seed, epoch)``. In a
  distributed run rank ``r`` takes every ``world_size``-th index of it, after the tail is cut so every rank
  has the same count, and each rank cuts its shard into whole batches of ``batch_size`` (the per-process batch;
  the global batch is ``batch_size * world_size``); a partial last batch is dropped. Datasets are indexed
  directly (no DataLoader, no workers): fastdiff's training sets are small and preloaded, and direct indexing
  makes "epoch and batch position" all the state a resume needs. A ``Tensor`` or ``TensorDataset`` is sliced in
  one indexing op; any other map-style dataset is read item by item and collated with ``default_collate``.
- **Randomness.** ``loss_fn(model, batch, generator)`` gets a ``torch.Generator`` on the model's device, owned by
  the runtime, and must draw ALL its randomness from it (noise, sigmas, label dropout). Its state, torch's
  global CPU (and CUDA) RNG state (dropout layers use it), the data position, the model, the EMA and the AdamW
  moments all go into the checkpoint, so a resumed run is bitwise identical to an uninterrupted one (on the CPU
  with deterministic ops). A fresh run seeds torch's global RNG from ``(seed, rank)``.
- **Optimisation.** AdamW with optional linear warmup of the learning rate; gradient clipping by global norm
  (the pre-clip norm is logged); optional bf16 autocast (``amp``) around ``loss_fn``; an EMA of the weights
  updated after every optimizer step.
- **Distributed.** Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is created (gloo on the CPU,
  nccl on CUDA), the model is wrapped in ``DistributedDataParallel``, and only rank 0 writes checkpoints, logs
  and the progress bar. Every rank reads the checkpoint on resume, so the run directory must be on a file
  system all ranks see.
- **A second player.** An :class:`Adversary` (SADM's structure discriminator) has its own AdamW and loss. Before
  a model step it makes its updates on the same batch, with the model frozen; during the model step its own
  parameters are frozen. Both players, both optimizers and every RNG go into the checkpoint.
- **One run per directory.** Rank 0 holds an OS lock (``flock``) on ``out_dir/.fastdiff-run.lock`` for the whole
  run, so a second run on the same directory is refused with the first one's pid, host, start time and command,
  instead of deleting its files in flight and resuming from its checkpoints. The kernel drops the lock when its
  holder dies, even by SIGKILL, so a killed run never blocks the next; the other ranks of a DDP run do not lock,
  they learn rank 0's verdict. :func:`keep_run_locks` keeps the lock past :func:`train` while the caller writes
  its exports.
- **Output** in ``out_dir``: checkpoints (see :mod:`fastdiff.checkpoint`), ``log.csv`` (one row every
  ``log_every`` steps; on resume the rows after the resumed step are cut, so no step appears twice) and, with
  ``tensorboard=True``, TensorBoard event files in ``out_dir/tensorboard``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import errno
import hashlib
import io
import json
import math
import os
import shlex
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from fastdiff import checkpoint as ckpt
from fastdiff.arguments import number

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

LossFn = Callable[[nn.Module, Any, torch.Generator], tuple[torch.Tensor, Mapping[str, Any]]]
AdversaryLossFn = Callable[[nn.Module, nn.Module, Any, torch.Generator], tuple[torch.Tensor, Mapping[str, Any]]]
RUN_KIND = "fastdiff-train"
_BASE_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "time_s")


# --------------------------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def distributed_context(device: str | torch.device | None = None) -> DistContext:
    """Rank, world size, local rank and device of this process, without side effects.

    Read from ``torch.distributed`` when a process group exists, otherwise from the variables ``torchrun`` sets
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a plain ``python`` run is rank 0 of 1. The device is ``device``
    when given, else ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU. The sampler's multi-GPU
    sharding uses the same function, so training and sampling agree on who does what.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    local = _env_int("LOCAL_RANK", 0)
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", local % torch.cuda.device_count())
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def init_distributed(device: str | torch.device | None = None) -> tuple[DistContext, bool]:
    """Create the process group when ``WORLD_SIZE > 1`` and none exists yet; return ``(context, created)``.

    The backend is nccl for a CUDA device and gloo otherwise; rendezvous is ``env://`` (``MASTER_ADDR`` and
    ``MASTER_PORT``, as ``torchrun`` sets them). ``created`` tells the caller it owns the group and should
    ``torch.distributed.destroy_process_group()`` it at the end.
    """
    ctx = distributed_context(device)
    if ctx.world_size == 1 or dist.is_initialized():
        return ctx, False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={ctx.world_size} but this torch build has no torch.distributed")
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    dist.init_process_group(backend="nccl" if ctx.device.type == "cuda" else "gloo", init_method="env://")
    return distributed_context(ctx.device), True


# --------------------------------------------------------------------------------------------- config and state


@dataclass
class TrainConfig:
    """Settings of one training run. ``batch_size`` is per process; ``steps`` counts optimizer steps."""

    steps: int
    batch_size: int
    lr: float = 2e-4
    seed: int = 0
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    amp: bool = False  # bf16 autocast around loss_fn (CPU and CUDA)
    checkpoint_every: int = 500
    log_every: int = 10
    out_dir: str = "runs/x"
    keep: int = 2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    tensorboard: bool = False
    progress: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    device: str | None = None  # None: cuda:<LOCAL_RANK> when available, else cpu

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting. NumPy scalars and 0-d tensors are taken as the Python
        numbers they hold (the checkpoint stores the config as JSON, which knows only those)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "betas" and isinstance(value, (tuple, list)):
                setattr(self, f.name, tuple(number(b) for b in value))
            else:
                setattr(self, f.name, number(value))

        def positive_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {v!r}")

        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "keep"):
            positive_int(name)
        positive_int("warmup_steps", 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay <= 1):
            raise ValueError(f"TrainConfig.ema_decay must lie in [0, 1], got {self.ema_decay!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"TrainConfig.grad_clip must be None or a finite number > 0, got {self.grad_clip!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ValueError(f"TrainConfig.eps must be > 0, got {self.eps!r}")
        if not str(self.out_dir):
            raise ValueError("TrainConfig.out_dir must be a directory path")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (1-based): a linear ramp over ``warmup_steps``, then ``lr``."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        return self.lr


@dataclass
class Adversary:
    """A second player trained against the model by its own optimizer (a GAN-style discriminator).

    At each model step ``s`` (0-based) with ``s >= start_step`` and ``(s - start_step) % every == 0``, the runtime
    first makes ``updates`` adversary updates, each ``loss_fn(module, model, batch, generator) -> (loss, logs)``
    on the step's batch (fresh randomness from the generator each time), minimised by the adversary's AdamW; the
    model's parameters are frozen meanwhile (``loss_fn`` should also run the model under ``torch.no_grad()``).
    Then the model takes its step, with the adversary's parameters frozen, so gradients flow through the
    adversary into the model's outputs but never into the adversary's weights. So ascent (the adversary's
    updates) changes only the adversary, and descent only the model.

    ``active`` is set by the runtime before every step: True from model step ``start_step`` on. A model loss that
    adds an adversarial term reads it, which makes ``start_step`` a warm-up on the model's own loss alone that a
    resumed run reproduces. The adversary's logs are written with an ``adv_`` prefix (``adv_loss`` is its
    loss), from its latest update.
    """

    module: nn.Module
    loss_fn: AdversaryLossFn
    lr: float = 2e-4
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    updates: int = 1
    every: int = 1
    start_step: int = 0
    active: bool = field(default=False, init=False)

    def validate(self) -> None:
        """Raise ``ValueError`` or ``TypeError`` naming the first bad setting."""
        if not isinstance(self.module, nn.Module) or not _trainable(self.module):
            raise ValueError("Adversary.module must be an nn.Module with trainable parameters")
        if not callable(self.loss_fn):
            raise TypeError(f"Adversary.loss_fn must be callable, got {type(self.loss_fn).__name__}")
        for name, minimum in (("updates", 1), ("every", 1), ("start_step", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"Adversary.{name} must be an integer >= {minimum}, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"Adversary.lr must be a finite number > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"Adversary.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"Adversary.grad_clip must be None or a finite number > 0, got {self.grad_clip!r}")

    def plays_at(self, step: int) -> bool:
        """Whether the adversary updates before model step ``step`` (0-based)."""
        return step >= self.start_step and (step - self.start_step) % self.every == 0


@dataclass
class TrainState:
    """Everything :func:`train` holds; returned at the end (rank 0's and every other rank's are identical).

    ``model`` is the bare module (never the DDP wrapper); ``ema`` maps each ``state_dict`` name of the model to
    its EMA in at least float32; ``step`` counts optimizer steps done; ``epoch``/``batch_in_epoch`` is the data
    position of the next batch.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: dict[str, torch.Tensor]
    generator: torch.Generator
    config: TrainConfig
    context: DistContext
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)
    adversary: Adversary | None = None
    adversary_optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    elapsed_s: float = 0.0
    last_logs: dict[str, float] = field(default_factory=dict)
    checkpoint_path: Path | None = None

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a ``state_dict`` in the model's own dtypes and devices."""
        own = self.model.state_dict()
        return {k: v.to(dtype=own[k].dtype, device=own[k].device) for k, v in self.ema.items()}

    def ema_model(self) -> nn.Module:
        """A copy of the model holding the EMA weights, in eval mode, without gradients."""
        m = copy.deepcopy(self.model)
        m.load_state_dict(self.ema_state_dict())
        return m.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- helpers


def _derive_seed(*parts: object) -> int:
    # A stable hash (Python's hash() is salted per process): independent streams for data, noise and dropout.
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _DataOrder:
    """The per-rank batch indices of each epoch (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, seed: int, ctx: DistContext):
        self.n, self.batch_size, self.seed, self.ctx = n, batch_size, seed, ctx
        self.per_rank = n // ctx.world_size
        if batch_size > self.per_rank:
            where = f" over {ctx.world_size} processes" if ctx.distributed else ""
            raise ValueError(
                f"TrainConfig.batch_size={batch_size} is larger than this process's shard of the dataset "
                f"({self.per_rank} of {n} items{where}); lower batch_size"
            )
        self.batches = self.per_rank // batch_size
        self._cached: tuple[int, torch.Tensor] | None = None

    def indices(self, epoch: int, batch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(_derive_seed("data", self.seed, epoch))
            perm = torch.randperm(self.n, generator=g)[: self.per_rank * self.ctx.world_size]
            self._cached = (epoch, perm[self.ctx.rank :: self.ctx.world_size])
        return self._cached[1][batch * self.batch_size : (batch + 1) * self.batch_size]


def _fetch(dataset: Any, idx: torch.Tensor) -> Any:
    if isinstance(dataset, torch.Tensor):
        return dataset[idx.to(dataset.device)]
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx.to(t.device)] for t in dataset.tensors)
    items = [dataset[i] for i in idx.tolist()]
    out = default_collate(items)
    # default_collate turns tuples into lists; keep the (image, label) tuple the dataset returns.
    return tuple(out) if isinstance(items[0], tuple) and isinstance(out, list) else out


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _ema_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


@torch.no_grad()
def _ema_update(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    # ema = decay * ema + (1 - decay) * weight, in the EMA's (>= float32) precision; integer buffers are copied.
    for name, value in model.state_dict().items():
        e = ema[name]
        if e.is_floating_point():
            e.mul_(decay).add_(value.to(e.dtype), alpha=1 - decay)
        else:
            e.copy_(value)


def _grad_norm(params: list[nn.Parameter], clip: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients before clipping; clips them in place to ``clip`` when given."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _allreduce_grads(params: list[nn.Parameter], world: int) -> None:
    # DDP syncs the model; extra trainable modules (a discriminator, say) are averaged here. A missing grad
    # counts as zero so that every rank joins the same collectives.
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        p.grad = g.div_(world)


def _gather_state(t: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's copy of a small uint8 state tensor (RNG states), gathered on every rank."""
    if not ctx.distributed:
        return [t.cpu()]
    dev = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(dev)
    out = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(out, x)
    return [o.cpu() for o in out]


def _optimizer_payload(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, entry in sd["state"].items():
        for name, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{idx}.{name}"] = v
            else:
                scalars[f"{idx}.{name}"] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _restore_optimizer(
    opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict, prefix: str, hyper: dict, path: Path
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ckpt.CheckpointError(f"{path}: the {prefix} state does not fit this model: {exc}") from None
    # load_state_dict brings back the saved hyper-parameters; the run's settings decide them (lr is set per step).
    for g in opt.param_groups:
        g.update(hyper)


class _CsvLog:
    """``log.csv``, cut back to the rows at or before the resumed step (including a half-written last line).

    The one file fastdiff appends to rather than writing through :func:`fastdiff.checkpoint.atomic_write`: a
    rewrite per row would cost time quadratic in the run's length, and the cut-back above already repairs the torn
    last row a kill leaves. Its rewrites (the cut-back, a new column) are atomic."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.columns: list[str] | None = None
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            kept: list[list[str]] = []
            if rows:
                header = rows[0]
                for row in rows[1:]:
                    try:
                        ok = len(row) == len(header) and int(row[0]) <= resume_step
                    except ValueError:
                        ok = False
                    if ok:
                        kept.append(row)
                self.columns = header if kept else None
            buf = io.StringIO()
            if kept:
                csv.writer(buf).writerows([self.columns, *kept])
            ckpt._write_text_atomic(path, buf.getvalue())
        self._file = open(path, "a", newline="")
        self._writer = csv.writer(self._file)

    def write(self, row: dict[str, float | int]) -> None:
        if self.columns is None:
            self.columns = list(_BASE_COLUMNS) + sorted(k for k in row if k not in _BASE_COLUMNS)
            self._writer.writerow(self.columns)
        elif row.keys() - set(self.columns):
            self._widen(sorted(row.keys() - set(self.columns)))
        try:
            self._writer.writerow(["" if row.get(c) is None else row[c] for c in self.columns])
            self._file.flush()
        except OSError as exc:  # a full disk: name the file, which a buffered write's error does not
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc

    def _widen(self, new: list[str]) -> None:
        # A key that first appears later (an adversary after its warm-up) becomes a new column, blank before.
        self._file.close()
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        self.columns = self.columns + new
        buf = io.StringIO()
        csv.writer(buf).writerows([self.columns, *(r + [""] * len(new) for r in rows)])
        ckpt._write_text_atomic(self.path, buf.getvalue())
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)

    def close(self) -> None:
        self._file.close()


def _open_tensorboard(out_dir: Path, start_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        warnings.warn(
            f"TrainConfig.tensorboard=True but tensorboard cannot be imported ({exc}); not writing it", stacklevel=2
        )
        return None
    # purge_step drops events a killed run wrote after the checkpoint it is resumed from.
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)


def _scalar(value: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else value)
    if t.numel() != 1:
        raise ValueError(f"loss_fn's log {name!r} must be a number or a 1-element tensor, got shape {tuple(t.shape)}")
    return t.float().cpu().reshape(())


def _check_finite(
    loss: torch.Tensor | None, grad_norm: torch.Tensor, step: int, state: TrainState, whose: str = ""
) -> None:
    if (loss is None or torch.isfinite(loss)) and torch.isfinite(grad_norm):
        return
    last = f"; the last checkpoint is {state.checkpoint_path}" if state.checkpoint_path else ""
    shown = "" if loss is None else f"{whose}loss={float(loss)}, "
    raise FloatingPointError(f"training diverged at step {step}: {shown}{whose}grad_norm={float(grad_norm)}{last}")


# --------------------------------------------------------------------------------------------- the run lock


class RunDirectoryInUse(RuntimeError):
    """Another live process is training (or sampling) into the run directory."""


@dataclass
class _RunLock:
    path: Path
    fd: int
    users: int = 1  # train() calls of this process inside it; it is released when the last one ends


_held: dict[str, _RunLock] = {}  # by the directory's real path
_keeping = 0  # depth of keep_run_locks() blocks


def _owner_text(fd: int) -> str:
    """Who holds a lock file, from the record its owner wrote into it."""
    try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        parts = [f"pid {info['pid']} on host {info['host']}", f"started {info['started']}"]
        return ", ".join(parts) + f", command: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its owner record is still being written or unreadable"


def _acquire_run_lock(out_dir: Path) -> _RunLock:
    """Take ``out_dir``'s run lock, or raise :class:`RunDirectoryInUse` naming its holder. Re-entrant within a
    process (the staged Cas-DM recipe, a caller that resumes in the same process)."""
    key = os.path.realpath(out_dir)
    held = _held.get(key)
    if held is not None:
        held.users += 1
        return held
    path = out_dir / ckpt.RUN_LOCK
    if fcntl is None:
        return _RunLock(path, -1)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner_text(fd)
            os.close(fd)
            raise RunDirectoryInUse(
                f"run directory {out_dir} is in use by another training run ({owner}); wait for it to end, or "
                "use another directory"
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # Refusing every run on such a file system would be worse than the risk it guards against.
            warnings.warn(f"cannot lock {path} ({exc.strerror}): this file system has no file locks, so nothing "
                          f"stops a second run from using {out_dir} at the same time", stacklevel=3)  # fmt: skip
            return _RunLock(path, -1)
        # A releasing owner unlinks the file before it lets go: a lock won on an unlinked file guards nothing.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise RunDirectoryInUse(f"could not lock run directory {out_dir}: its lock file keeps being replaced")
    record = {
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
    }  # fmt: skip
    # Written in place: replacing the file (atomic_write) would move the name off the locked inode.
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    lock = _held[key] = _RunLock(path, fd)
    return lock


def _release_run_lock(lock: _RunLock) -> None:
    lock.users -= 1
    if lock.users > 0 or _keeping:
        return
    for key, held in list(_held.items()):
        if held is lock:
            del _held[key]
    if lock.fd < 0:
        return
    # Unlink while still holding it, so that no later run can win a lock on a name that is about to vanish.
    with contextlib.suppress(OSError):
        os.unlink(lock.path)
    os.close(lock.fd)


@contextlib.contextmanager
def keep_run_locks() -> Iterator[None]:
    """Run locks that :func:`train` takes inside this block stay held until it ends, so that what the caller writes
    into the run directory after training (the exported model, plots of log.csv) cannot mix with another run's."""
    global _keeping
    _keeping += 1
    try:
        yield
    finally:
        _keeping -= 1
        if not _keeping:
            for lock in [h for h in _held.values() if h.users == 0]:
                lock.users = 1
                _release_run_lock(lock)


def _broadcast_text(text: str, ctx: DistContext, size: int = 4096) -> str:
    """Rank 0's ``text`` on every rank (one collective; cut to ``size`` bytes)."""
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = torch.zeros(size, dtype=torch.uint8)
    data = text.encode()[:size]
    if ctx.is_main and data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).rstrip(b"\0").decode(errors="replace")


@contextlib.contextmanager
def hold_run_directory(out_dir: str | os.PathLike, ctx: DistContext | None = None) -> Iterator[None]:
    """Hold ``out_dir`` for one run (see :func:`_open_run_dir`) while the block runs: ``fastdiff sample --out-dir``
    takes it as :func:`train` does, so that two runs never merge each other's files."""
    lock = _open_run_dir(Path(out_dir), ctx if ctx is not None else distributed_context())
    try:
        yield
    finally:
        if lock is not None:
            _release_run_lock(lock)


def _open_run_dir(out_dir: Path, ctx: DistContext) -> _RunLock | None:
    """Rank 0 makes ``out_dir``, takes its run lock and clears what killed writers left there; every rank learns
    whether that worked, so that a refused DDP run ends on all ranks instead of hanging at the next collective.
    Returns rank 0's lock (None on the other ranks)."""
    lock, error = None, None
    if ctx.is_main:
        try:
            if out_dir.exists() and not out_dir.is_dir():
                raise NotADirectoryError(f"run directory {out_dir} exists and is not a directory")
            out_dir.mkdir(parents=True, exist_ok=True)
            lock = _acquire_run_lock(out_dir)
            ckpt.remove_stale_temp_files(out_dir)
        except (OSError, RunDirectoryInUse) as exc:
            if lock is not None:
                _release_run_lock(lock)
            error = exc
    if ctx.distributed:
        # Also the barrier: no rank looks into the directory before rank 0 has it, tidy.
        why = _broadcast_text(str(error) if error is not None else "", ctx)
        if why and not ctx.is_main:
            raise RunDirectoryInUse(f"rank 0 could not take the run directory: {why}")
    if error is not None:
        raise error
    return lock


# --------------------------------------------------------------------------------------------- checkpoints


def _save(state: TrainState, n_data: int) -> None:
    """Collective: every rank contributes its RNG states, rank 0 writes, everybody waits for the write."""
    ctx, cfg = state.context, state.config
    rng = {"loss": _gather_state(state.generator.get_state(), ctx), "torch": _gather_state(torch.get_rng_state(), ctx)}
    if ctx.device.type == "cuda":
        rng["cuda"] = _gather_state(torch.cuda.get_rng_state(ctx.device), ctx)
    if ctx.is_main:
        tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in state.ema.items()})
        for name, m in state.extra_modules.items():
            if _trainable(m):
                tensors.update({f"extra.{name}.{k}": v for k, v in m.state_dict().items()})
        opt_tensors, opt_meta = _optimizer_payload(state.optimizer, "optim")
        tensors.update(opt_tensors)
        adv_meta = None
        if state.adversary is not None:
            tensors.update({f"adv.{k}": v for k, v in state.adversary.module.state_dict().items()})
            adv_tensors, adv_meta = _optimizer_payload(state.adversary_optimizer, "adv_optim")
            tensors.update(adv_tensors)
        for kind, per_rank in rng.items():
            tensors.update({f"rng.{kind}.{r}": t for r, t in enumerate(per_rank)})
        meta = {
            "kind": RUN_KIND,
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "world_size": ctx.world_size,
            "dataset_len": n_data,
            "elapsed_s": state.elapsed_s,
            "model_class": type(state.model).__qualname__,
            "config": asdict(cfg),
            "optimizer": opt_meta,
            "adversary_optimizer": adv_meta,
        }
        state.checkpoint_path = ckpt.save_checkpoint(cfg.out_dir, tensors, meta, keep=cfg.keep)
    else:
        state.checkpoint_path = Path(cfg.out_dir) / ckpt.checkpoint_name(state.step)
    if ctx.distributed:
        dist.barrier()


def _resume(state: TrainState, path: Path, n_data: int) -> None:
    tensors, meta = ckpt.load_checkpoint(path)
    if meta.get("kind") != RUN_KIND:
        raise ckpt.CheckpointError(f"{path} is not a fastdiff training-run checkpoint (kind {meta.get('kind')!r})")
    ctx, cfg = state.context, state.config
    ckpt.load_state_into(state.model, tensors, prefix="model.")
    ema_given = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    if ema_given.keys() != state.ema.keys() or any(ema_given[k].shape != v.shape for k, v in state.ema.items()):
        raise ckpt.CheckpointError(f"{path}: the EMA weights do not match the model's parameters and buffers")
    for k, e in state.ema.items():
        e.copy_(ema_given[k])
    for name, m in state.extra_modules.items():
        if _trainable(m):
            ckpt.load_state_into(m, tensors, prefix=f"extra.{name}.")
    hyper = {"betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    _restore_optimizer(state.optimizer, tensors, meta["optimizer"], "optim", hyper, path)
    adv = state.adversary
    saved_adv = meta.get("adversary_optimizer") is not None
    if adv is None and saved_adv:
        raise ckpt.CheckpointError(f"{path} holds an adversary's state, but this run has no adversary")
    if adv is not None and not saved_adv:
        raise ckpt.CheckpointError(f"{path} holds no adversary's state, but this run has an adversary")
    if adv is not None:
        ckpt.load_state_into(adv.module, tensors, prefix="adv.")
        hyper = {"betas": tuple(adv.betas), "eps": cfg.eps, "weight_decay": adv.weight_decay}
        _restore_optimizer(state.adversary_optimizer, tensors, meta["adversary_optimizer"], "adv_optim", hyper, path)

    saved = meta.get("config", {})
    changed = [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in (("seed", cfg.seed), ("batch_size", cfg.batch_size), ("ema_decay", cfg.ema_decay))
        if saved.get(k) != v
    ]
    if meta.get("world_size") != ctx.world_size:
        changed.append(f"world_size: {meta.get('world_size')} -> {ctx.world_size}")
    if meta.get("dataset_len") != n_data:
        changed.append(f"dataset length: {meta.get('dataset_len')} -> {n_data}")
    if changed:
        warnings.warn(
            f"resuming {path} with changed settings ({'; '.join(changed)}): not an exact continuation", stacklevel=2
        )

    for kind in ("loss", "torch", "cuda"):
        t = tensors.get(f"rng.{kind}.{ctx.rank}")
        if t is None:
            continue  # a new rank (world size grew) or a CPU checkpoint resumed on CUDA: keep the fresh seed
        if kind == "loss":
            state.generator.set_state(t)
        elif kind == "torch":
            torch.set_rng_state(t)
        elif ctx.device.type == "cuda":
            torch.cuda.set_rng_state(t, ctx.device)
    state.step, state.epoch, state.batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
    state.elapsed_s = float(meta.get("elapsed_s", 0.0))
    state.checkpoint_path = path


# --------------------------------------------------------------------------------------------- the loop


def _adversary_updates(
    adv: Adversary,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    model: nn.Module,
    batch: Any,
    state: TrainState,
) -> dict[str, torch.Tensor]:
    """``adv.updates`` steps of the adversary on ``batch``; returns the last one's logs (``adv_``-prefixed)."""
    cfg, ctx = state.config, state.context
    model_params = _trainable(model)
    model.requires_grad_(False)
    adv.module.requires_grad_(True)
    adv.module.train()
    try:
        for _ in range(adv.updates):
            with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                loss, logs = adv.loss_fn(adv.module, model, batch, state.generator)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ValueError("Adversary.loss_fn must return a scalar loss tensor and a logs dict")
            optimizer.zero_grad(set_to_none=True)
            loss.float().backward()
            if ctx.distributed:
                _allreduce_grads(params, ctx.world_size)
            grad_norm = _grad_norm(params, adv.grad_clip)
            for g in optimizer.param_groups:
                g["lr"] = adv.lr
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # nothing of the adversary's lingers into the model's step
    finally:
        adv.module.requires_grad_(False)
        for p in model_params:
            p.requires_grad_(True)
    out = {f"adv_{k}": v for k, v in logs.items()}
    out.update(adv_loss=loss.detach(), adv_grad_norm=grad_norm)
    return out


def _mean_over_ranks(logs: Mapping[str, Any], ctx: DistContext) -> dict[str, float]:
    """Each scalar log (a number or a 1-element tensor) averaged over the ranks, as floats; one collective."""
    names = sorted(logs)
    values = torch.stack([_scalar(logs[k], k) for k in names])
    if ctx.distributed:
        values = values.to(ctx.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(values)
        values = values.cpu() / ctx.world_size
    return {k: v.item() for k, v in zip(names, values)}


def train(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Any,
    config: TrainConfig,
    *,
    extra_modules: dict[str, nn.Module] | None = None,
    adversary: Adversary | None = None,
) -> TrainState:
    """Train ``model`` on ``loss_fn`` for ``config.steps`` optimizer steps, resuming from ``config.out_dir``.

    Args:
        model: the network; moved to the run's device. Its trainable parameters are optimised by AdamW.
        loss_fn: ``loss_fn(model, batch, generator) -> (loss, logs)``. ``model`` is the module to call (the
            DDP wrapper in a distributed run: call it, not its submodules, so gradients are synchronised);
            ``batch`` is what the dataset items collate to, on the device (``(images [B, ...], labels [B])``
            for fastdiff's datasets); ``generator`` is the runtime's ``torch.Generator`` on the device, the
            only source of randomness ``loss_fn`` may use. ``loss`` is a scalar tensor; ``logs`` maps names to
            floats or scalar tensors, with the same keys at every step, and is written to the log. A loss that
            needs the run's state defines ``loss_fn.bind(state)``, called once with the :class:`TrainState` before
            the first step (after a resume): CoDi's consistency target reads the EMA weights ``state.ema``.
        dataset: a map-style dataset (``len`` and integer indexing), a ``TensorDataset`` or a tensor whose
            first dimension indexes the items.
        config: the run settings; ``config.out_dir`` holds the checkpoints and logs. If it already holds a
            checkpoint the run continues from it, exactly; a run that already reached ``steps`` returns at once.
            If another live process trains there, :class:`RunDirectoryInUse` names it and nothing is touched.
        extra_modules: other modules ``loss_fn`` uses (through a closure), moved to the device. Those with
            trainable parameters (a discriminator) are optimised by the same AdamW, kept in sync across ranks
            and saved in checkpoints; frozen ones (a distillation teacher) are only moved.
        adversary: a second player with its own optimizer (see :class:`Adversary`), moved to the device, kept
            in sync across ranks and saved in checkpoints with its optimizer.

    Returns the final :class:`TrainState` (its ``ema_model()`` is the usual model to sample from).
    """
    config.validate()
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    try:
        n_data = len(dataset)
    except TypeError:
        raise TypeError(f"dataset must have a length and integer indexing, got {type(dataset).__name__}") from None
    if n_data == 0:
        raise ValueError("the dataset is empty")
    extras = dict(extra_modules or {})
    for name, m in extras.items():
        if not isinstance(m, nn.Module) or not name or "." in name:
            raise ValueError(f"extra_modules must map dotless names to nn.Module, got {name!r}: {type(m).__name__}")
    if adversary is not None:
        adversary.validate()

    ctx, created_group = init_distributed(config.device)
    try:
        with hold_run_directory(config.out_dir, ctx):
            return _run(model, loss_fn, dataset, n_data, config, extras, adversary, ctx)
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Any,
    n_data: int,
    cfg: TrainConfig,
    extras: dict[str, nn.Module],
    adversary: Adversary | None,
    ctx: DistContext,
) -> TrainState:
    order = _DataOrder(n_data, cfg.batch_size, cfg.seed, ctx)
    device = ctx.device
    model.to(device)
    for m in extras.values():
        m.to(device)
    groups = [{"params": _trainable(model)}]
    groups += [{"params": _trainable(m)} for m in extras.values() if _trainable(m)]
    if not groups[0]["params"]:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().to(_ema_dtype(v.dtype), copy=True) for k, v in model.state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(_derive_seed("loss", cfg.seed, ctx.rank))
    state = TrainState(model, optimizer, ema, generator, cfg, ctx, extras)
    adv_params: list[nn.Parameter] = []
    if adversary is not None:
        adversary.module.to(device)
        adv_params = _trainable(adversary.module)
        state.adversary = adversary
        state.adversary_optimizer = torch.optim.AdamW(
            adv_params, lr=adversary.lr, betas=tuple(adversary.betas), eps=cfg.eps, weight_decay=adversary.weight_decay
        )
        adversary.module.requires_grad_(False)  # trainable only inside its own updates

    out_dir = Path(cfg.out_dir)
    # Seeded first so that a rank the checkpoint has no RNG state for (the world grew) still starts seeded.
    torch.manual_seed(_derive_seed("torch", cfg.seed, ctx.rank))
    latest = ckpt.latest_checkpoint(out_dir)
    if latest is not None:
        _resume(state, latest, n_data)
    if ctx.is_main:
        # Checkpoints newer than the one resumed from belong to a run killed before its pointer write.
        for step, p in ckpt.list_checkpoints(out_dir):
            if step > state.step:
                p.unlink(missing_ok=True)
    if state.step >= cfg.steps:
        return state
    bind = getattr(loss_fn, "bind", None)
    if callable(bind):
        bind(state)

    trainable = [p for g in groups for p in g["params"]]
    extra_params = [p for g in groups[1:] for p in g["params"]]
    net: nn.Module = model
    if ctx.distributed:
        for p in extra_params + adv_params:
            dist.broadcast(p.data, src=0)
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    log = _CsvLog(out_dir / "log.csv", state.step) if ctx.is_main else None
    tb = _open_tensorboard(out_dir, state.step) if ctx.is_main and cfg.tensorboard else None
    bar = None
    if ctx.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter() - state.elapsed_s
    model.train()
    adv_logs: dict[str, torch.Tensor] = {}
    try:
        while state.step < cfg.steps:
            if state.batch_in_epoch >= order.batches:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            idx = order.indices(state.epoch, state.batch_in_epoch)
            batch = _to_device(_fetch(dataset, idx), device)
            if adversary is not None:
                adversary.active = state.step >= adversary.start_step
                if adversary.plays_at(state.step):
                    adv_logs = _adversary_updates(adversary, state.adversary_optimizer, adv_params, model, batch, state)

            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                out = loss_fn(net, batch, generator)
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
                raise TypeError(f"loss_fn must return (loss, logs_dict), got {type(out).__name__}")
            loss, logs = out
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn must return a scalar loss tensor, got {shape}")
            optimizer.zero_grad(set_to_none=True)
            loss.float().backward()
            if ctx.distributed and extra_params:
                _allreduce_grads(extra_params, ctx.world_size)
            grad_norm = _grad_norm(trainable, cfg.grad_clip)
            lr = cfg.lr_at(state.step + 1)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            _ema_update(state.ema, model, cfg.ema_decay)
            state.step += 1
            state.batch_in_epoch += 1
            state.elapsed_s = time.perf_counter() - t0

            last = state.step == cfg.steps
            if state.step % cfg.log_every == 0 or last:
                means = _mean_over_ranks({**logs, **adv_logs, "loss": loss}, ctx)
                _check_finite(torch.tensor(means["loss"]), grad_norm, state.step, state)
                if adv_logs:
                    _check_finite(torch.tensor(means["adv_loss"]), torch.tensor(means["adv_grad_norm"]), state.step,
                                  state, "the adversary's ")  # fmt: skip
                row = {"step": state.step, "epoch": state.epoch, "loss": means.pop("loss"), "lr": lr}
                row.update({"grad_norm": float(grad_norm), "time_s": round(state.elapsed_s, 3), **means})
                state.last_logs = row
                if log is not None:
                    log.write(row)
                if tb is not None:
                    for k, v in row.items():
                        if k != "step":
                            tb.add_scalar(k, v, state.step)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
            if state.step % cfg.checkpoint_every == 0 or last:
                # grad_norm is the same on every rank (the loss is not), so all ranks agree to stop.
                _check_finite(None, grad_norm, state.step, state)
                _save(state, n_data)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()
    return state
