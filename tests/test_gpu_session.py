"""benchmarks/gpu_session.sh, rehearsed on this CPU machine (`--rehearse`: every stage runs a CPU form of its
command), so that the script's own mistakes surface before device time is spent, and its budget checked."""

import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STAGES = ["build", "check", "tests", "sanitizer", "kernels", "cache", "sample"]


def test_the_stages_fit_eight_minutes():
    """Each stage's slice adds to the deadlines; together they end within 8 minutes of the script's start."""
    text = SCRIPT.read_text()
    rehearsal = text.index("if [ $REHEARSE = 1 ]; then\n    stage build")
    gpu_path = text[:rehearsal] + text[text.index("else\n    stage build") :]
    slices = {name: int(s) for name, s in re.findall(r"^\s*stage (\w+) (\d+) ", gpu_path, flags=re.M)}
    assert set(slices) == {"wheels", *STAGES}, slices
    assert sum(slices.values()) <= 8 * 60, slices


def test_rehearsal_runs_every_stage_and_returns_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "WHEELS": str(tmp_path / "no-wheels"), "PYTHON": sys.executable,
           "HOME": str(tmp_path)}  # fmt: skip
    res = subprocess.run(["bash", str(SCRIPT), "--rehearse"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["cache_speed.csv", "kernels.csv", "kernels.png", "logs.tar.gz", "sample_loops.csv",
                     "sample_loops.png", "summary.txt"]  # fmt: skip
    summary = (out / "summary.txt").read_text()
    for stage in STAGES:
        line = next(line for line in summary.splitlines() if line.startswith(f"{stage}: "))
        if stage == "check":  # this machine has no CUDA build: the one line that would stop a GPU run
            assert "stopped: fastdiff._C was built without CUDA" in line, line
        else:
            assert line.startswith(f"{stage}: ok"), line
    assert re.search(r"^tests: ok .* (\d+)/\d+ tests collected", summary, flags=re.M)
    assert int(re.search(r"^sanitizer: ok .*: (\d+)/\d+ tests collected", summary, flags=re.M).group(1)) >= 24
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {f"{stage}.log" for stage in STAGES} | {"summary.txt"} <= names
