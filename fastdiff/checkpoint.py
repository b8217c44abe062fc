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
target with ``os.replace``, so a reader sees either the old file or the new one, never a partial one.

The safetensors header carries exactly these string keys: ``format`` (``fastdiff-checkpoint``, ``fastdiff-model``
or ``fastdiff-teacher-pairs``), ``version``, ``sha256`` and ``meta`` (the JSON object). safetensors itself has no
checksum, so ``sha256`` is ours:

- **Version 2** (written now): the digest covers the format, the version and the meta JSON, then every tensor's
  name, dtype, shape and bytes. The metadata steers loading (a model's config, a run's step and epoch), so an
  edited or bit-flipped ``sigma_data`` or ``step`` is refused like a flipped weight.
- **Version 1** (files written by earlier fastdiff) is still read: its digest covers the tensors only, so its
  metadata cannot be verified. A typed model's config is still checked field by field, and the model it describes
  must fit the stored tensors before it is built (:func:`load_typed_model`), but a plausible edit (a
  ``sigma_data`` of 0.4 for 0.5) loads as written: re-save such files to get the version-2 check.

Every reader first makes sure the path is a regular file (:func:`check_regular_file`): opening a FIFO blocks
forever, and a device never ends.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import stat
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: runs take no lock there
    fcntl = None

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_FORMAT = "fastdiff-checkpoint"
MODEL_FORMAT = "fastdiff-model"
FORMAT_VERSION = 2
READ_VERSIONS = ("1", "2")
_HEADER_KEYS = frozenset({"format", "version", "sha256", "meta"})
LATEST = "latest"
RUN_LOCK = ".fastdiff-run.lock"  # the run directory's lock file (fastdiff.train.runtime)
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.safetensors$")
# A safetensors header is JSON; anything past this size is a corrupt length field, not a real header.
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used: corrupt, truncated, of the wrong format, or mismatched."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file (or a run directory's checkpoint) does not exist."""


# ---------------------------------------------------------------------------------- shared checks of loaders


def check_regular_file(
    path: str | os.PathLike,
    what: str,
    error: type[Exception] = ValueError,
    missing: type[Exception] = FileNotFoundError,
) -> int:
    """Return the size of ``path`` if it is a regular file (after following symlinks), before anyone opens it.

    Raises ``missing`` ("<what> not found: <path>") if nothing is there, and ``error`` naming the path for a
    directory, a symlink loop, or any other kind of file: reading a FIFO blocks until a writer appears, which may be
    never, and a device such as ``/dev/zero`` never ends.
    """
    a_what = ("an " if what[:1] in "aeiou" else "a ") + what
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise missing(f"{what} not found: {path}") from None
        if exc.errno == errno.ELOOP:
            raise error(f"{path} is a symlink loop (too many levels of symbolic links), not {a_what}") from None
        raise error(f"cannot access {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path} is a directory, not {a_what}")
    if not stat.S_ISREG(st.st_mode):
        mode = st.st_mode
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")  # fmt: skip
        raise error(f"{path} is not a regular file ({kind}); refusing to use it as {a_what}")
    return st.st_size


def check_keys(obj: Any, name: str, required=(), allowed=None) -> dict:
    """``obj`` if it is a dict that holds every key of ``required`` and, unless ``allowed`` is None, no key outside
    ``required`` and ``allowed``; else ``ValueError`` naming ``name`` and the missing or unknown keys. A config read
    from a file with a misspelt key must not quietly fall back to a default."""
    if not isinstance(obj, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ValueError(f"{name} lacks the fields {missing}")
    if allowed is not None:
        unknown = sorted(str(k) for k in set(obj) - set(required) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {name} fields {unknown}")
    return obj


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

    Nothing is deleted while another live process holds the directory's run lock (a training run of
    :mod:`fastdiff.train.runtime`): its temporary files are writes in flight, not leftovers. The kernel drops that
    lock when its holder dies, even by SIGKILL, so a killed run's leftovers are removed. Returns the removed paths.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    try:  # its holder (fastdiff.train.runtime) writes {"pid", "host", ...} into it
        fd = os.open(directory / RUN_LOCK, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        fd = None  # no run has ever locked it, or the last one ended cleanly
    if fd is not None:
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held; flock conflicts between two descriptors of one process too, so ask who
            try:
                owner = json.loads(os.pread(fd, 65536, 0) or b"{}")
            except (OSError, ValueError):
                owner = {}
            if not isinstance(owner, dict) or (owner.get("pid"), owner.get("host")) != (
                os.getpid(), socket.gethostname()
            ):  # fmt: skip
                return removed
        except OSError:
            pass  # a file system without flock: runs there are not locked either
        finally:
            os.close(fd)
    for p in directory.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _digest(tensors: Mapping[str, torch.Tensor], fields: tuple[str, ...] = ()) -> str:
    """Version 1: the tensors alone (``fields`` empty). Version 2: ``(format, version, meta JSON)`` first."""
    h = hashlib.sha256()
    for field in fields:
        # Length-prefixed, so that no two different field tuples hash alike; and a version-2 digest is never the
        # version-1 digest of the same tensors, so editing "2" into "1" does not switch the metadata check off.
        b = field.encode()
        h.update(len(b).to_bytes(8, "little") + b)
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
    version = str(FORMAT_VERSION)
    header = {"format": fmt, "version": version, "sha256": _digest(flat, (fmt, version, meta_json)), "meta": meta_json}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=header))


def parse_json(text: str | bytes, what: str, nan_ok: bool = False) -> Any:
    """``json.loads`` that refuses duplicate keys (two readers of one file could pick different ones) and, unless
    ``nan_ok``, NaN and Infinity (never written), and reports absurd nesting as a ValueError, not a RecursionError."""

    def pairs(items):
        out = dict(items)
        if len(out) != len(items):
            keys = [k for k, _ in items]
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return out

    def constant(name):
        if not nan_ok:
            raise ValueError(f"{name} is not JSON")
        return float(name)

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise ValueError(f"{what} is too deeply nested") from None


def _read_safetensors(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and read one of our safetensors files: ``(tensors, meta)``. Nothing here can unpickle."""
    tensors, meta, _ = _read_versioned(path, fmt)
    return tensors, meta


def _read_versioned(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """:func:`_read_safetensors`, and the file's format version."""
    size = check_regular_file(path, "checkpoint file", CheckpointError, CheckpointNotFoundError)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= _MAX_HEADER and 8 + n <= size else None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw is None:
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
        raise CheckpointError(f"{path} is truncated or corrupt: the header needs {8 + n} bytes but the file has {size}")
    try:
        header = parse_json(raw, "the header")
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: unreadable header ({exc})") from None
    info = header.get("__metadata__")
    info = info if isinstance(info, dict) else {}
    if info.get("format") != fmt:
        found = info.get("format")
        hint = ""
        if found == CHECKPOINT_FORMAT:
            hint = " (it is a training checkpoint: use fastdiff.checkpoint.load_checkpoint)"
        elif found == MODEL_FORMAT:
            hint = " (it is a model weights file: use fastdiff.checkpoint.load_model_weights)"
        raise CheckpointError(f"{path} is not a {fmt} file: its format is {found!r}{hint}")
    version = info.get("version")
    if version not in READ_VERSIONS:
        newer = isinstance(version, str) and version.isdigit() and int(version) > FORMAT_VERSION
        raise CheckpointError(
            f"{path} has {fmt} version {version!r}; this fastdiff reads versions {', '.join(READ_VERSIONS)}"
            + (" (written by a newer fastdiff?)" if newer else "")
        )
    if set(info) != _HEADER_KEYS or not all(isinstance(v, str) for v in info.values()):
        # a damaged key must not make the metadata read as absent (and so as defaults)
        raise CheckpointError(
            f"{path} is corrupt: its header metadata must hold the strings {sorted(_HEADER_KEYS)}, found {sorted(info)}"
        )
    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors raises its own error type, OSError and others for damaged files
        raise CheckpointError(f"{path} is truncated or corrupt: safetensors cannot read it ({exc})") from None
    fields = () if version == "1" else (fmt, version, info["meta"])
    if _digest(tensors, fields) != info["sha256"]:
        covered = "tensor data" if version == "1" else "tensor data or metadata"
        raise CheckpointError(f"{path} is corrupt: the {covered} does not match the checksum stored in the file")
    try:
        meta = parse_json(info["meta"], "the metadata")
    except ValueError as exc:
        raise CheckpointError(f"{path} is corrupt: its metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is corrupt: its metadata must be a JSON object, got {type(meta).__name__}")
    return tensors, meta, version


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
        try:
            with open(pointer, "rb") as f:
                raw = f.read(256)  # a checkpoint name is short; a huge pointer file is damage, not a name
        except OSError as exc:
            raise CheckpointError(f"cannot read {pointer}: {exc.strerror or exc}") from None
        name = raw.decode("utf-8", errors="replace").strip()
        if not _CKPT_RE.match(name):
            raise CheckpointError(f"{pointer} is corrupt: expected a checkpoint file name, found {name[:80]!r}")
        target = directory / name
        if not os.path.lexists(target):
            raise CheckpointNotFoundError(f"{pointer} names {name}, which does not exist in {directory}")
        return target  # anything there but a regular file is refused by the reader, with its own reason
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


def check_state_fits(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "model.", strict: bool = True
) -> None:
    """Raise one :class:`CheckpointError` listing every way the entries ``prefix + name`` of ``tensors`` do not fit
    ``module``: missing keys, unexpected keys (both only when ``strict``) and shape mismatches (always), the latter
    as ``name: checkpoint shape vs model shape``. Reads only names and shapes, so ``module`` may live on the meta
    device."""
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


def load_state_into(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str = "model.", strict: bool = True
) -> None:
    """Copy the entries ``prefix + name`` of ``tensors`` into ``module``'s parameters and buffers.

    Every problem is reported in one :class:`CheckpointError` (:func:`check_state_fits`). Values are cast to each
    parameter's dtype and device.
    """
    check_state_fits(module, tensors, prefix, strict)
    own = module.state_dict()
    given = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
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
    ``kind``, a config ``build`` rejects (TypeError, ValueError or KeyError), or weights that do not fit.

    In a version-1 file the checksum does not cover the config, so a damaged one could describe a network far
    larger than the file: such a model is first built on the meta device, which allocates nothing, and checked
    against the file's tensors, and only a config that describes the weights actually stored is built for real.
    (Version 2 skips that: its config is covered by the checksum, and the meta device's first use costs a second
    or more of imports. A ``build`` that reads tensor values cannot run on the meta device; its config checks
    alone bound it.)
    """
    tensors, config, version = _model_file(path)
    config = dict(config)
    found = config.pop("type", None)
    provenance = str(config.pop("provenance", ""))
    if found != kind:
        raise CheckpointError(f"{path} holds a model of type {found!r}, not {kind!r}")

    def built(device: str | None) -> nn.Module | None:
        try:
            if device is None:
                return build(config)
            with torch.device(device):
                return build(config)
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path} has an invalid {kind} config: {e}") from e
        except (RuntimeError, NotImplementedError):
            if device is None:
                raise
            return None  # the builder reads values, which meta tensors do not have

    def fits(model: nn.Module) -> None:
        try:
            check_state_fits(model, tensors, prefix="")
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None

    if version == "1" and (probe := built("meta")) is not None:
        fits(probe)
    model = built(None)
    fits(model)
    model.load_state_dict(tensors)
    model.provenance = provenance
    return model


def _model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    tensors, meta, version = _read_versioned(Path(path), MODEL_FORMAT)
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is corrupt: its config must be a JSON object, got {type(config).__name__}")
    return tensors, config, version


def load_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_model`: ``(state_dict of CPU tensors, config dict)``.

    Raises :class:`CheckpointError` (naming the file) for a missing, truncated, corrupt or pickle file, or a
    file of another format.
    """
    tensors, config, _ = _model_file(path)
    return tensors, config
