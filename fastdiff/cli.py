"""The ``fastdiff`` command line (also ``python -m fastdiff``)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import fastdiff
from fastdiff import metrics, models, schedules, solvers
from fastdiff.bench import baselines as bench_baselines
from fastdiff.bench import kernels as bench_kernels
from fastdiff.bench import loops
from fastdiff.checkpoint import atomic_write, check_regular_file
from fastdiff import cache as fastcache
from fastdiff.guidance import METHODS, Guidance
from fastdiff.ode import reference_sample
from fastdiff.train.codi import CoDiStudent, LowResCondition, student_solver
from fastdiff.train.runtime import RunDirectoryInUse

SEED_MAX = 2**32 - 1  # every seed the commands derive (seed + 2, seed * 1_000_003 + index) stays in torch's range


class CLIError(Exception):
    """A one-line message for the user, naming the argument or the file at fault."""


class _UsageError(Exception):
    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (no usage block) and ``main`` returns 2 rather than
    exiting, as for every other error."""

    def error(self, message: str):
        raise _UsageError(self.prog, f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's ``(default: X)`` after each option's help, only where it informs: not where the help already
    states its default (it would print twice), not for a default of None or an empty list (the help says what
    happens then), and not for a flag, whose help says what giving it does (a ``--no-X`` flag's default True would
    read as if X were off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is argparse.SUPPRESS or action.default == []
        if unset or action.nargs == 0 or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class _RawHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """:class:`_HelpFormatter` for a description already laid out by hand (a module docstring)."""


# --------------------------------------------------------------------------------------------- argument types


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    return parse


def _number(minimum: float | None = None, *, strict: bool = False) -> Callable[[str], float]:
    """A finite float, at least (``strict``: above) ``minimum``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low = minimum is not None and (value <= minimum if strict else value < minimum)
        if not math.isfinite(value) or low:
            bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}")
        return value

    return parse


def _integers(minimum: int) -> Callable[[str], list[int]]:
    """Comma-separated integers, each at least ``minimum``."""
    one = _integer(minimum)

    def parse(text: str) -> list[int]:
        try:
            return [one(v) for v in text.split(",")]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {minimum}, got {text!r}") from None

    return parse


def _sizes(text: str) -> list[int]:
    """``fastdiff bench kernels --sizes``: comma-separated element counts (16K, 1M, 50M, 4096)."""
    try:
        return [bench_kernels.parse_size(v) for v in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; give comma-separated counts such as 16K,1M,50M") from None


def _two(convert, expected: str):
    """An argparse type for ``a,b``: two values made by ``convert``."""

    def parse(text: str):
        try:
            a, b = (convert(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return a, b

    return parse


_pair = _two(float, "two numbers 'lo,hi'")
_step_range = _two(int, "two step indices 'start,stop'")


def _device(text: str) -> str:
    """A device this torch can allocate on: a CPU-only build refuses cuda here, not deep inside the first copy."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu or cuda (cuda:N)") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("meta tensors hold no data; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this torch sees no CUDA device (a CPU-only build, or no GPU); "
                                         "use cpu")  # fmt: skip
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise argparse.ArgumentTypeError(f"{text} cannot be used here: {reason}") from None
    return str(device)


# --------------------------------------------------------------------------------------------- files


def _os_reason(exc: OSError) -> str:
    """An OSError as ``FILE: reason``, naming the file a temporary file of :func:`atomic_write` stood in for."""
    name = exc.filename
    if name is None:
        return str(exc)
    path = Path(os.fsdecode(name))
    m = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", path.name)
    shown = path.with_name(m[1]) if m else path
    return f"{shown}: {exc.strerror or exc}"


def _input_file(path: str | os.PathLike, arg: str, *, folder: bool = False) -> Path:
    """``path`` if it is a regular file (or, with ``folder``, a directory), decided by ``stat`` before anything
    opens it: opening a FIFO waits forever for a writer."""
    if not (folder and os.path.isdir(path)):
        check_regular_file(path, f"{arg} file", error=CLIError, missing=CLIError)
    return Path(path)


def _output_dir(path: str | os.PathLike, arg: str, *, target: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, a directory that cannot be made or written into (``target`` names what ``arg``
    gave, when ``path`` is that file's folder)."""
    shown = target if target is not None else path
    here = Path(os.path.abspath(path))
    while True:
        try:
            mode = os.stat(here).st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            if here.parent == here:
                raise CLIError(f"{arg} {shown}: no existing folder above it") from None
            here = here.parent  # made by the write; its nearest existing ancestor decides
        except OSError as exc:
            raise CLIError(f"{arg} {shown}: {here}: {exc.strerror}") from None
    if not stat.S_ISDIR(mode):
        what = "is not a directory" if target is None and here == Path(os.path.abspath(path)) else (
            f"lies under {here}, which is not a directory")  # fmt: skip
        raise CLIError(f"{arg} {shown} {what}")
    if not os.access(here, os.W_OK | os.X_OK):
        raise CLIError(f"{arg} {shown}: cannot write into {here} (permission denied or a read-only file system)")
    return Path(path)


def _output_file(path: str | os.PathLike, arg: str, *, suffixes: tuple[str, ...] | None = None) -> Path:
    """Refuse, before any work, an output file that cannot be written: an existing directory or special file, a
    suffix the writer does not produce, or a folder that cannot be made or written."""
    path = Path(path)
    if path.is_dir():
        example = path / ("out" + (suffixes or ("",))[0])
        raise CLIError(f"{arg} {path} is a directory; give a file path inside it, e.g. {example}")
    if suffixes is not None and path.suffix.lower() not in suffixes:
        listed = " or ".join(suffixes) if len(suffixes) <= 2 else f"{suffixes[0]} (or {', '.join(suffixes[1:5])}, ...)"
        raise CLIError(f"{arg} {path}: the file name must end in {listed}")
    if os.path.lexists(path):
        _input_file(path, arg)  # a FIFO or device is never overwritten
    _output_dir(path.parent, arg, target=path)
    return path


def _load(arg: str, path: str | os.PathLike, load: Callable[..., Any], *args, **kwargs) -> Any:
    """``load(path, ...)`` with what a corrupt file can raise besides ValueError turned into one line naming it."""
    try:
        return load(path, *args, **kwargs)
    except RecursionError:
        raise CLIError(f"{arg} {path}: nested too deeply to read; not a file fastdiff wrote") from None
    except UnicodeDecodeError as exc:
        raise CLIError(f"{arg} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CLIError(f"{arg} {path}: {exc.strerror or exc}") from None


def _model_path(spec: str, arg: str) -> None:
    """Refuse a model argument that names something other than a built-in model or a regular file."""
    if str(spec) not in models.MODELS and os.path.lexists(spec):
        _input_file(spec, arg)


def _model(spec: str, arg: str):
    """A built-in model or a model file (checked to be a regular file before it is opened)."""
    _model_path(spec, arg)
    return _load(arg, spec, models.get)


def _image_suffixes() -> tuple[str, ...]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    return (".png", *("." + k for k in FigureCanvasBase.get_supported_filetypes() if k != "png"))


def _save_figure(fig, path: Path, arg: str, dpi: int) -> None:
    """One atomic write (a reader, or a Ctrl-C, never leaves half an image), in the format of the suffix."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix[1:].lower()))
    except OSError as exc:
        raise CLIError(f"{arg} {path}: cannot write it: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _option(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for conv in (int, float):
        try:
            return key, conv(raw)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(raw.lower(), raw)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastdiff", description="Fast, trustworthy sampling for diffusion models.")
    p.add_argument("--version", action="version", version=f"fastdiff {fastdiff.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "sample",
        help="sample a model (the built-in digits model by default) and report NFE, time and quality",
        description=(
            "Sample a model from seeded noise and report the NFE spent (conditional and unconditional), the wall "
            "time and the quality. Image models (digits, or a .safetensors UNet): the distance to a high-NFE "
            "teacher solve from the same noise, the Frechet distance to real digits in a digits classifier's "
            "features, and the class accuracy; --out writes the samples beside the teacher's as a PNG. The exact "
            "Gaussian mixture (gmm): the error against an exact ODE solve and the sliced W2 distance to the data. "
            "A CoDi student (fastdiff train codi) samples its condition, --cond-image and/or --class, by multistep "
            "consistency sampling (--solver lcm, its default) and reports how well the samples hold the low-res "
            "input. Under torchrun, --out-dir shards the samples across processes and writes them to one samples.npz."
        ),
        formatter_class=_HelpFormatter,
    )
    s.add_argument("--model", default="digits",
                   help=f"built-in model {sorted(models.MODELS)}, or a .safetensors model file: a UNet, a Cas-DM "
                   "model or a CoDi student")  # fmt: skip
    s.add_argument("--solver", default=None, choices=sorted(solvers.SOLVERS),
                   help="solver (default: lcm for a CoDi student, which passes the student's sigma_min, "
                   "boundary_scale and sigma_data to it; dpmpp_2m otherwise)")  # fmt: skip
    s.add_argument(
        "--option",
        "-O",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="solver option, repeatable, e.g. -O order=3 -O variant=bh1 for unipc, -O max_order=3 for ipndm",
    )
    s.add_argument("--steps", type=_integer(1), default=None,
                   help="solver steps N (default: 4 with lcm, 10 for images, 6 for gmm). lcm evaluates at the first N "
                   "levels of the N + 1 step schedule, leaving out its lowest, sigma_min, where a consistency model "
                   "returns its input: --steps 1 is one jump from sigma_max to the data, --steps 2 re-noises once, "
                   "to the schedule's middle level, and jumps again")  # fmt: skip
    s.add_argument(
        "--schedule",
        default="karras",
        help=f"a named schedule {sorted(schedules.SCHEDULES)} (its options through --schedule-option), or a .json "
        "schedule file written by fastdiff.schedules.save",
    )
    s.add_argument(
        "--schedule-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of a named schedule, repeatable, e.g. --schedule-option model=sdxl for align_your_steps, "
        "--schedule-option alpha=0.5 for beta, --schedule-option sigmas=sd to take beta over Stable Diffusion's "
        "discrete levels, --schedule-option shift=3 for flow_shift (see fastdiff.schedules)",
    )
    s.add_argument("--sigma-min", type=_number(0, strict=True), default=None,
                   help="smallest nonzero sigma (default 0.002, or the model's smallest if larger)")  # fmt: skip
    s.add_argument("--sigma-max", type=_number(0, strict=True), default=None,
                   help="largest sigma (default 80, or the model's largest if smaller)")  # fmt: skip
    s.add_argument("--rho", type=_number(0, strict=True), default=7.0, help="rho of the karras schedule")
    s.add_argument("--guidance", type=_number(0), default=None, metavar="W",
                   help="classifier-free guidance scale w >= 0 (0: the unconditional model, 1: the conditional one; "
                   "negative scales only through the Python API)")  # fmt: skip
    s.add_argument(
        "--interval",
        type=_pair,
        default=None,
        metavar="LO,HI",
        help="with --guidance: guide only steps whose start sigma lies in (LO, HI]; default: every step",
    )
    s.add_argument("--guidance-steps", type=_step_range, default=None, metavar="START,STOP",
                   help="with --guidance, instead of --interval: guide only the steps START..STOP (inclusive, "
                   "counted from 0)")  # fmt: skip
    s.add_argument("--guidance-method", default="cfg", choices=list(METHODS),
                   help="with --guidance: how the two estimates combine (see fastdiff.guidance); cfg_pp (CFG++) "
                   "changes the solver step, for --solver euler, ddim, euler_ancestral or dpmpp_2m, and takes W as "
                   "its lambda (usually 0..1)")  # fmt: skip
    s.add_argument("--guidance-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="option of --guidance-method, repeatable: phi for rescale; eta, norm_threshold, momentum "
                   "for apg; zero_init_steps for cfg_zero_star")  # fmt: skip
    s.add_argument("--class", dest="class_label", type=_integer(0), default=None,
                   help="images: sample only this class (default: all classes in turn); a class-conditional CoDi "
                   "student's class")  # fmt: skip
    s.add_argument("--cond-image", type=Path, default=None, metavar="PATH",
                   help="CoDi students conditioned on a low-res image (lowres2|4|8): a PNG/JPEG file, or a .npy/.npz "
                   "array [N, C, H, W] (uint8, or float in [-1, 1]), of low-res images (the model's resolution over "
                   "the factor), or of images at the model's resolution, which are average-pooled by the factor; "
                   "sample i takes image i mod N")  # fmt: skip
    s.add_argument("--n", "-n", "--num-samples", dest="n", type=_integer(2), default=None,
                   help="number of samples (default: 200 for images, 2000 for gmm); under torchrun write -n or "
                   "--num-samples, since torchrun rejects --n as an abbreviation of its own options")  # fmt: skip
    s.add_argument("--seed", type=_integer(0, SEED_MAX), default=0, help="seed of the initial noise")
    s.add_argument("--out", type=Path, default=None,
                   help="write a PNG (image grid, or scatter plot for gmm); the suffix picks the format")  # fmt: skip
    s.add_argument("--out-dir", type=Path, default=None,
                   help="images: write all samples to DIR/samples.npz (sharded across torchrun processes)")  # fmt: skip
    s.add_argument("--batch-size", type=_integer(1), default=500, help="images: samples per model call")
    s.add_argument("--no-teacher", action="store_true", help="images: skip the teacher solve and its metrics")
    s.add_argument("--device", type=_device, default=None, help="images: cuda or cpu (default: cuda when available)")
    s.add_argument("--unconditional", action="store_true", help="gmm: sample the whole mixture")
    s.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="gmm: sampling dtype")
    s.add_argument("--cuda-graph", action="store_true",
                   help="images on CUDA: replay the whole loop as one captured CUDA graph per batch size")  # fmt: skip
    s.add_argument("--cache", default=None, metavar="SPEC",
                   help="images: reuse the network's features between evaluations (fastdiff.cache): deepcache:N "
                   "(every N-th evaluation full), first_block:T (skip where the first block changed by less than "
                   "T, decided by a calibration run), first_block:T:dynamic; add :taylor to extrapolate")  # fmt: skip
    s.add_argument("--progress", action="store_true", help="show a progress bar")
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser(
        "ld3",
        help="learn a schedule's timesteps for a solver and NFE (LD3) and save it as JSON",
        description=(
            "LD3 (Tong et al. 2025): make teacher pairs with a long solve (cached beside --out), learn the "
            "timesteps xi and evaluation offsets xi_c of --solver at --nfe against them with the slack objective, "
            "log the teacher distance on the validation pairs per round, then compare the learned schedule with "
            "the Karras and logSNR-uniform schedules on held-out noise. `fastdiff sample --schedule OUT` uses it. "
            "With --pipeline DIR --prompts FILE it learns for a diffusers pipeline on those prompts (needs "
            "diffusers): the schedule file then goes to sample_pipeline(..., learned_schedule=OUT) or "
            "FastDiffScheduler.from_config(..., learned_schedule=OUT)."
        ),
        formatter_class=_HelpFormatter,
    )
    d.add_argument("--model", default=None,
                   help=f"built-in model {sorted(models.MODELS)} or a .safetensors UNet (default: digits)")  # fmt: skip
    d.add_argument("--pipeline", type=Path, default=None, metavar="DIR",
                   help="a diffusers pipeline folder (save_pretrained, safetensors weights) to learn for, instead "
                        "of --model")  # fmt: skip
    d.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                   help="with --pipeline: one prompt per line (DiT: class names or ids)")  # fmt: skip
    d.add_argument(
        "--negative-prompt",
        default=None,
        metavar="TEXT",
        help="with --pipeline: the unconditional pass's prompt (default: the pipeline's, the empty one)",
    )
    d.add_argument("--height", type=_integer(1), default=None, help="with --pipeline: image height in pixels")
    d.add_argument("--width", type=_integer(1), default=None, help="with --pipeline: image width in pixels")
    d.add_argument("--solver", default="ipndm", choices=sorted(solvers.ODE_SOLVERS),
                   help="the solver to learn for (deterministic: LD3 learns a map from noise to image)")  # fmt: skip
    d.add_argument("--nfe", type=_integer(1), default=4, help="model evaluations per sample")
    d.add_argument("--out", type=Path, required=True,
                   help="the learned schedule (.json); an existing file is replaced only if it is one")  # fmt: skip
    d.add_argument("--force", action="store_true", help="replace an existing --out even if it is not a schedule")
    d.add_argument("--pairs", type=_integer(4), default=100,
                   help="teacher pairs, half for training, half for validation")  # fmt: skip
    d.add_argument("--held-out", type=_integer(1), default=200, help="new pairs for the final comparison")
    d.add_argument("--teacher-solver", default="heun", choices=sorted(solvers.ODE_SOLVERS), help="teacher solver")
    d.add_argument("--teacher-steps", type=_integer(1), default=32, help="teacher steps (Karras schedule)")
    d.add_argument("--teacher-cache", type=Path, default=None,
                   help="teacher pairs, reused when they match (default: OUT with .teacher.safetensors)")  # fmt: skip
    d.add_argument("--space", default="logsnr", choices=["logsnr", "time"], help="where xi is normalised")
    d.add_argument("--no-decoupled", action="store_true", help="do not learn the evaluation offsets xi_c")
    d.add_argument("--metric", default="auto", choices=["auto", "lpips", "l2", "l1"],
                   help="teacher distance (auto: LPIPS where lpips imports, else L2)")  # fmt: skip
    d.add_argument("--rounds-xi", type=_integer(0), default=2, help="rounds of xi alone")
    d.add_argument("--rounds-both", type=_integer(0), default=5, help="then rounds of xi and xi_c")
    d.add_argument("--batch-size", type=_integer(1), default=2, help="pairs per step")
    d.add_argument("--lr-xi", type=_number(0, strict=True), default=5e-3, help="RMSprop learning rate of xi")
    d.add_argument("--gamma", type=_number(0), default=1e-3, help="slack radius r = gamma * d / N^2")
    d.add_argument("--sigma-min", type=_number(0, strict=True), default=None,
                   help="smallest nonzero sigma (default 0.002, or the model's smallest if larger)")  # fmt: skip
    d.add_argument("--sigma-max", type=_number(0, strict=True), default=None,
                   help="largest sigma (default 80, or the model's largest if smaller)")  # fmt: skip
    d.add_argument("--guidance", type=_number(0), default=None, metavar="W",
                   help="classifier-free guidance scale w >= 0")  # fmt: skip
    d.add_argument("--interval", type=_pair, default=None, metavar="LO,HI",
                   help="with --guidance: guidance interval (LO, HI]")  # fmt: skip
    d.add_argument("--seed", type=_integer(0, SEED_MAX), default=0, help="seed of the training order")
    d.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when available)")
    d.add_argument("--progress", action="store_true", help="show progress bars")
    d.set_defaults(func=cmd_ld3)

    t = sub.add_parser("train", help="training jobs (EDM, SADM, Cas-DM, CoDi distillation, the digits classifier)")
    tsub = t.add_subparsers(dest="train", required=True, metavar="JOB")
    e = tsub.add_parser(
        "edm",
        help="train an EDM UNet (the built-in digits model was made this way)",
        description=(
            "Train a class-conditional EDM UNet with the EDM loss and label dropout (for classifier-free "
            "guidance), on the shared runtime: bf16 autocast, gradient clipping, EMA, checkpoints every N steps "
            "in --out-dir, exact resume when rerun, DDP under torchrun. Writes the EMA weights as safetensors."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_training_args(e, "runs/edm")
    _add_init_arg(e)
    e.set_defaults(func=cmd_train_edm)
    a = tsub.add_parser(
        "sadm",
        help="train or fine-tune an EDM UNet with SADM (structure-guided adversarial training)",
        description=(
            "SADM (Yang et al. 2024): the EDM loss plus lam times the structural gap, the distance between the "
            "pairwise affinities of the real batch and of the denoiser's predictions in the features of a "
            "structure discriminator, which is trained to maximise that gap (alternating updates). From scratch, "
            "or fine-tuning --init (digits, or a model file), on the shared runtime: both players and both "
            "optimizers checkpointed, exact resume, EMA, bf16, DDP under torchrun. log.csv holds both players' "
            "losses, players.png draws them; the exported model samples with every fastdiff solver."
        ),
        formatter_class=_HelpFormatter,
    )
    a.add_argument("--lam", type=_number(0), default=0.01, help="weight of the structural gap in the denoiser's loss")
    a.add_argument("--affinity", default="cosine", choices=["cosine", "l2", "gaussian"], help="pairwise affinity S")
    a.add_argument("--distance", default="l1", choices=["l1", "l2", "kl"], help="distance between the affinities")
    a.add_argument("--temperature", type=_number(0, strict=True), default=0.1,
                   help="row-softmax temperature of --distance kl")  # fmt: skip
    a.add_argument("--bandwidth", type=_number(0, strict=True), default=1.0,
                   help="kernel bandwidth of --affinity gaussian")  # fmt: skip
    a.add_argument("--feature-dim", type=_integer(1), default=64, help="the discriminator's feature size")
    a.add_argument("--no-encoder-sigma", dest="encoder_sigma", action="store_false",
                   help="the discriminator does not see the noise level")  # fmt: skip
    a.add_argument("--d-lr", type=_number(0, strict=True), default=2e-4, help="the discriminator's learning rate")
    a.add_argument("--d-updates", type=_integer(1), default=1, help="discriminator updates per turn")
    a.add_argument("--d-every", type=_integer(1), default=1, help="denoiser steps per discriminator turn")
    a.add_argument("--adv-warmup", type=_integer(0), default=0,
                   help="denoiser steps on the EDM loss alone before the game")  # fmt: skip
    a.add_argument("--gradient-penalty", type=_number(0), default=0.0, help="R1-style penalty weight on the real batch")
    _add_training_args(a, "runs/sadm")
    _add_init_arg(a)
    a.set_defaults(func=cmd_train_sadm)
    o = tsub.add_parser(
        "codi",
        help="distil a model into a conditional 1-4-step sampler (CoDi)",
        description=(
            "CoDi (Mei et al. 2024): the frozen teacher plus a ControlNet-like adapter (zero-initialised, so the "
            "student starts as the teacher) trained with a conditional consistency loss and a data term, for "
            "multistep consistency sampling in 1-4 steps: fastdiff sample --model OUT_DIR/model.safetensors "
            "--solver lcm --cond-image PATH. On the shared runtime: EMA target, checkpoints, exact resume, bf16, DDP "
            "under torchrun."
        ),
        formatter_class=_HelpFormatter,
    )
    o.add_argument("--teacher", default="digits", help="the EDM UNet to distil: digits, or a model file")
    o.add_argument("--condition", default="lowres4+class",
                   help="lowres2|lowres4|lowres8|inpaint|class, optionally +class")  # fmt: skip
    o.add_argument("--intervals", type=_integer(1), default=20, help="N, the number of noise intervals")
    o.add_argument("--target", default="teacher", choices=["teacher", "ema_cfg"],
                   help="who takes the step z_t -> z_s: the frozen teacher, or the EMA student with CFG")  # fmt: skip
    o.add_argument("--w-min", type=_number(), default=2.0, help="smallest CFG scale of --target ema_cfg")
    o.add_argument("--w-max", type=_number(), default=14.0, help="largest CFG scale (exclusive)")
    o.add_argument("--cond-dropout", type=_number(0), default=0.1, help="probability of training the null condition")
    o.add_argument("--data-weight", type=_number(0), default=1.0, help="weight of the data term |x_hat - x0|^2")
    o.add_argument("--boundary-scale", type=_number(0, strict=True), default=10.0,
                   help="LCM's timestep scaling of c_skip, c_out")  # fmt: skip
    o.add_argument("--fusion", default="zero_conv", choices=["zero_conv", "mu"], help="how adapter features join")
    o.add_argument("--trainable", default="adapter", choices=["adapter", "all"], help="PE-CoDi or full CoDi")
    _add_training_args(o, "runs/codi", sized=False)
    o.set_defaults(func=cmd_train_codi, lr=2e-4, ema=0.99, warmup=0)
    k = tsub.add_parser(
        "cascade",
        help="train a Cas-DM model (cascaded eps + x0 networks with a metric loss) or a baseline",
        description=(
            "Train Cas-DM (An et al. 2024): an eps-prediction DDPM network theta, a cascaded x0 network phi that sees "
            "theta's clean-image estimate through a stop-gradient, a learned per-pixel blend r, and a metric loss "
            "(LPIPS where it imports, else pseudo-Huber) on phi only; or the baselines (--variant dual: one network "
            "with eps, x0 and r heads; ddpm: eps only). Discrete VP training on the shared runtime (bf16, EMA, "
            "checkpoints, exact resume, DDP under torchrun). The model file samples with every fastdiff solver: "
            "fastdiff sample --model OUT_DIR/model.safetensors."
        ),
        formatter_class=_HelpFormatter,
    )
    k.add_argument("--variant", default="cascade", choices=["cascade", "dual", "ddpm"], help="model variant")
    k.add_argument("--metric", default="auto", choices=["auto", "lpips", "pseudo_huber", "l2", "none"],
                   help="metric on phi's x0 (auto: LPIPS where it imports, else pseudo-Huber)")  # fmt: skip
    k.add_argument("--lam", type=_number(0), default=1.0, help="the metric's weight")
    k.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="DDPM beta schedule")
    k.add_argument("--timesteps", type=_integer(1), default=1000, help="DDPM training timesteps T")
    k.add_argument("--phi-inputs", default="xt_x0", choices=["xt_x0", "x0"], help="what phi sees besides t")
    k.add_argument("--r-map", default="pixel", choices=["pixel", "channel"], help="r per pixel or per element")
    k.add_argument("--r-loss", default="posterior", choices=["posterior", "uniform", "none"],
                   help="r's loss weight: DDPM's posterior c_t^2, 1, or r untrained")  # fmt: skip
    k.add_argument("--clip-phi-input", type=_number(0), default=1.0,
                   help="clamp phi's x0 input to [-c, c] (0: no clamp)")  # fmt: skip
    k.add_argument("--staged", type=_integer(1), default=None, metavar="N",
                   help="train theta alone for N steps, then phi with theta frozen (default: joint)")  # fmt: skip
    _add_training_args(k, "runs/cascade")
    k.set_defaults(func=cmd_train_cascade)
    c = tsub.add_parser(
        "classifier",
        help="train the digits classifier behind the quality metrics",
        description="Train the digits classifier on the train split of the UCI digits; report held-out accuracy.",
        formatter_class=_HelpFormatter,
    )
    c.add_argument("--steps", type=_integer(1), default=600, help="optimizer steps")
    c.add_argument("--seed", type=_integer(0, SEED_MAX), default=0, help="seed")
    c.add_argument("--out", default="digits_classifier.safetensors", help="output weights file (.safetensors)")
    c.set_defaults(func=cmd_train_classifier)

    b = sub.add_parser("bench", help="microbenchmarks (see BENCHMARKS.md)")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    k = bsub.add_parser(
        "kernels",
        help="the fused guided step against eager torch, torch.compile and the copy bandwidth",
        description=bench_kernels.__doc__,
        formatter_class=_RawHelpFormatter,
    )
    k.add_argument("--sizes", type=_sizes, default=None,
                   help="elements per tensor, e.g. 16K,1M,50M (default: those on a GPU, 16K,1M on the "
                   "CPU)")  # fmt: skip
    k.add_argument("--dtypes", default="fp32,fp32+bf16", help=f"comma-separated, from {list(bench_kernels.DTYPES)}")
    k.add_argument("--workloads", default=",".join(bench_kernels.WORKLOADS), help="comma-separated workloads")
    k.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when available)")
    k.add_argument("--reps", type=_integer(1), default=20, help="timed repetitions on the CPU")
    k.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    k.add_argument("--time-budget", type=_number(0, strict=True), default=None, metavar="S",
                   help="start no further size/dtype/workload cell after S seconds")  # fmt: skip
    k.add_argument("--threads", type=_integer(0), default=1,
                   help="torch threads for a CPU run (default 1; 0: torch's), printed with the results")  # fmt: skip
    k.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for kernels.csv and kernels.png")
    k.add_argument("--progress", action="store_true", help="print each measurement as it starts")
    k.set_defaults(func=cmd_bench_kernels)
    e2e = bsub.add_parser(
        "sample",
        help="whole sampling loops with CFG: k-diffusion-style and diffusers loops against fastdiff.Sampler",
        description=(
            "End-to-end sampling benchmark (see fastdiff/bench/loops.py and BENCHMARKS.md). Variants: kdiffusion "
            "(k-diffusion's own sampler from the installed package), kdiff_eager "
            "(k-diffusion-style loop, CFG batch at every step), diffusers (scheduler loop, CFG every step), "
            "fastdiff_eager (fastdiff.Sampler), fastdiff_graph (the whole loop in one CUDA graph; CUDA only), "
            "fastdiff_interval (guidance only on sigma in (0.28, 2.9]; a CUDA graph on CUDA). Per row: time per "
            "batch, model time (the network forwards alone), host overhead per step, NFE, peak memory. Writes "
            "sample_loops.csv and sample_loops.png to --out and prints a Markdown table."
        ),
        formatter_class=_HelpFormatter,
    )
    e2e.add_argument("--preset", default=None, choices=sorted(loops.PRESETS),
                     help="cpu: tiny networks at 4x8x8 (< 2 min on 2 cores); gpu: SD-like latents 4x64x64 and "
                     "4x128x128 at reduced width, batches 1, 8, 32 (default: gpu where CUDA is available)")  # fmt: skip
    e2e.add_argument("--models", default=",".join(loops.E2E_MODELS),
                     help=f"comma-separated model families of the e2e scenario, from {list(loops.MODELS)}")  # fmt: skip
    e2e.add_argument("--variants", default=",".join(loops.VARIANTS), help="comma-separated loop variants")
    e2e.add_argument("--scenarios", default=",".join(loops.SCENARIOS),
                     help="overhead (each loop's own cost per step against k-diffusion's and diffusers' loops: batch "
                     "1, 40 steps, a one-multiply network), e2e (every model and batch) and/or edm2_interval (digits, "
                     "32 Heun steps)")  # fmt: skip
    e2e.add_argument("--batches", type=_integers(1), default=None,
                     help="comma-separated batch sizes (default: the preset's)")  # fmt: skip
    e2e.add_argument("--resolutions", type=_integers(1), default=None,
                     help="comma-separated latent sizes (default: the preset's)")  # fmt: skip
    e2e.add_argument("--solver", default="dpmpp_2m", choices=sorted(bench_baselines.KDIFF_SAMPLERS),
                     help="solver of the e2e scenario")  # fmt: skip
    e2e.add_argument("--steps", type=_integer(1), default=None,
                     help="steps of the e2e scenario (default: the preset's)")  # fmt: skip
    e2e.add_argument("--reps", type=_integer(1), default=None,
                     help="timed repetitions per row (default: the preset's)")  # fmt: skip
    e2e.add_argument("--scale", type=_number(0), default=2.0, help="guidance scale")
    e2e.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when available)")
    e2e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                     help="diffusers networks' weights (default: bfloat16 on CUDA, float32 on the CPU)")  # fmt: skip
    e2e.add_argument("--time-budget", type=_number(0, strict=True), default=None, metavar="S",
                     help="record the rows that would start after S seconds as skipped")  # fmt: skip
    e2e.add_argument("--threads", type=_integer(1), default=None,
                     help="torch threads on the CPU (default: the preset's, 1)")  # fmt: skip
    e2e.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the CSV and PNG")
    e2e.add_argument("--no-progress", action="store_true",
                     help="hide the progress bar (it is shown unless this is given)")  # fmt: skip
    e2e.set_defaults(func=cmd_bench_sample)
    return p


def cmd_bench_sample(args: argparse.Namespace) -> int:
    _output_dir(args.out, "--out")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = loops.bench_sample(
        args.preset or ("gpu" if device.type == "cuda" else "cpu"), models=args.models, variants=args.variants,
        scenarios=args.scenarios, batches=args.batches, resolutions=args.resolutions, solver=args.solver,
        steps=args.steps, reps=args.reps, scale=args.scale, device=device, dtype=args.dtype,
        time_budget=args.time_budget, threads=args.threads, progress=not args.no_progress,
        echo=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    if not rows:
        raise CLIError(f"--variants {args.variants} has no row in --scenarios {args.scenarios} here: nothing to run")
    csv_path, png_path = loops.write_results(rows, args.out)
    print(loops.markdown_table(rows))
    for summary in (loops.overhead_summary(rows), loops.edm2_summary(rows)):
        if summary:
            print()
            print(summary)
    threads = f", {rows[0]['threads']} torch threads" if rows and rows[0]["threads"] != "" else ""
    print(f"device {rows[0]['device']}{threads}, {rows[0]['date']}; wrote {csv_path} and {png_path}")
    # Rows skipped for a missing peer (said before the run) or one that does not apply here are not failures; a row
    # that raised is, and the status says so to a script that only reads the status.
    failed = [
        f"{r['scenario']} {r['model']} b={r['batch']} {r['variant']}" for r in rows if r["note"].startswith("failed")
    ]
    if failed:
        what = "1 row failed (see its note)" if len(failed) == 1 else f"{len(failed)} rows failed (see their notes)"
        print(f"{what}: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    _output_dir(args.out, "--out")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    elements = args.sizes or _sizes("16K,1M,50M" if device.type == "cuda" else "16K,1M")
    dtypes = args.dtypes.split(",")
    workloads = args.workloads.split(",")
    checks = {"--dtypes": (dtypes, bench_kernels.DTYPES), "--workloads": (workloads, bench_kernels.WORKLOADS)}
    for arg, (names, known) in checks.items():
        for name in names:
            if name not in known:
                raise CLIError(f"{arg}: unknown {name!r}; choose from {list(known)}")
    rows = bench_kernels.bench_kernels(
        elements, dtypes, workloads, device, reps=args.reps,
        compile=not args.no_compile, progress=(lambda m: print(m, file=sys.stderr)) if args.progress else None,
        threads=args.threads or None, time_budget=args.time_budget,
    )  # fmt: skip
    bench_kernels.write_results(rows, args.out)
    print(bench_kernels.markdown_table(rows))
    threads = f", {rows[0]['threads']} torch threads" if rows[0]["threads"] != "" else ""
    print(f"device {rows[0]['device']}{threads}; wrote {args.out / 'kernels.csv'} and {args.out / 'kernels.png'}")
    return 0


def _add_training_args(p: argparse.ArgumentParser, out_dir: str, sized: bool = True) -> None:
    """The data, network size (``sized``) and runtime options every ``fastdiff train`` diffusion job shares."""
    p.add_argument("--data", default="digits", help="digits, an image folder, or a .npy/.npz array file")
    if sized:
        p.add_argument("--resolution", type=_integer(1), default=None,
                       help="image size (digits: 16; folders: resize to it)")  # fmt: skip
    p.add_argument("--classes", type=_ints, default=None, metavar="A,B,...",
                   help="train on these classes only (labels kept: a model of every class still fits)")  # fmt: skip
    if sized:
        p.add_argument("--size", default="small", choices=["tiny", "small"], help="UNet preset (of every network)")
    p.add_argument("--steps", type=_integer(1), default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=_integer(1), default=128, help="batch size per process")
    p.add_argument("--lr", type=_number(0, strict=True), default=2e-3, help="AdamW learning rate")
    p.add_argument("--warmup", type=_integer(0), default=100, help="linear warm-up steps")
    p.add_argument("--ema", type=_number(0), default=0.998, help="EMA decay per step")
    p.add_argument("--label-dropout", type=_number(0), default=0.1,
                   help="probability of training a sample unconditionally")  # fmt: skip
    p.add_argument("--seed", type=_integer(0, SEED_MAX), default=0,
                   help="seed of the weights, the data order and the noise")  # fmt: skip
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--checkpoint-every", type=_integer(1), default=500, help="steps between checkpoints")
    p.add_argument("--out-dir", default=out_dir,
                   help="checkpoints and log.csv (a rerun resumes from here; one run at a time)")  # fmt: skip
    p.add_argument("--export", default=None, help="EMA model file (default: OUT_DIR/model.safetensors)")
    p.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar (it is shown unless this is given)")  # fmt: skip


def _add_init_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="fine-tune this EDM UNet (digits, or a model file), not a fresh --size network")  # fmt: skip


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _check_training_paths(args: argparse.Namespace, *models_: str) -> None:
    """Every path a ``fastdiff train`` job reads or writes, before the data and the model are loaded: ``models_``
    names the model arguments (``--init``, ``--teacher``)."""
    _output_dir(args.out_dir, "--out-dir")
    if args.export is not None:
        _output_file(args.export, "--export", suffixes=(".safetensors",))  # what fastdiff sample --model reads
    if args.data != "digits" and os.path.lexists(args.data):
        _input_file(args.data, "--data", folder=True)
    for arg in models_:
        spec = getattr(args, arg.lstrip("-"))
        if spec is not None:
            _model_path(spec, arg)


def _train_config(args: argparse.Namespace):
    from fastdiff.train import TrainConfig

    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, ema_decay=args.ema, amp=args.amp,
        checkpoint_every=args.checkpoint_every, out_dir=args.out_dir, warmup_steps=args.warmup, device=args.device,
        progress=args.progress,
    )  # fmt: skip


def cmd_train_edm(args: argparse.Namespace) -> int:
    from fastdiff.train import recipes

    _check_training_paths(args, "--init")
    path = recipes.train_edm(
        args.data, _train_config(args), size=args.size, resolution=args.resolution, classes=args.classes,
        label_dropout=args.label_dropout, init=args.init, export=args.export,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


def cmd_train_codi(args: argparse.Namespace) -> int:
    from fastdiff.train import recipes
    from fastdiff.train.codi import CoDiConfig

    _check_training_paths(args, "--teacher")
    codi = CoDiConfig(
        condition=args.condition, intervals=args.intervals, target=args.target, w_min=args.w_min, w_max=args.w_max,
        cond_dropout=args.cond_dropout, data_weight=args.data_weight, boundary_scale=args.boundary_scale,
        fusion=args.fusion, trainable=args.trainable,
    )  # fmt: skip
    path = recipes.train_codi(args.teacher, args.data, _train_config(args), codi, classes=args.classes,
                              export=args.export)  # fmt: skip
    print(f"wrote {path}")
    return 0


def cmd_train_sadm(args: argparse.Namespace) -> int:
    from fastdiff.train import recipes
    from fastdiff.train.sadm import SADMConfig

    _check_training_paths(args, "--init")
    sadm = SADMConfig(
        lam=args.lam, affinity=args.affinity, distance=args.distance, temperature=args.temperature,
        bandwidth=args.bandwidth, feature_dim=args.feature_dim, encoder_sigma=args.encoder_sigma, d_lr=args.d_lr,
        d_updates=args.d_updates, d_every=args.d_every, warmup=args.adv_warmup,
        gradient_penalty=args.gradient_penalty, label_dropout=args.label_dropout,
    )  # fmt: skip
    path = recipes.train_sadm(
        args.data, _train_config(args), sadm, size=args.size, resolution=args.resolution, classes=args.classes,
        init=args.init, export=args.export,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


def cmd_train_cascade(args: argparse.Namespace) -> int:
    from fastdiff.train import recipes
    from fastdiff.train.cascade import CascadeConfig

    _check_training_paths(args)
    cascade = CascadeConfig(
        variant=args.variant, schedule=args.schedule, timesteps=args.timesteps, phi_inputs=args.phi_inputs,
        r_map=args.r_map, r_loss=args.r_loss, lam=args.lam, metric=args.metric,
        clip_phi_input=args.clip_phi_input or None, label_dropout=args.label_dropout,
    )  # fmt: skip
    path = recipes.train_cascade(
        args.data, _train_config(args), cascade, size=args.size, resolution=args.resolution, classes=args.classes,
        staged=args.staged,
        export=args.export,
    )  # fmt: skip
    print(f"wrote {path}")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from fastdiff.train import recipes

    _output_file(args.out, "--out", suffixes=(".safetensors",))
    path, acc = recipes.train_digits_classifier(args.out, steps=args.steps, seed=args.seed)
    print(f"held-out accuracy {acc:.4f} (359 test digits); wrote {path}")
    return 0


def _is_schedule_file(path: Path) -> bool:
    """Whether ``path`` (a regular file) holds a fastdiff schedule, the only kind ``ld3 --out`` may replace."""
    try:
        with open(path, "rb") as f:
            payload = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(payload, dict) and payload.get("format") == schedules.SCHEDULE_FORMAT


def cmd_ld3(args: argparse.Namespace) -> int:
    from fastdiff.train.ld3 import LD3Config, learn_schedule, learnable_steps

    _check_interval(args)
    _output_file(args.out, "--out", suffixes=(".json",))  # fastdiff sample --schedule reads .json files
    if os.path.lexists(args.out) and not args.force and not _is_schedule_file(args.out):
        raise CLIError(f"--out {args.out} exists and is not a fastdiff schedule; give another path, or --force to "
                       "replace it")  # fmt: skip
    cache = args.teacher_cache if args.teacher_cache is not None else args.out.with_suffix(".teacher.safetensors")
    _output_file(cache, "--teacher-cache", suffixes=(".safetensors",))
    learnable_steps(args.solver, args.nfe)  # before the model and the teacher pairs cost anything
    if args.pipeline is not None or args.prompts is not None:
        return _ld3_pipeline(args)
    given = [f for f in ("negative_prompt", "height", "width") if getattr(args, f) is not None]
    if given:
        raise CLIError(f"--{given[0].replace('_', '-')} applies to --pipeline")
    args.model = args.model or "digits"
    model = _model(args.model, "--model")
    _sigma_range(args, model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    guidance = _guidance(args)
    config = LD3Config(space=args.space, decoupled=not args.no_decoupled, rounds_xi=args.rounds_xi,
                       rounds_both=args.rounds_both, batch_size=args.batch_size, lr_xi=args.lr_xi, gamma=args.gamma,
                       metric=args.metric, seed=args.seed)  # fmt: skip
    result, errors = learn_schedule(
        model, args.model, args.solver, args.nfe, args.out, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        pairs=args.pairs, held_out=args.held_out, teacher_solver=args.teacher_solver, teacher_steps=args.teacher_steps,
        teacher_cache=args.teacher_cache, guidance=guidance, config=config, device=device, progress=args.progress,
        echo=tqdm.write,  # above the progress bar
    )  # fmt: skip
    _report_ld3(args, result, errors)
    return 0


def _ld3_pipeline(args: argparse.Namespace) -> int:
    """``fastdiff ld3 --pipeline DIR --prompts FILE``: LD3 on a diffusers pipeline's network and the user's
    prompts (:func:`fastdiff.integrations.diffusers_ld3.learn_pipeline_schedule`)."""
    if args.pipeline is None or args.prompts is None:
        raise CLIError("--pipeline DIR and --prompts FILE go together: the pipeline to learn for, and its prompts")
    if args.model is not None:
        raise CLIError("--model and --pipeline are two models to learn for; give one")
    try:
        from fastdiff.integrations import diffusers_ld3
    except ImportError as e:
        raise CLIError(f"--pipeline needs diffusers (pip install 'fastdiff[diffusers]'): {e}") from None
    from fastdiff.train.ld3 import LD3Config

    check_regular_file(args.prompts, "--prompts file", error=CLIError, missing=CLIError)
    try:
        prompts = diffusers_ld3.read_prompts(args.prompts)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CLIError(f"--prompts {args.prompts}: {e}") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        pipe = diffusers_ld3.load_pipeline(args.pipeline, device)
    except (OSError, ValueError) as e:
        raise CLIError(f"--pipeline {args.pipeline}: {e}") from None
    guidance = _guidance(args)
    config = LD3Config(space=args.space, decoupled=not args.no_decoupled, rounds_xi=args.rounds_xi,
                       rounds_both=args.rounds_both, batch_size=args.batch_size, lr_xi=args.lr_xi, gamma=args.gamma,
                       metric=args.metric, seed=args.seed)  # fmt: skip
    result, errors = diffusers_ld3.learn_pipeline_schedule(
        pipe, prompts, args.solver, args.nfe, args.out, negative_prompt=args.negative_prompt, guidance=guidance,
        height=args.height, width=args.width, sigma_min=args.sigma_min, sigma_max=args.sigma_max, pairs=args.pairs,
        held_out=args.held_out, teacher_solver=args.teacher_solver, teacher_steps=args.teacher_steps,
        teacher_cache=args.teacher_cache, config=config, name=str(args.pipeline.resolve()), progress=args.progress,
        echo=tqdm.write,
    )  # fmt: skip
    _report_ld3(args, result, errors, " of the latents")
    return 0


def _report_ld3(args: argparse.Namespace, result, errors: dict, of: str = "") -> None:
    print(f"learned        {args.solver} at NFE {args.nfe} in {result.seconds:.0f} s (metric {result.metric})")
    print("sigmas         " + " ".join(f"{v:.4g}" for v in result.sigmas.tolist()))
    print("eval sigmas    " + " ".join(f"{v:.4g}" for v in result.eval_sigmas.tolist()))
    print(f"held-out teacher RMSE{of} ({args.held_out} new pairs): LD3 {errors['ld3']:.4f}   karras "
          f"{errors['karras']:.4f}   logsnr_uniform (LD3's start) {errors['logsnr_uniform']:.4f}")  # fmt: skip
    print(f"wrote {args.out}")


def _sigma_range(args: argparse.Namespace, model) -> None:
    """EDM's default range 0.002..80, narrowed to a model's own (a DDPM model's timestep grid) where it has one; a
    CoDi student's is the range it was trained on."""
    codi = getattr(model, "codi_config", None)
    if codi is not None:
        low, high = codi.sigma_min, codi.sigma_max
    else:
        low, high = max(0.002, getattr(model, "sigma_min", 0.002)), min(80.0, getattr(model, "sigma_max", 80.0))
    if args.sigma_min is None:
        args.sigma_min = low
    if args.sigma_max is None:
        args.sigma_max = high


def _check_interval(args: argparse.Namespace) -> None:
    if args.interval is not None and args.guidance is None:
        raise CLIError("--interval limits guidance to a noise interval; it needs --guidance W")
    steps = getattr(args, "guidance_steps", None)
    if steps is not None and args.guidance is None:
        raise CLIError("--guidance-steps limits guidance to a range of steps; it needs --guidance W")
    if args.guidance is None and (getattr(args, "guidance_method", "cfg") != "cfg" or getattr(
            args, "guidance_option", None)):  # fmt: skip
        raise CLIError("--guidance-method and --guidance-option choose how guidance combines; they need "
                       "--guidance W")  # fmt: skip
    if steps is not None and args.interval is not None:
        raise CLIError("give the guided steps as --interval (sigmas) or as --guidance-steps, not both")


def _guidance(args: argparse.Namespace) -> Guidance | None:
    """``--guidance`` with ``--interval`` or ``--guidance-steps`` (checked by :func:`_check_interval`)."""
    if args.guidance is None:
        return None
    options = dict(getattr(args, "guidance_option", []))
    unknown = sorted(set(options) - {"phi", "eta", "norm_threshold", "momentum", "zero_init_steps"})
    if unknown:
        raise CLIError(f"--guidance-option {unknown[0]}: unknown; the options are phi (rescale), eta, "
                       "norm_threshold, momentum (apg) and zero_init_steps (cfg_zero_star)")  # fmt: skip
    return Guidance(args.guidance, args.interval, steps=getattr(args, "guidance_steps", None),
                    method=getattr(args, "guidance_method", "cfg"), **options)  # fmt: skip


def _refuse_unused(args: argparse.Namespace, model) -> None:
    """Options the chosen model would silently ignore."""
    if isinstance(model, models.GaussianMixture):
        unused = [("--class", args.class_label is not None), ("--out-dir", args.out_dir is not None),
                  ("--cuda-graph", args.cuda_graph), ("--no-teacher", args.no_teacher),
                  ("--device " + str(args.device), args.device not in (None, "cpu")),
                  ("--cond-image", args.cond_image is not None), ("--cache", args.cache is not None)]  # fmt: skip
        why = ("the gmm model samples all its classes on the CPU and always compares with the exact solve (and has "
               "no network whose features a cache could reuse)")  # fmt: skip
    else:
        unused = [("--unconditional", args.unconditional)]
        why = "image models sample their classes in turn (or one, with --class)"
        if not isinstance(model, CoDiStudent):
            unused.append(("--cond-image", args.cond_image is not None))
            why += "; --cond-image is the condition of a CoDi student (fastdiff train codi)"
    given = [name for name, on in unused if on]
    if given:
        raise CLIError(f"{', '.join(given)} does not apply to --model {args.model}: {why}")


def _read_images(path: Path, channels: int) -> torch.Tensor:
    """``[N, channels, H, W]`` float32 in [-1, 1] from a PNG/JPEG file (one image, converted to ``channels``) or a
    ``.npy``/``.npz`` array (read without unpickling; see :class:`fastdiff.data.ArrayDataset`)."""
    from fastdiff import data

    suffix = path.suffix.lower()
    if suffix in data.ARRAY_EXTENSIONS:
        return data.ArrayDataset(path, labels_key=None).images
    if suffix not in data.IMAGE_EXTENSIONS:
        raise ValueError(f"{path}: expected a PNG/JPEG image or a .npy/.npz array")
    if channels not in (1, 3):
        raise ValueError(f"{path}: an image file gives 1 or 3 channels, the model takes {channels}; give a .npy array")
    try:
        pixels = torch.from_numpy(data._read_image(path, channels, None))
    except OSError:
        raise
    except Exception as exc:  # PIL signals corrupt data with many exception types
        raise ValueError(f"cannot read image {path}: {exc}") from None
    image = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    return image[None].float() / 127.5 - 1


def _student_condition(args: argparse.Namespace, student: CoDiStudent) -> torch.Tensor | None:
    """A CoDi student's condition tensors ``[N, C, R, R]`` from ``--cond-image`` (None for a class-only student),
    checked against the student before any sampling; ``--class`` only for a student that takes labels."""
    cond, cfg = student.condition, student.config
    if args.class_label is not None and not cond.uses_labels:
        raise CLIError(f"--class: --model {args.model} is a CoDi student conditioned on {cond.name}, without class "
                       "labels; drop --class")  # fmt: skip
    if not cond.channels:
        if args.cond_image is not None:
            raise CLIError(f"--cond-image: --model {args.model} is a CoDi student conditioned on {cond.name} alone; "
                           "drop --cond-image")  # fmt: skip
        return None
    if not isinstance(cond, LowResCondition):
        raise CLIError(f"--model {args.model} is a CoDi student conditioned on {cond.name}, which the command line "
                       "does not build: sample it from Python, fastdiff.sample(student, x, sigmas, "
                       "solver=student_solver(student), cond={'cond': tensor, ...}) (README, CoDi)")  # fmt: skip
    if args.cond_image is None:
        raise CLIError(f"--model {args.model} is a CoDi student conditioned on {cond.name}: give its low-resolution "
                       "images with --cond-image PATH")  # fmt: skip
    path = _input_file(args.cond_image, "--cond-image")
    images = _load("--cond-image", path, _read_images, cfg.in_channels)
    _, channels, height, width = images.shape
    res, f = cfg.resolution, cond.factor
    if channels != cfg.in_channels:
        raise CLIError(f"--cond-image {path}: {channels}-channel images; the student takes {cfg.in_channels}")
    if (height, width) == (res, res):
        images = F.avg_pool2d(images, f)
    elif (height, width) != (res // f, res // f):
        low = res // f
        raise CLIError(f"--cond-image {path}: {width}x{height} images; this student ({cond.name}, {res}x{res}) "
                       f"takes {low}x{low} low-res images, or {res}x{res} ones to average-pool by {f}")  # fmt: skip
    return cond.from_lowres(images)


def _solver(args: argparse.Namespace, model) -> solvers.Solver:
    """``--solver`` with its ``-O`` options; ``lcm`` on a CoDi student takes the student's scalings unless ``-O``
    gives others."""
    options = dict(args.option)
    if args.solver == "lcm" and isinstance(model, CoDiStudent):
        options = {**vars(student_solver(model)), **options}
    return solvers.get(args.solver, **options)


def cmd_sample(args: argparse.Namespace) -> int:
    _check_interval(args)
    if args.out is not None:
        _output_file(args.out, "--out", suffixes=_image_suffixes())
    if args.out_dir is not None:
        _output_dir(args.out_dir, "--out-dir")
    model = _model(args.model, "--model")
    gmm, student = isinstance(model, models.GaussianMixture), isinstance(model, CoDiStudent)
    _refuse_unused(args, model)
    if args.cache is not None:
        try:
            args.cache = fastcache.parse(args.cache)
        except ValueError as exc:
            raise CLIError(f"--cache: {exc}") from None
    args.condition = _student_condition(args, model) if student else None
    _sigma_range(args, model)
    args.solver = args.solver or ("lcm" if student else "dpmpp_2m")
    steps = args.steps if args.steps is not None else 4 if args.solver == "lcm" else 6 if gmm else 10
    n = args.n if args.n is not None else (2000 if gmm else 200)
    solver = _solver(args, model)
    args.eval_sigmas = args.schedule_metadata = None
    schedule_options = dict(args.schedule_option)
    if args.schedule.endswith(".json"):  # a learned schedule brings its own steps and evaluation sigmas
        if schedule_options:
            raise CLIError(f"--schedule-option is for named schedules; {args.schedule} is a schedule file")
        _input_file(args.schedule, "--schedule")
        learned = _load("--schedule", args.schedule, schedules.load_schedule, solver=args.solver)
        sigmas, args.eval_sigmas, args.schedule_metadata = learned.sigmas, learned.eval_sigmas, learned.metadata
        if args.steps is not None and args.steps != len(sigmas) - 1:
            raise ValueError(f"--steps {args.steps} disagrees with {args.schedule} ({len(sigmas) - 1} steps); drop it")
    else:
        kwargs = {"rho": args.rho, **schedule_options} if args.schedule == "karras" else schedule_options
        if args.solver == "lcm":  # leave out sigma_min, where a consistency model returns its input (see --steps)
            levels = schedules.get(args.schedule, steps + 1, args.sigma_min, args.sigma_max, **kwargs)
            sigmas = torch.cat([levels[:-2], levels[-1:]])
        else:
            sigmas = schedules.get(args.schedule, steps, args.sigma_min, args.sigma_max, **kwargs)
    guidance = _guidance(args)
    run = _sample_gmm if gmm else _sample_images
    return run(args, model, sigmas, solver, guidance, n)


def _describe(args, solver, sigmas, guidance) -> str:
    levels = f" at sigma {' '.join(f'{v:.4g}' for v in sigmas[:-1].tolist())}" if solver.name == "lcm" else ""
    return f"solver {solver!r}  schedule {args.schedule} ({len(sigmas) - 1} steps{levels})  guidance {guidance}"


def _sample_images(args, model, sigmas, solver, guidance, n: int) -> int:
    import contextlib

    from fastdiff import generate
    from fastdiff.train import init_distributed
    from fastdiff.train.runtime import hold_run_directory

    cfg = model.config
    ctx, created = init_distributed(args.device)
    try:
        if ctx.distributed and args.out_dir is None:
            raise ValueError("under torchrun, give --out-dir: each process samples a shard and writes it there")
        # Held from before the first part is written until the merge: two runs' parts must never mix.
        held = hold_run_directory(args.out_dir, ctx) if args.out_dir is not None else contextlib.nullcontext()
        with held:
            model = model.to(ctx.device)
            kw = dict(shape=(cfg.in_channels, cfg.resolution, cfg.resolution), num_classes=cfg.num_classes,
                      guidance=guidance, class_label=args.class_label, seed=args.seed, batch_size=args.batch_size,
                      device=ctx.device, condition=args.condition)  # fmt: skip
            indices = generate.shard(n, ctx.rank, ctx.world_size)
            t0 = time.perf_counter()
            gen = generate.generate(model, indices, sigmas, solver=solver, progress=args.progress and ctx.is_main,
                                    cuda_graph=args.cuda_graph, eval_sigmas=args.eval_sigmas, cache=args.cache,
                                    **kw)  # fmt: skip
            wall = time.perf_counter() - t0
            if args.out_dir is not None:
                generate.write_part(args.out_dir, gen, ctx.rank, ctx.world_size)
                if ctx.distributed:
                    torch.distributed.barrier()  # every part is on disk before rank 0 merges them
                if ctx.is_main:
                    path = generate.merge_parts(args.out_dir, n, ctx.world_size)
                    print(f"wrote {path} ({n} samples from {ctx.world_size} process(es), indices 0..{n - 1} once "
                          "each)")  # fmt: skip
    finally:
        if created:
            torch.distributed.destroy_process_group()
    if ctx.distributed:
        return 0  # a sharded run writes samples; the report below is for one process's own samples
    _report_images(args, model, sigmas, solver, guidance, gen, wall, kw)
    return 0


def _report_images(args, model, sigmas, solver, guidance, gen, wall: float, kw: dict) -> None:
    from fastdiff import evaluate

    cfg, n = model.config, len(gen.indices)
    print(f"model {args.model}  {_describe(args, solver, sigmas, guidance)}")
    print(f"NFE            {gen.nfe} per sample ({gen.nfe - gen.nfe_uncond} conditional + {gen.nfe_uncond} "
          "unconditional)")  # fmt: skip
    if gen.full_evaluations is not None:
        print(f"cache          {args.cache.spec()}: {gen.full_evaluations} full + {gen.cached_evaluations} cached "
              "forward calls of the network per sample")  # fmt: skip
    print(f"wall time      {wall * 1e3:.1f} ms for {n} samples ({kw['device']})")
    teacher = None
    if isinstance(model, CoDiStudent):
        if not args.no_teacher:
            print("teacher        not applicable: a CoDi student samples its condition in a few consistency steps "
                  "and has no high-NFE solve of its own to compare with (benchmarks/codi_digits.py compares it with "
                  "its teacher)")  # fmt: skip
        if args.condition is not None:
            f = model.condition.factor
            print(f"low-res input  RMSE of the samples' {f}x{f} block means to --cond-image "
                  f"{_lowres_rmse(gen, args.condition, f):.4f} (images in [-1, 1])")  # fmt: skip
    elif not args.no_teacher:
        teacher = evaluate.teacher_sample(model, gen.indices, args.sigma_min, args.sigma_max, **kw)
        lpips_model, why = _lpips_or_reason()
        err = metrics.teacher_error(gen.images, teacher.images, lpips_model=lpips_model)
        lp = f"LPIPS {err['lpips_mean']:.4f}" if "lpips_mean" in err else f"LPIPS unavailable: {why}"
        print(f"teacher        {evaluate.TEACHER_LABEL} ({teacher.nfe} NFE), "
              f"same noise: RMSE to it {err['rmse_mean']:.4f} (images in [-1, 1]); {lp}")  # fmt: skip
    if (cfg.resolution, cfg.in_channels, cfg.num_classes) == (16, 1, 10):  # digits-shaped: the digits judge fits
        judge = evaluate.default_judge()
        q = judge(gen.images, gen.labels)
        qt = judge(teacher.images, teacher.labels) if teacher is not None else {}
        floor, count = judge.real_floor(n, gen.labels)
        shown = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
        print(f"FD to real digits     sample {q['fd']:.3f}   teacher {shown(qt, 'fd')}   "
              f"real held-out digits ({count}): {floor:.3f}")  # fmt: skip
        note = _held_out_note(count, n, gen.labels)
        if note:
            print(f"{'':22}{note}")
        if "accuracy" in q:
            print(f"class accuracy        sample {q['accuracy']:.3f}   teacher {shown(qt, 'accuracy')}")
    if args.out is not None:
        _save_figure(_image_figure(args, gen, teacher, sigmas, solver), args.out, "--out", dpi=120)
        print(f"wrote {args.out}")


# The FD of real digits drawn from the 1797 against all of them reads 7.6 for 100 digits, 3.9 for 200, 1.2 for 500
# (5 draws each, 2026-12-02): its upward bias falls slowly with the count, so the held-out digits' FD is only a
# floor at several hundred of them, more than the held-out split's 359.
HELD_OUT_ENOUGH = 500


def _held_out_note(count: int, n: int, labels: torch.Tensor | None) -> str:
    """Why the held-out digits' FD is no floor for ``n`` samples, or "" where it is one: the FD of a small set is
    biased upward, the more the fewer its members, so fewer held-out digits than samples (the held-out split has
    about 36 per class), or a few hundred of each, can score above the samples themselves."""
    if count >= n and count >= HELD_OUT_ENOUGH:
        return ""
    classes = sorted(set(labels.tolist())) if labels is not None else []
    of = f" of class {classes[0]}" if len(classes) == 1 else ""
    why = (f"only {count} held-out digits{of} exist for {n} samples" if count < n
           else f"{count} held-out digits are under ~{HELD_OUT_ENOUGH}")  # fmt: skip
    return (f"(not a floor at this n: {why}, and the FD of a small set is biased upward, the more the smaller it "
            "is, so samples can score below it)")  # fmt: skip


def _lowres_rmse(gen, condition: torch.Tensor, factor: int) -> float:
    """How well samples hold their low-res input: the RMSE between their ``factor x factor`` block means and those
    of their condition rows (the input, upsampled)."""
    given = condition[gen.indices % len(condition)]
    return float((F.avg_pool2d(gen.images, factor) - F.avg_pool2d(given, factor)).square().mean().sqrt())


def _lpips_or_reason():
    """``(LPIPSAdapter, None)`` where lpips and its backbone weights are at hand, else ``(None, why not)``."""
    from fastdiff.lpips import LPIPSAdapter

    try:
        return LPIPSAdapter(), None
    except ImportError:
        return None, "pip install fastdiff[lpips] (it needs torchvision)"
    except FileNotFoundError as exc:  # names the backbone file and the folder it belongs in
        return None, str(exc)


def _schedule_title(args) -> str:
    """The schedule as a figure title names it: a learned one by its file (and what it was learned for)."""
    if not args.schedule.endswith(".json"):
        return f"{args.schedule} schedule"
    meta = args.schedule_metadata or {}
    made = f" (for {meta['solver']} at NFE {meta['nfe']})" if "solver" in meta and "nfe" in meta else ""
    return f"learned schedule from {args.schedule}{made}"


def _column_labels(labels: torch.Tensor | None, k: int, cols: int) -> list[str] | None:
    """The class of each column of a grid of the first ``k`` samples, ``cols`` per row; None where a column holds
    more than one class (or the model takes no labels), so that no label misleads."""
    if labels is None:
        return None
    columns = [set(labels[j:k:cols].tolist()) for j in range(min(cols, k))]
    return [str(c.pop()) for c in columns] if all(len(c) == 1 for c in columns) else None


def _image_figure(args, gen, teacher, sigmas, solver, rows: int = 10, cols: int = 10):
    """Up to ``rows`` x ``cols`` samples beside the teacher's from the same noise, each column labelled with its
    class; returns the matplotlib Figure (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastdiff.data import image_grid
    from fastdiff.evaluate import TEACHER_LABEL

    k = min(len(gen.images), rows * cols)
    panels = [(gen.images[:k], f"{solver.name}, {len(sigmas) - 1} steps ({gen.nfe} NFE)")]
    if args.condition is not None:  # a CoDi student's low-res input beside its samples
        panels.insert(0, (args.condition[gen.indices[:k] % len(args.condition)], "--cond-image (upsampled)"))
    if teacher is not None:
        panels.append((teacher.images[:k], f"teacher: {TEACHER_LABEL} ({teacher.nfe} NFE)"))
    labels = _column_labels(gen.labels, k, cols)  # every panel shows the same indices, so the same classes
    width = gen.images.shape[-1]
    # Square grids fill each panel's width; the class row beneath them needs half an inch more height.
    height = 4.6 if labels is None else 5.1
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), height), squeeze=False)
    for ax, (imgs, title) in zip(axes[0], panels):
        ax.imshow(image_grid(imgs, nrow=cols), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=10)
        ax.set_yticks([])
        if labels is None:
            ax.set_xticks([])
        else:  # tile j spans pixels j * (width + 1) .. + width - 1 (image_grid leaves a 1-pixel gap)
            ax.set_xticks([j * (width + 1) + (width - 1) / 2 for j in range(len(labels))], labels, fontsize=8)
            ax.set_xlabel("class", fontsize=9)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    g = f"guidance {args.guidance}" + (f" on ({args.interval[0]}, {args.interval[1]}]" if args.interval else "")
    if args.guidance_steps:
        g += f" on steps {args.guidance_steps[0]}-{args.guidance_steps[1]}"
    fig.suptitle(f"{args.model}: {_schedule_title(args)}, same noise, {g if args.guidance else 'no guidance'}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig


def _sample_gmm(args, model, sigmas, solver, guidance, n: int) -> int:
    if guidance is not None and args.unconditional:
        raise ValueError("--guidance needs class-conditional sampling; drop --unconditional")
    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    noise = torch.randn(n, model.dim, generator=gen, dtype=torch.float64)
    labels = None if args.unconditional else torch.arange(n) % model.num_classes
    cond = None if labels is None else {"class_labels": labels}
    x = (noise * sigmas[0]).to(dtype)

    t0 = time.perf_counter()
    out, stats = fastdiff.sample(
        model, x, sigmas, solver=solver, guidance=guidance, cond=cond, return_stats=True, progress=args.progress,
        eval_sigmas=args.eval_sigmas,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    # APG's momentum, CFG-Zero*'s zero-init and CFG++ depend on the steps taken: there is no exact ODE to solve.
    step_dependent = guidance is not None and guidance.step_dependent
    ref = None if step_dependent else reference_sample(model, noise * sigmas[0], sigmas, guidance=guidance, cond=cond)
    data = model.sample(n, torch.Generator().manual_seed(args.seed + 1), class_labels=labels)
    data2 = model.sample(n, torch.Generator().manual_seed(args.seed + 2), class_labels=labels)
    # The same projections for all three distances, so that they compare.
    sw_to_data = lambda pts: metrics.sliced_wasserstein(pts, data, generator=torch.Generator().manual_seed(12345))  # noqa: E731
    sw, sw_floor = sw_to_data(out), sw_to_data(data2)

    print(f"model {args.model}  {_describe(args, solver, sigmas, guidance)}")
    print(f"NFE            {stats.nfe} per sample ({stats.nfe_cond} conditional + {stats.nfe_uncond} unconditional)")
    print(f"wall time      {wall * 1e3:.1f} ms for {n} samples ({args.dtype}, {x.device})")
    if ref is None:
        print("error vs exact solve   none: this guidance depends on the steps taken (momentum, zero-init, CFG++)")
        print(f"sliced W2 to data      {sw:.4f}  (two draws of the data: {sw_floor:.4f})")
    else:
        err = (out.double() - ref).norm(dim=1)
        why = "a stochastic solver leaves the ODE's path, so not its error" if solver.stochastic else "RK45, rtol 1e-10"
        print(f"error vs exact solve   mean {err.mean():.3e}  max {err.max():.3e}  (L2 per sample; {why})")
        print(f"sliced W2 to data      {sw:.4f}  (exact ODE solve: {sw_to_data(ref):.4f}; two draws of the data: "
              f"{sw_floor:.4f})")  # fmt: skip
    if args.out is not None:
        _plot(args, out.double(), ref, data, labels, len(sigmas) - 1)
        print(f"wrote {args.out}")
    return 0


def _plot(args, out: torch.Tensor, ref: torch.Tensor, data: torch.Tensor, labels, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = None if labels is None else labels.numpy()
    panels = [(out, f"fastdiff {args.solver}, {steps} steps")] + (
        [] if ref is None else [(ref, "exact ODE solve (RK45)")]
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), sharex=True, sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (pts, title) in zip(axes, panels):
        ax.scatter(data[:, 0], data[:, 1], s=2, c="lightgrey", label="data")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=color, cmap="tab10", vmin=0, vmax=9)
        ax.set_title(title)
        ax.set_aspect("equal")
    lim = 1.2 * float(data.abs().max())
    axes[0].set_xlim(-lim, lim)
    axes[0].set_ylim(-lim, lim)
    where = args.interval or (f"steps {args.guidance_steps[0]}-{args.guidance_steps[1]}" if args.guidance_steps
                              else "all steps")  # fmt: skip
    method = f" ({args.guidance_method})" if args.guidance and args.guidance_method != "cfg" else ""
    fig.suptitle(f"{args.model}: {_schedule_title(args)}, guidance {args.guidance or 'off'}{method}, interval {where}")
    fig.tight_layout()
    _save_figure(fig, args.out, "--out", dpi=110)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, RunDirectoryInUse):
        return _os_reason(exc)
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure the input can cause is one line on stderr and exit status 2, Ctrl-C is one
    line and 130 (the shell's code for SIGINT). ``FASTDIFF_TRACEBACK=1`` shows the traceback instead."""
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130
    name = " ".join(["fastdiff", args.command, *(getattr(args, k) for k in ("train", "bench") if hasattr(args, k))])
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if os.environ.get("FASTDIFF_TRACEBACK"):
            raise
        # atomic_write removed its temporary file on the way out: no output is left half-written.
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, RecursionError, ArithmeticError, RunDirectoryInUse) as exc:
        if os.environ.get("FASTDIFF_TRACEBACK"):
            raise
        print(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
