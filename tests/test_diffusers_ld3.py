"""LD3 for a diffusers pipeline (fastdiff.integrations.diffusers_ld3, `fastdiff ld3 --pipeline`), on pipelines
built from config (tests/_tiny_pipelines.py; random weights, so the mechanics, not the quality): the teacher
distance falls, the schedule file round-trips into sample_pipeline and FastDiffScheduler, and the prompts reach
the network as the sampler's conditioning."""

import json

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import _tiny_pipelines as tiny  # noqa: E402

from fastdiff import cli, schedules  # noqa: E402
from fastdiff.integrations.diffusers import FastDiffScheduler, PipelineSampler, sample_pipeline  # noqa: E402
from fastdiff.integrations.diffusers_ld3 import (  # noqa: E402
    PromptConditioned,
    learn_pipeline_schedule,
    pipeline_sigma_range,
)
from fastdiff.train.ld3 import LD3Config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

PROMPTS = ["a photo of a cat", "red house"]
QUICK = dict(pairs=8, held_out=4, teacher_steps=12, config=LD3Config(rounds_xi=2, rounds_both=2))


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_the_teacher_distance_falls_and_the_file_records_the_run(tmp_path, family):
    """SD with guidance on an interval (teacher and student skip the unconditional pass outside it), and Flux
    (distilled guidance, a flow schedule): the best validation distance is below LD3's start, the held-out error
    of the learned schedule below that of its logSNR-uniform start, and the file says what it was learned for."""
    pipe = getattr(tiny, family)()
    kw = dict(guidance=fastdiff.Guidance(3.0, interval=(0.5, 5.0))) if family == "sd" else dict(height=16, width=16)
    if family == "flux":
        kw["max_sequence_length"] = 8
    lines = []
    out = tmp_path / "s.json"
    result, errors = learn_pipeline_schedule(pipe, PROMPTS, "ipndm", 4, out, echo=lines.append, **QUICK, **kw)
    distances = [row["val_distance"] for row in result.log]
    assert min(distances[1:]) < 0.9 * distances[0]
    assert errors["ld3"] < errors["logsnr_uniform"]
    saved = schedules.load_schedule(out, solver="ipndm")
    assert torch.allclose(saved.sigmas, result.sigmas.double())
    assert saved.metadata["model"].startswith(f"{type(pipe).__name__} ") and "prompts:" in saved.metadata["model"]
    low, high = pipeline_sigma_range(
        PipelineSampler(pipe, **{k: v for k, v in kw.items() if k != "max_sequence_length"})
    )
    assert saved.sigmas[0] == pytest.approx(high) and saved.sigmas[-2] == pytest.approx(low)
    assert any("teacher pairs: 8 from heun" in line for line in lines)
    if family == "sd":
        assert (low, high) == pytest.approx((0.02917, 14.6146), rel=1e-4)  # SD's training timesteps 0 and 999


def test_the_teacher_cache_is_reused_for_the_same_prompts_only(tmp_path):
    pipe = tiny.sd()
    quick = dict(QUICK, config=LD3Config(rounds_xi=1, rounds_both=0))
    lines = []
    for prompts in (PROMPTS, PROMPTS, ["green tree", "red house"]):
        learn_pipeline_schedule(pipe, prompts, "ipndm", 4, tmp_path / "s.json", echo=lines.append, **quick)
    made = [line for line in lines if line.startswith("teacher pairs")]
    assert "from heun" in made[0] and made[1].endswith("(8 pairs)")  # reused
    assert any("other settings" in line for line in lines)  # other prompts: new pairs


def test_the_learned_file_runs_in_both_entry_points(tmp_path):
    """The schedule drives sample_pipeline and, in the pipeline's own loop, FastDiffScheduler: with guidance at
    every step (the pipeline's CFG) the two agree, evaluation sigmas included."""
    pipe = tiny.sd()
    out = tmp_path / "s.json"
    learn_pipeline_schedule(pipe, PROMPTS, "ipndm", 4, out, guidance=3.0, echo=lambda _: None, **QUICK)
    saved = schedules.load_schedule(out, solver="ipndm")
    assert not torch.equal(saved.eval_sigmas, saved.sigmas)  # decoupled evaluation sigmas were learned
    ours = sample_pipeline(pipe, PROMPTS, solver="ipndm", guidance=3.0, learned_schedule=str(out),
                           generator=torch.Generator().manual_seed(0), output_type="latent")  # fmt: skip
    assert ours.nfe == (4, 4)
    original = pipe.scheduler
    pipe.scheduler = FastDiffScheduler.from_config(original.config, solver="ipndm", learned_schedule=str(out))
    try:
        loop = pipe(prompt=PROMPTS, guidance_scale=3.0, num_inference_steps=4, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    finally:
        pipe.scheduler = original
    assert (ours.images - loop).abs().max() <= 1e-5 * loop.abs().max()


def test_prompt_labels_select_each_prompts_conditioning():
    """class_labels i runs prompt i's embeddings, -1 the negative prompt's, mixed in one batch."""
    pipe = tiny.sd()
    runner = PipelineSampler(pipe, steps=4, guidance=3.0)
    c = runner.conditioning(PROMPTS, ["blue sky"] * 2)
    model = PromptConditioned(runner.model, c)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((3,), 2.0)
    got = model(x, sigma, class_labels=torch.tensor([1, -1, 0]))
    ehs = torch.stack([c.cond["encoder_hidden_states"][1], c.uncond["encoder_hidden_states"][0],
                       c.cond["encoder_hidden_states"][0]])  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(got, runner.model(x, sigma, encoder_hidden_states=ehs), atol=1e-6)


def test_bad_requests(tmp_path):
    pipe = tiny.sd()
    with pytest.raises(ValueError, match="at least one prompt"):
        learn_pipeline_schedule(pipe, [], "ipndm", 4, tmp_path / "s.json")
    with pytest.raises(TypeError, match="one string"):
        learn_pipeline_schedule(pipe, PROMPTS, "ipndm", 4, tmp_path / "s.json", negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="no timestep to learn"):
        learn_pipeline_schedule(pipe, PROMPTS, "ipndm", 2, tmp_path / "s.json")


# ------------------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "sd"
    tiny.sd().save_pretrained(path)
    return path


def test_cli_learns_for_a_saved_pipeline(tmp_path, pipeline_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\nred house\n")
    out = tmp_path / "learned.json"
    args = ["ld3", "--pipeline", str(pipeline_dir), "--prompts", str(prompts), "--nfe", "4", "--pairs", "6",
            "--held-out", "4", "--teacher-steps", "8", "--rounds-xi", "1", "--rounds-both", "1", "--guidance", "3",
            "--interval", "0.5,5", "--negative-prompt", "blue sky", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "held-out teacher RMSE of the latents (4 new pairs): LD3" in text and f"wrote {out}" in text
    meta = json.loads(out.read_text())["metadata"]
    assert meta["solver"] == "ipndm" and meta["nfe"] == 4 and str(pipeline_dir) in meta["model"]
    assert (tmp_path / "learned.teacher.safetensors").is_file()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipeline_dir)
    got = sample_pipeline(pipe, ["red house"], solver="ipndm", learned_schedule=str(out), output_type="latent")
    assert got.nfe == (4, 0) and torch.isfinite(got.images).all()


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--prompts", "P"], "--pipeline DIR and --prompts FILE go together"),
        (["--pipeline", "D"], "--pipeline DIR and --prompts FILE go together"),
        (["--pipeline", "D", "--prompts", "P", "--model", "digits"], "give one"),
        (["--height", "32"], "--height applies to --pipeline"),
        (["--pipeline", "NOWHERE", "--prompts", "P"], "not a diffusers pipeline folder"),
        (["--pipeline", "D", "--prompts", "EMPTY"], "holds no prompts"),
        (["--pipeline", "D", "--prompts", "MISSING"], "--prompts file not found"),
    ],
)
def test_cli_refuses_bad_combinations(tmp_path, pipeline_dir, capsys, extra, match):
    (tmp_path / "P").write_text("a cat\n")
    (tmp_path / "EMPTY").write_text("\n \n")
    where = {"P": tmp_path / "P", "EMPTY": tmp_path / "EMPTY", "MISSING": tmp_path / "MISSING", "D": pipeline_dir,
             "NOWHERE": tmp_path}  # fmt: skip
    extra = [str(where.get(a, a)) for a in extra]
    assert cli.main(["ld3", "--nfe", "4", "--out", str(tmp_path / "o.json"), *extra]) == 2
    assert match in capsys.readouterr().err
