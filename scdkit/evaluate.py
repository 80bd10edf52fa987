"""Continuation quality on held-out clips: a pipeline next to two non-learned references, "repeat the last
context frame" and "move it on at constant velocity" (``scdkit.references``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from scdkit.data import as_dataset
from scdkit.interfaces import Batch, VideoDataset
from scdkit.metrics import mse_per_frame, psnr_per_frame, sharpness_per_frame, ssim_per_frame, state_error_per_frame
from scdkit.pipeline import Generation, Pipeline
from scdkit.references import constant_velocity, repeat_last


class EvalConfig(BaseModel):
    """Which held-out continuations are scored (``generate``, ``swap-eval``)."""

    model_config = ConfigDict(extra="forbid")
    clips: int = Field(16, ge=1, description="held-out clips evaluated")
    context: int = Field(4, ge=1, description="true frames given as context")
    frames: int = Field(8, ge=1, description="frames generated after the context")
    steps: int | None = Field(None, ge=1, description="sampling steps (default: the scheduler's)")
    seed: int = Field(0, ge=0, description="seed of the held-out clips and the noise")
    guidance: float | None = Field(None, ge=0, description="classifier-free guidance scale of SCD pipelines "
                                   "(1: none; the unconditional branch sees noisy encoder features and the null label)")


@dataclass
class Scores:
    psnr: list[float]
    ssim: list[float]
    mse: list[float]
    sharpness: list[float]
    state_error: list[float] | None = None  # pixels, when the data has true states (``Batch.states``)

    @classmethod
    def of(cls, pred: Tensor, true: Tensor, states: Tensor | None = None) -> Scores:
        return cls(psnr_per_frame(pred, true).tolist(), ssim_per_frame(pred, true).tolist(),
                   mse_per_frame(pred, true).tolist(), sharpness_per_frame(pred).tolist(),
                   None if states is None else state_error_per_frame(pred, states).tolist())

    def mean(self, first: int | None = None) -> dict[str, float]:
        return {k: sum(v[:first]) / len(v[:first]) for k, v in vars(self).items() if v is not None}


@dataclass
class Evaluation:
    clips: Batch  # the held-out clips, context and truth, with their conditioning
    context: Tensor
    truth: Tensor
    generation: Generation
    model: Scores
    repeat_last: Scores
    constant_velocity: Scores
    truth_sharpness: list[float]
    guidance: float | None = None


def held_out_clips(data: VideoDataset, clips: int, frames: int, seed: int = 0) -> Batch:
    return data.clips(clips, frames, split="test", seed=seed)


@torch.no_grad()
def evaluate_continuation(pipeline: Pipeline, data: VideoDataset | str, config: EvalConfig = EvalConfig()) -> Evaluation:
    """Continue ``config.clips`` held-out clips after ``config.context`` true frames; scored on the CPU."""
    context, frames, steps, seed = config.context, config.frames, config.steps, config.seed
    data = as_dataset(data, pipeline.frame)
    batch = held_out_clips(data, config.clips, context + frames, seed)
    past, truth = batch.video[:, :context], batch.video[:, context:]
    states = None if batch.states is None else batch.states[:, context:]
    generation = pipeline.generate(batch.context(context), frames, steps=steps, generator=pipeline.generator(seed),
                                   guidance=config.guidance)
    generated = generation.video.float().cpu()
    return Evaluation(batch, past, truth, generation, Scores.of(generated, truth, states),
                      Scores.of(repeat_last(past, frames), truth, states),
                      Scores.of(constant_velocity(past, frames), truth, states), sharpness_per_frame(truth).tolist(),
                      config.guidance)
