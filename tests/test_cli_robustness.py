"""The command line under bad input, full disks, Ctrl-C and a second run on a busy directory: one line on stderr
naming the argument or the file, a non-zero status, no traceback, no hang and no half-written output."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdiff import cli, schedules
from fastdiff.cli import main

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_hang():
    """A command that blocks (opening a FIFO waits for a writer) fails the test instead of hanging the suite."""

    def timeout(signum, frame):
        raise TimeoutError("the command hung")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _error(capsys, argv: list[str], status: int = 2) -> str:
    """Run the CLI in this process; the one line it printed about the failure (after any progress report)."""
    try:
        assert main(argv) == status
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt")
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("fastdiff ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and "Traceback" not in err, err
    return lines[0]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("a regular file, not a directory")
    return f


GMM = ["sample", "--model", "gmm", "--n", "40", "--steps", "2"]


# ------------------------------------------------------------------------------------------ item 6: Ctrl-C, atomic


@pytest.fixture
def fast_reference(monkeypatch):
    """The gmm command's exact ODE solve (seconds of RK45) replaced by its input: these tests are about files."""
    monkeypatch.setattr(cli, "reference_sample", lambda model, x, sigmas, **kw: x.double())


def _sigint_inside(monkeypatch, target: str, after: int = 1) -> None:
    """Deliver a real SIGINT to this process from inside the ``after``-th call of ``target``."""
    module, name = target.rsplit(".", 1)
    real = getattr(__import__(module, fromlist=[name]), name)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == after:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, wrapped)


def _interrupted(capsys, argv: list[str]) -> str:
    try:
        status = main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt")
    err = capsys.readouterr().err
    assert status == 130 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_sigint_while_the_png_is_written_leaves_no_partial_file(capsys, monkeypatch, tmp_path, fast_reference):
    """SIGINT arrives after matplotlib has written 124 bytes of the PNG: the command says so in one line and exits
    130, and neither the PNG nor a temporary file is left behind."""
    import matplotlib.figure

    def savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(PNG + bytes(116))  # 124 bytes, as in the report
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the signal interrupts this

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    assert _interrupted(capsys, [*GMM, "--out", str(tmp_path / "x.png")]) == "fastdiff sample: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_sigint_during_training_exits_130_and_frees_the_run_directory(capsys, monkeypatch, tmp_path):
    run = tmp_path / "run"
    _sigint_inside(monkeypatch, "fastdiff.train.runtime._ema_update", after=2)  # step 2, after step 1's checkpoint
    argv = ["train", "edm", "--size", "tiny", "--steps", "5", "--batch-size", "8", "--checkpoint-every", "1",
            "--out-dir", str(run), "--no-progress"]  # fmt: skip
    assert _interrupted(capsys, argv) == "fastdiff train edm: interrupted"
    assert sorted(p.name for p in run.iterdir()) == ["ckpt-000001.safetensors", "latest", "log.csv"]


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (GMM, "fastdiff.sample"),
        (["sample", "--n", "2", "--steps", "1", "--no-teacher"], "fastdiff.generate.generate"),
        (["ld3", "--model", "gmm", "--out", "{tmp}/s.json"], "fastdiff.train.ld3.learn_schedule"),
        (["train", "edm", "--out-dir", "{tmp}/run"], "fastdiff.train.recipes.train_edm"),
        (["train", "sadm", "--out-dir", "{tmp}/run"], "fastdiff.train.recipes.train_sadm"),
        (["train", "codi", "--out-dir", "{tmp}/run"], "fastdiff.train.recipes.train_codi"),
        (["train", "cascade", "--out-dir", "{tmp}/run"], "fastdiff.train.recipes.train_cascade"),
        (["train", "classifier", "--out", "{tmp}/c.safetensors"], "fastdiff.train.recipes.train_digits_classifier"),
        (["bench", "kernels", "--out", "{tmp}/b"], "fastdiff.bench.kernels.bench_kernels"),
        (["bench", "sample", "--out", "{tmp}/b"], "fastdiff.bench.loops.bench_sample"),
    ],
)
def test_ctrl_c_is_one_line_and_status_130_in_every_command(capsys, monkeypatch, tmp_path, argv, target):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    line = _error(capsys, [a.format(tmp=tmp_path) for a in argv], status=130)
    assert line.endswith(": interrupted") and line.startswith("fastdiff ")


def test_bench_outputs_are_written_atomically(monkeypatch, tmp_path):
    """Every file the package writes goes through fastdiff.checkpoint.atomic_write (the CLI's figures: the SIGINT
    test above)."""
    from fastdiff import checkpoint
    from fastdiff.bench import kernels, loops

    written = []
    real = checkpoint.atomic_write

    def spy(path, write):
        written.append(Path(path).name)
        real(path, write)

    monkeypatch.setattr(kernels, "atomic_write", spy)
    monkeypatch.setattr(loops, "atomic_write", spy)
    row = {"workload": "euler_cfg", "dtype": "fp32", "elements": 1024, "provider": "copy", "us": 1.0, "gbps": 1.0,
           "host_us": float("nan"), "threads": 1, "device": "cpu", "copy_fraction": 1.0}  # fmt: skip
    kernels.write_results([row], tmp_path / "k")
    loops.write_results([], tmp_path / "l")
    assert sorted(written) == ["kernels.csv", "kernels.png", "sample_loops.csv", "sample_loops.png"]
    assert (tmp_path / "k" / "kernels.png").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------ item 5: a busy --out-dir


def test_train_on_a_directory_another_process_trains_in_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "from pathlib import Path; import sys, time; from fastdiff.train import runtime; "
         "runtime._acquire_run_lock(Path(sys.argv[1])); print('holding', flush=True); time.sleep(120)", str(run)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        line = _error(capsys, ["train", "edm", "--size", "tiny", "--steps", "2", "--batch-size", "8", "--out-dir",
                               str(run), "--no-progress"])  # fmt: skip
        # Sampling into it would merge parts of two runs into one samples.npz: refused the same way.
        sampled = _error(capsys, ["sample", "--n", "2", "--steps", "1", "--no-teacher", "--out-dir", str(run)])
    finally:
        holder.kill()
        holder.communicate()
    assert line.startswith(f"fastdiff train edm: error: run directory {run} is in use by another training run")
    assert sampled.startswith(f"fastdiff sample: error: run directory {run} is in use") and str(holder.pid) in sampled
    assert f"(pid {holder.pid} on host " in line and "started " in line and "command: " in line
    assert sorted(p.name for p in run.iterdir()) == [".fastdiff-run.lock"]  # the holder's, untouched
    # The holder was killed; its lock went with it (tests/test_train_runtime.py trains after a SIGKILL).
    from fastdiff.train import runtime

    runtime._release_run_lock(runtime._acquire_run_lock(run))
    assert list(run.iterdir()) == []


# ------------------------------------------------------------------------------------------ item 7: tracebacks


def test_device_that_does_not_exist_here_is_refused(capsys):
    line = _error(capsys, [*GMM, "--device", "nonsense"])
    assert "argument --device: unknown device 'nonsense'" in line
    if not torch.cuda.is_available():
        for argv in ([*GMM, "--device", "cuda"], ["train", "edm", "--device", "cuda"], ["ld3", "--out", "x.json",
                     "--device", "cuda:0"], ["bench", "kernels", "--device", "cuda"]):  # fmt: skip
            assert "argument --device: cuda" in _error(capsys, argv)


@pytest.mark.parametrize(
    ("argv", "arg"),
    [
        ([*GMM, "--out", "{f}/x.png"], "--out"),
        (["sample", "--out-dir", "{f}/samples"], "--out-dir"),
        (["train", "edm", "--out-dir", "{f}/run"], "--out-dir"),
        (["train", "edm", "--export", "{f}/m.safetensors"], "--export"),
        (["train", "classifier", "--out", "{f}/c.safetensors"], "--out"),
        (["ld3", "--model", "gmm", "--out", "{f}/s.json"], "--out"),
        (["bench", "kernels", "--out", "{f}/b"], "--out"),
        (["bench", "sample", "--out", "{f}/b"], "--out"),
    ],
)
def test_output_under_a_regular_file_is_refused_up_front(capsys, a_file, argv, arg):
    line = _error(capsys, [a.format(f=a_file) for a in argv])
    assert f" {arg} {a_file}/" in line and f"lies under {a_file}, which is not a directory" in line


@pytest.mark.parametrize(
    ("argv", "arg"),
    [
        ([*GMM, "--out", "{d}/x.png"], "--out"),
        (["sample", "--out-dir", "{d}/samples"], "--out-dir"),
        (["train", "edm", "--steps", "1", "--out-dir", "{d}/run"], "--out-dir"),
        (["train", "edm", "--steps", "1", "--export", "{d}/m.safetensors"], "--export"),
        (["ld3", "--model", "gmm", "--out", "{d}/s.json"], "--out"),
    ],
)
def test_read_only_output_directory_is_refused(capsys, monkeypatch, tmp_path, argv, arg):
    """Root writes into a chmod 0555 directory, so this simulates the read-only directory (EACCES or EROFS) that
    os.access reports; test_read_only_directory_for_a_non_root_user does it for real where the suite is not root."""
    ro = tmp_path / "ro"
    ro.mkdir()
    access = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if Path(p) == ro else access(p, mode))
    line = _error(capsys, [a.format(d=ro) for a in argv])
    assert f" {arg} {ro}/" in line and f"cannot write into {ro} (permission denied or a read-only file system)" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_for_a_non_root_user(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert "cannot write into" in _error(capsys, [*GMM, "--out", str(ro / "x.png")])


def test_out_dir_that_is_a_file_is_refused(capsys, a_file):
    for argv in (["train", "edm", "--out-dir", str(a_file)], ["sample", "--out-dir", str(a_file)]):
        assert f"--out-dir {a_file} is not a directory" in _error(capsys, argv)


def test_full_disk_is_one_line_naming_the_file(capsys, monkeypatch, tmp_path, fast_reference):
    import matplotlib.figure

    def enospc(self, fname, *args, **kwargs):
        Path(fname).write_bytes(PNG)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", enospc)
    out = tmp_path / "x.png"
    line = _error(capsys, [*GMM, "--out", str(out)])
    assert line == f"fastdiff sample: error: --out {out}: cannot write it: No space left on device"
    assert list(tmp_path.iterdir()) == []

    def export_fails(*args, **kwargs):  # what atomic_write raises deep in a training job: its temporary file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / ".model.safetensors.k3x9.tmp"))

    monkeypatch.setattr("fastdiff.train.recipes.train_edm", export_fails)
    line = _error(capsys, ["train", "edm", "--out-dir", str(tmp_path / "run")])
    assert line == f"fastdiff train edm: error: {tmp_path / 'run' / 'model.safetensors'}: No space left on device"


def test_symlink_loop_as_model_is_one_line(capsys, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    for argv in (["sample", "--model", str(a)], ["ld3", "--model", str(a), "--out", str(tmp_path / "s.json")],
                 ["train", "sadm", "--init", str(a), "--out-dir", str(tmp_path / "r")]):  # fmt: skip
        line = _error(capsys, argv)
        assert f"{a} is a symlink loop" in line and ("--model" in line or "--init" in line)


def test_unreadable_schedule_files_are_one_line(capsys, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"format": "fastdiff-schedule", "note": "caf\xe9"}')
    # The CLI names the argument where the loader raises RecursionError or UnicodeDecodeError; a loader that
    # reports the problem itself (fastdiff.schedules, once it checks) names the file.
    assert str(deep) in _error(capsys, ["sample", "--model", "gmm", "--schedule", str(deep)])
    line = _error(capsys, ["sample", "--model", "gmm", "--schedule", str(latin)])
    assert str(latin) in line and ("UTF-8" in line or "utf-8" in line)
    for error in (RecursionError("maximum recursion depth exceeded"), UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "x")):

        def load(path, error=error):
            raise error

        with pytest.raises(cli.CLIError, match=f"^--schedule {latin}: "):
            cli._load("--schedule", latin, load)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*GMM, "--seed", str(2**70)], "argument --seed: must be an integer in [0, 4294967295]"),
        (["train", "edm", "--seed", str(2**70)], "argument --seed: must be an integer in [0, 4294967295]"),
        (["bench", "kernels", "--reps", "0"], "argument --reps: must be an integer >= 1, got '0'"),
        (["bench", "sample", "--reps", "0"], "argument --reps: must be an integer >= 1, got '0'"),
        (["bench", "kernels", "--sizes", "0"], "argument --sizes: '0' is not an element count >= 1"),
        ([*GMM, "--n", "1"], "argument --n/-n/--num-samples: must be an integer >= 2, got '1'"),
        ([*GMM, "--sigma-min", "nan"], "argument --sigma-min: must be a finite number > 0, got 'nan'"),
    ],
)
def test_numbers_out_of_range_are_refused_by_name(capsys, argv, message):
    line = _error(capsys, argv)
    assert message in line, line


# ------------------------------------------------------------------------------------------ item 8: FIFOs


@pytest.mark.parametrize(
    ("argv", "arg"),
    [
        (["sample", "--model", "{p}.safetensors"], "--model"),
        (["sample", "--model", "gmm", "--schedule", "{p}.json"], "--schedule"),
        (["ld3", "--model", "{p}.safetensors", "--out", "{tmp}/s.json"], "--model"),
        (["ld3", "--model", "gmm", "--out", "{p}.json"], "--out"),
        (["ld3", "--model", "gmm", "--out", "{tmp}/s.json", "--teacher-cache", "{p}.safetensors"], "--teacher-cache"),
        (["train", "edm", "--init", "{p}.safetensors", "--out-dir", "{tmp}/run"], "--init"),
        (["train", "codi", "--teacher", "{p}.safetensors", "--out-dir", "{tmp}/run"], "--teacher"),
        (["train", "edm", "--data", "{p}.npz", "--out-dir", "{tmp}/run"], "--data"),
        (["train", "edm", "--export", "{p}.safetensors", "--out-dir", "{tmp}/run"], "--export"),
    ],
)
def test_fifo_paths_are_refused_without_opening_them(capsys, tmp_path, argv, arg):
    fifo = tmp_path / "pipe"
    argv = [a.format(p=fifo, tmp=tmp_path) for a in argv]
    path = next(a for a in argv if a.startswith(str(fifo)))
    os.mkfifo(path)
    line = _error(capsys, argv)
    assert f"{path} is not a regular file (a FIFO (named pipe)); refusing to use it as a {arg} file" in line


# ------------------------------------------------------------------------------------------ item 10: silent accepts


def test_interval_without_guidance_is_refused(capsys, tmp_path):
    for argv in ([*GMM, "--interval", "0.3,3"], ["ld3", "--out", str(tmp_path / "s.json"), "--interval", "1,2"]):
        assert "--interval limits guidance to a noise interval; it needs --guidance W" in _error(capsys, argv)


def test_guidance_steps_need_guidance_and_exclude_the_interval(capsys):
    steps = ["--guidance-steps", "2,4"]
    needs = "--guidance-steps limits guidance to a range of steps; it needs --guidance W"
    assert needs in _error(capsys, [*GMM, *steps])
    both = [*GMM, "--guidance", "3", *steps, "--interval", "0.1,2"]
    assert "give the guided steps as --interval (sigmas) or as --guidance-steps, not both" in _error(capsys, both)
    assert "expected two step indices 'start,stop', got '2,x'" in _error(capsys, [*GMM, "--guidance-steps", "2,x"])


def test_guidance_steps_guide_those_steps(capsys, tmp_path):
    """--guidance-steps 2,4 on 8 Euler steps: 3 unconditional evaluations, and the run reports the range."""
    argv = [*GMM, "--guidance", "3", "--guidance-steps", "2,4", "--steps", "8", "--solver", "euler", "--n", "64",
            "--out", str(tmp_path / "g.png")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "NFE            11 per sample (8 conditional + 3 unconditional)" in out
    assert "Guidance(scale=3.0, steps=(2, 4))" in out


def test_guidance_methods_from_the_command_line(capsys, tmp_path):
    """--guidance-method with its --guidance-option: the run says which; a step-dependent method (APG's momentum)
    has no exact ODE to compare with, and says so; options are checked against the method."""
    argv = [*GMM, "--guidance", "3", "--guidance-method", "apg", "--guidance-option", "momentum=-0.5",
            "--guidance-option", "eta=0", "--out", str(tmp_path / "a.png")]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "method='apg', eta=0.0, norm_threshold=None, momentum=-0.5" in out
    assert "error vs exact solve   none: this guidance depends on the steps taken" in out
    wrong = [*GMM, "--guidance", "3", "--guidance-method", "apg", "--guidance-option", "phi=0.5"]
    assert "guidance option phi belongs to method='rescale', not method='apg'" in _error(capsys, wrong)
    unknown = [*GMM, "--guidance", "3", "--guidance-option", "gamma=1"]
    assert "--guidance-option gamma: unknown" in _error(capsys, unknown)
    assert "they need --guidance W" in _error(capsys, [*GMM, "--guidance-method", "rescale"])


def test_cfg_pp_from_the_command_line(capsys):
    """--guidance-method cfg_pp runs with the solvers CFG++ is defined for, has no exact ODE, and names the
    solvers where it is refused."""
    assert cli.main([*GMM, "--guidance", "0.6", "--guidance-method", "cfg_pp", "--solver", "dpmpp_2m"]) == 0
    out = capsys.readouterr().out
    assert "method='cfg_pp'" in out and "depends on the steps taken (momentum, zero-init, CFG++)" in out
    assert "NFE            4 per sample (2 conditional + 2 unconditional)" in out
    wrong = [*GMM, "--guidance", "0.6", "--guidance-method", "cfg_pp", "--solver", "heun"]
    assert ("CFG++ (method='cfg_pp') is defined for the solvers euler, ddim, euler_ancestral, dpmpp_2m; 'heun' has "
            "no CFG++ form") in _error(capsys, wrong)  # fmt: skip


def test_negative_guidance_is_refused_by_the_cli(capsys):
    assert "argument --guidance: must be a finite number >= 0, got '-1'" in _error(capsys, [*GMM, "--guidance", "-1"])


def test_ld3_out_replaces_only_a_schedule(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert "--out" in _error(capsys, ["ld3", "--model", "gmm", "--out", str(notes)]) and notes.read_text() == "my notes"
    config = tmp_path / "config.json"
    config.write_text('{"lr": 1}')
    line = _error(capsys, ["ld3", "--model", "gmm", "--out", str(config)])
    assert f"--out {config} exists and is not a fastdiff schedule" in line and "--force" in line
    assert config.read_text() == '{"lr": 1}'
    # A schedule may be replaced (learn again), so may anything with --force: the refusal is the only difference.
    sched = tmp_path / "old.json"
    schedules.save(sched, schedules.karras(4, 0.1, 10.0))
    assert cli._is_schedule_file(sched) and not cli._is_schedule_file(config)


def test_ld3_without_a_free_timestep_is_refused(capsys, tmp_path):
    argv = ["ld3", "--model", "gmm", "--solver", "ipndm", "--nfe", "2", "--out", str(tmp_path / "s.json")]
    line = _error(capsys, argv)
    assert "ipndm at NFE 2 takes 2 step(s)" in line and "no timestep to learn" in line
    assert "smallest NFE is 3" in line and list(tmp_path.iterdir()) == []


def test_out_that_is_a_directory_is_refused(capsys, tmp_path):
    line = _error(capsys, [*GMM, "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a directory; give a file path inside it" in line
    assert list(tmp_path.iterdir()) == [] and not tmp_path.with_suffix(".png").exists()


def test_out_writes_exactly_the_path_it_prints(capsys, tmp_path, fast_reference):
    out = tmp_path / "plot.svg"
    assert main([*GMM, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}") and out.read_text().lstrip().startswith("<?xml")
    assert "the file name must end in .png (or " in _error(capsys, [*GMM, "--out", str(tmp_path / "plot")])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "sample", "--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
        (["bench", "sample", "--batches", "1,0"], "argument --batches: expected comma-separated integers >= 1"),
        (["bench", "sample", "--resolutions", "0"], "argument --resolutions: expected comma-separated integers >= 1"),
    ],
)
def test_bench_sample_refuses_non_positive_sizes(capsys, argv, message):
    assert message in _error(capsys, [*argv, "--scenarios", "e2e", "--models", "null", "--variants",
                                      "fastdiff_eager", "--no-progress"])  # fmt: skip


def test_bench_sample_api_refuses_zero_rather_than_taking_the_preset():
    from fastdiff.bench import loops

    with pytest.raises(ValueError, match="steps must be integers >= 1, got 0"):
        loops.bench_sample("cpu", scenarios="e2e", models="null", variants="fastdiff_eager", steps=0, progress=False)


def test_options_the_model_would_ignore_are_refused(capsys):
    assert "--class does not apply to --model gmm" in _error(capsys, [*GMM, "--class", "3"])
    assert "--unconditional does not apply to --model digits" in _error(capsys, ["sample", "--unconditional"])


def test_parse_errors_are_one_line_and_name_the_option(capsys):
    line = _error(capsys, ["sample", "--steps", "x"])
    assert (
        line == "fastdiff sample: error: argument --steps: must be an integer >= 1, got 'x' (see fastdiff sample "
        "--help)"
    )


def test_json_schedule_written_by_ld3_is_recognised(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": schedules.SCHEDULE_FORMAT, "sigmas": [1.0, 0.0]}))
    assert cli._is_schedule_file(path)
