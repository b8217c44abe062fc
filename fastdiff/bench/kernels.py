"""Microbenchmarks of the fused step against eager torch, ``torch.compile`` and the copy bandwidth.

Workloads are solver steps with classifier-free guidance, as the sampler issues them:

* ``euler_cfg``: x, D_c, D_u -> x_next, D;
* ``heun_corrector``: the same plus one history entry (the predictor's D);
* ``dpmpp_2m``: the same plus one history entry (the previous D);
* ``unipc_corrector``: the same plus two history entries (UniC-2 reads D_{i-1} and D_{i-2});
* ``rescale``, ``apg``, ``cfg_zero_star``: a DPM-Solver++(2M) step guided by that method (rescale phi = 0.7; APG
  eta = 0 with a norm threshold; CFG-Zero*), on a batch of 4 samples: eager and ``compile`` run
  :func:`fastdiff.guidance.guided_estimate` then the reference step; the kernels run the method's reduction
  (:func:`fastdiff.ops.guidance_sums`), its ``[B]``-sized weights and the per-sample fused step
  (:func:`fastdiff.ops.guided_step_per_sample`), two passes over memory, which the bandwidth counts.

Each provider is timed on the same tensors in the same run: ``eager`` (the pure-torch reference), ``compile``
(``torch.compile`` of that reference, compiled afresh for each row: one compiled function shared by every row would
meet dynamo's recompile limit after 8 shapes and dtypes and silently run the rest eagerly, so each row also checks
that its call compiled a graph), and every fastdiff kernel backend available here, called through
:func:`fastdiff.ops.guided_step` with the backend forced (so its host-side dispatch is included, as a user pays it;
each row checks that the forced backend ran). ``copy`` is ``dst.copy_(src)`` over the same number of bytes the step
moves; bandwidth is bytes read plus written over time. GPU times are medians of ``triton.testing.do_bench`` (CUDA
events); CPU times are medians of wall-clock repetitions, on ``threads`` torch threads (1 by default: on a shared
2-core machine two OpenMP threads turn small copies into multi-millisecond outliers whenever the other core is
busy). ``host_us`` is the wall time of one call returning to Python, without synchronising the device.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from fastdiff import ops
from fastdiff.checkpoint import atomic_write
from fastdiff.guidance import Guidance, guided_estimate, method_weights

WORKLOADS = {  # history entries
    "euler_cfg": 0, "heun_corrector": 1, "dpmpp_2m": 1, "unipc_corrector": 2, "rescale": 1, "apg": 1,
    "cfg_zero_star": 1,
}  # fmt: skip
METHODS = {
    "rescale": Guidance(2.0, method="rescale", phi=0.7),
    "apg": Guidance(2.0, method="apg", eta=0.0, norm_threshold=50.0),
    "cfg_zero_star": Guidance(2.0, method="cfg_zero_star"),
}
METHOD_BATCH = 4
DTYPES = {"fp32": (torch.float32, torch.float32), "fp32+bf16": (torch.float32, torch.bfloat16)}
SIZES = {"16K": 16_384, "1M": 1_048_576, "50M": 50_331_648}


def parse_size(text: str) -> int:
    """An element count: one of ``SIZES``, or a number with an optional ``K`` (2^10) or ``M`` (2^20) suffix, at
    least 1; ``ValueError`` naming ``text`` for anything else."""
    name = text.strip().upper()
    if name in SIZES:
        return SIZES[name]
    scale = {"K": 1 << 10, "M": 1 << 20}.get(name[-1:], 1)
    try:
        value = int(float(name[:-1] if scale > 1 else name) * scale)
    except (ValueError, OverflowError):  # OverflowError: inf
        value = 0
    if value < 1:
        raise ValueError(f"{text!r} is not an element count >= 1 (a number, with K for 2^10 or M for 2^20)")
    return value


def _time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of one call, after warm-up."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _host_time(fn: Callable[[], object], device: torch.device, reps: int = 50) -> float:
    """Median wall time of one call returning to Python, without synchronising the device."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return statistics.median(times)


@contextlib.contextmanager
def _forced_backend(backend: str | None):
    """Force ``FASTDIFF_BACKEND`` while a provider is timed (None leaves it as it is)."""
    old = os.environ.get("FASTDIFF_BACKEND")
    if backend is not None:
        os.environ["FASTDIFF_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTDIFF_BACKEND", None)
        else:
            os.environ["FASTDIFF_BACKEND"] = old


def _method_reference(guidance, x, dc, du, hist, a, b):
    """A method's step as eager torch runs it: the guided estimate (:func:`guided_estimate`), then the step."""
    d = guided_estimate(guidance, x, 1.0, dc, du, {})
    return ops.guided_step_reference(x, d, None, hist, a, b)


def _method_fused(guidance, x, dc, du, hist, coef, sigma):
    """A method's step on fastdiff's kernels: one reduction, the per-sample weights, the fused step."""
    u, guide = method_weights(guidance, x, sigma, dc, du, {})
    return ops.guided_step_per_sample(x, dc, u, hist, coef, guide)


def _compiled_reference(fn: Callable, args: tuple) -> Callable:
    """``torch.compile`` of the reference ``fn``, compiled for ``args`` now, after clearing dynamo's caches; raises
    if the call did not compile a graph (it would time eager torch under the name ``compile``)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    before = counters["stats"]["unique_graphs"]
    compiled(*args)
    if counters["stats"]["unique_graphs"] == before:
        raise RuntimeError("torch.compile ran the reference without compiling it; the compile row would time eager")
    return compiled


def bench_kernels(
    sizes: list[int],
    dtypes: list[str],
    workloads: list[str] | None = None,
    device: str | torch.device | None = None,
    reps: int = 20,
    compile: bool = True,
    progress: Callable[[str], None] | None = None,
    threads: int | None = 1,
    time_budget: float | None = None,
) -> list[dict]:
    """Run the benchmark grid; returns one row per (workload, dtype, size, provider). ``threads``: torch's intra-op
    threads for a CPU run (None: leave them as they are), recorded in every row. ``time_budget``: seconds after
    which no further (workload, dtype, size) cell starts, so that a run on a lent GPU ends with its results."""
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be an integer >= 1, got {reps!r}")
    if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"sizes must be element counts >= 1, got {sizes!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    providers = [b for b in ops.available_backends() if b != "torch" and (b != "cpu") == (device.type == "cuda")]
    if device.type == "cpu" and "triton" in providers:
        providers.remove("triton")  # the interpreter measures numpy, not the kernel
    old_threads = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        deadline = None if time_budget is None else time.perf_counter() + time_budget
        return _grid(sizes, dtypes, workloads or list(WORKLOADS), device, reps, compile, progress, providers, deadline)
    finally:
        torch.set_num_threads(old_threads)


def _grid(sizes, dtypes, workloads, device, reps, compile, progress, providers, deadline) -> list[dict]:
    rows = []
    cells = [(name, dname, n) for name in workloads for dname in dtypes for n in sizes]
    for k, (name, dname, n) in enumerate(cells):
        if deadline is not None and time.perf_counter() > deadline:
            print(f"bench kernels: time budget spent; {k} of {len(cells)} cells measured", file=sys.stderr)
            break
        n_hist = WORKLOADS[name]
        tx, td = DTYPES[dname]
        method = METHODS.get(name)
        shape = (n,) if method is None else (METHOD_BATCH, -(-n // METHOD_BATCH))
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, device=device, dtype=tx, generator=g)
        dc, du = (torch.randn(shape, device=device, generator=g).to(td) for _ in range(2))
        hist = [torch.randn(shape, device=device, dtype=tx, generator=g) for _ in range(n_hist)]
        b = [0.5] + [0.1] * n_hist
        n = x.numel()
        moved = (x.element_size() * (3 + n_hist) + 2 * dc.element_size()) * n  # read x, D's, history; write 2
        if method is None:
            reference, args = ops.guided_step_reference, (x, dc, du, hist, 0.9, b, 2.0)
            step = partial(ops.guided_step, x, dc, du, hist, a=0.9, b=b, w=2.0)
        else:
            moved += (x.element_size() + 2 * dc.element_size()) * n  # the reduction's pass over x and the D's
            reference, args = partial(_method_reference, method), (x, dc, du, hist, 0.9, b)
            sigma = torch.ones((), device=device, dtype=ops.acc_dtype(x))
            step = partial(_method_fused, method, x, dc, du, hist, [0.9, 0.0, 0.0, 1.0, 0.0, *b], sigma)
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        calls = {"copy": partial(dst.copy_, src), "eager": partial(reference, *args)}
        if compile:
            if progress:
                progress(f"{name} {dname} {n} compiling")
            calls["compile"] = partial(_compiled_reference(reference, args), *args)
        calls.update(dict.fromkeys(providers, step))
        for provider, fn in calls.items():
            if progress:
                progress(f"{name} {dname} {n} {provider}")
            kernel = provider in providers
            before = ops.calls[provider] if kernel else 0
            with _forced_backend(provider if kernel else None):
                sec = _time(fn, device, reps)
                host = _host_time(fn, device) * 1e6 if provider != "copy" else float("nan")
            if kernel and ops.calls[provider] == before:
                raise RuntimeError(f"the {provider} row did not run the {provider} backend")
            rows.append({
                "workload": name, "dtype": dname, "elements": n, "provider": provider,
                "us": sec * 1e6, "gbps": moved / sec / 1e9, "host_us": host,
                "threads": torch.get_num_threads() if device.type == "cpu" else "",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            })  # fmt: skip
        copy_gbps = next(r["gbps"] for r in rows[-len(calls) :] if r["provider"] == "copy")
        for r in rows[-len(calls) :]:
            r["copy_fraction"] = r["gbps"] / copy_gbps
    return rows


def write_results(rows: list[dict], out: Path) -> None:
    """CSV, PNG (time per provider, one panel per workload and dtype) and a Markdown table."""
    if not rows:
        raise ValueError("no benchmark rows to write")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "kernels.csv", lambda tmp: Path(tmp).write_text(buf.getvalue(), newline=""))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["workload"], r["dtype"]) for r in rows}, key=lambda p: (list(WORKLOADS).index(p[0]), p[1]))
    cols = len({p[1] for p in panels})
    fig, axes = plt.subplots(len(panels) // cols, cols, figsize=(5 * cols, 3.2 * len(panels) // cols), squeeze=False)
    for ax, (wl, dt) in zip(axes.flat, panels):
        pts = [r for r in rows if r["workload"] == wl and r["dtype"] == dt]
        for provider in dict.fromkeys(r["provider"] for r in pts):
            sel = [r for r in pts if r["provider"] == provider]
            ax.loglog([r["elements"] for r in sel], [r["us"] for r in sel], marker="o", ms=3, label=provider)
        ax.set(title=f"{wl}, {dt}", xlabel="elements", ylabel="µs per call")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    threads = f", {rows[0]['threads']} torch threads" if rows[0]["threads"] != "" else ""
    fig.suptitle(f"fused guided step on {rows[0]['device']}{threads}")
    fig.tight_layout()
    try:
        atomic_write(out / "kernels.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| workload | dtype | elements | provider | µs | GB/s | of copy | host µs |", "|---" * 8 + "|"]
    for r in rows:
        host = "–" if r["provider"] == "copy" else f"{r['host_us']:.1f}"
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {r['elements']} | {r['provider']} | {r['us']:.1f} | "
            f"{r['gbps']:.1f} | {r['copy_fraction']:.0%} | {host} |"
        )
    return "\n".join(lines)
