"""The CPU extension under AddressSanitizer (issue 18): an out-of-bounds read or write in the kernels or the bindings
stops the process with a report, where a normal build would return garbage or crash only sometimes.

csrc/bindings.cpp and csrc/step_cpu.cpp are built with ``-fsanitize=address`` by torch.utils.cpp_extension.load into
a temporary directory, as a module of its own (``fastdiff_asan``; the in-tree ``fastdiff._C`` is never touched), in
subprocesses started with libasan preloaded (an instrumented module needs the ASan runtime loaded first, and Python
is not built with it; see _preload). This file is also the script those subprocesses run:

    python tests/test_ops_asan.py build|drive|overflow BUILD_DIR

``drive`` calls the op's forward and backward through that module on valid inputs (every dtype pair, odd sizes,
aligned and misaligned storage, every structure) against the reference, and on invalid ones, which must raise;
``overflow`` makes the kernel read past a buffer on purpose, and the test requires ASan to catch it, so that the
check cannot pass with ASan inactive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAME = "fastdiff_asan"
CFLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1", "-fopenmp"]
LDFLAGS = ["-fsanitize=address", "-fopenmp"]


def _preload() -> str | None:
    """``LD_PRELOAD`` for the subprocesses: gcc's libasan, then libstdc++. The ASan runtime must come first; and
    libstdc++ must be loaded when it starts, or its interceptor of ``__cxa_throw`` finds nothing to forward to and
    aborts at the first C++ exception (TORCH_CHECK throws one), since Python itself does not link libstdc++."""
    if shutil.which("gcc") is None:
        return None
    paths = []
    for lib in ("libasan.so", "libstdc++.so.6"):
        path = subprocess.run(["gcc", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not (os.path.isabs(path) and os.path.exists(path)):
            return None
        paths.append(os.path.realpath(path))
    return " ".join(paths)


def _run(mode: str, build: Path, preload: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LD_PRELOAD": preload, "ASAN_OPTIONS": "detect_leaks=0", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, __file__, mode, str(build)], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)  # fmt: skip


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory):
    from torch.utils.cpp_extension import is_ninja_available

    preload = _preload()
    if preload is None:
        pytest.skip("gcc's libasan is not available here")
    if not is_ninja_available():
        pytest.skip("torch.utils.cpp_extension.load needs ninja")
    build = tmp_path_factory.mktemp("asan_build")
    res = _run("build", build, preload)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    return build, preload


def test_op_under_address_sanitizer_valid_and_invalid_calls(asan_build):
    res = _run("drive", *asan_build)
    assert res.returncode == 0 and "AddressSanitizer" not in res.stderr, res.stdout[-2000:] + res.stderr[-8000:]
    assert "drove" in res.stdout, res.stdout


def test_address_sanitizer_is_active_in_that_module(asan_build):
    """A deliberate read past the end of a d_cond buffer, in the op's own kernel, is caught: ASan is on."""
    res = _run("overflow", *asan_build)
    assert res.returncode != 0, res.stdout + res.stderr[-3000:]
    report = res.stderr[res.stderr.find("ERROR: AddressSanitizer") :]
    assert report.startswith("ERROR: AddressSanitizer: heap-buffer-overflow"), res.stderr[-5000:]
    assert "fastdiff::guided_step_cpu" in report and f"{NAME}.so" in report, report[:5000]  # in the op's own kernel
    assert "read past the buffer" not in res.stdout  # the process stopped at the read


# --------------------------------------------------------------------------- what the subprocesses run


def _load(build: str):
    from torch.utils.cpp_extension import load

    os.environ.pop("LD_PRELOAD", None)  # this process has ASan; the compilers it starts need not
    sources = [str(ROOT / "csrc" / f) for f in ("bindings.cpp", "step_cpu.cpp")]
    return load(name=NAME, sources=sources, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=build)


def _drive(m) -> int:
    import random

    import torch

    from fastdiff import ops

    rnd, g = random.Random(18), torch.Generator().manual_seed(18)
    calls = 0

    def make(n, dtype, misaligned):
        # A fresh allocation of exactly n elements (ASan's redzone starts right after it), or a view one element in.
        base = torch.randn(n + misaligned, generator=g, dtype=torch.float64).to(dtype)
        return base[misaligned:]

    pairs = [(tx, td) for tx, tds in ops.KERNEL_DTYPES.items() for td in tds]
    sizes = [1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 33, 97, 1025, 4 * 3 * 17 * 19]
    for tx, td in pairs:
        for n in sizes:
            for _ in range(6):
                mis = rnd.random() < 0.4
                nh, uncond, noise, write_e = (
                    rnd.randint(0, 3),
                    rnd.random() < 0.5,
                    rnd.random() < 0.5,
                    rnd.random() < 0.7,
                )
                x, dc = make(n, tx, mis), make(n, td, mis and rnd.random() < 0.5)
                du = make(n, td, mis) if uncond else None
                hist = [make(n, tx, mis and rnd.random() < 0.5) for _ in range(nh)]
                nz = make(n, tx, mis) if noise else None
                values = [rnd.uniform(-2, 2) for _ in range(6 + nh)]
                coef = values if rnd.random() < 0.5 else torch.tensor(values, dtype=torch.float64)
                x_out = make(n, tx, mis)
                e_out = make(n, tx, mis) if write_e else None
                m.guided_step(x, dc, du, hist, nz, coef, x_out, e_out)
                a, w, hx, hd, cn, *b = values
                ref_x, ref_e = ops.guided_step_reference(x, dc, du, hist, a, b, w, hx, hd, nz, cn)
                tol = dict(rtol=1e-2, atol=1e-2) if tx != torch.float32 or td != torch.float32 else {}
                torch.testing.assert_close(x_out, ref_x, **tol)
                if write_e:
                    torch.testing.assert_close(e_out, ref_e, **tol)
                g_x, g_e = make(n, tx, mis), make(n, tx, False)
                grads = m.guided_step_backward(x, dc, du, hist, nz, coef, g_x, g_e)
                want = ops._backward_reference(x, dc, du, hist, nz, torch.tensor(values, dtype=torch.float64), g_x, g_e)
                torch.testing.assert_close(grads[0], want[0], **tol)
                torch.testing.assert_close(grads[-1], want[-1], rtol=1e-3, atol=1e-3 * n)
                calls += 2

    x, short = torch.randn(4097), torch.randn(4096)
    out, e = torch.empty_like(x), torch.empty_like(x)
    c6 = [0.5, 1.0, 0.0, 1.0, 0.0, 0.5]
    bad = [
        (x, short, None, [], None, c6, out, e),  # short d_cond
        (x, x, short, [], None, c6, out, e),  # short d_uncond
        (x, x, None, [short], None, c6 + [0.1], out, e),  # short history
        (x, x, None, [], short, c6, out, e),  # short noise
        (x, x, None, [], None, c6, out[:-1], e),  # short x_out
        (x, x, None, [], None, c6, out, e[:-1]),  # short e_out
        (x, x, None, [x], None, c6, out, e),  # a coefficient short
        (x, x, None, [], None, c6 + [0.1], out, e),  # a coefficient over
        (x, x, None, [], None, torch.tensor(c6[:5]), out, e),
        (x, x, None, [x] * 4, None, c6 + [0.1] * 4, out, e),  # too much history
        (x, x.double(), None, [], None, c6, out, e),  # an unsupported pair
        (x, x.half(), x, [], None, c6, out, e),  # d_uncond unlike d_cond
        (x, x, None, [x.double()], None, c6 + [0.1], out, e),
        (x.int(), x.int(), None, [], None, c6, out.int(), e.int()),
        (x[::2], x[::2], None, [], None, c6, out[:2049], e[:2049]),  # non-contiguous
        (x, x, None, [], None, [float("nan")] + c6[1:], out, e),
        (x, x, None, [], None, [1e300] + c6[1:], out, e),  # overflows float32
        (x, x, None, [], None, torch.tensor([c6]), out, e),  # 2-D coefficients
        (x, x, None, [], None, c6, out, out),  # overlapping outputs
        (x, x, None, [], None, c6, x, e),  # an output over an input
        (x[:0], x[:0], None, [], None, c6, out[:0], None),  # empty
        (x.to("meta"), x.to("meta"), None, [], None, c6, out.to("meta"), None),
    ]
    for args in bad:
        try:
            m.guided_step(*args)
        except RuntimeError:
            calls += 1
        else:
            raise AssertionError(f"accepted a bad call: {[getattr(a, 'shape', a) for a in args]}")
    for g_x, g_e in [(short, x), (x, short), (x, x.double()), (x[::2], x[::2]), (torch.randn(1), torch.randn(1))]:
        try:
            m.guided_step_backward(x, x, None, [], None, c6, g_x, g_e)
        except RuntimeError:
            calls += 1
        else:
            raise AssertionError("accepted bad gradients")
    return calls


def _overflow(m) -> None:
    """A d_cond tensor whose memory holds half its elements: numpy's as_strided makes one that passes every check
    (same element count, contiguous), so the kernel reads past the end of the allocation."""
    import numpy as np
    import torch

    n = 4096
    buf = np.random.default_rng(0).standard_normal(n // 2).astype(np.float32)
    d_cond = torch.from_numpy(np.lib.stride_tricks.as_strided(buf, shape=(n,), strides=(4,)))
    x = torch.randn(n)
    m.guided_step(x, d_cond, None, [], None, [0.5, 1.0, 0.0, 1.0, 0.0, 0.5], torch.empty_like(x), None)
    print("read past the buffer unnoticed", flush=True)


if __name__ == "__main__":
    mode, build = sys.argv[1], sys.argv[2]
    module = _load(build)
    if mode == "drive":
        print(f"drove {_drive(module)} calls", flush=True)
    elif mode == "overflow":
        _overflow(module)
