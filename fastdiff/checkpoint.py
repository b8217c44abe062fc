"""Checkpoints and shipped model weights, as safetensors files: no pickle anywhere.

Two formats share one writer and one reader:

- A **training checkpoint** (:func:`save_checkpoint` / :func:`load_checkpoint`) is ONE safetensors file holding
  every tensor of a run (model, EMA, optimizer moments, RNG states as uint8 tensors) and, in the safetensors
  string metadata, a JSON object of everything else (step, epoch, config, optimizer scalars). One file means
  the tensors and their metadata can never come from two different saves. In a run directory the files are
  step-numbered (``ckpt-000100.safetensors``) and a ``latest`` pointer file, rewritten atomically after the
  checkpoint itself, names the newest complete one; older ones beyond ``keep`` are pruned.
- **Model weights** (:func:`save_model` / :func:`load_model_weights`) are one safetensors file of a module's
  ``state_dict`` with the model config as JSON in the metadata: the format of shipped weights.

Every file is written to a temporary file in the same directory, flushed and fsynced, then moved over the
target with ``os.replace``, so a reader sees either the old file or the new one, never a partial one. The
metadata also carries a SHA-256 digest of all tensor names, dtypes, shapes and bytes: safetensors itself has
no checksum, and a flipped byte inside a weight would otherwise load silently.

The safetensors header carries these string keys: ``format`` (``fastdiff-checkpoint`` or ``fastdiff-model``),
``version``, ``sha256`` and ``meta`` (the JSON object).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_FORMAT = "fastdiff-checkpoint"
MODEL_FORMAT = "fastdiff-model"
FORMAT_VERSION = 1
LATEST = "latest"
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.safetensors$")
# A safetensors header is JSON; anything past this size is a corrupt length field, not a real header.
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used: corrupt, truncated, of the wrong format, or mismatched."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file (or a run directory's checkpoint) does not exist."""


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint of ``step`` inside a run directory: ``ckpt-000100.safetensors``."""
    return f"ckpt-{step:06d}.safetensors"


def _fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry; without this a power loss may forget it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result, then move it over ``path``. No partial ``path`` ever exists, and
    the file gets the usual permissions. Every file fastdiff writes for keeps goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); the final file gets the usual permissions, as open() would give.
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _write_text_atomic(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed writer left in ``directory`` (``.<name>.<random>.tmp``).

    Only call this where no other process is writing into ``directory``. Returns the removed paths.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing storage (safetensors refuses aliased tensors)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensors must map str to Tensor, got {name!r}: {type(t).__name__}")
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        elif t.numel():
            seen.add(key)
        out[name] = t
    return out


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], fmt: str, meta: dict[str, Any]) -> None:
    flat = _prepare(tensors)
    try:
        meta_json = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint metadata must be JSON-serialisable (finite numbers, str keys): {exc}") from None
    header = {"format": fmt, "version": str(FORMAT_VERSION), "sha256": _digest(flat), "meta": meta_json}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))


def _read_safetensors(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and read one of our safetensors files. Nothing here can unpickle."""
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > _MAX_HEADER or 8 + n > size:
            # torch.save writes a zip archive (PK..) or, in the legacy format, a raw pickle (protocol byte
            # 0x80 then opcodes); both read as an absurd header length. A real header may start with 0x80 too.
            if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and (n is None or n > _MAX_HEADER)):
                raise CheckpointError(
                    f"{path} is a pickle/torch.save file; fastdiff refuses to unpickle files (that could run "
                    f"arbitrary code). Convert it to safetensors with a tool you trust."
                )
            if n is None:
                raise CheckpointError(f"{path} is truncated or corrupt: only {size} bytes, no safetensors header")
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path} is corrupt or not a safetensors file: header length field reads {n}")
            raise CheckpointError(
                f"{path} is truncated or corrupt: the header needs {8 + n} bytes but the file has {size}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: unreadable header ({exc})") from None
    info = header.get("__metadata__") or {}
    if info.get("format") != fmt:
        found = info.get("format")
        hint = ""
        if found == CHECKPOINT_FORMAT:
            hint = " (it is a training checkpoint: use fastdiff.checkpoint.load_checkpoint)"
        elif found == MODEL_FORMAT:
            hint = " (it is a model weights file: use fastdiff.checkpoint.load_model_weights)"
        raise CheckpointError(f"{path} is not a {fmt} file: its format is {found!r}{hint}")
    version = info.get("version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path} has {fmt} version {version!r}; this fastdiff reads version {FORMAT_VERSION}"
            + (" (written by a newer fastdiff?)" if str(version).isdigit() and int(version) > FORMAT_VERSION else "")
        )
    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors raises its own error type, OSError and others for damaged files
        raise CheckpointError(f"{path} is truncated or corrupt: safetensors cannot read it ({exc})") from None
    if _digest(tensors) != info.get("sha256"):
        raise CheckpointError(f"{path} is corrupt: the tensor data does not match the checksum stored in the file")
    try:
        meta = json.loads(info.get("meta", "{}"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is corrupt: its metadata is not valid JSON ({exc})") from None
    return tensors, meta


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """The ``(step, path)`` of every ``ckpt-*.safetensors`` in a run directory, by increasing step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint a run directory's ``latest`` pointer names, or ``None`` if the directory has none.

    Without a pointer (a run killed between its first checkpoint and the pointer write) the newest
    ``ckpt-*.safetensors`` is used: checkpoint files only ever appear complete, so it is safe to read.
    """
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _CKPT_RE.match(name):
            raise CheckpointError(f"{pointer} is corrupt: expected a checkpoint file name, found {name[:80]!r}")
        target = directory / name
        if not target.is_file():
            raise CheckpointNotFoundError(f"{pointer} names {name}, which does not exist in {directory}")
        return target
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _prune(directory: Path, keep: int, protect: Path) -> None:
    found = list_checkpoints(directory)
    for _, p in found[: max(len(found) - keep, 0)]:
        if p != protect:
            p.unlink(missing_ok=True)
    remove_stale_temp_files(directory)


def save_checkpoint(
    path_dir_or_file: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], *, keep: int = 2
) -> Path:
    """Write a training checkpoint atomically and return its path.

    Args:
        path_dir_or_file: a run directory, or a file path ending in ``.safetensors``. In a directory the file is
            ``ckpt-<step>.safetensors`` (``meta["step"]`` is required), then the ``latest`` pointer is rewritten
            atomically, then all but the newest ``keep`` checkpoints (and stale temporary files) are removed.
            A file path is written as given, with no pointer and no pruning.
        tensors: name -> tensor of any shape and dtype (bool, integer, float, bf16...), on any device; they are
            stored on the CPU. Aliased tensors (tied weights) are stored as separate copies.
        meta: a JSON-serialisable dict (step, epoch, config, optimizer scalars...).
        keep: how many checkpoints a directory keeps (at least 1).
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    target = Path(path_dir_or_file)
    if target.suffix == ".safetensors" and not target.is_dir():
        _write_safetensors(target, tensors, CHECKPOINT_FORMAT, meta)
        return target
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"saving into a run directory needs an int meta['step'] >= 0, got {step!r}")
    path = target / checkpoint_name(step)
    _write_safetensors(path, tensors, CHECKPOINT_FORMAT, meta)
    # The pointer is the commit record: written only after the checkpoint is complete on disk.
    _write_text_atomic(target / LATEST, path.name + "\n")
    _prune(target, keep, protect=path)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a training checkpoint: a ``.safetensors`` file, or a run directory (its ``latest`` checkpoint).

    Returns ``(tensors, meta)``: CPU tensors by name and the metadata dict. Raises
    :class:`CheckpointNotFoundError` for a missing file or a directory without checkpoints, and
    :class:`CheckpointError` (a ``ValueError``) naming the file for a truncated or corrupt file, a pickle, or a
    file of another format or version.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointNotFoundError(f"no checkpoint (ckpt-*.safetensors) in directory {path}")
        path = found
    return _read_safetensors(path, CHECKPOINT_FORMAT)


def load_state_into(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "model.", strict: bool = True
) -> None:
    """Copy the entries ``prefix + name`` of ``tensors`` into ``module``'s parameters and buffers.

    Every problem is reported in one :class:`CheckpointError`: missing keys, unexpected keys (both only when
    ``strict``) and shape mismatches (always), the latter as ``name: checkpoint shape vs model shape``. Values
    are cast to each parameter's dtype and device.
    """
    own = module.state_dict()
    given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(given))
        if given[k].shape != own[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(prefix + k for k in missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(prefix + k for k in unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(prefix + m for m in mismatched)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit {type(module).__name__} (prefix {prefix!r}):\n  " + "\n  ".join(problems)
        )
    module.load_state_dict({k: v for k, v in given.items() if k in own}, strict=False)


def _unwrap(module: nn.Module) -> nn.Module:
    # DistributedDataParallel and torch.compile wrap the real module; its names have no wrapper prefix.
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)


def save_model(path: str | os.PathLike, module: nn.Module, config: dict[str, Any]) -> Path:
    """Write ``module``'s ``state_dict`` and its JSON-serialisable ``config`` as one safetensors file, atomically.

    This is the format of shipped weights: ``load_model_weights(path)`` returns ``(state_dict, config)``, from
    which the caller builds the model with ``config`` and loads the state (e.g. with :func:`load_state_into`
    and ``prefix=""``).
    """
    path = Path(path)
    _write_safetensors(path, _unwrap(module).state_dict(), MODEL_FORMAT, {"config": config})
    return path


def save_typed_model(path: str | os.PathLike, module: nn.Module, kind: str, config: dict[str, Any],
                     provenance: str = "") -> Path:  # fmt: skip
    """:func:`save_model` with ``{"type": kind, **config}`` (plus ``provenance``, e.g. the command that trained
    it, when given) as the config; read back with :func:`load_typed_model`."""
    return save_model(path, module, {"type": kind, **config, **({"provenance": str(provenance)} if provenance else {})})


def load_typed_model(path: str | os.PathLike, kind: str, build: Callable[[dict[str, Any]], nn.Module]) -> nn.Module:
    """Rebuild a model written by :func:`save_typed_model`: ``build(config)`` makes it, the weights are loaded with
    every name and shape checked, and ``.provenance`` is set. Raises :class:`CheckpointError` for a file of another
    ``kind``, a config ``build`` rejects (TypeError or ValueError), or weights that do not fit."""
    tensors, config = load_model_weights(path)
    config = dict(config)
    found = config.pop("type", None)
    provenance = str(config.pop("provenance", ""))
    if found != kind:
        raise CheckpointError(f"{path} holds a model of type {found!r}, not {kind!r}")
    try:
        model = build(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid {kind} config {config}: {e}") from e
    load_state_into(model, tensors, prefix="")
    model.provenance = provenance
    return model


def load_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_model`: ``(state_dict of CPU tensors, config dict)``.

    Raises :class:`CheckpointError` (naming the file) for a missing, truncated, corrupt or pickle file, or a
    file of another format.
    """
    tensors, meta = _read_safetensors(Path(path), MODEL_FORMAT)
    return tensors, meta.get("config", {})
