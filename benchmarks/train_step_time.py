"""Training time per step of every fastdiff trainer on the digits, measured alone (one job at a time).

The comparison scripts (cascade_digits.py, sadm_digits.py) read the time per step from their runs' logs, but
those runs usually share the machine with each other. This script runs each job for --steps steps with the same
network size, batch and thread count, one after another, and reports the time per step between the 20th and the
last step (skipping the first steps' warm-up), the median of --repeats runs. Writes train_step_time.csv to --out
(rows of jobs not run this time are kept) and prints a Markdown table.

    python benchmarks/train_step_time.py --out benchmarks/results/cpu
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _training_runs import merge_csv, write_csv

JOBS = {
    "edm": ["edm"],
    "sadm": ["sadm"],
    "ddpm": ["cascade", "--variant", "ddpm"],
    "dual": ["cascade", "--variant", "dual", "--metric", "auto"],
    "cascade_nometric": ["cascade", "--variant", "cascade", "--metric", "none"],
    "cascade_metric": ["cascade", "--variant", "cascade", "--metric", "auto"],
    "codi": ["codi", "--trainable", "all"],
    "codi_pe": ["codi", "--trainable", "adapter"],
}
SKIP = 20


def step_time(job: list[str], steps: int, batch: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "fastdiff", "train", *job, "--steps", str(steps), "--batch-size", str(batch),
               "--checkpoint-every", str(steps), "--out-dir", out, "--no-progress"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(Path(out) / "log.csv") as f:
            rows = {int(r["step"]): float(r["time_s"]) for r in csv.DictReader(f)}
    return (rows[steps] - rows[SKIP]) / (steps - SKIP)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    p.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of " + ",".join(JOBS))
    p.add_argument("--steps", type=int, default=60, help="steps per run (a multiple of 10, above 20)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.steps <= SKIP or args.steps % 10:
        p.error(f"--steps must be a multiple of 10 above {SKIP} (the log has a row every 10 steps)")
    rows = []
    for name in args.jobs.split(","):
        if name not in JOBS:
            p.error(f"unknown job {name!r}; choose from {list(JOBS)}")
        times = [step_time(JOBS[name], args.steps, args.batch_size, args.threads) for _ in range(args.repeats)]
        rows.append({"job": name, "s_per_step": statistics.median(times), "min": min(times), "max": max(times),
                     "batch": args.batch_size, "threads": args.threads})  # fmt: skip
        print(f"{name:17s} {rows[-1]['s_per_step']:.3f} s/step ({min(times):.3f}-{max(times):.3f})", flush=True)
    path = args.out / "train_step_time.csv"
    rows = merge_csv(rows, path, lambda r: list(JOBS).index(r["job"]), ("job",))
    write_csv(rows, path)
    base = {r["job"]: r["s_per_step"] for r in rows}
    print("\n| job | s/step (median; min-max) | vs edm | vs ddpm |\n|---|---|---|---|")
    for r in rows:
        vs = [f"{r['s_per_step'] / base[b]:.2f}x" if b in base else "-" for b in ("edm", "ddpm")]
        print(f"| {r['job']} | {r['s_per_step']:.3f} ({r['min']:.3f}-{r['max']:.3f}) | {vs[0]} | {vs[1]} |")


if __name__ == "__main__":
    main()
