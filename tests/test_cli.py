import re
import subprocess
import sys

import pytest

from fastdiff import schedules
from fastdiff.cli import main


def test_sample_prints_nfe_time_error_and_distance(capsys, tmp_path):
    png = tmp_path / "plot.png"
    rc = main(
        [
            "sample",
            "--model",
            "gmm",
            "--solver",
            "heun",
            "--steps",
            "8",
            "--guidance",
            "2.0",
            "--interval",
            "0.3,3.0",
            "--n",
            "300",
            "--out",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    nfe = re.search(r"NFE\s+(\d+) per sample \((\d+) conditional \+ (\d+) unconditional\)", out)
    assert nfe and int(nfe[1]) == int(nfe[2]) + int(nfe[3]) and int(nfe[2]) == 15 and int(nfe[3]) > 0
    assert re.search(r"wall time\s+[\d.]+ ms", out)
    err = re.search(r"error vs exact solve\s+mean ([\d.e+-]+)", out)
    assert err and 0 < float(err[1]) < 1
    assert re.search(r"sliced W2 to data\s+[\d.]+", out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_more_steps_give_smaller_error(capsys):
    errors = []
    for steps in ("4", "32"):
        main(["sample", "--model", "gmm", "--solver", "dpmpp_2m", "--steps", steps, "--n", "200"])
        errors.append(float(re.search(r"mean ([\d.e+-]+)", capsys.readouterr().out)[1]))
    assert errors[1] < errors[0] / 10


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "--model", "gmm", "--steps", "0"], "argument --steps: must be an integer >= 1"),
        (["sample", "--model", "nope"], "unknown model 'nope'"),
        (["sample", "--model", "missing.safetensors"], "missing.safetensors"),
        (["sample", "--interval", "3,1", "--guidance", "2"], "sigma_lo=3.0 > sigma_hi=1.0"),
        (["sample", "--schedule", "cosine"], "unknown schedule 'cosine'"),
        (["sample", "--solver", "unipc", "-O", "order=7"], "unipc order must be 1, 2 or 3"),
        (["sample", "--solver", "euler", "-O", "order=2"], "solver 'euler' has no option order; its options: none"),
        (["sample", "--solver", "lcm", "-O", "boundary_scale=0"], "boundary_scale must be > 0"),
        (["sample", "--model", "gmm", "--cond-image", "low.npy"], "--cond-image does not apply to --model gmm"),
    ],
)
def test_errors_are_reported_not_raised(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_lcm_takes_the_schedule_without_its_lowest_level(capsys):
    """A consistency model returns its input at sigma_min: N lcm steps are the first N levels of N + 1."""
    assert main(["sample", "--model", "gmm", "--solver", "lcm", "--steps", "3", "--n", "20"]) == 0
    out = capsys.readouterr().out
    levels = re.search(r"schedule karras \(3 steps at sigma ([\d. ]+)\)", out)[1].split()
    want = schedules.karras(4, 0.002, 80.0)[:3].tolist()
    assert [float(v) for v in levels] == [float(f"{v:.4g}") for v in want]
    assert re.search(r"NFE\s+3 per sample", out)


def test_help_and_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for flag in ("--model", "--solver", "--steps", "--schedule", "--guidance", "--interval", "--seed", "--out",
                 "--cond-image"):  # fmt: skip
        assert flag in res.stdout


def test_bench_kernels_writes_csv_plot_and_table(capsys, tmp_path):
    rc = main(["bench", "kernels", "--sizes", "1K", "--dtypes", "fp32", "--workloads", "euler_cfg,dpmpp_2m",
               "--no-compile", "--reps", "3", "--device", "cpu", "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    rows = (tmp_path / "kernels.csv").read_text().splitlines()
    providers = {line.split(",")[3] for line in rows[1:]}
    assert {"copy", "eager", "cpu"} <= providers and len(rows) == 1 + 2 * len(providers)
    assert (tmp_path / "kernels.png").read_bytes()[:4] == b"\x89PNG"
    assert "| euler_cfg | fp32 | 1024 | cpu |" in out


def test_bench_rejects_unknown_names(capsys):
    assert main(["bench", "kernels", "--dtypes", "fp8"]) == 2
    assert "unknown 'fp8'" in capsys.readouterr().err


def test_bench_kernels_compiles_every_row_and_records_its_threads():
    """Each compile row times a graph compiled for it, even past dynamo's recompile limit (lowered to 1 here: one
    compiled function shared by the rows would run the second eagerly, and the row's own check would raise)."""
    import torch
    import torch._dynamo

    from fastdiff.bench import kernels

    n = torch.get_num_threads()
    with torch._dynamo.config.patch(recompile_limit=1):
        rows = kernels.bench_kernels([1024, 2048], ["fp32"], ["euler_cfg", "dpmpp_2m", "apg"], "cpu", reps=2,
                                     threads=1)  # fmt: skip
    assert len([r for r in rows if r["provider"] == "compile"]) == 6
    assert {r["workload"] for r in rows if r["provider"] == "cpu"} == {"euler_cfg", "dpmpp_2m", "apg"}
    assert {r["threads"] for r in rows} == {1} and torch.get_num_threads() == n
