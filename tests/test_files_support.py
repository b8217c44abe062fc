"""Helpers shared by the file-loading robustness tests (issue 18); no tests of its own.

A loader that blocks forever (a FIFO opened for reading) or asks for terabytes (a size field read from a corrupt
header) would hang or kill CI rather than fail a test, so the tests run such loads under these guards.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal

import pytest


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Raise TimeoutError in the block after ``seconds``: a blocking ``open()`` is interrupted by the signal."""

    def fire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def address_space_limit(headroom: int = 1 << 30):
    """Cap the process's address space at its current size plus ``headroom`` inside the block, so that any
    allocation a corrupt size field asks for fails at once (as MemoryError or torch's RuntimeError, which the
    tests then see as the wrong exception type) instead of succeeding or swapping."""
    try:
        limit = _address_space() + headroom
    except OSError:
        pytest.skip("needs /proc/self/status (Linux) to read the address space")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < limit:
        limit = hard
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def make_fifo(path) -> os.PathLike:
    """A named pipe at ``path`` with no writer: opening it for reading blocks until one appears."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    os.mkfifo(path)
    return path


def make_symlink_loop(path) -> os.PathLike:
    """``path`` -> ``path.other`` -> ``path``: resolving it fails with ELOOP."""
    other = path.with_name(path.name + ".other")
    os.symlink(other, path)
    os.symlink(path, other)
    return path


def write_v1(path, tensors, fmt: str, meta):
    """A file exactly as fastdiff wrote it before format version 2 (a checksum over the tensors only), with any
    ``meta``: what an old file whose metadata was edited or damaged looks like to the loader."""
    import json

    from safetensors.torch import save_file

    from fastdiff import checkpoint

    flat = checkpoint._prepare(tensors)
    header = {"format": fmt, "version": "1", "sha256": checkpoint._digest(flat), "meta": json.dumps(meta)}
    save_file(flat, str(path), metadata=header)
    return path


def flip_every_bit(path, positions, load, same) -> int:
    """Flip each bit of the bytes at ``positions`` of ``path`` in turn: each flip must make ``load`` raise
    CheckpointError naming the file, or load something ``same`` accepts. Returns the number of flips that loaded."""
    from fastdiff.checkpoint import CheckpointError

    data = path.read_bytes()
    loaded = 0
    fd = os.open(path, os.O_RDWR)  # one byte rewritten in place: far cheaper than rewriting the file per flip
    try:
        for pos in positions:
            for bit in range(8):
                os.pwrite(fd, bytes([data[pos] ^ (1 << bit)]), pos)
                try:
                    result = load(path)
                except CheckpointError as exc:
                    assert path.name in str(exc), f"byte {pos} bit {bit}: the error does not name the file: {exc}"
                    continue
                finally:
                    os.pwrite(fd, data[pos : pos + 1], pos)
                assert same(result), f"byte {pos} bit {bit}: loaded with different contents"
                loaded += 1
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    return loaded


def header_size(path) -> int:
    """Bytes of a safetensors file's length field and JSON header: everything that steers its loading."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def header_positions(path, meta_stride: int, rest_stride: int) -> list[int]:
    """Byte offsets of a safetensors file's header to flip: those of the length field and the ``__metadata__``
    entry (what steers loading) every ``meta_stride`` bytes, the tensor entries every ``rest_stride``."""
    with open(path, "rb") as f:
        header = f.read(header_size(path))
    end = header.index(b'},"', header.index(b"__metadata__")) + 2  # safetensors writes compact JSON
    return [*range(0, end, meta_stride), *range(end, len(header), rest_stride)]
