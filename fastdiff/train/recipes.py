"""Whole training jobs behind ``fastdiff train ...``: data in, shipped-format weights out.

* :func:`train_edm`: an EDM UNet (:mod:`fastdiff.models.unet`) with the EDM loss (:mod:`fastdiff.train.edm`) on
  the shared runtime (:mod:`fastdiff.train.runtime`: DDP, bf16, EMA, checkpoints, exact resume); exports the EMA
  weights. This made the built-in ``digits`` model.
* :func:`train_sadm`: SADM (:mod:`fastdiff.train.sadm`): an EDM UNet, from scratch or fine-tuned from a model
  file, against a structure discriminator, on the same runtime; exports the EMA denoiser, an ordinary EDM UNet.
* :func:`train_codi`: CoDi (:mod:`fastdiff.train.codi`): a frozen teacher distilled into a conditional student
  (the teacher plus an adapter) for 1-4-step consistency sampling, on the same runtime; exports the EMA student.
* :func:`train_cascade`: Cas-DM (:mod:`fastdiff.train.cascade`) and its baselines (the dual-output model, a plain
  eps-DDPM) on the same runtime; exports the EMA model.
* :func:`train_digits_classifier`: the classifier behind fastdiff's digits quality metrics
  (:mod:`fastdiff.evaluate`), trained on the train split of the UCI digits.
"""

from __future__ import annotations

import csv
import dataclasses
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fastdiff import data
from fastdiff.checkpoint import atomic_write
from fastdiff.models.classifier import evaluate_accuracy, save_classifier, train_classifier
from fastdiff.models.unet import EDMUNet, UNetConfig, count_parameters, save_unet
from fastdiff.train.cascade import CascadeConfig, CascadeLoss, build_cascade, save_cascade
from fastdiff.train.codi import CoDiConfig, CoDiLoss, CoDiStudent, get_condition, save_student
from fastdiff.train.edm import EDMLoss
from fastdiff.train.runtime import TrainConfig, distributed_context, keep_run_locks, train
from fastdiff.train.sadm import SADMConfig, SADMLoss, build_encoder

SIZES = {"tiny": UNetConfig.tiny, "small": UNetConfig.small}


def _command() -> str:
    """The ``fastdiff ...`` command line of this process (console script or ``python -m fastdiff``), else ""."""
    entry = Path(sys.argv[0]) if sys.argv else Path()
    ours = entry.name == "fastdiff" or entry.parts[-2:] == ("fastdiff", "__main__.py")
    return shlex.join(["fastdiff", *sys.argv[1:]]) if ours else ""


def _dataset(dataset_spec: str, resolution: int | None, classes: Sequence[int] | None):
    """:func:`fastdiff.data.get_dataset`, keeping only ``classes`` when given."""
    ds = data.get_dataset(dataset_spec, resolution)
    return ds if classes is None else ds.with_classes(classes)


def _load_edm_unet(spec: str | Path, role: str) -> EDMUNet:
    """The EDM UNet ``spec`` (``digits`` or a model file); ``role`` names it in the error for another model."""
    from fastdiff import models

    model = models.get(spec)
    if not isinstance(model, EDMUNet):
        raise ValueError(f"{role} needs an EDM UNet (the built-in 'digits' or a fastdiff train edm/sadm model "
                         f"file), got {type(model).__name__} from {spec}")  # fmt: skip
    return model


def _check_fits(model: EDMUNet, spec: str | Path, ds, match_classes: bool = True) -> None:
    """Raise ``ValueError`` unless ``model`` takes the data's resolution and channels and, with ``match_classes``,
    has its classes (when the data has any)."""
    own = model.config
    c, h, w = ds.shape
    wants = {"resolution": h if h == w else f"{h}x{w}", "in_channels": c}  # a non-square size never matches
    has = {k: getattr(own, k) for k in wants}
    if has != wants or (match_classes and ds.num_classes and own.num_classes != ds.num_classes):
        raise ValueError(f"{spec} was made for {has} with {own.num_classes} classes; the data has {wants} with "
                         f"{ds.num_classes} classes")  # fmt: skip


def _data_and_unet(
    dataset_spec: str, size: str, resolution: int | None, classes: Sequence[int] | None = None
) -> tuple[torch.utils.data.Dataset, UNetConfig]:
    """The dataset (only ``classes`` when given) and ``UNetConfig.<size>()`` resized to its resolution, channels
    and classes."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    ds = _dataset(dataset_spec, resolution, classes)
    channels, height, width = ds.shape
    if height != width:
        raise ValueError(f"the UNet needs square images, the data is {height}x{width}")
    base = SIZES[size]().to_dict()
    cfg = UNetConfig.from_dict({**base, "resolution": height, "in_channels": channels, "num_classes": ds.num_classes})
    return ds, cfg


def _initial_unet(cfg: UNetConfig, seed: int, init: str | Path | None, ds) -> EDMUNet:
    """A fresh ``EDMUNet(cfg)`` seeded by ``seed``, or the EDM UNet ``init`` (``digits`` or a model file) checked
    against the data."""
    if init is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initial weights are part of the run's seed
            return EDMUNet(cfg)
    model = _load_edm_unet(init, "--init")
    _check_fits(model, init, ds)
    return model.train().requires_grad_(True)


def _millions(module: torch.nn.Module) -> str:
    return f"{count_parameters(module) / 1e6:.2f}M parameters"


def _report(what: str, dataset_spec: str, ds, config: TrainConfig) -> None:
    if distributed_context(config.device).is_main:
        print(f"{what}; data {dataset_spec}: {len(ds)} images {tuple(ds.shape)}, {ds.num_classes} classes",
              file=sys.stderr)  # fmt: skip


def _export_unet(state, config: TrainConfig, export: str | Path | None) -> Path:
    """Write the run's EMA UNet to ``export`` (default ``<out_dir>/model.safetensors``) on rank 0."""
    out = Path(export) if export is not None else Path(config.out_dir) / "model.safetensors"
    if state.context.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_unet(out, state.ema_model().cpu(), provenance=_command())
        plot_training_log(Path(config.out_dir) / "log.csv", Path(config.out_dir) / "loss.png")
    return out


def train_edm(
    dataset_spec: str,
    config: TrainConfig,
    *,
    size: str = "small",
    resolution: int | None = None,
    classes: Sequence[int] | None = None,
    label_dropout: float = 0.1,
    init: str | Path | None = None,
    export: str | Path | None = None,
) -> Path:
    """Train an EDM UNet on ``dataset_spec`` (see :func:`fastdiff.data.get_dataset`) and write its EMA weights.

    The network is ``UNetConfig.<size>()`` resized to the data's resolution, channels and classes, or the model
    ``init`` (``"digits"`` or an EDM UNet file) to fine-tune. ``classes`` keeps only those classes of the data.
    Checkpoints and ``log.csv`` go to ``config.out_dir`` (a rerun resumes); the EMA weights to ``export`` (default
    ``<out_dir>/model.safetensors``), loadable with ``fastdiff.models.get(path)``. Returns that path.
    """
    ds, cfg = _data_and_unet(dataset_spec, size, resolution, classes)
    model = _initial_unet(cfg, config.seed, init, ds)
    _report(f"EDM UNet {init or size}: {_millions(model)}", dataset_spec, ds, config)
    loss = EDMLoss(sigma_data=model.sigma_data, label_dropout=label_dropout if ds.num_classes else 0.0)
    with keep_run_locks():  # the export and the plot of log.csv are still this run's
        return _export_unet(train(model, loss, ds, config), config, export)


def train_sadm(
    dataset_spec: str,
    config: TrainConfig,
    sadm: SADMConfig,
    *,
    size: str = "small",
    resolution: int | None = None,
    classes: Sequence[int] | None = None,
    init: str | Path | None = None,
    export: str | Path | None = None,
) -> Path:
    """Train an EDM UNet with SADM (:mod:`fastdiff.train.sadm`) and write its EMA weights.

    As :func:`train_edm` (``init`` fine-tunes an existing model, ``classes`` selects classes), plus a structure
    discriminator seeded by ``config.seed``. Both players, both optimizers and every RNG are checkpointed in
    ``config.out_dir``; ``log.csv`` holds both players' losses and ``players.png`` draws them. Returns the path
    of the exported denoiser, an ordinary EDM UNet model file.
    """
    if config.batch_size < sadm.min_batch:
        raise ValueError(f"SADM compares the structure within a batch: --batch-size must be at least "
                         f"{sadm.min_batch} for distance {sadm.distance!r}, got {config.batch_size}")  # fmt: skip
    ds, cfg = _data_and_unet(dataset_spec, size, resolution, classes)
    if not ds.num_classes:
        sadm = dataclasses.replace(sadm, label_dropout=0.0)
    model = _initial_unet(cfg, config.seed, init, ds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        encoder = build_encoder(sadm, ds.shape)
    _report(f"SADM: EDM UNet {init or size} ({_millions(model)}), structure discriminator ({_millions(encoder)})",
            dataset_spec, ds, config)  # fmt: skip
    loss = SADMLoss(sadm, encoder, sigma_data=model.sigma_data)
    with keep_run_locks():
        state = train(model, loss, ds, config, adversary=loss.adversary)
        out = _export_unet(state, config, export)
        if state.context.is_main:
            plot_players(Path(config.out_dir) / "log.csv", Path(config.out_dir) / "players.png")
    return out


def train_cascade(
    dataset_spec: str,
    config: TrainConfig,
    cascade: CascadeConfig,
    *,
    size: str = "small",
    resolution: int | None = None,
    classes: Sequence[int] | None = None,
    staged: int | None = None,
    export: str | Path | None = None,
) -> Path:
    """Train a Cas-DM model (or a baseline variant) of fastdiff UNets on ``dataset_spec`` and write its EMA model.

    Every network is ``UNetConfig.<size>()`` with the variant's channel counts (:func:`build_cascade`). Training is
    joint by default; ``staged=N`` first trains theta alone for N steps (``<out_dir>/theta``), then phi and r for
    the remaining ``config.steps - N`` with theta frozen at its EMA weights (``<out_dir>/phi``). Checkpoints and
    ``log.csv`` go to ``config.out_dir`` (a rerun resumes); the model to ``export`` (default
    ``<out_dir>/model.safetensors``), loadable with ``fastdiff.models.get(path)``. Returns that path.
    """
    if staged is not None and (cascade.variant != "cascade" or not 0 < staged < config.steps):
        raise ValueError(f"staged training needs the cascade variant and 0 < staged < steps, got {staged}")
    ds, unet = _data_and_unet(dataset_spec, size, resolution, classes)
    if not ds.num_classes:
        cascade = CascadeConfig.from_dict({**cascade.to_dict(), "label_dropout": 0.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_cascade(cascade, unet, ds.shape)
    ctx = distributed_context(config.device)
    if ctx.is_main:
        nets = ", ".join(f"{n} {count_parameters(getattr(model, n)) / 1e6:.2f}M" for n in ("theta", "phi")
                         if getattr(model, n) is not None)  # fmt: skip
        loss = CascadeLoss(cascade, ds.shape)
        print(f"Cas-DM {cascade.variant} ({nets} parameters), metric {loss.metric_name}, lam {cascade.lam}; data "
              f"{dataset_spec}: {len(ds)} images {tuple(ds.shape)}", file=sys.stderr)  # fmt: skip
    with keep_run_locks():  # staged: both stages' directories stay locked until the export is written
        if staged is None:
            state = train(model, CascadeLoss(cascade, ds.shape), ds, config)
        else:
            out = Path(config.out_dir)
            first = dataclasses.replace(config, steps=staged, out_dir=str(out / "theta"))
            state = train(model, CascadeLoss(cascade, ds.shape, terms="theta"), ds, first)
            model.load_state_dict(state.ema_model().state_dict())
            model.theta.requires_grad_(False)
            second = dataclasses.replace(config, steps=config.steps - staged, out_dir=str(out / "phi"))
            state = train(model, CascadeLoss(cascade, ds.shape, terms="phi"), ds, second)
        path = Path(export) if export is not None else Path(config.out_dir) / "model.safetensors"
        if ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            ema = state.ema_model().cpu()
            ema.unet_config = unet
            save_cascade(path, ema, provenance=_command())
    return path


def _log_rows(log_csv: Path) -> list[dict[str, str]]:
    with open(log_csv) as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    """The steps and values of ``key`` where it is set (blank before an adversary starts)."""
    kept = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "", "nan")]
    return [s for s, _ in kept], [v for _, v in kept]


def _save_figure(fig, out_png: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def train_codi(
    teacher: str | Path,
    dataset_spec: str,
    config: TrainConfig,
    codi: CoDiConfig,
    *,
    classes: Sequence[int] | None = None,
    export: str | Path | None = None,
) -> Path:
    """Distil the EDM UNet ``teacher`` (``"digits"`` or a model file) into a CoDi student on ``dataset_spec``.

    The data must have the teacher's resolution and channels (and classes for a ``+class`` condition). The student
    is the teacher plus an adapter seeded by ``config.seed``; the teacher stays frozen. Checkpoints and
    ``log.csv`` go to ``config.out_dir``; the EMA student to ``export`` (default ``<out_dir>/model.safetensors``),
    read back by :func:`fastdiff.train.codi.load_student`. Returns that path.
    """
    teacher_model = _load_edm_unet(teacher, "the CoDi teacher")
    ds = _dataset(dataset_spec, teacher_model.config.resolution, classes)
    _check_fits(teacher_model, teacher, ds, match_classes=False)  # it runs unconditionally: any classes will do
    condition = get_condition(codi.condition, ds.shape[0])
    if condition.uses_labels and not ds.num_classes:
        raise ValueError(f"the {condition.name} condition needs class labels; {dataset_spec} has none")
    teacher_model.eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        student = CoDiStudent(teacher_model, condition, codi.fusion, ds.num_classes).set_trainable(codi.trainable)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    _report(f"CoDi {codi.trainable}: student {_millions(student)} ({trainable / 1e6:.2f}M trained), condition "
            f"{condition.name}, teacher {teacher}", dataset_spec, ds, config)  # fmt: skip
    with keep_run_locks():
        state = train(
            student, CoDiLoss(codi, teacher_model, condition), ds, config, extra_modules={"teacher": teacher_model}
        )
        path = Path(export) if export is not None else Path(config.out_dir) / "model.safetensors"
        if state.context.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_student(path, state.ema_model().cpu(), codi, provenance=_command())
    return path


def plot_training_log(log_csv: Path, out_png: Path) -> None:
    """Draw the EDM loss of a run's ``log.csv`` against the step, overall and per sigma bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _log_rows(log_csv)
    if not rows:
        return
    main = "loss_denoise" if "loss_denoise" in rows[0] else "loss"
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key in [k for k in rows[0] if k == main or k.startswith("loss_sigma")]:
        ax.plot(*_column(rows, key), lw=1.6 if key == main else 0.8,
                label="loss" if key == main else key.replace("loss_", ""))  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted denoising loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{log_csv.parent.name}: EDM loss (logged every few steps, not smoothed)", fontsize=10)
    _save_figure(fig, out_png)


def plot_players(log_csv: Path, out_png: Path) -> None:
    """Draw a SADM run's two players from its ``log.csv``: the denoiser's EDM loss and total loss, and the
    structural gap as each player measured it (the discriminator maximises it, the denoiser minimises it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _log_rows(log_csv)
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(*_column(rows, "loss_denoise"), label="EDM loss", lw=1.2)
    a.plot(*_column(rows, "loss"), label="total (EDM + lam gap)", lw=0.8)
    a.set_yscale("log")
    a.set_title("denoiser", fontsize=10)
    b.plot(*_column(rows, "structure_gap"), label="gap in the denoiser's step", lw=1.0)
    b.plot(*_column(rows, "adv_structure_gap"), label="gap in the discriminator's step", lw=1.0)
    b.set_title("structure discriminator (maximises the gap)", fontsize=10)
    for ax in (a, b):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save_figure(fig, out_png)


def train_digits_classifier(
    out: str | Path, *, resolution: int = 16, steps: int = 600, batch_size: int = 128, seed: int = 0
) -> tuple[Path, float]:
    """Train the digits classifier on the train split and write it to ``out``; returns ``(path, held-out
    accuracy)`` on the test split (359 digits)."""
    train_set = data.DigitsDataset(resolution, split="train")
    test_set = data.DigitsDataset(resolution, split="test")
    model = train_classifier(train_set.images, train_set.labels, steps=steps, batch_size=batch_size, seed=seed)
    acc = evaluate_accuracy(model, test_set.images, test_set.labels)
    path = save_classifier(out, model, provenance=_command())
    return path, acc
