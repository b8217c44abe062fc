"""The Triton kernels compiled ahead of time for a Hopper GPU (sm_90) on this CPU machine, exactly as their launchers
call them (tests/triton_sm90.py, in its own process). The rest of the suite runs the kernels under Triton's
interpreter, which accepts what a GPU compile may refuse and types scalar arguments differently; this is the
CPU-side guard that the first GPU run compiles, reads its coefficients and LD3's schedule ends in float64, and
loads 128 bits at a time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_sm90.py")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


STEP_CASES = ["fp32 host", "fp32 device", "fp32+bf16 host", "bf16 host", "fp64 host"]


@pytest.mark.parametrize("case", STEP_CASES)
def test_step_kernels_compile_for_sm90_with_float64_coefficients(compiled, case):
    forward, backward = compiled[case]
    assert (forward["kernel"], backward["kernel"]) == ("_guided_step_kernel", "_guided_step_backward_kernel")
    for launch in (forward, backward):
        assert launch["cubin_bytes"] > 0
        # a, w, hx, hd, c_noise, b0..b3 travel as float64 scalars (host coefficients) and are otherwise unused
        assert list(launch["float_scalars"].values()) == ["fp64"] * 9, launch["float_scalars"]


def test_fp32_forward_kernel_loads_128_bits(compiled):
    for case in ("fp32 host", "fp32 device"):
        assert "ld.global.v4.b32" in compiled[case][0]["global_loads"], compiled[case][0]["global_loads"]


@pytest.mark.parametrize("case", STEP_CASES)
def test_guidance_kernels_compile_for_sm90_with_float64_coefficients(compiled, case):
    sums, step = compiled[f"guidance {case}"]
    assert (sums["kernel"], step["kernel"]) == ("_guidance_sums_kernel", "_guided_step_per_sample_kernel")
    assert sums["cubin_bytes"] > 0 and step["cubin_bytes"] > 0
    assert sums["float_scalars"] == {}  # the weights are read from memory
    assert list(step["float_scalars"].values()) == ["fp64"] * 9, step["float_scalars"]


def test_guidance_kernels_load_128_bits(compiled):
    """Each sample starts on a 16-element boundary here, as an image's or latent's does: the per-sample blocks load
    128 bits at a time (the scalar loads are the per-sample weights)."""
    for case in STEP_CASES:
        wide = "ld.global.v2.b64" if case.startswith("fp64") else "ld.global.v4.b32"
        for launch in compiled[f"guidance {case}"]:
            assert wide in launch["global_loads"], (case, launch["kernel"], launch["global_loads"])


def test_ld3_kernels_compile_for_sm90_with_float64_ends(compiled):
    forward, backward = compiled["ld3"]
    for launch in (forward, backward):
        assert launch["cubin_bytes"] > 0
        assert launch["float_scalars"] == {"lo": "fp64", "hi": "fp64"}


def test_an_unannotated_python_float_compiles_as_float32(compiled):
    """The premise of the tests above, on Triton itself: without the annotation, LD3's ends would be float32 on a
    GPU and off by about 1e-7 relative."""
    (launch,) = compiled["premise"]
    assert launch["float_scalars"] == {"lo": "fp32", "hi": "fp64"}
