"""LD3: the parameterisation, gradients through the fused ops, the slack step, a short run that improves held-out
teacher error, schedule files, teacher pairs and the GITS-style baseline."""

import itertools
import json
import warnings

import pytest
import torch

import fastdiff
from fastdiff import checkpoint, gits, ld3, schedules
from fastdiff.train.ld3 import LD3Config, slack_step, train_ld3

SMIN, SMAX = 0.002, 80.0


@pytest.fixture(scope="module")
def pairs(gmm):
    kw = dict(shape=(2,), sigma_min=SMIN, sigma_max=SMAX, num_classes=gmm.num_classes, dtype=torch.float64)
    train = ld3.make_teacher_pairs(gmm, 24, model_name="gmm", **kw)
    held = ld3.make_teacher_pairs(gmm, 200, first_index=10_000, **kw)
    return train, held


def _err(gmm, held, sigmas, solver, eval_sigmas=None):
    out = fastdiff.sample(gmm, held.noise, sigmas, solver=solver, cond={"class_labels": held.labels},
                          eval_sigmas=eval_sigmas)  # fmt: skip
    return ((out - held.target) ** 2).mean(1).sqrt().mean().item()


@pytest.mark.parametrize("space", ["logsnr", "time"])
def test_parameterisation_decreases_keeps_endpoints_and_clips_offsets(space):
    gen = torch.Generator().manual_seed(0)
    for steps in (2, 3, 7):
        sched = ld3.LD3Schedule(steps, SMIN, SMAX, space)
        with torch.no_grad():
            sched.xi.copy_(torch.randn(steps, generator=gen, dtype=torch.float64) * 3)
            sched.xi_c.copy_(torch.randn(steps, generator=gen, dtype=torch.float64) * 10)
        s, ev = sched.sigmas().detach(), sched.eval_sigmas().detach()
        assert s.shape == ev.shape == (steps + 1,)
        assert (s[1:] < s[:-1]).all() and s[-1] == 0
        assert s[0].item() == pytest.approx(SMAX, rel=1e-12) and s[-2].item() == pytest.approx(SMIN, rel=1e-12)
        to = torch.log if space == "logsnr" else (lambda v: v)
        u, uv = to(s[:-1]), to(ev[:-1])
        half_gap = (u[:-1] - u[1:]).min() / 2
        assert ((uv - u).abs() <= half_gap * (1 + 1e-12)).all()
        assert ev[0] == s[0] and ev[-2] == s[-2] and ev[-1] == 0  # endpoints never move
        assert (ev[1:] <= ev[:-1]).all()  # half the smallest gap keeps the evaluation points in order


def test_gradients_through_the_fused_ops_match_the_torch_reference(gmm, pairs, monkeypatch):
    train, _ = pairs
    x, y = train.noise[:4], train.labels[:4]

    def grads(backend):
        monkeypatch.setenv("FASTDIFF_BACKEND", backend)
        sched = ld3.LD3Schedule(4, SMIN, SMAX)
        with torch.no_grad():
            sched.xi.copy_(torch.tensor([0.3, -0.2, 1.1, 0.4], dtype=torch.float64))
            sched.xi_c.copy_(torch.tensor([0.0, 0.05, -0.03, 0.0], dtype=torch.float64))
        loss = (ld3.Student(gmm, "unipc", sched, None)(x, y) - train.target[:4]).square().sum()
        return torch.autograd.grad(loss, [sched.xi, sched.xi_c])

    ref, got = grads("torch"), grads("cpu")
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert ref[0].abs().max() > 0 and ref[1].abs().max() > 0


@pytest.mark.parametrize(
    "solver, options",
    [("dpm_2", {}), ("lms", {}), ("deis", {}), ("res_multistep", {}), ("gradient_estimation", {}),
     ("euler_ancestral", {"eta": 0.0}), ("dpmpp_sde", {"eta": 0.0}), ("dpm_2_ancestral", {"eta": 0.0})],
)  # fmt: skip
def test_student_runs_every_deterministic_solver(gmm, pairs, solver, options):
    """The student of a solver with points between the schedule's entries (DPM-2's midpoint, DPM++ SDE's s) or
    derivative history (LMS, DEIS) equals fastdiff.sample on its schedule and back-propagates to both parameters;
    the ancestral and SDE solvers take part with eta = 0, where they draw nothing."""
    train, _ = pairs
    sched = ld3.LD3Schedule(4, SMIN, SMAX)
    with torch.no_grad():
        sched.xi.copy_(torch.tensor([0.3, -0.2, 1.1, 0.4], dtype=torch.float64))
        sched.xi_c.copy_(torch.tensor([0.0, 0.05, -0.03, 0.0], dtype=torch.float64))
    s = fastdiff.solvers.get(solver, **options)
    out = ld3.Student(gmm, s, sched, None)(train.noise[:4], train.labels[:4])
    cond = {"class_labels": train.labels[:4]}
    ref = fastdiff.sample(gmm, train.noise[:4], sched.sigmas().detach(), solver=s, cond=cond,
                          eval_sigmas=sched.eval_sigmas().detach())  # fmt: skip
    torch.testing.assert_close(out.detach(), ref, rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad((out - train.target[:4]).square().sum(), [sched.xi, sched.xi_c])
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2m_sde", "lcm", "er_sde"])
def test_student_refuses_a_solver_that_draws_noise(gmm, solver):
    with pytest.raises(ValueError, match="draws noise at its steps"):
        ld3.Student(gmm, solver, ld3.LD3Schedule(4, SMIN, SMAX), None)


def test_gradcheck_of_the_student_in_float64(gmm, pairs, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "cpu")  # the C++ kernel's forward and fused backward
    train, _ = pairs

    def student_of(xi, xi_c):
        sched = ld3.LD3Schedule(3, SMIN, SMAX)
        del sched.xi, sched.xi_c  # plain tensors in place of the parameters, so gradcheck can perturb them
        sched.xi, sched.xi_c = xi, xi_c
        return ld3.Student(gmm, "dpmpp_2m", sched, None)(train.noise[:3], train.labels[:3])

    xi = torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64, requires_grad=True)
    xi_c = torch.tensor([0.0, 0.02, 0.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(student_of, (xi, xi_c), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_slack_step_stays_in_the_ball_and_never_raises_a_loss(gmm, pairs):
    train, _ = pairs
    sched = ld3.LD3Schedule(4, SMIN, SMAX)
    student = ld3.Student(gmm, "euler", sched, None)
    metric, _ = ld3.make_metric("l2")
    x_T, target, labels = train.noise[:8], train.target[:8], train.labels[:8]
    radius = 0.5
    x = x_T.clone()
    for lr in (1e3, 10.0, 1e-2):  # a huge step overshoots (rejected for some samples), a small one helps
        new, before, after = slack_step(student, metric, x, x_T, target, labels, lr, radius)
        assert ((new - x_T).norm(dim=1) <= radius * (1 + 1e-12)).all()
        assert (after <= before).all()
        with torch.no_grad():
            torch.testing.assert_close(metric(student(new, labels), target), after, rtol=1e-12, atol=0)
        x = new
    moved = ld3.project_to_ball(x_T + 10, x_T, radius)
    torch.testing.assert_close((moved - x_T).norm(dim=1), torch.full((8,), radius, dtype=torch.float64))


def test_a_short_run_improves_held_out_teacher_error(gmm, pairs):
    train, held = pairs
    tr, va = train.split(16)
    cfg = LD3Config(rounds_xi=1, rounds_both=1, metric="l2")
    res = train_ld3(gmm, "dpmpp_2m", tr, va, steps=4, sigma_min=SMIN, sigma_max=SMAX, config=cfg)
    initial = _err(gmm, held, schedules.logsnr_uniform(4, SMIN, SMAX), "dpmpp_2m")  # xi = ones
    learned = _err(gmm, held, res.sigmas, "dpmpp_2m", res.eval_sigmas)
    assert learned < 0.7 * initial, (learned, initial)
    assert [r["round"] for r in res.log] == [0, 1, 2] and res.metric == "l2"
    assert res.log[-1]["val_distance"] <= res.log[0]["val_distance"]


def test_saved_schedule_round_trips_exactly(tmp_path):
    sched = ld3.LD3Schedule(5, SMIN, SMAX)
    with torch.no_grad():
        sched.xi.copy_(torch.tensor([0.1, 0.7, -0.3, 0.2, 0.9], dtype=torch.float64))
        sched.xi_c.copy_(torch.tensor([0.0, 0.1, -0.1, 0.05, 0.0], dtype=torch.float64))
    s, ev = sched.sigmas().detach(), sched.eval_sigmas().detach()
    path = tmp_path / "s.json"
    schedules.save(path, s, eval_sigmas=ev, solver="ipndm", nfe=5, model="gmm")
    got = schedules.load_schedule(path, solver="ipndm", nfe=5)
    assert torch.equal(got.sigmas, s) and torch.equal(got.eval_sigmas, ev)
    assert got.metadata == {"solver": "ipndm", "nfe": 5, "model": "gmm"}
    assert torch.equal(schedules.load(path), s)


def test_bad_schedule_files_are_refused_clearly(tmp_path):
    def write(payload):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(payload))
        return path

    good = {"format": "fastdiff-schedule", "version": 1, "sigmas": [80.0, 5.0, 0.5, 0.0], "metadata": {}}
    with pytest.raises(ValueError, match="not a fastdiff schedule"):
        schedules.load_schedule(write({k: v for k, v in good.items() if k != "sigmas"}))
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedules.load_schedule(write({**good, "sigmas": [80.0, 0.5, 5.0, 0.0]}))
    with pytest.raises(ValueError, match="inconsistent"):
        schedules.load_schedule(write({**good, "metadata": {"solver": "euler", "nfe": 4}}))
    with pytest.raises(ValueError, match="eval_sigmas has 2 entries"):
        schedules.load_schedule(write({**good, "eval_sigmas": [80.0, 0.0]}))
    with pytest.raises(ValueError, match="not valid JSON"):
        (tmp_path / "torn.json").write_text('{"format": "fastdiff-sch')
        schedules.load_schedule(tmp_path / "torn.json")
    path = write({**good, "metadata": {"solver": "euler", "nfe": 3}})
    with pytest.warns(UserWarning, match="learned for solver 'euler', not 'unipc'"):
        schedules.load_schedule(path, solver="unipc")
    with pytest.warns(UserWarning, match="learned for NFE 3, but this run spends 5"):
        schedules.load_schedule(path, nfe=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedules.load_schedule(path, solver="euler", nfe=3)


def test_teacher_pairs_round_trip_and_refuse_corruption(pairs, tmp_path):
    train, _ = pairs
    path = train.save(tmp_path / "pairs.safetensors")
    got = ld3.TeacherPairs.load(path)
    assert torch.equal(got.noise, train.noise) and torch.equal(got.target, train.target)
    assert torch.equal(got.labels, train.labels) and got.metadata == train.metadata
    assert got.metadata["solver"] == "heun" and got.metadata["nfe"] == 63
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        ld3.TeacherPairs.load(path)


def test_teacher_pairs_are_the_teacher_solve(gmm, pairs):
    train, _ = pairs
    ref = fastdiff.sample(gmm, train.noise, schedules.karras(32, SMIN, SMAX), solver="heun",
                          cond={"class_labels": train.labels})  # fmt: skip
    torch.testing.assert_close(train.target, ref, rtol=0, atol=1e-12)


def test_gits_dynamic_programme_finds_the_cheapest_path():
    gen = torch.Generator().manual_seed(3)
    g1 = 9
    cost = torch.rand(g1, g1, generator=gen, dtype=torch.float64).triu(1)
    cost[torch.tril(torch.ones(g1, g1, dtype=torch.bool))] = float("inf")
    for steps in (1, 3, 5, 8):
        path = gits.best_path(cost, steps)
        brute = min(
            ([0, *mid, g1 - 1] for mid in itertools.combinations(range(1, g1 - 1), steps - 1)),
            key=lambda p: sum(cost[a, b].item() for a, b in zip(p, p[1:])),
        )
        assert path == brute


def test_gits_schedule_beats_karras_on_the_mixture(gmm, pairs):
    _, held = pairs
    sig = gits.gits_sigmas(gmm, 5, SMIN, SMAX, shape=(2,), grid=32, n=32, num_classes=4, dtype=torch.float64)
    assert sig.shape == (6,) and sig[0] == SMAX and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    assert _err(gmm, held, sig, "euler") < _err(gmm, held, schedules.karras(5, SMIN, SMAX), "euler")


def test_steps_for_nfe():
    assert ld3.steps_for_nfe("euler", 5) == 5
    assert ld3.steps_for_nfe("heun", 7) == 4
    with pytest.raises(ValueError, match="cannot spend exactly 4"):
        ld3.steps_for_nfe("heun", 4)


def test_cli_learns_saves_and_samples_a_schedule(tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "sched.json"
    args = ["ld3", "--model", "gmm", "--solver", "dpmpp_2m", "--nfe", "4", "--out", str(out), "--pairs", "12",
            "--held-out", "40", "--rounds-xi", "1", "--rounds-both", "1"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "round 2 (xi+xi_c): teacher distance" in text and "held-out teacher RMSE" in text
    learned = schedules.load_schedule(out, solver="dpmpp_2m", nfe=4)
    assert learned.metadata["model"] == "gmm" and learned.eval_sigmas is not None and len(learned.sigmas) == 5
    assert (tmp_path / "sched.teacher.safetensors").exists()
    assert main(args) == 0  # reuses the cached teacher pairs
    assert "teacher pairs: " + str(tmp_path / "sched.teacher.safetensors") in capsys.readouterr().out

    assert main(["sample", "--model", "gmm", "--solver", "dpmpp_2m", "--schedule", str(out), "-n", "64"]) == 0
    assert "NFE            4 per sample" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="learned for solver 'dpmpp_2m', not 'euler'"):
        assert main(["sample", "--model", "gmm", "--solver", "euler", "--schedule", str(out), "-n", "64"]) == 0
    assert main(["sample", "--model", "gmm", "--schedule", str(out), "--steps", "6", "-n", "64"]) == 2
    assert "disagrees with" in capsys.readouterr().err
