"""Device and precision hygiene, proven on the CPU.

With the pipeline on the CPU and ``torch.set_default_device("meta")``, any tensor the library made
without an explicit device would land on the meta device and fail against the CPU tensors; so a
loss, a training step and a generation that run through mean every tensor follows the pipeline.
"""

from contextlib import contextmanager

import pytest
import torch

from scdkit.cli import main
from scdkit.data import load_dataset
from scdkit.evaluate import EvalConfig, evaluate_continuation
from scdkit.interfaces import Recipe
from scdkit.registry import load_registry
from scdkit.testing import _randomise
from scdkit.train import TrainConfig, Trainer
from tests.test_registry import GOOD, REPO

BASELINE = GOOD.replace('[pipelines.p]', '''[models.dit]
plugin = "causal-dit"
width = 32
layers = 2
heads = 2

[pipelines.base]
model = "dit"
scheduler = "flow"
height = 8
width = 8
patch_size = 2

[pipelines.p]''')


@contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def tiny(tmp_path, name="p"):
    path = tmp_path / "registry.toml"
    path.write_text(BASELINE)
    pipeline = load_registry(path).build(name, load=False)
    _randomise(pipeline)  # adaLN-Zero starts as the identity: give every path weight
    return pipeline


def test_the_meta_default_device_catches_a_tensor_made_without_a_device():
    with default_device_meta(), pytest.raises(RuntimeError):
        torch.randn(4) + torch.ones(4, device="cpu")  # what a CPU-assuming line would do


@pytest.mark.parametrize("name", ["scd-digits", "baseline-digits"])
def test_loss_training_step_and_generation_make_every_tensor_on_the_pipelines_device(name, tmp_path):
    pipeline = load_registry(REPO / "registry.toml").build(name, load=False, device="cpu")
    data = load_dataset("moving-digits", pipeline.frame)
    batch = data.clips(2, 3)
    trainer = Trainer(pipeline, TrainConfig(steps=1, batch=2, frames=3, eval_every=0), tmp_path, data)
    with default_device_meta():
        loss = pipeline.loss(batch, Recipe(), pipeline.generator(0))
        assert loss.device.type == "cpu" and torch.isfinite(loss)
        assert trainer.train_step() > 0
        video = pipeline.generate(batch.context(2), 2, generator=pipeline.generator(0)).video
        assert video.device.type == "cpu" and video.shape == (2, 2, 1, 32, 32)
        scores = evaluate_continuation(pipeline, "moving-digits", EvalConfig(clips=2, frames=2, steps=2)).model
        assert len(scores.psnr) == 2


def test_a_scheduler_that_assumes_the_cpu_is_caught(tmp_path):
    pipeline = tiny(tmp_path)
    flow = type(pipeline.scheduler)

    class CpuNoise(flow):
        def sample_timesteps(self, shape, generator=None, device=None):
            return torch.sigmoid(torch.randn(shape))  # no device: the bug the meta test exists for

    pipeline.scheduler = CpuNoise(pipeline.scheduler.config)
    with default_device_meta(), pytest.raises(RuntimeError):
        pipeline.loss(torch.rand(2, 3, 1, 8, 8))


@pytest.mark.parametrize("name", ["p", "base"])
def test_dtype_follows_the_parameters(name, tmp_path):
    pipeline = tiny(tmp_path, name).to(torch.float64)
    clips = torch.rand(2, 3, 1, 8, 8)
    assert pipeline.loss(clips, generator=pipeline.generator(0)).dtype == torch.float64
    video = pipeline.generate(clips[:, :2], 2, steps=2, generator=pipeline.generator(0)).video
    assert video.dtype == torch.float64


@pytest.mark.parametrize("name", ["p", "base"])
def test_bf16_autocast_smoke(name, tmp_path):
    """bf16 autocast on the CPU (slow here, so tiny): matmuls run in bf16, the weights stay fp32, a training
    step and a generation run and stay finite and close to fp32."""
    pipeline = tiny(tmp_path, name)
    clips = torch.rand(2, 3, 1, 8, 8)
    reference = pipeline.generate(clips[:, :2], 2, steps=2, generator=pipeline.generator(0)).video
    pipeline.set_precision("bf16")
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: seen.append(out.dtype) if isinstance(module, torch.nn.Linear) else None)
    try:
        trainer = Trainer(pipeline, TrainConfig(steps=1, batch=2, frames=3, eval_every=0), tmp_path / "run",
                          "moving-digits")
        assert torch.isfinite(torch.tensor(trainer.train_step()))
        video = pipeline.generate(clips[:, :2], 2, steps=2, generator=pipeline.generator(0)).video
    finally:
        hook.remove()
    assert torch.bfloat16 in seen and torch.float32 not in seen, "every Linear must run in bf16 under autocast"
    assert all(p.dtype == torch.float32 for p in pipeline.parameters())
    assert torch.isfinite(video).all() and (video - reference).abs().max() < 0.2  # one step moved the weights a little


def test_compiled_generation_equals_eager(tmp_path):
    """--compile wraps the per-step network call and the context step; the 'eager' backend checks the wiring fast."""
    for name in ("p", "base"):
        pipeline = tiny(tmp_path, name)
        clips = torch.rand(1, 2, 1, 8, 8)
        eager = pipeline.generate(clips, 3, steps=2, generator=pipeline.generator(0)).video
        pipeline.compile_streaming(backend="eager")
        compiled = pipeline.generate(clips, 3, steps=2, generator=pipeline.generator(0)).video
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


def test_device_and_precision_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "registry.toml"
    path.write_text(BASELINE + 'checkpoint = "ckpt"\n')
    gif = tmp_path / "x.gif"
    base = ["generate", "--registry", str(path), "--gif", str(gif)]
    for args, expected in ((["--device", "cuda"], "--device cuda: not available"),
                           (["--device", "tpu"], "--device tpu: unknown device"),
                           (["--precision", "fp8"], "invalid choice: 'fp8'")):
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not gif.exists()


def test_auto_device_says_which(tmp_path, capsys):
    path = tmp_path / "registry.toml"
    path.write_text(BASELINE)
    assert main(["--threads", "1", "train", "--registry", str(path), "--steps", "1", "--batch", "1", "--frames", "2",
                 "--eval-every", "0", "--out", str(tmp_path / "run"), "--precision", "bf16"]) == 0
    assert "device: auto picked cpu (no cuda or mps), bf16 autocast" in capsys.readouterr().err


def test_a_distillation_step_makes_every_tensor_on_the_pipelines_device():
    """The teacher's sampling, the student's grid times and the pair check (scdkit.distill) under a meta default."""
    from scdkit.distill import Teacher, pair_problem

    registry = load_registry(REPO / "registry.toml")
    teacher = Teacher(registry.build("scd-digits", device="cpu"), steps=2)
    student = registry.build("scd-digits-fast", device="cpu")
    batch = load_dataset("moving-digits", student.frame).clips(2, 3)
    with default_device_meta():
        assert pair_problem(student.scheduler) is None
        loss = student.loss(batch, Recipe(), student.generator(0), teacher)
        loss.backward()
        assert loss.device.type == "cpu" and torch.isfinite(loss)
