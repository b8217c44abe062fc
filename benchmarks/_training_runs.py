"""What the training comparisons on the digits share (cascade_digits.py, sadm_digits.py): train the runs that are
missing with the ``fastdiff train`` CLI, read a run's time per step from its log, sample and judge a model, and
summarise several seeds as their mean and range; and the CSV writer other benchmarks use too."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastdiff import generate
from fastdiff.checkpoint import atomic_write


def train_missing(run_dir: Path, job_args: list[str]) -> None:
    """``fastdiff train JOB_ARGS --out-dir RUN_DIR`` unless ``RUN_DIR/model.safetensors`` exists."""
    if (run_dir / "model.safetensors").exists():
        return
    cmd = [sys.executable, "-m", "fastdiff", "train", *job_args, "--out-dir", str(run_dir), "--no-progress"]
    print("training:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def seconds_per_step(log_csv: Path) -> float:
    """Training wall time per optimizer step over a whole run (from the last row of its ``log.csv``)."""
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["time_s"]) / int(rows[-1]["step"])


def sample_and_judge(model, sigmas: torch.Tensor, solver, shape, num_classes: int, n: int, batch: int, judge) -> dict:
    """Samples ``0..n-1`` (sample i: class i mod 10, always the same noise), no guidance: NFE, FD, accuracy and
    the sampling wall time."""
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = generate.generate(model, torch.arange(n), sigmas, solver=solver, shape=shape, num_classes=num_classes,
                                batch_size=batch)  # fmt: skip
    return {"nfe": gen.nfe, **judge(gen.images, gen.labels), "sample_s": time.perf_counter() - t0}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def cell(values: list[float], digits: int) -> str:
    """The mean, with the range over seeds when there are several: ``"1.234 (1.100-1.300)"``."""
    text = f"{mean(values):.{digits}f}"
    return text if len(values) == 1 else f"{text} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def fd_accuracy_cell(rows: list[dict]) -> str:
    """``"FD / accuracy"`` of the rows (the seeds of one cell), each as :func:`cell` gives it."""
    return f"{cell([r['fd'] for r in rows], 3)} / {cell([r['accuracy'] for r in rows], 3)}"


def read_csv(path: Path, text: tuple[str, ...]) -> list[dict]:
    """Rows written by :func:`write_csv`: the ``text`` columns as strings, integer-valued ones as ints, the rest
    as floats (for redrawing a plot without sampling again)."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return [{k: v if k in text else (int(v) if v.lstrip("-").isdigit() else float(v)) for k, v in r.items()}
            for r in rows]  # fmt: skip


def merge_csv(rows: list[dict], path: Path, key, text: tuple[str, ...]) -> list[dict]:
    """``rows`` plus the rows of ``path`` (when it exists) whose ``key(row)`` none of ``rows`` has, sorted by
    ``key``: a rerun of some jobs keeps the others' results."""
    if path.exists():
        done = {key(r) for r in rows}
        rows = [r for r in read_csv(path, text) if key(r) not in done] + rows
    return sorted(rows, key=key)


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` as a CSV file at ``path`` (its folder made), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
