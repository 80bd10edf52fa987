"""The three component interfaces and the contract where encoder and decoder meet.

Axis legend used throughout scdkit:
    b batch · f frames · n tokens per frame · p patch values (channels·patch²) · d width · h heads

Data flow: video [b f c H W] --patchify--> patches [b f n p]
    encoder(patches) -> cond [b f n_c d_c]     (once per frame, block-causal)
    decoder(x_t [b n p], t [b], cond [b n_c d_c]) -> prediction [b n p]   (per denoising step)
    scheduler: noise/time parametrisation for training and sampling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt
from torch import Tensor, nn


class ComponentConfig(BaseModel):
    """Base of every component config: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


class CausalEncoder(nn.Module, Component, ABC):
    """Runs once per frame over the clean past and emits one conditioning per frame.

    ``forward`` (whole clip, block-causal) and ``step`` (incremental, cached) must agree,
    and the output for frame k must never depend on frames after k.
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
        """Empty state for streaming ``batch`` videos of up to ``max_frames`` frames."""

    @abstractmethod
    def step(self, state: EncoderState, patches: Tensor) -> tuple[Tensor, EncoderState]:
        """Consume the next k frames [b k n p]; return their conditioning [b k n_c d_c].

        The state is updated in place and returned for convenience.
        """


class FrameDecoder(nn.Module, Component, ABC):
    """Denoises one frame at a time, conditioned on the encoder output of the previous frame."""

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


class NoiseScheduler(Component, ABC):
    """Owns the noise/time parametrisation. Pure torch and stateless."""

    def __init__(self, config: ComponentConfig):
        self.config = config

    @abstractmethod
    def sample_timesteps(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """Training times, one per element of ``shape``."""

    @abstractmethod
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Noisy sample x_t; ``t`` broadcasts from the left over x0's leading axes."""

    @abstractmethod
    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the decoder is trained to predict at time t."""

    @abstractmethod
    def timesteps(self, steps: int | None = None) -> Tensor:
        """Sampling times, from pure noise to clean, ``steps + 1`` values."""

    @abstractmethod
    def step(self, prediction: Tensor, t: float, t_next: float, x: Tensor) -> Tensor:
        """One sampling step from time t to t_next."""


class VideoModel(nn.Module, Component, ABC):
    """A monolithic streaming video diffuser (no encoder/decoder split), e.g. the causal-DiT
    baseline. It generates through the same streaming loop as an SCD pipeline."""

    def __init__(self, config: ComponentConfig, frame: FrameSpec):
        super().__init__()
        self.config = config
        self.frame = frame

    @abstractmethod
    def forward(self, clean: Tensor, noisy: Tensor, t: Tensor) -> Tensor:
        """Teacher-forced training path: noisy frame f ([b f n p], times [b f]) sees clean frames < f."""

    @abstractmethod
    def new_state(self, batch: int, max_frames: int) -> EncoderState:
        """Empty streaming state (KV cache over the clean context)."""

    @abstractmethod
    def observe(self, state: EncoderState, patches: Tensor) -> None:
        """Clean frames [b k n p] enter the context."""

    @abstractmethod
    def predict(self, state: EncoderState, x_t: Tensor, t: Tensor) -> Tensor:
        """Prediction [b n p] for the next frame at noise time t [b], from the context so far."""

    def prepare(self, state: EncoderState, times: Tensor) -> None:
        """The sampling times of a generation, before its first step: a hook to precompute what depends
        on the time alone. Nothing by default."""
