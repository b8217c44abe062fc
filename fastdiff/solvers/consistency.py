"""Consistency solvers: multistep consistency sampling of consistency-distilled models (CoDi students, LCMs)."""

from __future__ import annotations

SOLVERS = ()
__all__: list[str] = []
