"""Continuation quality on held-out clips: a pipeline next to "repeat the last context frame"."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scdkit.data import make_clips
from scdkit.metrics import mse_per_frame, psnr_per_frame, sharpness_per_frame, ssim_per_frame
from scdkit.pipeline import Generation, Pipeline


@dataclass
class Scores:
    psnr: list[float]
    ssim: list[float]
    mse: list[float]
    sharpness: list[float]

    @classmethod
    def of(cls, pred: Tensor, true: Tensor) -> Scores:
        return cls(psnr_per_frame(pred, true).tolist(), ssim_per_frame(pred, true).tolist(),
                   mse_per_frame(pred, true).tolist(), sharpness_per_frame(pred).tolist())

    def mean(self, first: int | None = None) -> dict[str, float]:
        return {k: sum(v[:first]) / len(v[:first]) for k, v in vars(self).items()}


@dataclass
class Evaluation:
    context: Tensor
    truth: Tensor
    generation: Generation
    model: Scores
    repeat_last: Scores
    truth_sharpness: list[float]


def held_out_clips(pipeline: Pipeline, data: str, clips: int, frames: int, seed: int = 0) -> Tensor:
    return make_clips(data, clips, frames, pipeline.frame.height, split="test", seed=seed)


@torch.no_grad()
def evaluate_continuation(pipeline: Pipeline, data: str = "moving-digits", clips: int = 16, context: int = 4,
                          frames: int = 8, steps: int | None = None, seed: int = 0) -> Evaluation:
    video = held_out_clips(pipeline, data, clips, context + frames, seed)
    past, truth = video[:, :context], video[:, context:]
    generation = pipeline.generate(past, frames, steps=steps, generator=torch.Generator().manual_seed(seed))
    repeat = past[:, -1:].expand_as(truth)
    return Evaluation(past, truth, generation, Scores.of(generation.video, truth), Scores.of(repeat, truth),
                      sharpness_per_frame(truth).tolist())
