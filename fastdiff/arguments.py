"""Checks of plain-number arguments, in one place, for the API, the configs and the fields of model files.

A number may be a Python ``int`` or ``float``, a NumPy scalar or a 0-d tensor, as users of NumPy, k-diffusion and
torch pass them; a bool is not a number here (``True`` where a number belongs is a slip, not 1). Every error is a
``ValueError`` that names the argument and the value.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def number(value: Any) -> Any:
    """The Python scalar a NumPy, 0-d array or 0-d tensor number holds; anything else unchanged (a meta tensor has
    no value to read)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 and value.device.type != "meta" else value
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def _integer_kind(lo: int | None, hi: int | None) -> str:
    kind = {1: "a positive integer", 0: "a non-negative integer", None: "an integer"}.get(lo, f"an integer >= {lo}")
    return kind + (f" no larger than {hi}" if hi is not None else "")


def as_int(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a Python ``int`` in ``[lo, hi]``: Python, NumPy and 0-d tensor integers qualify; bools, floats
    (even ``16.0``), strings and None do not."""
    v = number(value)
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be {_integer_kind(lo, hi)}, got {value!r}")
    return v


def as_real(value: Any, name: str, finite: bool = True) -> float:
    """``value`` as a Python ``float``: Python, NumPy and 0-d tensor ints and floats qualify; bools, complex
    numbers, strings and None do not, nor (when ``finite``) NaN, Inf or an int too large for a float."""
    v = number(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(v)
    except OverflowError:
        v = math.inf
    if finite and not math.isfinite(v):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return v
