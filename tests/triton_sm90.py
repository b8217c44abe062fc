"""Compiles fastdiff's Triton kernels for a Hopper GPU (sm_90) ahead of time, on a machine without one, exactly as
their launchers call them, and prints what tests/test_triton_compile.py checks as JSON. It runs in its own process
because the test suite imports Triton with its interpreter on, and the interpreted and compiled forms of Triton's
own library functions cannot be mixed in one process."""

import json
import os
import sys
import tempfile
import textwrap
import warnings

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with the Triton interpreter off"
warnings.filterwarnings("ignore")  # Triton's notice about its FP-fusion default; irrelevant to what is checked

import importlib.util  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import fastdiff.kernels.guidance as guidance_kernels  # noqa: E402
import fastdiff.kernels.guided_step as step_kernels  # noqa: E402
import fastdiff.kernels.ld3_sigmas as ld3_kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def launches(module, name: str, launcher, *args) -> list[tuple]:
    """``(kernel, args, kwargs)`` of every launch of ``module.name`` while ``launcher(*args)`` runs (nothing runs)."""
    seen, kernel = [], getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((kernel, args, kwargs))

    setattr(module, name, Spy())
    try:
        launcher(*args)
    finally:
        setattr(module, name, kernel)
    return seen


def compile_launch(kernel, args, kwargs) -> dict:
    """The argument types Triton's launcher derives from these arguments, and what the sm_90 compile of the kernel
    with that signature (and its constants and alignment attributes) gives."""
    backend = make_backend(TARGET)
    _, spec, _ = create_function_from_signature(kernel.signature, kernel.params, backend)(*args, **kwargs)
    names = list(kernel.signature.parameters)
    signature = {n: ty for n, (ty, _) in zip(names, spec)}
    constexprs = {(i,): v for i, (ty, v) in enumerate(spec) if ty == "constexpr"}
    attrs = {(i,): backend.parse_attr(a) for i, (ty, a) in enumerate(spec) if ty != "constexpr" and isinstance(a, str)}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET)
    ptx = compiled.asm["ptx"]
    return {
        "kernel": kernel.fn.__name__,
        "float_scalars": {n: ty for n, ty in signature.items() if ty.startswith(("fp", "bf"))},
        "cubin_bytes": len(compiled.asm["cubin"]),
        "global_loads": sorted({t for line in ptx.splitlines() for t in line.split() if t.startswith("ld.global")}),
    }


STEP_CASES = {  # state dtype, model-output dtype, coefficients in a device tensor
    "fp32 host": (torch.float32, torch.float32, False),
    "fp32 device": (torch.float32, torch.float32, True),
    "fp32+bf16 host": (torch.float32, torch.bfloat16, False),
    "bf16 host": (torch.bfloat16, torch.bfloat16, False),
    "fp64 host": (torch.float64, torch.float64, False),
}


def step_cases() -> dict:
    out, n = {}, 4096
    for name, (tx, td, device_coef) in STEP_CASES.items():
        x, h, g = (torch.randn(n).to(tx) for _ in range(3))
        dc, du = (torch.randn(n).to(td) for _ in range(2))
        coef = [0.7, 2.5, 0.4, -0.3, 0.0, 0.3, -0.2]
        if device_coef:
            coef = torch.tensor(coef, dtype=torch.float64 if tx == torch.float64 else torch.float32)
        out_x, out_e = torch.empty_like(x), torch.empty_like(x)
        runs = launches(step_kernels, "_guided_step_kernel", step_kernels.guided_step, x, dc, du, [h], None, coef,
                        out_x, out_e)  # fmt: skip
        runs += launches(step_kernels, "_guided_step_backward_kernel", step_kernels.guided_step_backward, x, dc, du,
                         [h], None, coef, g, g)  # fmt: skip
        out[name] = [compile_launch(*run) for run in runs]
    return out


def guidance_cases() -> dict:
    """The per-sample guidance kernels (``guidance <case>``: sums, then step) on two samples of 4096 elements, so
    that each sample spans several blocks, in the dtypes of the step cases."""
    out, shape = {}, (2, 4096)
    for name, (tx, td, device_coef) in STEP_CASES.items():
        acc = torch.float64 if tx == torch.float64 else torch.float32
        x, h = (torch.randn(shape).to(tx) for _ in range(2))
        dc, du = (torch.randn(shape).to(td) for _ in range(2))
        mix, guide, sums = torch.randn(2, 6, dtype=acc), torch.randn(2, 3, dtype=acc), torch.empty(2, 5, dtype=acc)
        coef = [0.7, 0.0, 0.4, -0.3, 0.0, 0.3, -0.2]
        if device_coef:
            coef = torch.tensor(coef, dtype=acc)
        out_x, out_e = torch.empty_like(x), torch.empty_like(x)
        runs = launches(guidance_kernels, "_guidance_sums_kernel", guidance_kernels.guidance_sums, x, dc, du, mix,
                        sums)  # fmt: skip
        runs += launches(guidance_kernels, "_guided_step_per_sample_kernel", guidance_kernels.guided_step_per_sample,
                         x, dc, du, [h], None, coef, guide, out_x, out_e)  # fmt: skip
        out[f"guidance {name}"] = [compile_launch(*run) for run in runs]
    return out


def ld3_cases() -> dict:
    xi = torch.randn(33, dtype=torch.float64)
    runs = launches(ld3_kernels, "_ld3_sigmas_kernel", ld3_kernels.ld3_sigmas, xi, -6.2, 4.4, True)
    backward = ld3_kernels.ld3_sigmas_backward
    runs += launches(ld3_kernels, "_ld3_sigmas_backward_kernel", backward, xi, xi, -6.2, 4.4, True)
    return {"ld3": [compile_launch(*run) for run in runs]}


def premise() -> dict:
    """Triton itself: an unannotated Python float argument compiles as float32, an annotated one as float64."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "premise.py")
        with open(path, "w") as f:
            f.write(textwrap.dedent("""
                import triton
                import triton.language as tl


                @triton.jit
                def premise_kernel(out_ptr, lo, hi: tl.float64):
                    tl.store(out_ptr, lo + hi)
            """))
        spec = importlib.util.spec_from_file_location("premise", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return {"premise": [compile_launch(module.premise_kernel, (torch.empty(1, dtype=torch.float64), 0.1, 0.2), {})]}


if __name__ == "__main__":
    json.dump({**step_cases(), **guidance_cases(), **ld3_cases(), **premise()}, sys.stdout)
