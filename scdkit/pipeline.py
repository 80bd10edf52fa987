"""Pipelines: the streaming protocol over an SCD encoder + decoder or a monolithic model, the
training loss, and the one streaming generation loop.

:func:`assemble` is the one place that tells the two kinds apart; everything after it (training,
generation, swap-eval, bench, probe) sees a :class:`~scdkit.interfaces.StreamingModel`.
A :class:`Pipeline` is an ``nn.Module``: ``.to(device, dtype)`` moves it, and every tensor it makes
is made on its device.

Axis legend: b batch · f frames · n tokens per frame · p patch values · c channels · d width.
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor, nn

from scdkit.device import AUTOCAST_DTYPES, synchronize
from scdkit.errors import UsageError
from scdkit.interfaces import (Batch, CausalEncoder, Conditioning, EncoderState, FrameDecoder, FrameSpec,
                               NoiseScheduler, Recipe, StagedDecoder, StreamingModel, VideoModel, as_batch, given)
from scdkit.nn.dit import TimeTable

if TYPE_CHECKING:
    from scdkit.distill import Teacher


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


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise with x's shape, device and dtype."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


#: The unconditional branch of classifier-free guidance sees the encoder features with this much Gaussian noise
#: (and the null label): the official code's "decoder" guidance (PAPER.md), the same noise as training's cond_noise.
GUIDANCE_FEATURE_NOISE = 0.05


def time_batch(t: float | Tensor, like: Tensor) -> Tensor:
    """Times [b] for a batch like ``like`` [b ...]: one float broadcast, or per-item times as they are."""
    if isinstance(t, Tensor):
        return t
    return torch.full((like.shape[0],), t, device=like.device)


class ScdModel(StreamingModel):
    """An SCD encoder + frame decoder behind the streaming protocol."""

    def __init__(self, encoder: CausalEncoder, decoder: FrameDecoder):
        super().__init__()
        if encoder.contract != decoder.contract:
            raise ValueError(f"encoder emits {encoder.contract}, decoder expects {decoder.contract}")
        self.encoder, self.decoder, self.frame = encoder, decoder, encoder.frame
        self.staged = isinstance(decoder, StagedDecoder)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "decoder": self.decoder}

    def loss(self, x0: Tensor, conditioning: Conditioning, scheduler: NoiseScheduler, recipe: Recipe,
             generator: torch.Generator | None = None, teacher: Teacher | None = None) -> Tensor:
        b, f = x0.shape[:2]
        context = x0
        classes = self.decoder.accepts.classes
        if recipe.label_dropout > 0 and classes and conditioning.labels is not None:  # teaches the null label
            drop = torch.rand(b, generator=generator, device=x0.device) < recipe.label_dropout
            conditioning = conditioning.without_labels(drop, self.decoder.accepts.null_label)
        if recipe.context_noise > 0:  # mild noise on the encoder input for robustness to its own samples
            noisy_clip = torch.rand(b, generator=generator, device=x0.device) >= recipe.clean_context_ratio
            level = torch.rand(b, f, generator=generator, device=x0.device) * recipe.context_noise * noisy_clip[:, None]
            context = scheduler.add_noise(x0, noise_like(x0, generator), level)
        cond = self.encoder(context, **given(self.encoder, conditioning))[:, :-1]  # frame i is decoded from frame i-1
        if recipe.cond_noise > 0:
            cond = cond + recipe.cond_noise * noise_like(cond, generator)
        # several noise draws reuse one encoder pass: stack them along the batch axis
        draws = recipe.noise_draws
        cond = rearrange(cond, "b f n d -> (b f) n d").repeat(draws, 1, 1)
        targets = rearrange(x0[:, 1:], "b f n p -> (b f) n p").repeat(draws, 1, 1)
        per_frame = conditioning.frames(0, f - 1).per_frame(f - 1).repeat(draws)  # the action at frame i-1
        t = scheduler.sample_timesteps((targets.shape[0],), generator=generator, device=x0.device)
        noise = noise_like(targets, generator)
        if teacher is not None:  # distillation (scdkit.distill): the teacher's sample from this noise, at grid times
            targets = teacher.sample(noise, cond, per_frame, generator)
            t = teacher.grid_times(scheduler, targets.shape[0], generator, x0.device)
        prediction = self.decoder(scheduler.add_noise(targets, noise, t), t, cond, **given(self.decoder, per_frame))
        return scheduler.training_loss(prediction, targets, noise, t).mean()

    def new_state(self, batch: int, max_frames: int, conditioning: Conditioning,
                  guidance: float | None = None) -> EncoderState:
        state = self.encoder.new_state(batch, max_frames)
        state.cond = None  # the last frame's conditioning, projected by the decoder when it is staged
        # With guidance the decoder sees every stream twice, stacked along the batch: conditioned, then
        # unconditioned (noisy features, null label); ``predict`` mixes the two.
        state.guidance = None if guidance is None or guidance == 1.0 else guidance
        labels = conditioning.labels
        if state.guidance is not None and labels is not None and self.decoder.accepts.classes:
            labels = torch.cat([labels, torch.full_like(labels, self.decoder.accepts.null_label)])
        state.labels = labels
        # the decoder's keyword arguments, worked out once per frame rather than at every step
        state.decoder_extra = given(self.decoder, Conditioning(labels=labels))
        state.table = None  # the decoder's time terms for this generation's times
        return state

    def prepare(self, state: EncoderState, times: list[float]) -> None:
        if not self.staged or self.decoder.accepts.actions:  # terms that change per frame are not tabulated
            return
        labels = state.labels
        uses_labels = labels is not None and self.decoder.accepts.classes
        rows = labels.shape[0] if uses_labels else 1
        tiled = given(self.decoder, Conditioning(labels=labels.repeat(len(times)) if uses_labels else None))
        device = next(self.decoder.parameters()).device
        state.table = TimeTable(lambda t: self.decoder.time_terms(t, **tiled), times, device, rows)

    def observe(self, state: EncoderState, patches: Tensor, conditioning: Conditioning) -> None:
        cond, _ = self.encoder.step(state, patches, **given(self.encoder, conditioning))
        cond = cond[:, -1]
        last = conditioning.frames(patches.shape[1] - 1)  # what was done at the newest frame shapes the next
        action = None if last.actions is None else last.actions[:, 0]
        if state.guidance is not None:
            # seeded by the frame count: guided generation stays reproducible without a generator here
            noise = torch.Generator(device=cond.device).manual_seed(state.frames)
            unconditioned = cond + GUIDANCE_FEATURE_NOISE * torch.randn(cond.shape, generator=noise, device=cond.device,
                                                                        dtype=cond.dtype)
            cond = torch.cat([cond, unconditioned])
            action = None if action is None else action.repeat(2, 1)
        state.cond = self.decoder.condition(cond) if self.staged else cond
        state.decoder_extra = given(self.decoder, Conditioning(state.labels, action))

    def decoding_state(self, cond: Tensor, conditioning: Conditioning) -> EncoderState:
        """A state whose next frame is decoded from ``cond`` [b n_c d_c], e.g. read from an encoder-output cache,
        as if the encoder had just emitted it: ``predict`` works on it, the encoder never runs.
        ``conditioning``: labels [b] and the action of the frame ``cond`` encodes [b a] (what ``observe`` would
        hand the decoder). Call ``prepare`` on it before sampling, as for any state."""
        state = EncoderState()
        state.labels, state.table, state.guidance = conditioning.labels, None, None
        state.cond = self.decoder.condition(cond) if self.staged else cond
        state.decoder_extra = given(self.decoder, conditioning)
        return state

    def compile_steps(self, **options) -> None:
        # the decoder itself, not predict: predict looks the time up by value, which would recompile per time
        self.decoder.forward = torch.compile(self.decoder.forward, **options)
        if self.staged:
            self.decoder.denoise = torch.compile(self.decoder.denoise, **options)
        self.encoder.step = torch.compile(self.encoder.step, **options)

    def predict(self, state: EncoderState, x_t: Tensor, t: float | Tensor) -> Tensor:
        guidance = state.guidance  # set by new_state and decoding_state
        if guidance is None:
            return self._decode(state, x_t, t)
        if isinstance(t, Tensor):
            t = t.repeat(2)
        conditioned, unconditioned = self._decode(state, torch.cat([x_t, x_t]), t).chunk(2)
        return unconditioned + guidance * (conditioned - unconditioned)

    def _decode(self, state: EncoderState, x_t: Tensor, t: float | Tensor) -> Tensor:
        extra = state.decoder_extra
        if not self.staged:
            return self.decoder(x_t, time_batch(t, x_t), state.cond, **extra)
        terms = state.table.get(t) if state.table is not None and not isinstance(t, Tensor) else None
        if terms is None:
            terms = self.decoder.time_terms(time_batch(t, x_t), **extra)
        return self.decoder.denoise(x_t, state.cond, terms)


class MonolithicModel(StreamingModel):
    """A monolithic ``VideoModel`` (e.g. the causal-DiT baseline) behind the streaming protocol,
    trained by teacher forcing: every frame but the first is a target, at its own noise time."""

    def __init__(self, model: VideoModel):
        super().__init__()
        self.model, self.frame = model, model.frame

    @property
    def components(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(self, x0: Tensor, conditioning: Conditioning, scheduler: NoiseScheduler, recipe: Recipe,
             generator: torch.Generator | None = None, teacher: Teacher | None = None) -> Tensor:
        if teacher is not None:
            raise UsageError(f"distillation trains an SCD decoder under a frozen encoder; {self.model.plugin_name} "
                             "is monolithic")
        b, f = x0.shape[:2]
        t = scheduler.sample_timesteps((b, f), generator=generator, device=x0.device)
        noise = noise_like(x0, generator)
        prediction = self.model(x0, scheduler.add_noise(x0, noise, t), t, **given(self.model, conditioning))
        return scheduler.training_loss(prediction, x0, noise, t)[:, 1:].mean()

    def new_state(self, batch: int, max_frames: int, conditioning: Conditioning,
                  guidance: float | None = None) -> EncoderState:
        if guidance is not None and guidance != 1.0:
            raise UsageError(f"guidance is for SCD pipelines (the unconditional branch sees noisy encoder features); "
                             f"{self.model.plugin_name} is monolithic")
        state = self.model.new_state(batch, max_frames)
        state.model_extra = given(self.model, Conditioning(labels=conditioning.labels))  # once, not per step
        return state

    def prepare(self, state: EncoderState, times: list[float]) -> None:
        self.model.prepare(state, times)

    def observe(self, state: EncoderState, patches: Tensor, conditioning: Conditioning) -> None:
        self.model.observe(state, patches, **given(self.model, conditioning))

    def predict(self, state: EncoderState, x_t: Tensor, t: float | Tensor) -> Tensor:
        return self.model.predict(state, x_t, time_batch(t, x_t), **state.model_extra)

    def compile_steps(self, **options) -> None:
        self.model.predict = torch.compile(self.model.predict, **options)
        self.model.observe = torch.compile(self.model.observe, **options)


#: The roles a pipeline may have, one set per kind; :func:`assemble` turns each into its model.
ROLE_SETS = (frozenset({"encoder", "decoder"}), frozenset({"model"}))


def assemble(components: dict[str, nn.Module]) -> StreamingModel:
    """The streaming model for components by role: the one place that tells SCD from monolithic."""
    roles = frozenset(components)
    if roles == ROLE_SETS[0]:
        return ScdModel(components["encoder"], components["decoder"])
    if roles == ROLE_SETS[1]:
        return MonolithicModel(components["model"])
    raise ValueError(f"a pipeline has an encoder and a decoder (SCD) or a model (monolithic), got {sorted(roles)}")


class Pipeline(nn.Module):
    """A streaming model, its scheduler and frame geometry: everything needed to train or sample.

    ``autocast_dtype`` (None, ``torch.bfloat16`` or ``torch.float16``) runs the loss and generation
    under autocast on the pipeline's device; the weights keep their own dtype.
    """

    def __init__(self, name: str, scheduler: NoiseScheduler, frame: FrameSpec, model: StreamingModel,
                 attention: str = ""):
        super().__init__()
        self.name, self.scheduler, self.frame, self.model = name, scheduler, frame, model
        self.attention = attention  # the attention backend Registry.build chose, and why ("" when built directly)
        self.autocast_dtype: torch.dtype | None = None
        self.sources: dict = {}  # role -> runs.Source: the checkpoints Registry.build loaded
        self.warnings: list[str] = []  # e.g. an encoder and decoder paired by --force-pairing

    @property
    def components(self) -> dict[str, nn.Module]:
        """The trained components by role; what a checkpoint directory holds (``role.safetensors``)."""
        return self.model.components

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def generator(self, seed: int) -> torch.Generator:
        """A seeded random generator on the pipeline's device."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def set_precision(self, precision: str) -> None:
        """``fp32`` (no autocast), ``bf16`` or ``fp16`` autocast (``scdkit.device.check_precision`` says
        whether this device supports it)."""
        self.autocast_dtype = AUTOCAST_DTYPES[precision]

    def compile_streaming(self, **options) -> None:
        """``torch.compile`` the per-step network call (the SCD decoder, or the monolithic model's step)
        and the per-frame context step (the encoder step); ``options`` go to ``torch.compile``. The first
        generation afterwards pays the compilation."""
        self.model.compile_steps(**options)

    def sampling_times(self, steps: int | None = None) -> list[float]:
        """The decoder times of a sampling run of ``steps`` steps; a UsageError for steps the scheduler refuses."""
        try:
            return self.scheduler.begin(steps, self.device).times
        except ValueError as exc:
            raise UsageError(f"{self.scheduler.plugin_name}: {exc}") from exc

    def check_conditioning(self, batch: Batch, frames: int) -> None:
        """A UsageError naming what this pipeline needs and the batch lacks (``frames``: actions needed)."""
        accepts = self.model.accepts
        if accepts.classes and batch.labels is None:
            raise UsageError(f"pipeline {self.name!r} is class-conditioned: give labels [b] with the video")
        if accepts.actions:
            have = 0 if batch.actions is None else batch.actions.shape[1]
            if have < frames:
                raise UsageError(f"pipeline {self.name!r} is action-conditioned: give actions for {frames} frames "
                                 f"([b {frames} {accepts.actions}]), got {have}")

    def loss(self, batch: Batch | Tensor, recipe: Recipe | None = None,
             generator: torch.Generator | None = None, teacher: Teacher | None = None) -> Tensor:
        """Diffusion loss on a batch of clips [b f c H W] in [0, 1]; every frame but the first is a target.
        With a ``teacher`` (:mod:`scdkit.distill`) the targets are its samples from the loss's noise."""
        batch = as_batch(batch).to(self.device, self.dtype)
        self.check_conditioning(batch, batch.video.shape[1])
        x0 = patchify(to_model_range(batch.video), self.frame)
        with self.autocast():
            return self.model.loss(x0, batch.conditioning, self.scheduler, recipe or Recipe(), generator, teacher)

    @torch.no_grad()
    def generate(self, context: Batch | Tensor, frames: int, steps: int | None = None,
                 generator: torch.Generator | None = None, guidance: float | None = None) -> Generation:
        """Stream ``frames`` new frames after ``context`` [b k c H W] (pixels in [0, 1]).

        Prefill the context once, then per frame: the scheduler's steps from noise, and the new
        clean frame enters the context (one encoder step for SCD). An action-conditioned pipeline
        needs the context's actions for the k + frames - 1 frames that enter the context.
        To continue one context several times, see :meth:`prefill` and :meth:`continue_from`.
        ``guidance`` S (SCD pipelines) is classifier-free guidance as the official code does it: each step
        predicts ``u + S·(c − u)``, ``c`` the prediction and ``u`` that from the encoder features with
        :data:`GUIDANCE_FEATURE_NOISE` noise and the null label; None or 1 is no guidance.
        """
        prefilled = self.prefill(context, frames, steps, guidance)
        return self._stream(prefilled.state, prefilled, frames, steps, generator, prefilled.started)

    @torch.no_grad()
    def prefill(self, context: Batch | Tensor, frames: int, steps: int | None = None,
                guidance: float | None = None) -> Prefill:
        """Run ``context`` [b k c H W] (pixels in [0, 1]) into the model once, with room for continuations of up
        to ``frames`` frames sampled with ``steps`` steps by default (see :meth:`continue_from`), with
        ``guidance`` (see :meth:`generate`)."""
        batch = as_batch(context).to(self.device, self.dtype)
        b, k = batch.video.shape[:2]
        self.check_conditioning(batch, k + frames - 1)
        self.train(False)
        times = self.sampling_times(steps)  # checks ``steps`` before any work; prepare() tabulates them
        with self.autocast():
            state = self.model.new_state(b, k + frames, batch.conditioning, guidance)
            started = time.perf_counter()
            self.model.prepare(state, times[:-1])
            self.model.observe(state, patchify(to_model_range(batch.video), self.frame), batch.conditioning.frames(0, k))
        return Prefill(batch, state, frames, steps, times, started)

    @torch.no_grad()
    def continue_from(self, prefilled: Prefill, frames: int | None = None, steps: int | None = None,
                      generator: torch.Generator | None = None) -> Generation:
        """Stream ``frames`` new frames (default: as many as the prefill has room for) after a prefilled context,
        with ``steps`` sampling steps (default: the prefill's). It works on a copy of the prefill's state, so the
        prefill is left as it was, ready for the next continuation; the result equals :meth:`generate` on the
        same context with the same generator. ``Generation.started`` is when this call started: the times
        exclude the prefill.

        The copy is ``copy.deepcopy`` of the plugin's state (its KV caches and the like); a state holding
        something that cannot be deep-copied defines ``__deepcopy__``.
        """
        frames = prefilled.frames if frames is None else frames
        if not 1 <= frames <= prefilled.frames:
            raise UsageError(f"the prefill has room for 1 to {prefilled.frames} new frames, got {frames}")
        steps = prefilled.steps if steps is None else steps
        times = self.sampling_times(steps)
        self.train(False)
        started = time.perf_counter()
        state = copy.deepcopy(prefilled.state)
        if times != prefilled.times:
            with self.autocast():
                self.model.prepare(state, times[:-1])
        return self._stream(state, prefilled, frames, steps, generator, started)

    def _stream(self, state: EncoderState, prefilled: Prefill, frames: int, steps: int | None,
                generator: torch.Generator | None, started: float) -> Generation:
        """The generation loop after the prefill: per frame, denoise it, then it enters the context."""
        batch, device = prefilled.batch, self.device
        k = batch.video.shape[1]
        outputs, stamps, observed = [], [], []
        with self.autocast():
            for i in range(frames):
                outputs.append(self.denoise_frame(state, batch.video.shape[0], steps, generator))
                stamps.append(synchronize(device))
                if i + 1 < frames:
                    self.model.observe(state, outputs[-1][:, None], batch.conditioning.frames(k + i, k + i + 1))
                    observed.append(synchronize(device))
        video = to_pixel_range(unpatchify(torch.stack(outputs, dim=1), self.frame))
        return Generation(video, started, stamps, observed)

    def denoise_frame(self, state: EncoderState, batch: int, steps: int | None = None,
                      generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """The next frame [batch n p] of every stream of ``state``: noise (drawn, or ``noise``), then the scheduler's
        ``steps`` steps with the model's prediction at each (a fresh solver state per frame). Call it under
        :meth:`autocast`."""
        x = noise if noise is not None else torch.randn((batch, self.frame.tokens, self.frame.patch_dim),
                                                        generator=generator, device=self.device, dtype=self.dtype)
        sampling = self.scheduler.begin(steps, self.device)
        for t in sampling.times[:-1]:
            x = self.scheduler.step(sampling, self.model.predict(state, x, t), x, generator)
        return x


@dataclass
class Prefill:
    """A context run into a pipeline's model (:meth:`Pipeline.prefill`), ready to be continued any number of
    times (:meth:`Pipeline.continue_from` works on a copy of ``state``)."""

    batch: Batch  # the context [b k c H W] with its conditioning, on the pipeline's device
    state: EncoderState  # the model's stream state after the context
    frames: int  # the longest continuation the state has room for
    steps: int | None  # the sampling steps continuations use by default (None: the scheduler's)
    times: list[float]  # the sampling times ``state`` was prepared for
    started: float  # wall-clock time at which the prefill started


@dataclass
class Generation:
    video: Tensor  # [b frames c H W] in [0, 1]
    started: float
    stamps: list[float]  # wall-clock time at which each frame was ready
    observed: list[float] = field(default_factory=list)  # ... and at which it had entered the context
    warmup_s: float | None = None  # the untimed warm-up run before it (compilation included), when timed

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
        gaps = self.frame_gaps_s
        return statistics.median(gaps) if gaps else self.first_frame_s
