"""The component interfaces, the contracts where they meet, and the one streaming protocol.

Axis legend used throughout scdkit:
    b batch · f frames · n tokens per frame · p patch values (channels·patch²) · d width · h heads ·
    a action width

Data flow: Batch(video [b f c H W], labels [b], actions [b f a]) --patchify--> patches [b f n p]
    encoder(patches, conditioning) -> cond [b f n_c d_c]            (once per frame, block-causal)
    decoder(x_t [b n p], t [b], cond [b n_c d_c], conditioning) -> prediction [b n p]   (every step)
    scheduler: the noise/time parametrisation, the training target and loss, and the sampler.

**Time.** Every decoder and model receives the noise time ``t`` as a float in [0, 1]: 1 is pure
noise, 0 the clean sample, ``x_t = alpha(t)·x0 + sigma(t)·noise`` for the scheduler's ``alpha_sigma``.
Schedulers with discrete timesteps (DDPM, DDIM) count them 1..T from the least to the most noisy, with 0 the
clean sample (the DDPM paper's convention; diffusers' timestep k is k + 1 here), and hand over ``k / T``. The built-in
blocks embed ``t·1000`` sinusoidally (``scdkit.nn.dit.TimestepEmbedding``).

**Conditioning.** Class labels [b] and per-frame actions [b f a] travel beside the video in a
:class:`Batch` and reach a component as a :class:`Conditioning`, but only a component that declares
them in ``accepts`` (a :class:`ConditioningSpec`) is given one: unconditioned plugins need no
``conditioning`` parameter at all.

**Devices.** A component makes every tensor on the device and dtype of its inputs or parameters;
nothing assumes the CPU. Random numbers come from a ``torch.Generator`` on that device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from torch import Tensor, nn


class ComponentConfig(BaseModel):
    """Base of every component config: unknown keys are errors, values are immutable, numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class CondSpec(BaseModel):
    """The encoder -> decoder contract: conditioning width and tokens per frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    dim: PositiveInt
    tokens: PositiveInt


class FrameSpec(BaseModel):
    """Frame geometry shared by every component of a pipeline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    channels: PositiveInt = 1
    height: PositiveInt = 32
    width: PositiveInt = 32
    patch_size: PositiveInt = 4

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // self.patch_size, self.width // self.patch_size

    @property
    def tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size**2

    def model_post_init(self, _: Any) -> None:
        if self.height % self.patch_size or self.width % self.patch_size:
            raise ValueError(
                f"frame {self.height}x{self.width} is not divisible by patch_size {self.patch_size}"
            )


# -- conditioning ---------------------------------------------------------------------------------

class ConditioningSpec(BaseModel):
    """Which conditioning a component accepts, or a data set provides: ``classes`` class labels
    (0 = none) and actions of width ``actions`` per frame (0 = none). A component that accepts ``classes``
    labels also accepts the label ``classes`` itself, the *null label* ("no label") of classifier-free
    guidance (:attr:`null_label`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    classes: NonNegativeInt = 0
    actions: NonNegativeInt = 0

    @property
    def any(self) -> bool:
        return bool(self.classes or self.actions)

    @property
    def null_label(self) -> int:
        return self.classes

    def unmet_by(self, provided: ConditioningSpec) -> list[str]:
        """What a component accepting ``self`` would miss from data providing ``provided``."""
        problems = []
        if self.classes and not provided.classes:
            problems.append(f"takes class labels ({self.classes} classes) but the data has none")
        elif provided.classes > self.classes > 0:
            problems.append(f"takes {self.classes} classes but the data has {provided.classes}")
        if self.actions and provided.actions != self.actions:
            have = f"actions of width {provided.actions}" if provided.actions else "no actions"
            problems.append(f"takes actions of width {self.actions} but the data has {have}")
        return problems


@dataclass(frozen=True)
class Conditioning:
    """What a component is given beside the frames: class labels [b] (int64) and actions [b f a]."""

    labels: Tensor | None = None
    actions: Tensor | None = None

    def frames(self, start: int, stop: int | None = None) -> Conditioning:
        """The conditioning of frames [start, stop): labels unchanged, actions sliced."""
        actions = None if self.actions is None else self.actions[:, start:stop]
        return replace(self, actions=actions)

    def per_frame(self, frames: int) -> Conditioning:
        """One item per (clip, frame), clip-major, as the decoder sees [b f ...] flattened to [(b f) ...].
        Actions must already cover exactly ``frames`` frames."""
        labels = None if self.labels is None else self.labels.repeat_interleave(frames)
        actions = None if self.actions is None else self.actions.flatten(0, 1)
        return Conditioning(labels, actions)

    def without_labels(self, drop: Tensor, null_label: int) -> Conditioning:
        """The labels of the clips where ``drop`` [b] (bool) is set replaced by ``null_label``."""
        if self.labels is None:
            return self
        return replace(self, labels=torch.where(drop, torch.full_like(self.labels, null_label), self.labels))

    def repeat(self, times: int) -> Conditioning:
        """The batch stacked ``times`` times along its first axis."""
        return Conditioning(*(None if x is None else x.repeat(times, *[1] * (x.dim() - 1))
                              for x in (self.labels, self.actions)))


@dataclass(frozen=True)
class Batch:
    """Clips and their optional conditioning: video [b f c H W] in [0, 1], labels [b], actions [b f a];
    and, for evaluation only (never given to a model), the true ``states`` [b f k 3]: the centre (y, x) in
    pixels and the radius of each of k objects per frame, NaN rows for objects absent from a clip."""

    video: Tensor
    labels: Tensor | None = None
    actions: Tensor | None = None
    states: Tensor | None = None

    @property
    def conditioning(self) -> Conditioning:
        return Conditioning(self.labels, self.actions)

    def _map(self, video, labels, actions, states) -> Batch:
        """A batch of each field passed through its function (``None`` fields stay ``None``)."""
        return Batch(*(None if x is None else fn(x) for fn, x in
                       zip((video, labels, actions, states), (self.video, self.labels, self.actions, self.states))))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """On ``device``; the video and actions in ``dtype`` (labels stay integers, states on the CPU)."""
        def floating(x: Tensor) -> Tensor:
            return x.to(device, dtype or x.dtype, non_blocking=True)
        return self._map(floating, lambda x: x.to(device, non_blocking=True), floating, lambda x: x)

    def frames(self, start: int, stop: int | None = None) -> Batch:
        def sliced(x: Tensor) -> Tensor:
            return x[:, start:stop]
        return self._map(sliced, lambda x: x, sliced, sliced)

    def context(self, frames: int) -> Batch:
        """The first ``frames`` frames as generation context, with the labels and *every* frame's
        actions (those of the frames to generate steer them)."""
        return Batch(self.video[:, :frames], self.labels, self.actions)

    def clips(self, start: int, stop: int | None = None) -> Batch:
        def sliced(x: Tensor) -> Tensor:
            return x[start:stop]
        return self._map(sliced, sliced, sliced, sliced)


def as_batch(data: Batch | Tensor) -> Batch:
    """A bare video tensor is a batch without conditioning."""
    return data if isinstance(data, Batch) else Batch(data)


def given(component: Any, conditioning: Conditioning | None) -> dict[str, Conditioning]:
    """Keyword arguments that pass ``conditioning`` to ``component`` only if it accepts any:
    plugins that declare no conditioning keep their plain signatures."""
    accepts = getattr(component, "accepts", None)
    if conditioning is None or accepts is None or not accepts.any:
        return {}
    return {"conditioning": conditioning}


# -- components -----------------------------------------------------------------------------------

class EncoderState:
    """Per-stream state of an encoder's incremental path (KV caches and the like).

    ``frames`` counts the frames the encoder has consumed so far. Encoders subclass this.
    """

    frames: int = 0


class Component:
    """What every component declares: its plugin name, version and config class."""

    plugin_name: ClassVar[str]
    plugin_version: ClassVar[str] = "0.1.0"
    config_class: ClassVar[type[ComponentConfig]]
    config: ComponentConfig

    @classmethod
    def example_config(cls) -> ComponentConfig:
        """A small valid config, used by the conformance kit and docs. Override to make it tiny."""
        return cls.config_class()

    @property
    def accepts(self) -> ConditioningSpec:
        """The conditioning this component takes (none by default); see the module doc."""
        return ConditioningSpec()


class CausalEncoder(nn.Module, Component, ABC):
    """Runs once per frame over the clean past and emits one conditioning per frame.

    ``forward`` (whole clip, block-causal) and ``step`` (incremental, cached) must agree,
    and the output for frame k must never depend on frames after k. An encoder that accepts
    conditioning takes ``conditioning`` (actions for exactly the frames given) in both.
    """

    #: Encoders that can load each other's weights declare the same family name.
    weight_family: ClassVar[str] = ""

    def __init__(self, config: ComponentConfig, frame: FrameSpec):
        super().__init__()
        self.config = config
        self.frame = frame

    @property
    @abstractmethod
    def contract(self) -> CondSpec:
        """Width and tokens per frame of the conditioning this encoder emits."""

    @abstractmethod
    def forward(self, patches: Tensor) -> Tensor:
        """Full clip, training path: [b f n p] -> [b f n_c d_c]."""

    @abstractmethod
    def new_state(self, batch: int, max_frames: int) -> EncoderState:
        """Empty state for streaming ``batch`` videos of up to ``max_frames`` frames, on the
        parameters' device."""

    @abstractmethod
    def step(self, state: EncoderState, patches: Tensor) -> tuple[Tensor, EncoderState]:
        """Consume the next k frames [b k n p]; return their conditioning [b k n_c d_c].

        The state is updated in place and returned for convenience.
        """


class FrameDecoder(nn.Module, Component, ABC):
    """Denoises one frame at a time, conditioned on the encoder output of the previous frame.

    ``t`` follows the time convention of the module doc. A decoder that accepts conditioning
    takes ``conditioning`` (one item per frame) as a fourth argument.
    """

    def __init__(self, config: ComponentConfig, frame: FrameSpec, cond: CondSpec):
        super().__init__()
        self.config = config
        self.frame = frame
        self.cond_spec = cond

    @property
    def contract(self) -> CondSpec:
        """The conditioning this decoder was built for."""
        return self.cond_spec

    @abstractmethod
    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """[b n p] noisy patches, [b] times, [b n_c d_c] conditioning -> [b n p] prediction."""


@runtime_checkable
class StagedDecoder(Protocol):
    """Optional fast path of a frame decoder whose forward splits into parts with different lifetimes:
    ``forward(x_t, t, cond[, conditioning]) == denoise(x_t, condition(cond), time_terms(t[, conditioning]))``.

    Streaming then computes ``time_terms`` once per sampling time and generation (for the whole
    schedule at once), ``condition`` once per frame, and only ``denoise`` at every step. Decoders
    without the split are called as a whole. ``time_terms`` returns tensors with a leading batch
    axis, possibly nested in tuples and lists.
    """

    def time_terms(self, t: Tensor) -> Any: ...

    def condition(self, cond: Tensor) -> Tensor: ...

    def denoise(self, x_t: Tensor, cond: Tensor, time_terms: Any) -> Tensor: ...


class VideoModel(nn.Module, Component, ABC):
    """A monolithic streaming video diffuser (no encoder/decoder split), e.g. the causal-DiT
    baseline. It trains and generates through the same :class:`StreamingModel` protocol as an SCD
    pipeline. One that accepts conditioning takes ``conditioning`` in ``forward`` (whole clip),
    ``observe`` (actions of the frames given) and ``predict`` (labels)."""

    def __init__(self, config: ComponentConfig, frame: FrameSpec):
        super().__init__()
        self.config = config
        self.frame = frame

    @abstractmethod
    def forward(self, clean: Tensor, noisy: Tensor, t: Tensor) -> Tensor:
        """Teacher-forced training path: noisy frame f ([b f n p], times [b f]) sees clean frames < f."""

    @abstractmethod
    def new_state(self, batch: int, max_frames: int) -> EncoderState:
        """Empty streaming state (KV cache over the clean context), on the parameters' device."""

    @abstractmethod
    def observe(self, state: EncoderState, patches: Tensor) -> None:
        """Clean frames [b k n p] enter the context."""

    @abstractmethod
    def predict(self, state: EncoderState, x_t: Tensor, t: Tensor) -> Tensor:
        """Prediction [b n p] for the next frame at noise time t [b], from the context so far."""

    def prepare(self, state: EncoderState, times: list[float]) -> None:
        """The sampling times of a generation, before its first step: a hook to precompute what depends
        on the time alone. Nothing by default."""


# -- data sets ------------------------------------------------------------------------------------

Split = Literal["train", "test"]


class VideoDataset(Component, ABC):
    """A source of clips for one frame geometry: seeded, so a (split, seed) pair always gives the same clips,
    and with disjoint ``train`` and ``test`` splits (held-out clips are never trained on).

    Construction is cheap (``scdkit validate`` builds every pipeline's data set); decoding, caching and the like
    happen on first use. A data set declares what it ``provides`` beside the video (class labels, actions; a
    component's ``accepts`` must be met by it) and whether its batches carry true ``states`` (evaluation only).
    """

    #: whether batches carry ``Batch.states`` (object centres and radii), for the state error
    has_states: ClassVar[bool] = False

    def __init__(self, config: ComponentConfig, frame: FrameSpec):
        self.config = config
        self.frame = frame
        self.name = self.plugin_name  # the registry table it was built from, once built by a registry

    @property
    def provides(self) -> ConditioningSpec:
        """The conditioning every batch carries (none by default)."""
        return ConditioningSpec()

    def frame_problems(self) -> list[tuple[str, str]]:
        """(pipeline key, problem) for each way the frame does not fit this data (none by default)."""
        return []

    @abstractmethod
    def clips(self, count: int, frames: int, split: Split = "train", seed: int = 0) -> Batch:
        """``count`` clips of ``frames`` frames [count frames c H W] in [0, 1], float32 on the CPU, with what
        the data set provides; the same for the same arguments."""

    def batch(self, count: int, frames: int, split: Split = "train", seed: int = 0,
              shard: tuple[int, int] = (0, 1)) -> Batch:
        """Shard ``rank`` of ``world`` (``shard``) of the batch ``clips(count, ...)``: clips
        [rank·count/world, (rank+1)·count/world). Data sets that can make a part alone override it."""
        return self.clips(count, frames, split, seed).clips(*shard_range(count, shard))


def shard_range(count: int, shard: tuple[int, int]) -> tuple[int, int]:
    """[start, stop) of shard ``(rank, world)`` of ``count`` clips; a ValueError unless they split evenly."""
    rank, world = shard
    if count % world:
        raise ValueError(f"a batch of {count} clips does not split into {world} equal shards")
    part = count // world
    return rank * part, (rank + 1) * part


# -- schedulers -----------------------------------------------------------------------------------

#: What a model predicts: ``epsilon`` the noise, ``sample`` the clean x0, ``velocity`` dx_t/dt along the
#: noising path (noise − x0 for flow matching), ``v`` alpha·noise − sigma·x0 (Salimans & Ho; diffusers'
#: "v_prediction", for variance-preserving noise).
PredictionType = Literal["epsilon", "velocity", "v", "sample"]
#: How ``alpha_sigma`` mixes x0 and noise: ``flow-matching`` alpha + sigma = 1 (x_t = (1 − t)·x0 + t·noise),
#: ``ddpm`` variance-preserving alpha² + sigma² = 1 (DDPM, DDIM, diffusers' beta schedules), else ``other``.
NoiseFamily = Literal["flow-matching", "ddpm", "other"]


@dataclass
class SamplingState:
    """One sampling run of a scheduler (one frame): the decoder times and what a solver carries.

    ``times`` holds ``steps + 1`` decoder times from noise to clean (see the module doc); ``index``
    counts the steps taken; ``history`` is free for multistep solvers (previous predictions).
    """

    times: list[float]
    device: torch.device
    index: int = 0
    history: list[Tensor] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    @property
    def t(self) -> float:
        return self.times[self.index]

    @property
    def t_next(self) -> float:
        return self.times[self.index + 1]


class NoiseScheduler(Component, ABC):
    """Owns the noise/time parametrisation, the training target and loss, and sampling.

    Training: ``sample_timesteps`` -> ``add_noise`` -> the model's prediction -> ``training_loss``.
    Sampling (one frame): ``state = begin(steps, device)``; then ``steps`` times
    ``x = step(state, model(x, state.t), x, generator)``. Everything a solver remembers lives in the
    state, so multistep and ancestral (seeded) samplers fit; the scheduler object itself is stateless.

    Declared: ``steps`` (default sampling steps) and ``prediction_type`` (what the model predicts, see
    :data:`PredictionType`). ``noise_family`` is read off ``alpha_sigma``. A trained checkpoint records both,
    and a model samples only with schedulers of the prediction type and noise family it was trained with.
    """

    def __init__(self, config: ComponentConfig):
        self.config = config

    @property
    @abstractmethod
    def steps(self) -> int:
        """Sampling steps when the caller does not say."""

    @property
    @abstractmethod
    def prediction_type(self) -> PredictionType:
        """What the model is trained to predict."""

    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Signal and noise scales at times ``t``: x_t = alpha·x0 + sigma·noise."""

    @abstractmethod
    def sample_timesteps(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
        """Training times in [0, 1], one per element of ``shape``, on ``device``."""

    @abstractmethod
    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to predict at time t (by ``prediction_type``)."""

    @abstractmethod
    def begin(self, steps: int | None = None, device: torch.device | str | None = None) -> SamplingState:
        """A new sampling run of ``steps`` steps (the default when None); fewer than 1 is a ValueError."""

    @abstractmethod
    def step(self, state: SamplingState, prediction: Tensor, x: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """One sampling step from ``state.t`` to ``state.t_next``; advances ``state.index``."""

    # Shared by every scheduler; override where an algorithm needs something else.

    @property
    def noise_family(self) -> NoiseFamily:
        """The :data:`NoiseFamily` of ``alpha_sigma``, checked at t = 0.25, 0.5 and 0.75."""
        t = torch.tensor([0.25, 0.5, 0.75], device="cpu")
        alpha, sigma = (torch.as_tensor(v).double() for v in self.alpha_sigma(t))
        if bool(((alpha + sigma - 1).abs() < 1e-4).all()):
            return "flow-matching"
        if bool(((alpha**2 + sigma**2 - 1).abs() < 1e-4).all()):
            return "ddpm"
        return "other"

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Noisy sample x_t; ``t`` broadcasts from the left over x0's leading axes."""
        alpha, sigma = (expand_like(s, x0) for s in self.alpha_sigma(t))
        return alpha * x0 + sigma * noise

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-item weight of the training loss at times ``t`` (1 by default)."""
        return torch.ones_like(t)

    def training_loss(self, prediction: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Weighted squared error per element (reduce it as the caller needs), at least in fp32."""
        dtype = torch.promote_types(prediction.dtype, torch.float32)  # bf16/fp16 predictions: an fp32 loss
        error = (prediction.to(dtype) - self.training_target(x0, noise, t).to(dtype)).square()
        return expand_like(self.loss_weight(t), error) * error

    @staticmethod
    def check_steps(steps: int | None, default: int) -> int:
        """``steps`` or the default; an error for fewer than one step (never a silent default)."""
        if steps is None:
            return default
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"sampling needs at least 1 step, got {steps!r}")
        return steps


def expand_like(t: Tensor, like: Tensor) -> Tensor:
    """``t`` [leading axes] with trailing singleton axes, so it broadcasts over ``like`` from the left."""
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


# -- the streaming protocol -----------------------------------------------------------------------

class Recipe(BaseModel):
    """Training options that shape the SCD loss (PAPER.md); a monolithic model ignores them."""

    model_config = ConfigDict(extra="forbid")
    noise_draws: int = Field(2, ge=1, description="decoder noise draws per encoder pass")
    cond_noise: float = Field(0.05, ge=0, description="std of Gaussian noise on the encoder output")
    clean_context_ratio: float = Field(0.1, ge=0, le=1, description="share of clips whose encoder input is clean")
    context_noise: float = Field(0.05, ge=0, le=1, description="max noise time of the encoder input otherwise")
    label_dropout: float = Field(0.1, ge=0, le=1, description="share of clips whose class label is replaced by the "
                                 "null label, so that the decoder also learns the unconditional branch of guidance")


class StreamingModel(nn.Module, ABC):
    """What training, generation, swap-eval, bench and probe see of a pipeline: an SCD encoder +
    decoder or a monolithic model, behind one interface (``scdkit.pipeline`` adapts both).

    ``components`` are the trained modules by role (one checkpoint file each). Streaming:
    ``new_state`` -> ``prepare`` (the generation's decoder times) -> ``observe`` (clean frames enter
    the context) -> ``predict`` (at every denoising step of the next frame) -> ``observe`` ...
    """

    frame: FrameSpec

    @property
    @abstractmethod
    def components(self) -> dict[str, nn.Module]: ...

    @property
    def accepts(self) -> ConditioningSpec:
        """The conditioning any component takes (classes and action width, the largest)."""
        specs = [c.accepts for c in self.components.values()]
        return ConditioningSpec(classes=max(s.classes for s in specs), actions=max(s.actions for s in specs))

    @abstractmethod
    def loss(self, x0: Tensor, conditioning: Conditioning, scheduler: NoiseScheduler, recipe: Recipe,
             generator: torch.Generator | None = None, teacher=None) -> Tensor:
        """Training loss on clean patches [b f n p]; every frame but the first is a target. ``teacher``
        (:class:`scdkit.distill.Teacher`): the targets are its samples from the loss's noise, or a UsageError."""

    @abstractmethod
    def new_state(self, batch: int, max_frames: int, conditioning: Conditioning,
                  guidance: float | None = None) -> EncoderState:
        """Empty stream state; ``conditioning`` holds the clip-level labels for the whole stream. ``guidance``:
        the classifier-free guidance scale of ``predict`` (None or 1: none), or a UsageError if unsupported."""

    def prepare(self, state: EncoderState, times: list[float]) -> None:
        """The decoder times of this generation's steps, before the first one. Nothing by default."""

    @abstractmethod
    def observe(self, state: EncoderState, patches: Tensor, conditioning: Conditioning) -> None:
        """Clean frames [b k n p] (and their actions) enter the context."""

    @abstractmethod
    def predict(self, state: EncoderState, x_t: Tensor, t: float | Tensor) -> Tensor:
        """Prediction [b n p] for the next frame at time ``t``: one float for the whole batch, or [b]."""

    @abstractmethod
    def compile_steps(self, **options) -> None:
        """Wrap the per-step network call and the per-frame context step with ``torch.compile(**options)``."""
