"""What the command line tells a new user (issue 23): each default said once in --help and none that misleads, the
option and the value named in a bad --sizes, the rows `bench sample` skips for a missing peer said up front, an
honest held-out FD line at small n, and figures whose columns name their class and whose title names a learned
schedule."""

from __future__ import annotations

import csv
import re

import pytest

import fastdiff
from fastdiff import cli, schedules
from fastdiff.bench import peers
from fastdiff.cli import main

COMMANDS = [["sample"], ["ld3"], ["train", "edm"], ["train", "sadm"], ["train", "codi"], ["train", "cascade"],
            ["train", "classifier"], ["bench", "kernels"], ["bench", "sample"]]  # fmt: skip
DIGITS = ["sample", "--n", "20", "--steps", "4", "--no-teacher"]


def _options(capsys, monkeypatch, command: list[str]) -> dict[str, str]:
    """``fastdiff COMMAND --help``'s options, each as its flags -> its help joined onto one line."""
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    entries: dict[str, str] = {}
    flags = None
    for line in text.splitlines():
        m = re.match(r"  (-\S.*?)(?:  +(\S.*))?$", line)
        if m:
            flags = m[1]
            entries[flags] = m[2] or ""
        elif flags is not None and line.strip():
            entries[flags] = f"{entries[flags]} {line.strip()}".strip()
    return {flags.split()[0].rstrip(","): help for flags, help in entries.items()}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_states_each_default_once_and_never_none(capsys, monkeypatch, command):
    options = _options(capsys, monkeypatch, command)
    assert len(options) > 3
    for flag, text in options.items():
        assert text.lower().count("default") <= 1, (flag, text)
        for empty in ("(default: None)", "(default: [])", "(default: True)", "(default: False)"):
            assert empty not in text, (flag, text)


def test_help_keeps_the_default_a_help_text_states(capsys, monkeypatch):
    options = _options(capsys, monkeypatch, ["sample"])
    assert options["--steps"].startswith("solver steps N (default: 4 with lcm, 10 for images, 6 for gmm).")
    assert options["--n"].startswith("number of samples (default: 200 for images, 2000 for gmm);")
    assert options["--seed"] == "seed of the initial noise (default: 0)"
    assert options["--interval"].endswith("; default: every step")
    assert options["--guidance-method"].endswith("(usually 0..1) (default: cfg)")


@pytest.mark.parametrize("command", [["train", "edm"], ["bench", "sample"]], ids=" ".join)
def test_no_progress_says_progress_is_shown_unless_given(capsys, monkeypatch, command):
    assert _options(capsys, monkeypatch, command)["--no-progress"] == (
        "hide the progress bar (it is shown unless this is given)"
    )


def test_bench_kernels_help_shows_its_defaults(capsys, monkeypatch):
    options = _options(capsys, monkeypatch, ["bench", "kernels"])
    assert options["--reps"] == "timed repetitions on the CPU (default: 20)"
    assert options["--dtypes"].endswith("(default: fp32,fp32+bf16)")
    assert options["--out"] == "folder for kernels.csv and kernels.png (default: bench-results)"
    assert options["--sizes"] == "elements per tensor, e.g. 16K,1M,50M (default: those on a GPU, 16K,1M on the CPU)"


@pytest.mark.parametrize("sizes,bad", [("16Q", "16Q"), ("16K,1Q", "1Q"), ("0", "0"), ("inf", "inf"), ("1K,", "")])
def test_bench_kernels_bad_size_names_the_option_and_the_value(capsys, tmp_path, sizes, bad):
    assert main(["bench", "kernels", "--sizes", sizes, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err == (
        f"fastdiff bench kernels: error: argument --sizes: {bad!r} is not an element count >= 1 (a number, with K "
        "for 2^10 or M for 2^20); give comma-separated counts such as 16K,1M,50M (see fastdiff bench kernels "
        "--help)\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_bench_kernels_unknown_dtype_names_the_option(capsys):
    assert main(["bench", "kernels", "--dtypes", "fp32,fp8"]) == 2
    assert capsys.readouterr().err == (
        "fastdiff bench kernels: error: --dtypes: unknown 'fp8'; choose from ['fp32', 'fp32+bf16']\n"
    )


# ------------------------------------------------------------------------------- bench sample without its peers

BENCH = ["bench", "sample", "--preset", "cpu", "--models", "null,unet", "--batches", "1", "--steps", "2", "--reps",
         "1", "--scenarios", "e2e", "--variants", "kdiffusion,diffusers,fastdiff_eager", "--no-progress"]  # fmt: skip


@pytest.fixture
def no_peers(monkeypatch):
    """diffusers and k-diffusion as where they are not installed (the import fails; here they are installed)."""

    def missing(name, install):
        def load():
            raise peers.PeerMissing(f"needs {name} ({install}): No module named {name.replace('-', '_')!r}")

        return load

    monkeypatch.setattr(peers, "diffusers", missing("diffusers", peers.DIFFUSERS_INSTALL))
    monkeypatch.setattr(peers, "k_diffusion_sampling", missing("k-diffusion", peers.K_DIFFUSION_INSTALL))


def _notes(folder) -> list[tuple[str, str, str]]:
    with open(folder / "sample_loops.csv", newline="") as f:
        return [(r["model"], r["variant"], r["note"]) for r in csv.DictReader(f)]


def test_bench_sample_says_up_front_which_rows_a_missing_peer_skips(capsys, tmp_path, no_peers):
    assert main([*BENCH, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == (
        "5 of 6 rows skipped, their optional packages not importable here: diffusers (pip install "
        "'fastdiff[diffusers]') for model unet and variant diffusers: 4 rows; k-diffusion (pip install k-diffusion "
        "--no-deps && pip install torchsde torchdiffeq scipy) for variant kdiffusion: 1 row"
    )
    assert "failed" not in captured.err + captured.out
    needs = {"diffusers": "skipped: needs diffusers (pip install 'fastdiff[diffusers]'): No module named 'diffusers'",
             "k-diffusion": f"skipped: needs k-diffusion ({peers.K_DIFFUSION_INSTALL}): No module named "
                            "'k_diffusion'"}  # fmt: skip
    assert _notes(tmp_path) == [
        ("null", "kdiffusion", needs["k-diffusion"]), ("null", "diffusers", needs["diffusers"]),
        ("null", "fastdiff_eager", ""), ("unet", "kdiffusion", needs["diffusers"]),
        ("unet", "diffusers", needs["diffusers"]), ("unet", "fastdiff_eager", needs["diffusers"]),
    ]  # fmt: skip


def test_bench_sample_fails_with_status_1_only_for_rows_that_failed(capsys, monkeypatch, tmp_path, no_peers):
    def broken(*args, **kwargs):
        raise RuntimeError("the sampler broke")

    monkeypatch.setattr(fastdiff, "Sampler", broken)
    assert main([*BENCH, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("5 of 6 rows skipped, their optional packages not importable here: diffusers")
    assert err[-1] == "1 row failed (see its note): e2e null b=1 fastdiff_eager"
    assert _notes(tmp_path)[2] == ("null", "fastdiff_eager", "failed: RuntimeError: the sampler broke")


def test_bench_sample_with_its_peers_says_nothing_up_front(capsys, tmp_path, k_diffusion):
    argv = [*BENCH, "--models", "null", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    assert [note for _, _, note in _notes(tmp_path)] == ["", "", ""]


# ------------------------------------------------------------------------------------- the held-out FD line


def test_held_out_fd_is_not_called_a_floor_at_small_n(capsys):
    assert main(DIGITS) == 0
    out = capsys.readouterr().out
    line = re.search(r"^FD to real digits .*real held-out digits \((\d+)\): [\d.]+\n(.*)$", out, re.M)
    assert line and line[1] == "20"
    assert line[2] == (
        " " * 22 + "(not a floor at this n: 20 held-out digits are under ~500, and the FD of a small set is biased "
        "upward, the more the smaller it is, so samples can score below it)"
    )


def test_held_out_fd_says_when_fewer_digits_than_samples_exist(capsys):
    assert main([*DIGITS, "--class", "7", "--n", "50"]) == 0
    out = capsys.readouterr().out
    count = int(re.search(r"real held-out digits \((\d+)\)", out)[1])
    assert count < 50
    assert f"(not a floor at this n: only {count} held-out digits of class 7 exist for 50 samples, and the FD" in out


def test_held_out_note_is_empty_where_the_count_is_a_floor():
    assert cli._held_out_note(600, 600, None) == ""
    assert cli._held_out_note(600, 100, None) == ""
    assert cli._held_out_note(400, 600, None).startswith("(not a floor at this n: only 400 held-out digits exist")


# ------------------------------------------------------------------------------------------------ the figures


@pytest.fixture
def figures(monkeypatch):
    """The figures the command saves, kept for inspection (saved and closed as usual)."""
    kept = []
    real = cli._save_figure

    def save(fig, *args, **kwargs):
        kept.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(cli, "_save_figure", save)
    return kept


def _column_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


def test_grid_columns_are_labelled_with_their_class(capsys, tmp_path, figures):
    out = tmp_path / "grid.png"
    assert main([*DIGITS, "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    (ax,) = fig.axes
    assert _column_labels(ax) == [str(c) for c in range(10)] and ax.get_xlabel() == "class"
    assert fig.get_suptitle() == "digits: karras schedule, same noise, no guidance"

    assert main([*DIGITS, "--class", "3", "--out", str(out)]) == 0
    assert _column_labels(figures[1].axes[0]) == ["3"] * 10


def test_grid_title_names_a_learned_schedule_and_its_file(capsys, tmp_path, figures):
    path = tmp_path / "learned.json"
    schedules.save(path, schedules.karras(4, 0.002, 80.0), solver="dpmpp_2m", nfe=4, model="digits")
    assert main(["sample", "--n", "20", "--schedule", str(path), "--out", str(tmp_path / "g.png")]) == 0
    (fig,) = figures
    assert fig.get_suptitle() == (
        f"digits: learned schedule from {path} (for dpmpp_2m at NFE 4), same noise, no guidance"
    )
    assert [ax.get_title() for ax in fig.axes] == ["dpmpp_2m, 4 steps (4 NFE)", "teacher: heun 32 steps (63 NFE)"]
    fig.canvas.draw()
    for ax in fig.axes:  # the sample panel and the teacher's, each column named, the names inside the picture
        assert _column_labels(ax) == [str(c) for c in range(10)]
        assert ax.xaxis.label.get_window_extent().y0 >= 0


def test_column_labels_only_where_each_column_holds_one_class():
    import torch

    assert cli._column_labels(torch.arange(30) % 10, 30, 10) == [str(c) for c in range(10)]
    assert cli._column_labels(torch.arange(30) % 3, 30, 10) is None  # 3 classes over 10 columns
    assert cli._column_labels(None, 30, 10) is None
    assert cli._column_labels(torch.arange(4) % 10, 4, 10) == ["0", "1", "2", "3"]
