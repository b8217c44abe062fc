"""CoDi (fastdiff.train.codi): the zero-initialised adapter, the boundary condition, which parameters learn, the
target, the CFG order, training, resume, bad input and multistep consistency sampling."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from fastdiff import solvers
from fastdiff.checkpoint import latest_checkpoint, load_checkpoint
from fastdiff.models.unet import EDMUNet, UNetConfig
from fastdiff.train import TrainConfig, recipes
from fastdiff.train.codi import (
    CoDiConfig,
    CoDiLoss,
    CoDiStudent,
    TensorCondition,
    consistency_output,
    consistency_sample,
    consistency_scalings,
    get_condition,
    load_student,
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


def _codi_run(tmp_path, name, steps, every=1000, ema=0.9, **options):
    teacher = tmp_path / "teacher.safetensors"
    if not teacher.exists():
        from fastdiff.models.unet import save_unet

        save_unet(teacher, _teacher())
    cfg = TrainConfig(steps=steps, batch_size=8, lr=2e-3, checkpoint_every=every, log_every=1, ema_decay=ema,
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


def test_a_tiny_cpu_run_lowers_both_terms(tmp_path):
    path = _codi_run(tmp_path, "run", 40, ema=0.0, trainable="all")
    trained, initial = load_student(path), CoDiStudent(_teacher(), get_condition("lowres4+class", 1))
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


def test_multistep_consistency_sampling_matches_its_definition():
    cond = get_condition("lowres4+class", 1)
    student = CoDiStudent(_teacher(), cond)
    x0, labels = _batch()
    kw = _kwargs(cond, x0, labels)
    sigmas = torch.tensor([80.0, 2.0, 0.5, 0.1, 0.0])
    z = 80.0 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    got = consistency_sample(student, z, sigmas, generator=torch.Generator().manual_seed(1), **kw)
    g = torch.Generator().manual_seed(1)
    x = z
    with torch.no_grad():
        for i, s in enumerate([80.0, 2.0, 0.5, 0.1]):
            x, _ = consistency_output(student, x, torch.full((4,), s), 0.002, **kw)
            if i < 3:
                nxt = [2.0, 0.5, 0.1][i]
                x = x + (nxt**2 - 0.002**2) ** 0.5 * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    one = consistency_sample(student, z, torch.tensor([80.0]), **kw)
    with torch.no_grad():
        torch.testing.assert_close(one, consistency_output(student, z, torch.full((4,), 80.0), 0.002, **kw)[0])
    with pytest.raises(ValueError, match="decreasing"):
        consistency_sample(student, z, torch.tensor([1.0, 2.0]), **kw)


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
