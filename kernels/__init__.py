"""Triton kernels of fastdiff, installed as ``fastdiff.kernels``.

The fused step kernels arrive with the "Fused step kernels" issue; each is checked against the pure-torch
reference in :mod:`fastdiff.ops` and dispatched from there, never imported directly by user code.
"""
