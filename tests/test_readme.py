"""The documentation runs: every Python block of README.md executes on the CPU in a namespace of its own, uses no
name it does not define, and prints what its comments say; and every command BENCHMARKS.md quotes names a script
or CLI option that exists, so that each table can be regenerated as written."""

import ast
import builtins
import contextlib
import io
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
NOT_RUN = re.compile(r"<!-- readme-test: not run \((?P<why>[^)]+)\)")


def python_blocks() -> list[tuple[int, str, str | None]]:
    """``(line, code, why not run or None)`` of every fenced Python block, dedented (blocks inside list items are
    indented); a block is not run where the line before it is ``<!-- readme-test: not run (why) ... -->``."""
    text = README.read_text()
    blocks = []
    for m in re.finditer(r"(?m)^(?P<indent>[ \t]*)```python\n(?P<body>.*?)^(?P=indent)```", text, re.S):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip().splitlines()[-1] if m.start() else ""
        why = NOT_RUN.search(before)
        blocks.append((line, textwrap.dedent(m["body"]), why["why"] if why else None))
    return blocks


BLOCKS = python_blocks()


def undefined_names(code: str) -> set[str]:
    """Names the block reads but neither assigns, imports, defines nor takes from builtins (module level and
    function bodies alike: a block is read top to bottom by a user)."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    loaded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound


def test_readme_has_blocks_and_at_most_one_is_not_run():
    assert len(BLOCKS) >= 6
    not_run = [(line, why) for line, _, why in BLOCKS if why]
    assert len(not_run) <= 1, not_run  # the Stable Diffusion download; its CPU twin follows it


@pytest.mark.parametrize("line,code,why", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_defines_every_name_it_uses(line, code, why):
    assert not undefined_names(code), f"README.md:{line} uses names it does not define"


@pytest.mark.parametrize("line,code,why", [b for b in BLOCKS if not b[2]],
                         ids=[f"README.md:{b[0]}" for b in BLOCKS if not b[2]])  # fmt: skip
def test_readme_block_runs_and_prints_what_it_says(line, code, why, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    printed = out.getvalue().splitlines()
    # `print(...)  # 63 14: ...`: the numbers before the colon are what the line prints
    for expected in re.findall(r"(?m)^print\(.*\)\s+#\s*([\d ]+?)(?::|$)", code):
        assert any(p.strip() == expected.strip() for p in printed), (expected, printed)


def benchmark_commands() -> list[str]:
    """Every command BENCHMARKS.md quotes in backticks (``python benchmarks/...`` or ``fastdiff ...``), on one
    line; those with ``...`` stand for a family and are left out."""
    text = BENCHMARKS.read_text()
    found = re.findall(r"`((?:python benchmarks/|fastdiff )[^`]+)`", text)
    return sorted({" ".join(c.split()) for c in found if "..." not in c and "DIR" not in c})


@pytest.mark.parametrize("command", benchmark_commands())
def test_benchmark_commands_name_what_exists(command):
    """A script exists and defines each option the command passes; a ``fastdiff`` command parses."""
    from fastdiff.cli import build_parser

    argv = shlex.split(command.replace("FILE.json", "schedule.json"))
    if argv[0] == "fastdiff":
        build_parser().parse_args(argv[1:])
        return
    script = ROOT / argv[1]
    assert script.exists(), f"{command}: no {argv[1]}"
    source = script.read_text()
    forwarded = re.search(r"main\(\[((?:\"\w+\", )+)\*sys\.argv\[1:\]\]\)", source)
    if forwarded:  # a script that is a CLI command under another name
        build_parser().parse_args([*re.findall(r'"(\w+)"', forwarded[1]), *argv[2:]])
        return
    for option in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
        assert f'"{option}"' in source, f"{command}: {argv[1]} has no option {option}"


def test_the_name_check_finds_what_a_block_leaves_undefined():
    assert undefined_names("import torch\nx = torch.zeros(3)\nprint(model(x, y))") == {"model", "y"}
    assert undefined_names("def f(a):\n    return a + b\nf(1)") == {"b"}
    assert not undefined_names("for i in range(3):\n    print(i)")


def test_the_readme_table_names_what_each_module_has():
    """``| `fastdiff.X` | ... `Name` ... |``: each class name a row lists is importable from its module."""
    import importlib

    rows = re.findall(r"(?m)^\| `(fastdiff(?:\.\w+)*)` \|(.*)\|$", README.read_text())
    assert len(rows) > 15
    for module_name, cells in rows:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a function or class row (fastdiff.sample, fastdiff.Guidance)
            continue
        for name in re.findall(r"`([A-Z][A-Za-z0-9]+)\b", cells):
            assert hasattr(module, name), f"README says {module_name} provides {name}"


# BENCHMARKS.md's scripts at their smallest settings (the same code paths as its tables, few samples): each runs
# to the end and writes its CSV. The training comparisons (cascade, sadm, codi) and the LD3 grid train first and
# are left out; `fastdiff bench kernels` and `bench sample` run in tests/test_cli.py and test_bench_sample.py.
SMALLEST = {
    "cache_digits.py": (["--samples", "8", "--batch-size", "8", "--reps", "1"], "cache_digits.csv"),
    "guidance_methods.py": (
        ["--mixture-samples", "40", "--digits-samples", "8", "--batch-size", "8"],
        "guidance_methods.csv",
    ),  # fmt: skip
    "digits_quality.py": (["--n", "8", "--batch-size", "8", "--solvers", "euler,dpmpp_2m"], "digits_quality.csv"),
    "schedules_quality.py": (["--quick", "--solvers", "dpmpp_2m"], "schedules_quality.csv"),
    "solver_convergence.py": (["--n", "16"], "solver_convergence.csv"),
    "cache_speed.py": (["--size", "tiny", "--steps", "2", "--reps", "1", "--device", "cpu"], "cache_speed.csv"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_benchmark_scripts_run_at_their_smallest_settings(script, tmp_path):
    import subprocess
    import sys

    args, csv_name = SMALLEST[script]
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert (tmp_path / csv_name).read_text().count("\n") >= 2
