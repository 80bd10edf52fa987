"""Training: the loss falls when overfitting one batch; the SCD loss follows the paper's recipe."""

import torch

from scdkit.data import load_dataset
from scdkit.interfaces import FrameSpec
from scdkit.interfaces import Batch, Recipe
from scdkit.registry import load_registry
from scdkit.train import TrainConfig, Trainer
from tests.test_registry import GOOD

SMALL = FrameSpec(height=8, width=8)


def tiny_pipeline(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text(GOOD)
    return load_registry(path).build("p", load=False)


def test_overfitting_one_batch_lowers_the_loss(tmp_path, monkeypatch):
    data = load_dataset("moving-digits", SMALL)
    fixed = data.clips(4, 4)
    monkeypatch.setattr(data, "clips", lambda *args, **kwargs: fixed)
    trainer = Trainer(tiny_pipeline(tmp_path), TrainConfig(steps=60, batch=4, frames=4, lr=3e-3, warmup=5, eval_every=0,
                                                           recipe=Recipe(noise_draws=4)), tmp_path, data)
    losses = [trainer.train_step() for _ in range(60)]
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5, losses


def test_encoder_runs_once_per_clip_and_decoder_sees_shifted_conditioning(tmp_path, monkeypatch):
    pipeline = tiny_pipeline(tmp_path)
    calls, seen = [], []
    encoder_forward = pipeline.components["encoder"].forward
    decoder_forward = pipeline.components["decoder"].forward
    monkeypatch.setattr(pipeline.components["encoder"], "forward",
                        lambda x: calls.append(x.shape) or encoder_forward(x))
    monkeypatch.setattr(pipeline.components["decoder"], "forward", lambda x, t, c: seen.append(c.shape) or decoder_forward(x, t, c))
    video = load_dataset("moving-digits", SMALL).clips(3, 5).video
    pipeline.loss(video, Recipe(noise_draws=2, cond_noise=0.0))
    assert len(calls) == 1 and calls[0][1] == 5  # one encoder pass over the whole clip
    assert len(seen) == 1 and seen[0][0] == 3 * 4 * 2  # all 4 target frames x 2 noise draws in one batch


def test_decoder_target_is_conditioned_on_previous_frame(tmp_path, monkeypatch):
    """Frame i's decoder input must carry the encoder output of frame i-1 (the one-frame shift)."""
    pipeline = tiny_pipeline(tmp_path)
    video = load_dataset("moving-digits", SMALL).clips(2, 4).video
    enc_out = pipeline.components["encoder"](torch.zeros(2, 4, 16, 4))
    marked = torch.arange(4.0)[None, :, None, None].expand_as(enc_out).clone()
    monkeypatch.setattr(pipeline.components["encoder"], "forward", lambda x: marked)
    got = []
    monkeypatch.setattr(pipeline.components["decoder"], "forward", lambda x, t, c: got.append(c) or x)
    pipeline.loss(video, Recipe(noise_draws=1, cond_noise=0.0))
    frame_ids = got[0][:, 0, 0].reshape(2, 3)
    assert torch.equal(frame_ids, torch.tensor([[0.0, 1.0, 2.0]] * 2))


def test_lr_schedule_warms_up_then_decays():
    from scdkit.train import _lr_factor

    assert _lr_factor(0, 10, 100) == 0.1 and _lr_factor(9, 10, 100) == 1.0
    assert abs(_lr_factor(100, 10, 100) - 0.1) < 1e-9


def test_the_held_out_check_logs_the_model_beside_both_references(tmp_path):
    trainer = Trainer(tiny_pipeline(tmp_path), TrainConfig(steps=1, batch=2, frames=2, eval_every=1, eval_steps=1),
                      tmp_path, "moving-digits")
    record = trainer.evaluate()
    assert record.keys() >= {"psnr", "repeat_last_psnr", "constant_velocity_psnr"}
    assert record["constant_velocity_psnr"] > record["repeat_last_psnr"]  # the digits do move
