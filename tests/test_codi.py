"""CoDi (fastdiff.train.codi): the zero-initialised adapter, the boundary condition, which parameters learn, the
target, the CFG order, training, resume, bad input, multistep consistency sampling in the engine (``lcm``) and a
student sampled from the command line with its condition."""

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import fastdiff
from fastdiff import generate, schedules, solvers
from fastdiff.checkpoint import latest_checkpoint, load_checkpoint
from fastdiff.cli import main
from fastdiff.models.unet import EDMUNet, UNetConfig
from fastdiff.train import TrainConfig, recipes
from fastdiff.solvers import consistency_scalings
from fastdiff.train.codi import (
    CoDiConfig,
    CoDiLoss,
    CoDiStudent,
    TensorCondition,
    consistency_output,
    get_condition,
    load_student,
    student_solver,
)

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 8, 8)


def _teacher(seed=0):
    torch.manual_seed(seed)
    cfg = UNetConfig.from_dict({**UNetConfig.tiny().to_dict(), "num_classes": 10})
    teacher = EDMUNet(cfg)
    with torch.no_grad():  # a trained-looking network: zero-initialised output layers would hide the fusion
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return teacher.eval().requires_grad_(False)


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=g) * 2 - 1, torch.arange(n) % 10


def _kwargs(condition, x0, labels, seed=2):
    cond = condition.make(x0, labels, torch.Generator().manual_seed(seed))
    kw = {} if cond is None else {"cond": cond}
    if condition.uses_labels:
        kw["class_labels"] = labels
    return kw


@pytest.mark.parametrize("fusion", ["zero_conv", "mu"])
@pytest.mark.parametrize("spec", ["lowres4+class", "lowres2", "inpaint", "inpaint+class", "class"])
def test_at_initialisation_the_student_is_the_teacher(spec, fusion):
    teacher = _teacher()
    cond = get_condition(spec, 1)
    student = CoDiStudent(teacher, cond, fusion)
    x0, labels = _batch()
    z, sigma = x0 + torch.randn_like(x0), torch.tensor([0.05, 0.5, 2.0, 20.0])
    with torch.no_grad():
        got = student(z, sigma, **_kwargs(cond, x0, labels))
        want = teacher(z, sigma, class_labels=torch.full((4,), -1))
    assert torch.equal(got, want)
    # ...and the adapter does reach the output once its fusion weights move
    with torch.no_grad():
        for name, p in student.net.adapter.named_parameters():
            if name.startswith(("zero", "mu", "cond_in")):
                p.add_(0.1)
        assert not torch.allclose(student(z, sigma, **_kwargs(cond, x0, labels)), want)


def test_conditions_hold_what_they_say():
    x0, labels = _batch()
    low = get_condition("lowres4", 1).make(x0, labels, torch.Generator())
    assert torch.allclose(low[:, :, ::4, ::4], torch.nn.functional.avg_pool2d(x0, 4))
    assert torch.equal(low, low[:, :, ::4, ::4].repeat_interleave(4, 2).repeat_interleave(4, 3))
    inp = get_condition("inpaint", 1).make(x0, labels, torch.Generator().manual_seed(0))
    image, keep = inp[:, :1], inp[:, 1:]
    assert set(keep.unique().tolist()) == {0.0, 1.0} and torch.equal(image, x0 * keep)
    holes = (1 - keep).flatten(1).sum(1)
    assert ((holes >= (0.3 * 8) ** 2 - 1e-6) & (holes <= (0.7 * 8) ** 2 + 1e-6)).all()
    with pytest.raises(ValueError, match="unknown condition"):
        get_condition("blur", 1)
    with pytest.raises(ValueError, match="factor must be 2, 4 or 8"):
        get_condition("lowres3", 1)


def test_the_boundary_condition_holds():
    c_skip, c_out = consistency_scalings(torch.tensor(0.002), 0.002)
    assert (float(c_skip), float(c_out)) == (1.0, 0.0)
    student = CoDiStudent(_teacher(), get_condition("class", 1))
    z = torch.randn(4, *SHAPE)
    with torch.no_grad():
        f, _ = consistency_output(student, z, torch.full((4,), 0.002), 0.002, class_labels=torch.arange(4))
    assert torch.equal(f, z)
    c_skip, c_out = consistency_scalings(torch.tensor(80.0), 0.002)
    assert float(c_skip) < 1e-5 and abs(float(c_out) - 1) < 1e-5  # far from the boundary f is the denoised image


def test_pe_mode_trains_only_the_adapter_and_the_teacher_stays_bit_identical():
    teacher = _teacher()
    before = copy.deepcopy(teacher.state_dict())
    cond = get_condition("lowres4+class", 1)
    student = CoDiStudent(teacher, cond).set_trainable("adapter")
    loss_fn = CoDiLoss(CoDiConfig(condition="lowres4+class"), teacher, cond)
    loss, _ = loss_fn(student, _batch(), torch.Generator().manual_seed(0))
    loss.backward()
    adapter = {id(p) for p in student.net.adapter.parameters()}
    for p in student.parameters():
        assert (p.grad is not None) == (id(p) in adapter)
    assert any(float(p.grad.abs().max()) > 0 for p in student.net.adapter.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0).step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # full CoDi trains the adapted network too
    student.set_trainable("all")
    assert all(p.requires_grad for p in student.parameters())


class _State:
    def __init__(self, model):
        self.model = model
        self.ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def test_the_target_is_the_ema_without_gradient_and_one_teacher_euler_step():
    teacher = _teacher()
    cond = get_condition("lowres4+class", 1)
    student = CoDiStudent(teacher, cond)
    with torch.no_grad():
        for p in student.net.adapter.zero.parameters():
            p.add_(0.05)
    cfg = CoDiConfig(condition="lowres4+class", cond_dropout=0.0)
    loss_fn = CoDiLoss(cfg, teacher, cond)
    state = _State(student)
    loss_fn.bind(state)
    calls = []
    target = loss_fn.target_model(student)
    loss_fn.target_model = lambda s: lambda *a, **k: calls.append(a) or target(*a, **k)

    x0, labels = _batch()
    loss, _ = loss_fn(student, (x0, labels), torch.Generator().manual_seed(4))
    loss.backward()
    assert all(not v.requires_grad and v.grad is None for v in state.ema.values())
    # replay the draws: one interval, the noise, the condition, then the target's input
    g = torch.Generator().manual_seed(4)
    n = int(torch.randint(1, cfg.intervals + 1, (1,), generator=g))
    t, s = float(cfg.grid()[n]), float(cfg.grid()[n - 1])
    z_t = x0 + t * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        d = teacher(z_t, torch.full((4,), t), class_labels=torch.full((4,), -1))
    a, (b,) = solvers.euler_coefficients(t, s)  # fastdiff's own Euler (= DDIM) step
    z_s = a * z_t + b * d
    z_target, s_target = calls[0]
    torch.testing.assert_close(z_target, z_s, rtol=1e-5, atol=1e-5)
    assert torch.allclose(s_target, torch.full((4,), s))


def test_cfg_order_is_cond_then_uncond():
    teacher = _teacher()
    cond = get_condition("lowres4+class", 1)
    student = CoDiStudent(teacher, cond)
    with torch.no_grad():
        for p in student.net.adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    loss_fn = CoDiLoss(CoDiConfig(target="ema_cfg"), teacher, cond)
    x0, labels = _batch()
    cond_kw, null_kw = loss_fn._cond_kwargs(x0, labels, torch.Generator().manual_seed(0))
    z, sigma = x0 + torch.randn_like(x0), torch.full((4,), 1.0)
    with torch.no_grad():
        d_cond, d_uncond = student(z, sigma, **cond_kw), student(z, sigma, **null_kw)
        for w, want in ((1.0, d_cond), (0.0, d_uncond), (3.0, d_uncond + 3 * (d_cond - d_uncond))):
            got = loss_fn.guided(student, z, sigma, cond_kw, null_kw, torch.full((4,), w))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(d_cond, d_uncond)


def _codi_run(tmp_path, name, steps, every=1000, ema=0.9, lr=2e-3, **options):
    teacher = tmp_path / "teacher.safetensors"
    if not teacher.exists():
        from fastdiff.models.unet import save_unet

        save_unet(teacher, _teacher())
    cfg = TrainConfig(steps=steps, batch_size=8, lr=lr, checkpoint_every=every, log_every=1, ema_decay=ema,
                      out_dir=str(tmp_path / name), progress=False)  # fmt: skip
    codi = CoDiConfig(**{"condition": "lowres4+class", **options})
    return recipes.train_codi(teacher, "digits", cfg, codi)


def test_resume_is_exact(tmp_path):
    _codi_run(tmp_path, "straight", 6, target="ema_cfg")
    _codi_run(tmp_path, "resumed", 3, every=3, target="ema_cfg")
    resumed = _codi_run(tmp_path, "resumed", 6, every=3, target="ema_cfg")
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, _ = load_checkpoint(latest_checkpoint(tmp_path / "straight"))
    tb, _ = load_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A student of the 8x8 digits trained for 40 steps (full CoDi, lr 1e-2, no EMA): long enough for its samples
    to hold their low-res input clearly better than samples of the null condition."""
    return _codi_run(tmp_path_factory.mktemp("codi"), "run", 40, ema=0.0, lr=1e-2, trainable="all")


def test_a_tiny_cpu_run_lowers_both_terms(trained):
    trained, initial = load_student(trained), CoDiStudent(_teacher(), get_condition("lowres4+class", 1))
    from fastdiff.data import DigitsDataset

    ds = DigitsDataset(8)
    batch = (ds.images[:256], ds.labels[:256])
    cfg = CoDiConfig(condition="lowres4+class")
    losses = {}
    for name, model in (("before", initial), ("after", trained)):
        fn = CoDiLoss(cfg, _teacher(), get_condition("lowres4+class", 1))
        with torch.no_grad():
            terms = [fn(model, batch, torch.Generator().manual_seed(k))[1] for k in range(8)]
        losses[name] = {key: sum(float(t[key]) for t in terms) for key in ("loss_consistency", "loss_data")}
    for key in ("loss_consistency", "loss_data"):
        assert losses["after"][key] < losses["before"][key], (key, losses)


def test_bad_conditions_are_refused():
    cond = get_condition("lowres4+class", 1)
    student = CoDiStudent(_teacher(), cond)
    x0, labels = _batch()
    with pytest.raises(ValueError, match=r"condition tensor must have shape \[4, 1, 8, 8\], got \(4, 1, 4, 4\)"):
        student(x0, torch.ones(4), cond=torch.zeros(4, 1, 4, 4), class_labels=labels)
    with pytest.raises(ValueError, match="got None"):
        student(x0, torch.ones(4), class_labels=labels)
    with pytest.raises(ValueError, match="takes no condition tensor"):
        CoDiStudent(_teacher(), get_condition("class", 1))(x0, torch.ones(4), cond=x0, class_labels=labels)
    with pytest.raises(ValueError, match="class_labels must lie in"):
        student(x0, torch.ones(4), cond=x0, class_labels=torch.full((4,), 12))
    with pytest.raises(TypeError, match="adapts a fastdiff EDMUNet"):
        CoDiStudent(torch.nn.Linear(2, 2), cond)
    with pytest.raises(ValueError, match="target must be one of"):
        CoDiConfig(target="student")


def test_a_user_tensor_condition(tmp_path):
    edges = TensorCondition(2, lambda x0, labels: torch.cat([x0.diff(dim=-1, prepend=x0[..., :1])] * 2, 1))
    student = CoDiStudent(_teacher(), edges)
    x0, labels = _batch()
    loss, logs = CoDiLoss(CoDiConfig(condition="edges"), _teacher(), edges)(student, (x0, labels), torch.Generator())
    assert torch.isfinite(loss) and set(logs) == {"loss_consistency", "loss_data", "sigma"}
    from fastdiff.train.codi import save_student

    path = save_student(tmp_path / "edges.safetensors", student, CoDiConfig(condition="edges"))
    loaded = load_student(path)
    cond = edges.make(x0, labels, torch.Generator())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x0, torch.ones(4), cond=cond), student(x0, torch.ones(4), cond=cond))
    with pytest.raises(ValueError, match="without its function: pass the condition tensor itself"):
        loaded.condition.make(x0, labels, torch.Generator())


def test_consistency_sampling_in_the_engine_matches_its_definition():
    cond = get_condition("lowres4+class", 1)
    student = CoDiStudent(_teacher(), cond)
    with torch.no_grad():  # an adapter that reads the condition
        for p in student.net.adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    x0, labels = _batch()
    kw = _kwargs(cond, x0, labels)
    sigmas = torch.tensor([80.0, 2.0, 0.5, 0.1, 0.0])
    z = 80.0 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    solver = student_solver(student, CoDiConfig())
    got = fastdiff.sample(student, z, sigmas, solver=solver, cond=kw, generator=torch.Generator().manual_seed(1))
    # the algorithm written out: x = f(x, sigma_i), then re-noise to sigma_{i+1} where it is positive
    g = torch.Generator().manual_seed(1)
    x = z
    with torch.no_grad():
        for i, s in enumerate([80.0, 2.0, 0.5, 0.1]):
            x, _ = consistency_output(student, x, torch.full((4,), s), 0.002, **kw)
            if i < 3:
                nxt = [2.0, 0.5, 0.1][i]
                x = x + (nxt**2 - 0.002**2) ** 0.5 * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    device_loop = fastdiff.Sampler(student, solver=solver, sigmas=sigmas)
    torch.testing.assert_close(device_loop.sample(z, kw, generator=torch.Generator().manual_seed(1)), got)
    one = fastdiff.sample(student, z, torch.tensor([80.0, 0.0]), solver=solver, cond=kw)
    with torch.no_grad():
        torch.testing.assert_close(one, consistency_output(student, z, torch.full((4,), 80.0), 0.002, **kw)[0])
    with pytest.raises(ValueError, match="below its sigma_min=0.002"):
        fastdiff.sample(student, z, torch.tensor([1.0, 0.001, 0.0]), solver=solver, cond=kw)
    with pytest.raises(ValueError, match="pass the student's CoDiConfig"):
        student_solver(student)


def test_the_replacement_baseline_keeps_the_low_resolution_image():
    from fastdiff.train.codi import LowResReplacement

    teacher = _teacher()
    x0, labels = _batch()
    lowres = torch.nn.functional.avg_pool2d(x0, 4)
    model = LowResReplacement(teacher, lowres, 4)
    with torch.no_grad():
        d = model(torch.randn(4, *SHAPE) * 3, torch.full((4,), 3.0), class_labels=labels)
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(d, 4), lowres, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="the low-res batch has 4 images, the sampler passed 8"):
        model(torch.randn(8, *SHAPE), torch.ones(8))


def _unet2d(**extra):
    from diffusers import UNet2DModel

    torch.manual_seed(3)
    blocks = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, **blocks, **extra)  # fmt: skip
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape))
    return unet.eval().requires_grad_(False)


@pytest.mark.parametrize("fusion", ["zero_conv", "mu"])
def test_a_diffusers_unet2d_student_starts_as_its_teacher_and_trains_its_adapter(fusion):
    from fastdiff.denoisers import VPDenoiser
    from fastdiff.integrations.diffusers import codi_student
    from fastdiff.train.cascade import vp_alphas_cumprod
    from fastdiff.train.codi import set_trainable

    unet, ab = _unet2d(), vp_alphas_cumprod("linear", 1000)
    teacher = VPDenoiser(unet, ab, "v")
    cond = get_condition("lowres4+class", 1)
    student = set_trainable(codi_student(unet, ab, "v", cond, fusion, num_classes=10), "adapter")
    x0, labels = _batch()
    z, sigma = x0 + torch.randn_like(x0), torch.tensor([0.05, 0.5, 2.0, 20.0])
    with torch.no_grad():
        assert torch.equal(student(z, sigma, **_kwargs(cond, x0, labels)), teacher(z, sigma))
    cfg = CoDiConfig(sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max, target="ema_cfg")
    loss, _ = CoDiLoss(cfg, teacher, cond)(student, (x0, labels), torch.Generator().manual_seed(0))
    loss.backward()
    adapter = {id(p) for p in student.net.adapter.parameters()}
    assert all((p.grad is not None) == (id(p) in adapter) for p in student.parameters())
    with pytest.raises(ValueError, match="condition tensor must have shape"):
        student(z, sigma, cond=torch.zeros(4, 1, 2, 2), class_labels=labels)
    with pytest.raises(ValueError, match="adapts an unconditional UNet2DModel"):
        codi_student(_unet2d(num_class_embeds=10), ab, "v", cond)


# --------------------------------------------------------------------------------------------- the command line


def _lowres_inputs(tmp_path, n=20):
    """The first ``n`` held-out 8x8 digits average-pooled by 4 (the students' input), saved as ``[n, 1, 2, 2]``."""
    from fastdiff.data import DigitsDataset

    lowres = F.avg_pool2d(DigitsDataset(8, split="test").images[:n], 4)
    path = tmp_path / "lowres.npy"
    np.save(path, lowres.numpy())
    return path, lowres


def _images(npz) -> torch.Tensor:
    return torch.from_numpy(npz["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_the_cli_samples_a_student_whose_samples_hold_their_input(trained, tmp_path, capsys):
    path, lowres = _lowres_inputs(tmp_path)
    out_dir, png = tmp_path / "samples", tmp_path / "grid.png"
    rc = main(["sample", "--model", str(trained), "--solver", "lcm", "--steps", "2", "--cond-image", str(path),
               "-n", "20", "--out", str(png), "--out-dir", str(out_dir)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "solver LCM(sigma_min=0.002, boundary_scale=10.0, sigma_data=0.5)" in out  # the student's own scalings
    assert "schedule karras (2 steps at sigma 80 2.515)" in out
    assert re.search(r"NFE\s+2 per sample \(2 conditional \+ 0 unconditional\)", out)
    assert "teacher        not applicable" in out
    printed = float(re.search(r"low-res input .* to --cond-image ([\d.]+)", out)[1])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = np.load(out_dir / "samples.npz", allow_pickle=False)
    assert (saved["labels"] == np.arange(20) % 10).all()
    images = _images(saved)
    assert abs(float((F.avg_pool2d(images, 4) - lowres).square().mean().sqrt()) - printed) < 0.01  # uint8 rounding

    # The same samples from Python, and from the same noise with the null condition (zeros, label -1).
    student = fastdiff.models.get(trained)
    assert isinstance(student, CoDiStudent) and (student.config.resolution, student.config.num_classes) == (8, 10)
    sigmas = schedules.karras(3, 0.002, 80.0)[[0, 1, 3]]
    kw = dict(shape=(1, 8, 8), num_classes=10, solver=student_solver(student),
              condition=student.condition.from_lowres(lowres))  # fmt: skip
    same = generate.generate(student, torch.arange(20), sigmas, **kw)
    torch.testing.assert_close(same.images, images, rtol=0, atol=1.5 / 127.5)

    def null(x, sigma, cond, class_labels):
        return student(x, sigma, cond=torch.zeros_like(cond), class_labels=torch.full_like(class_labels, -1))

    free = generate.generate(null, torch.arange(20), sigmas, **kw)
    free_rmse = float((F.avg_pool2d(free.images, 4) - lowres).square().mean().sqrt())
    assert printed < 0.75 * free_rmse, (printed, free_rmse)


def test_the_cli_takes_an_image_file_and_a_class(trained, tmp_path, capsys):
    from PIL import Image

    from fastdiff.data import DigitsDataset

    digit = ((DigitsDataset(8, split="test").images[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    image = tmp_path / "digit.png"
    Image.fromarray(digit).save(image)  # at the model's resolution: pooled to 2x2 by the command
    runs = {}
    for label in (3, 5):
        out_dir = tmp_path / f"class{label}"
        assert main(["sample", "--model", str(trained), "--cond-image", str(image), "--class", str(label), "-n", "4",
                     "--out-dir", str(out_dir)]) == 0  # fmt: skip
        saved = np.load(out_dir / "samples.npz", allow_pickle=False)
        assert (saved["labels"] == label).all()
        runs[label] = saved["images"]
    out = capsys.readouterr().out
    assert "solver LCM(sigma_min=0.002" in out and "(4 steps at sigma" in out  # lcm and 4 steps by default
    assert not np.array_equal(runs[3], runs[5])  # the class reaches the student


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """Student files of other conditions (their weights do not matter here)."""
    from fastdiff.train.codi import save_student

    folder = tmp_path_factory.mktemp("students")
    paths = {}
    for spec in ("class", "lowres4", "inpaint"):
        student = CoDiStudent(_teacher(), get_condition(spec, 1))
        paths[spec] = save_student(folder / f"{spec}.safetensors", student, CoDiConfig(condition=spec))
    return paths


def test_a_class_student_samples_from_the_cli(untrained, capsys):
    assert main(["sample", "--model", str(untrained["class"]), "--class", "2", "--steps", "1", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "schedule karras (1 steps at sigma 80)" in out and "low-res input" not in out


def _write(tmp_path, name, array, **kw):
    path = tmp_path / name
    np.save(path, array, **kw)
    return path


@pytest.mark.parametrize(
    "student,args,message",
    [
        ("trained", [], "conditioned on lowres4+class: give its low-resolution images with --cond-image PATH"),
        (
            "trained",
            ["--cond-image", "small"],
            "3x3 images; this student (lowres4+class, 8x8) takes 2x2 low-res images, or 8x8 ones to average-pool by 4",
        ),  # fmt: skip
        ("trained", ["--cond-image", "rgb"], "3-channel images; the student takes 1"),
        ("trained", ["--cond-image", "pickle"], "which would need unpickling"),
        ("trained", ["--cond-image", "range"], "float images must lie in [-1, 1]"),
        ("trained", ["--cond-image", "text"], "expected a PNG/JPEG image or a .npy/.npz array"),
        ("trained", ["--cond-image", "folder"], "is a directory, not a --cond-image file"),
        ("trained", ["--cond-image", "missing"], "--cond-image file not found"),
        ("trained", ["--cond-image", "good", "--class", "12"], "class must lie in [0, 10), got 12"),
        ("digits", ["--cond-image", "good"], "--cond-image does not apply to --model digits"),
        ("class", ["--cond-image", "good"], "conditioned on class alone; drop --cond-image"),
        ("lowres4", ["--cond-image", "good", "--class", "1"], "conditioned on lowres4, without class labels"),
        ("inpaint", [], "conditioned on inpaint, which the command line does not build: sample it from Python"),
    ],
)
def test_bad_condition_inputs_are_one_line_errors(trained, untrained, tmp_path, capsys, student, args, message):
    files = {
        "small": _write(tmp_path, "small.npy", np.zeros((2, 1, 3, 3), np.float32)),
        "rgb": _write(tmp_path, "rgb.npy", np.zeros((2, 3, 2, 2), np.float32)),
        "pickle": _write(tmp_path, "pickle.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "range": _write(tmp_path, "range.npy", np.full((2, 1, 2, 2), 255.0, np.float32)),
        "good": _write(tmp_path, "good.npy", np.zeros((2, 1, 2, 2), np.uint8)),
        "folder": tmp_path,
        "missing": tmp_path / "missing.npy",
    }
    (tmp_path / "notes.txt").write_text("not an image")
    files["text"] = tmp_path / "notes.txt"
    model = {"trained": trained, "digits": "digits", **untrained}[student]
    argv = [str(files.get(a, a)) for a in args]
    assert main(["sample", "--model", str(model), "-n", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
