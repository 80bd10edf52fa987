"""Pipelines: an SCD encoder + decoder + scheduler (or a monolithic model + scheduler),
the training loss, and the streaming generation loop shared by both.

Axis legend: b batch · f frames · n tokens per frame · p patch values · c channels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from scdkit.interfaces import CausalEncoder, EncoderState, FrameDecoder, FrameSpec, NoiseScheduler, VideoModel
from scdkit.nn.dit import TimeTable


def patchify(video: Tensor, frame: FrameSpec) -> Tensor:
    """[b f c H W] -> [b f n p]"""
    s = frame.patch_size
    return rearrange(video, "b f c (r s1) (q s2) -> b f (r q) (c s1 s2)", s1=s, s2=s)


def unpatchify(patches: Tensor, frame: FrameSpec) -> Tensor:
    """[b f n p] -> [b f c H W]"""
    s, (rows, _) = frame.patch_size, frame.grid
    return rearrange(patches, "b f (r q) (c s1 s2) -> b f c (r s1) (q s2)", r=rows, s1=s, s2=s)


def to_model_range(video: Tensor) -> Tensor:
    return video * 2 - 1


def to_pixel_range(video: Tensor) -> Tensor:
    return ((video + 1) / 2).clamp(0, 1)


class Recipe(BaseModel):
    """SCD training options that shape the loss (PAPER.md)."""

    model_config = ConfigDict(extra="forbid")
    noise_draws: int = Field(2, ge=1, description="decoder noise draws per encoder pass")
    cond_noise: float = Field(0.05, ge=0, description="std of Gaussian noise on the encoder output")
    clean_context_ratio: float = Field(0.1, ge=0, le=1, description="share of clips whose encoder input is clean")
    context_noise: float = Field(0.05, ge=0, le=1, description="max noise time of the encoder input otherwise")


@runtime_checkable
class StagedDecoder(Protocol):
    """A frame decoder whose forward splits into parts with different lifetimes (``dit-frame``):
    ``forward(x_t, t, cond) == denoise(x_t, condition(cond), time_terms(t))``.

    Streaming then computes ``time_terms`` once per sampling time, ``condition`` once per frame,
    and only ``denoise`` at every step. Decoders without the split are called as a whole.
    """

    def time_terms(self, t: Tensor) -> Any: ...

    def condition(self, cond: Tensor) -> Tensor: ...

    def denoise(self, x_t: Tensor, cond: Tensor, time_terms: Any) -> Tensor: ...


class ScdStream(nn.Module):
    """Adapts encoder + decoder to the streaming protocol that monolithic models implement natively."""

    def __init__(self, encoder: CausalEncoder, decoder: FrameDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.staged = isinstance(decoder, StagedDecoder)

    def new_state(self, batch: int, max_frames: int) -> EncoderState:
        state = self.encoder.new_state(batch, max_frames)
        state.cond = None  # the last frame's conditioning, projected by the decoder when it is staged
        if self.staged:
            state.time_terms = self.decoder.time_terms  # until prepare() tabulates them
        return state

    def prepare(self, state: EncoderState, times: Tensor) -> None:
        """The sampling times of this generation, before its first step (see ``VideoModel.prepare``)."""
        if self.staged:
            state.time_terms = TimeTable(self.decoder.time_terms, times)

    def observe(self, state: EncoderState, patches: Tensor) -> None:
        cond, _ = self.encoder.step(state, patches)
        state.cond = self.decoder.condition(cond[:, -1]) if self.staged else cond[:, -1]

    def predict(self, state: EncoderState, x_t: Tensor, t: Tensor) -> Tensor:
        if self.staged:
            return self.decoder.denoise(x_t, state.cond, state.time_terms(t))
        return self.decoder(x_t, t, state.cond)


@dataclass
class Pipeline:
    """Everything needed to train or sample: components, scheduler, frame geometry."""

    name: str
    scheduler: NoiseScheduler
    frame: FrameSpec
    encoder: CausalEncoder | None = None
    decoder: FrameDecoder | None = None
    model: VideoModel | None = None
    stream: nn.Module = field(init=False)
    attention: str = ""  # the attention backend Registry.build chose, and why ("" when built directly)

    def __post_init__(self) -> None:
        if self.model is None:
            if self.encoder.contract != self.decoder.contract:
                raise ValueError(f"encoder emits {self.encoder.contract}, decoder expects {self.decoder.contract}")
            self.stream = ScdStream(self.encoder, self.decoder)
        else:
            self.stream = self.model

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The trainable components by role; what a checkpoint directory holds."""
        if self.model is not None:
            return {"model": self.model}
        return {"encoder": self.encoder, "decoder": self.decoder}

    def parameters(self):
        return [p for m in self.modules.values() for p in m.parameters()]

    def train(self, mode: bool = True) -> Pipeline:
        for m in self.modules.values():
            m.train(mode)
        return self

    def loss(self, video: Tensor, recipe: Recipe, generator: torch.Generator | None = None) -> Tensor:
        """Diffusion loss on a batch of clips [b f c H W] in [0, 1]; every frame but the first is a target."""
        x0 = patchify(to_model_range(video), self.frame)
        if self.model is not None:
            return self._monolithic_loss(x0, generator)
        return self._scd_loss(x0, recipe, generator)

    def _scd_loss(self, x0: Tensor, recipe: Recipe, generator: torch.Generator | None) -> Tensor:
        b, f = x0.shape[:2]
        context = x0
        if recipe.context_noise > 0:  # mild noise on the encoder input for robustness to its own samples
            noisy_clip = torch.rand(b, generator=generator) >= recipe.clean_context_ratio
            level = torch.rand(b, f, generator=generator) * recipe.context_noise * noisy_clip[:, None]
            context = self.scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), level)
        cond = self.encoder(context)[:, :-1]  # frame i is conditioned on the encoder output of frame i-1
        if recipe.cond_noise > 0:
            cond = cond + recipe.cond_noise * torch.randn(cond.shape, generator=generator)
        targets = x0[:, 1:]
        # several noise draws reuse one encoder pass: stack them along the batch axis
        cond = rearrange(cond, "b f n d -> (b f) n d").repeat(recipe.noise_draws, 1, 1)
        targets = rearrange(targets, "b f n p -> (b f) n p").repeat(recipe.noise_draws, 1, 1)
        t = self.scheduler.sample_timesteps((targets.shape[0],), generator=generator)
        noise = torch.randn(targets.shape, generator=generator)
        prediction = self.decoder(self.scheduler.add_noise(targets, noise, t), t, cond)
        return (prediction - self.scheduler.training_target(targets, noise, t)).pow(2).mean()

    def _monolithic_loss(self, x0: Tensor, generator: torch.Generator | None) -> Tensor:
        b, f = x0.shape[:2]
        t = self.scheduler.sample_timesteps((b, f), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        prediction = self.model(x0, self.scheduler.add_noise(x0, noise, t), t)
        target = self.scheduler.training_target(x0, noise, t)
        return (prediction - target)[:, 1:].pow(2).mean()

    @torch.no_grad()
    def generate(self, context: Tensor, frames: int, steps: int | None = None,
                 generator: torch.Generator | None = None) -> Generation:
        """Stream ``frames`` new frames after ``context`` [b k c H W] (pixels in [0, 1]).

        Prefill the context once, then per frame: T decoder steps from noise, and the new
        clean frame enters the context (one encoder step for SCD).
        """
        self.train(False)
        b, k = context.shape[:2]
        times = self.scheduler.timesteps(steps)
        schedule = list(zip(times[:-1].tolist(), times[1:].tolist()))
        state = self.stream.new_state(b, k + frames)
        started = time.perf_counter()
        self.stream.prepare(state, times[:-1])
        self.stream.observe(state, patchify(to_model_range(context), self.frame))
        shape = (b, self.frame.tokens, self.frame.patch_dim)
        t_batch = torch.empty(b)
        outputs, stamps, observed = [], [], []
        for i in range(frames):
            x = torch.randn(shape, generator=generator)
            for t, t_next in schedule:
                x = self.scheduler.step(self.stream.predict(state, x, t_batch.fill_(t)), t, t_next, x)
            outputs.append(x)
            stamps.append(time.perf_counter())
            if i + 1 < frames:
                self.stream.observe(state, x[:, None])
                observed.append(time.perf_counter())
        video = to_pixel_range(unpatchify(torch.stack(outputs, dim=1), self.frame))
        return Generation(video, started, stamps, observed)


@dataclass
class Generation:
    video: Tensor  # [b frames c H W] in [0, 1]
    started: float
    stamps: list[float]  # wall-clock time at which each frame was ready
    observed: list[float] = field(default_factory=list)  # ... and at which it had entered the context

    @property
    def denoise_s(self) -> list[float]:
        """Time of each frame's denoising loop alone, for the frames after the first."""
        return [ready - entered for entered, ready in zip(self.observed, self.stamps[1:])]

    @property
    def first_frame_s(self) -> float:
        return self.stamps[0] - self.started

    @property
    def frame_gaps_s(self) -> list[float]:
        """Time between consecutive frames: every steady frame (the first, with prefill, excluded)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    @property
    def per_frame_s(self) -> float:
        """Median of :attr:`frame_gaps_s`."""
        gaps = torch.tensor(self.frame_gaps_s)
        return float(gaps.median()) if len(gaps) else self.first_frame_s
