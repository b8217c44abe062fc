"""The extension is built by `pip install`, and the CUDA sources compile with nvcc where it exists."""

import inspect
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp

from fastdiff import ops

ROOT = Path(__file__).resolve().parents[1]


def _torch_cxx_std() -> str:
    """The C++ standard torch's BuildExtension adds when a build names none, as setup.py does: the one the
    installed torch's headers need."""
    found = re.findall(r"cpp_flag_prefix \+ '(c\+\+\d+)'", inspect.getsource(cpp.BuildExtension))
    assert len(set(found)) == 1, f"cannot tell which -std torch's BuildExtension adds (found {found})"
    return found[0]


CXX_STD = f"-std={_torch_cxx_std()}"
# The flags torch's extension build passes to nvcc (no implicit half/bfloat16 conversions), and setup.py's -O3.
NVCC_FLAGS = [*cpp.COMMON_NVCC_FLAGS, CXX_STD, "-O3"]
ARCHS = ["80", "90"]


def test_extension_is_built():
    assert ops.extension_available(), "fastdiff._C did not import; was the package installed with its extension?"
    assert "cpu" in ops.available_backends()


def test_extension_op_matches_reference():
    from fastdiff import _C

    g = torch.Generator().manual_seed(3)
    x, dc, du, h, nz = (torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(5))
    x_out, e_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))  # poison
    _C.guided_step(x, dc, du, [h], nz, [0.9, 1.7, 0.0, 1.0, 0.2, 0.05, 0.05], x_out, e_out)
    rx, rd = ops.guided_step_reference(x, dc, du, [h], 0.9, [0.05, 0.05], 1.7, noise=nz, c_noise=0.2)
    assert torch.allclose(x_out, rx, rtol=0, atol=1e-14)
    assert torch.allclose(e_out, rd, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda C, x, out: C.guided_step(x, x.double(), None, [], None, [1] * 6, out, None), "unsupported dtypes"),
        (lambda C, x, out: C.guided_step(x, x, None, [x.double()], None, [1] * 7, out, None), "history has dtype"),
        (lambda C, x, out: C.guided_step(x, x[:5], None, [], None, [1] * 6, out, None), "d_cond has 5 elements"),
        (lambda C, x, out: C.guided_step(x, x, None, [], None, [1] * 5, out, None), "need 6 \\+ len\\(history\\)"),
        (lambda C, x, out: C.guided_step(x, x, None, [], None, [float("nan")] * 6, out, None), "must be finite"),
    ],
)  # fmt: skip
def test_extension_checks_its_inputs(call, match):
    from fastdiff import _C

    with pytest.raises(RuntimeError, match=match):
        call(_C, torch.randn(10), torch.empty(10))


def test_extension_refuses_outputs_that_overlap_inputs():
    """The kernels take every pointer as __restrict__: an output may share no byte with an input or the other
    output, and the error names both tensors."""
    from fastdiff import _C

    x, dc, du, h0, h1, nz = (torch.randn(10) for _ in range(6))

    def call(x_out, e_out):
        _C.guided_step(x, dc, du, [h0, h1], nz, [1.0] * 8, x_out, e_out)

    buf = torch.empty(20)
    call(buf[:10], buf[10:])  # adjacent, not overlapping
    for name, t in [("x", x), ("d_cond", dc), ("d_uncond", du), ("history\\[1\\]", h1), ("noise", nz)]:
        with pytest.raises(RuntimeError, match=f"x_out overlaps {name};"):
            call(t, torch.empty(10))
        with pytest.raises(RuntimeError, match=f"e_out overlaps {name};"):
            call(torch.empty(10), t)
    with pytest.raises(RuntimeError, match="e_out overlaps x_out;"):
        call(buf[:10], buf[9:19])  # one shared element
    shared = torch.randn(15)
    with pytest.raises(RuntimeError, match="x_out overlaps d_cond;"):
        _C.guided_step(x, shared[:10], None, [], None, [1.0] * 6, shared[5:], None)


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """t's values, `offset` elements into a fresh NaN-filled buffer: misaligned for the kernels' 16-byte vectors
    unless offset is a multiple of the vector width."""
    buf = torch.full((t.numel() + offset,), float("nan"), dtype=t.dtype)
    return buf[offset:].view(t.shape).copy_(t)


@pytest.mark.parametrize("tx,td", [(tx, td) for tx, tds in ops.KERNEL_DTYPES.items() for td in tds], ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1025, 3876], ids=lambda n: f"n{n}")
def test_vector_and_scalar_paths_agree(tx, td, n):
    """The kernels move 16-byte vectors when every tensor is aligned, and go element by element for the tail and
    whenever any one tensor is misaligned. The CPU kernel splits the work and runs the vector code exactly as the
    CUDA one does (csrc/step_math.h), so here every placement must give the same bits, and match the reference."""
    from fastdiff import _C

    g = torch.Generator().manual_seed(n)
    make = lambda dtype: (torch.randn(n, generator=g, dtype=torch.float64) * 2).to(dtype)  # noqa: E731
    inputs = [make(tx), make(td), make(td), make(tx), make(tx), make(tx), make(tx)]  # x, Dc, Du, noise, 3 history
    poison = torch.full((n,), float("nan"), dtype=tx)
    coef = [0.7, 2.5, 0.4, -0.4, 0.35, 0.3, -0.2, 0.15, 0.05]

    def run(offsets):  # one offset per tensor: the 7 inputs, then x_out and e_out
        x, dc, du, noise, *hist, x_out, e_out = (_at_offset(t, o) for t, o in zip([*inputs, poison, poison], offsets))
        _C.guided_step(x, dc, du, hist, noise, coef, x_out, e_out)
        return x_out, e_out

    aligned = run([0] * 9)
    for offsets in ([1] * 9, *([0] * k + [1] + [0] * (8 - k) for k in range(9))):
        got = run(offsets)
        assert torch.equal(got[0], aligned[0]) and torch.equal(got[1], aligned[1]), offsets

    def reference(dtype=None):
        x, dc, du, noise, *hist = (t if dtype is None else t.to(dtype) for t in inputs)
        return ops.guided_step_reference(x, dc, du, hist, 0.7, coef[5:], 2.5, 0.4, -0.4, noise, 0.35)

    for got, ref, same in zip(aligned, reference(torch.float64), reference()):
        # Twice the error of the same-dtype reference, plus one rounding of the output (as in test_ops.py).
        tol = 2 * (same.double() - ref).abs().max().item() + torch.finfo(tx).eps * ref.abs().max().item()
        assert (got.double() - ref).abs().max().item() <= tol


# ------------------------------------------------------------------------------------------- nvcc and ptxas


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"sm_{a}")
def nvcc_build(request, tmp_path_factory):
    """Every .cu compiled once per architecture as torch's build compiles it, with ptxas's resource report:
    (arch, {file stem: (object path, nvcc's return code, its stderr)})."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    arch, out = request.param, tmp_path_factory.mktemp(f"sm_{request.param}")
    builds = {}
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        obj = out / (cu.stem + ".o")
        cmd = ["nvcc", *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c", str(cu)]
        res = subprocess.run([*cmd, "-o", str(obj)], capture_output=True, text=True)
        builds[cu.stem] = (obj, res.returncode, res.stderr)
    return arch, builds


def test_cuda_kernels_compile_with_nvcc(nvcc_build):
    _, builds = nvcc_build
    for stem, (_, rc, stderr) in builds.items():
        assert rc == 0, f"{stem}.cu:\n{stderr}"


_PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(\w+)' for 'sm_\d+'\n.*?Function properties for \1\n"
    r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
    re.DOTALL,
)


def _demangle(names: list) -> list:
    """C++ names as written, where c++filt exists; the mangled ones otherwise."""
    if shutil.which("c++filt") is None:
        return names
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return res.stdout.splitlines()


def test_cuda_kernels_use_no_local_memory(nvcc_build):
    """A stack frame means the kernel keeps something in local memory (an array indexed at run time, or a copy
    of the parameter struct), which costs local loads and stores and can cost the loads their global address
    space; spills mean too many registers. Either is a regression in a kernel that should stream memory."""
    arch, builds = nvcc_build
    entries = [m for _, rc, stderr in builds.values() if rc == 0 for m in _PTXAS_ENTRY.findall(stderr)]
    # 6 dtype pairs x 32 forward and 16 backward flag combinations: fewer means the report was not parsed.
    assert len(entries) > 100, f"parsed only {len(entries)} kernel entries from ptxas -v for sm_{arch}"
    bad = [(name, stack, st, ld) for name, stack, st, ld in entries if (stack, st, ld) != ("0", "0", "0")]
    lines = [f"{n}: {stack} B stack, {st} B spill stores, {ld} B spill loads" for n, (_, stack, st, ld) in
             zip(_demangle([b[0] for b in bad]), bad)]  # fmt: skip
    assert not bad, f"{len(bad)} of {len(entries)} kernels use local memory on sm_{arch}:\n" + "\n".join(lines)


def _cuobjdump():
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    except ImportError:
        bundled = None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for tool in (bundled, shutil.which("cuobjdump"), os.path.join(home, "bin", "cuobjdump")):
        if tool and os.access(tool, os.X_OK):
            return tool
    return None


def _sass_by_kernel(obj: Path) -> dict:
    """{demangled kernel name: its SASS} for the kernels in an object file."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither in triton's wheel, on PATH, nor in $CUDA_HOME/bin)")
    if shutil.which("c++filt") is None:
        pytest.skip("no c++filt to demangle the kernel names")
    sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"^\s*Function : (\S+)\n", sass, flags=re.MULTILINE)[1:]
    return dict(zip(_demangle(parts[::2]), parts[1::2]))


def test_forward_kernels_use_wide_global_loads_and_stores(nvcc_build):
    """The forward pass streams memory: 128-bit loads and stores of the state tensors (64-bit loads of the four
    bf16/fp16 model outputs that go with four fp32 states), through global (LDG/STG), never generic, addressing."""
    arch, builds = nvcc_build
    obj, rc, stderr = builds["step_cuda"]
    assert rc == 0, stderr
    kernels = {k: v for k, v in _sass_by_kernel(obj).items() if "guided_step_kernel<" in k}
    assert len(kernels) == 6 * 32, f"found {len(kernels)} forward kernels in the sm_{arch} SASS"
    # Guided, two history entries, no noise, writing E: x, d_cond, d_uncond and both history entries are read.
    want = {  # (state, model output) -> (instruction, how many at least) in its vector path
        ("float", "float"): [("LDG.E.128", 5), ("STG.E.128", 2)],
        ("float", "__nv_bfloat16"): [("LDG.E.128", 3), ("LDG.E.64", 2), ("STG.E.128", 2)],
        ("float", "__half"): [("LDG.E.128", 3), ("LDG.E.64", 2), ("STG.E.128", 2)],
        ("__nv_bfloat16", "__nv_bfloat16"): [("LDG.E.128", 5), ("STG.E.128", 2)],
        ("__half", "__half"): [("LDG.E.128", 5), ("STG.E.128", 2)],
        ("double", "double"): [("LDG.E.128", 5), ("STG.E.128", 2)],
    }
    for (tx, td), expected in want.items():
        name = f"guided_step_kernel<true, 2, false, true, {tx}, {td}, {'double' if tx == 'double' else 'float'}>"
        sass = next((v for k, v in kernels.items() if name in k), None)
        assert sass is not None, f"no {name} in the sm_{arch} SASS"
        ops_used = re.findall(r"\b((?:LDG|STG|LD|ST|LDL|STL)(?:\.[A-Z0-9_]+)*)\b", sass)
        for op, count in expected:
            # nvcc may add cache qualifiers (LDG.E.128.CONSTANT, LDG.E.ENL2.128, ...): match the width and kind.
            kind, width = op.split(".E.")
            got = sum(1 for o in ops_used if o.startswith(kind + ".") and f".{width}" in o)
            assert got >= count, f"{name} on sm_{arch}: {got} {op}, expected at least {count}: {sorted(set(ops_used))}"
        generic = sorted({o for o in ops_used if o.split(".")[0] in ("LD", "ST", "LDL", "STL")})
        assert not generic, f"{name} on sm_{arch} uses generic or local memory instructions {generic}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_glue_compiles(tmp_path):
    """The torch side of the CUDA path (compiled only with a CUDA torch) at least parses against torch's headers.

    A CPU torch wheel ships the c10/cuda headers but not the CMake-generated macro header; an empty one serves.
    """
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    cuda_include = found[0] if found else None
    if cuda_include is None:
        pytest.skip("no CUDA toolkit headers found (set CUDA_HOME)")
    python_include = sysconfig.get_paths()["include"]
    includes = [tmp_path, *cpp.include_paths(), cuda_include, python_include, ROOT / "csrc"]
    cmd = ["c++", CXX_STD, "-fsyntax-only", "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C"]
    cmd += [f"-I{p}" for p in includes]
    for src in ("step_cuda_glue.cpp", "bindings.cpp"):
        res = subprocess.run([*cmd, str(ROOT / "csrc" / src)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
