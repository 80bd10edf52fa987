"""Few-step decoders distilled under a frozen encoder (scdkit.distill, ``scdkit train --teacher``).

The tiny registry of test_long_context plus ``one`` (1 Euler step) and ``ancestral`` (DDPM, seeded noise per step):
pipeline ``p`` (2 steps, its "shipped" checkpoint in ckpt/) teaches ``fast`` (the same encoder and decoder, 1 step).
"""

import json

import pytest
import torch

from scdkit.cli import main
from scdkit.distill import Teacher, pair_problem
from scdkit.interfaces import Conditioning, Recipe
from scdkit.registry import load_registry
from scdkit.runs import read_manifest
from tests.test_long_context import tiny_registry

STUDENTS = """
[schedulers.one]
plugin = "flow-match-euler"
steps = 1

[schedulers.ancestral]
plugin = "ddpm"
steps = 4

[pipelines.fast]
encoder = "causal"
decoder = "dec"
scheduler = "one"
height = 8
width = 8
patch_size = 4
checkpoint = "fast-ckpt"

[pipelines.fast-ddpm]
encoder = "causal"
decoder = "dec"
scheduler = "ancestral"
height = 8
width = 8
patch_size = 4
"""
FAST = ["--batch", "2", "--frames", "3", "--eval-every", "0", "--warmup", "1", "--checkpoint-every", "1"]


def registry_with_students(tmp_path):
    registry = tiny_registry(tmp_path)
    registry.path.write_text(registry.path.read_text() + STUDENTS)
    return load_registry(registry.path)


def distil(registry, *args, pipeline="fast", steps=2):
    return main(["--threads", "1", "train", "--registry", str(registry.path), "--pipeline", pipeline, *FAST,
                 "--steps", str(steps), *args])


def test_pair_problem_accepts_deterministic_solvers_and_refuses_ancestral_ones(tmp_path):
    registry = registry_with_students(tmp_path)
    assert pair_problem(registry.build("p", load=False).scheduler) is None
    assert pair_problem(registry.build("fast", load=False).scheduler) is None
    problem = pair_problem(registry.build("fast-ddpm", load=False).scheduler)
    assert problem and problem.startswith("ddpm does not follow a fixed (noise, clean) pair")


def test_the_distillation_targets_are_the_teachers_samples_at_the_students_grid_times(tmp_path):
    registry = registry_with_students(tmp_path)
    teacher = Teacher(registry.build("p"), steps=3)
    student = registry.build("fast", checkpoint=tmp_path / "ckpt")
    seen = {}
    original = student.model.decoder.forward

    def spy(x_t, t, cond, **extra):
        seen.update(x_t=x_t, t=t, cond=cond)
        return original(x_t, t, cond, **extra)

    student.model.decoder.forward = spy
    video = torch.rand(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    recipe = Recipe(noise_draws=1, cond_noise=0.0, context_noise=0.0)
    student.loss(video, recipe, torch.Generator().manual_seed(1), teacher)
    assert torch.equal(seen["t"], torch.ones_like(seen["t"]))  # a 1-step student: its grid is t = 1 alone
    noise = seen["x_t"]  # at t = 1 the student's input is the loss's noise itself
    with torch.no_grad():  # the teacher's 3 steps from that noise, by hand
        x, times = noise, teacher.times
        for t, t_next in zip(times, times[1:]):
            x = x + (t_next - t) * teacher.pipeline.model.decoder(x, torch.full((x.shape[0],), t), seen["cond"])
        target = teacher.sample(noise, seen["cond"], Conditioning())
    assert len(times) == 4 and torch.allclose(target, x, atol=1e-5)
    loss = student.loss(video, recipe, torch.Generator().manual_seed(1), teacher)
    # the loss is the student's flow-matching error against that sample: velocity e - x at t = 1
    with torch.no_grad():
        velocity = original(noise, seen["t"], seen["cond"])
    assert torch.allclose(loss, (velocity - (noise - target)).square().mean(), atol=1e-6)


def test_a_distilled_student_reaches_the_teachers_samples_in_one_step(tmp_path):
    """The behaviour: after distillation the 1-step student's frame from a given noise is far closer to the
    2-step teacher's than the teacher's own decoder sampled in 1 step (the blurred mean)."""
    registry = registry_with_students(tmp_path)
    assert distil(registry, "--init", str(tmp_path / "ckpt"), "--freeze", "encoder", "--teacher", "p",
                  "--out", str(tmp_path / "student"), "--lr", "3e-3", "--ema", "0", "--checkpoint-every", "100",
                  steps=80) == 0
    teacher = registry.build("p")
    student = registry.build("fast", checkpoint=tmp_path / "student")
    undistilled = registry.build("fast", checkpoint=tmp_path / "ckpt")  # the teacher's weights with the student's 1 step
    context = torch.rand(4, 2, 1, 8, 8, generator=torch.Generator().manual_seed(5))

    def frame(pipeline):
        return pipeline.generate(context, 1, generator=torch.Generator().manual_seed(9)).video

    reference = frame(teacher)
    error_student = (frame(student) - reference).abs().mean().item()
    error_undistilled = (frame(undistilled) - reference).abs().mean().item()
    assert error_student < 0.5 * error_undistilled, (error_student, error_undistilled)


def test_run_json_records_the_teacher_and_resuming_keeps_it(tmp_path, capsys):
    registry = registry_with_students(tmp_path)
    out = tmp_path / "student"
    assert distil(registry, "--init", str(tmp_path / "ckpt"), "--freeze", "encoder", "--teacher", "p",
                  "--teacher-steps", "3", "--out", str(out)) == 0
    assert "distilling from p (flow-match-euler, 3 steps) to 1 step of flow-match-euler" in capsys.readouterr().out
    recorded = read_manifest(out)["teacher"]
    assert recorded["name"] == "p" and recorded["steps"] == 3 and len(recorded["decoder_sha256"]) == 64
    assert json.loads((out / "run.json").read_text())["frozen"]["encoder"]["step"] == 3
    assert distil(registry, "--out", str(out), steps=3) == 0  # resumed without --teacher: the recorded one
    assert distil(registry, "--out", str(out), "--teacher", "p", "--teacher-steps", "3", steps=4) == 0  # the same
    assert distil(registry, "--out", str(out), "--teacher", "p", "--teacher-steps", "2", steps=5) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("scdkit: error: ") and "distilled from 'p' at 3 steps" in err
    assert "this one would be from 'p' at 2 steps" in err and "--fresh" in err


@pytest.mark.parametrize("args, message", [
    (["--init", "ckpt", "--teacher", "p"], "the student's encoder must be frozen"),
    (["--init", "ckpt", "--freeze", "encoder", "--teacher", "p", "--pipeline", "fast-ddpm"],
     "ddpm does not follow a fixed (noise, clean) pair"),
    (["--init", "other", "--freeze", "encoder", "--teacher", "p"], "are not the frozen encoder's"),
    (["--init", "ckpt", "--freeze", "encoder", "--teacher", "nope"], "--teacher nope: not a pipeline of"),
    (["--init", "ckpt", "--freeze", "encoder", "--teacher-steps", "3"], "--teacher-steps: only with --teacher"),
])
def test_distillation_refuses_what_cannot_work_in_one_line(tmp_path, capsys, args, message):
    registry = registry_with_students(tmp_path)
    other = registry.build("p", load=False)  # an encoder the teacher does not have
    from scdkit.checkpoint import save_component

    save_component(other.components["encoder"], tmp_path / "other" / "encoder.safetensors", "encoder", step=1)
    args = [str(tmp_path / a) if a in ("ckpt", "other") else a for a in args]
    pipeline = args.pop(args.index("--pipeline") + 1) if "--pipeline" in args else "fast"
    args = [a for a in args if a != "--pipeline"]
    capsys.readouterr()
    assert distil(registry, *args, "--out", str(tmp_path / "x"), pipeline=pipeline) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("scdkit: error")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x" / "decoder.safetensors").exists()
