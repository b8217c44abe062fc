"""Proof that a test exercised the backend it names: fastdiff.ops counts the passes each backend runs."""

import contextlib

from fastdiff import ops


@contextlib.contextmanager
def ran_on(backend: str, at_least: int = 1):
    """Asserts that the block ran at least ``at_least`` passes (forward or backward) of the fused step on ``backend``
    and none on another, so a test cannot pass on the pure-torch reference while it names a kernel."""
    before = dict(ops.calls)
    yield
    ran = {name: count - before.get(name, 0) for name, count in ops.calls.items()}
    ran = {name: count for name, count in ran.items() if count}
    assert ran.get(backend, 0) >= at_least and set(ran) == {backend}, f"expected passes on {backend} only, ran {ran}"
