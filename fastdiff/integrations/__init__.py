"""Integrations with other libraries: :mod:`fastdiff.integrations.diffusers` (a scheduler and a pipeline loop).

Each submodule imports its library when it is imported, so ``import fastdiff`` never needs them.
"""
