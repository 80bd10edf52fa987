"""DDPM-family noise, shared by the ``ddpm`` and ``ddim`` schedulers and the ``diffusers`` adapter.

    x_k = sqrt(ᾱ_k)·x0 + sqrt(1 − ᾱ_k)·ε,   ᾱ_k = ∏_{i≤k} (1 − β_i),   k = 1..T   (ᾱ_0 = 1: the clean sample)

Timesteps count from the least to the most noisy and the model sees t = k / T (``scdkit.interfaces``);
diffusers' timestep j is k − 1. Between timesteps ᾱ is interpolated linearly, so ``alpha_sigma`` stays
variance-preserving (alpha² + sigma² = 1) at every t in [0, 1].

Beta schedules: ``linear`` (Ho et al.) runs from 1e-4 to 0.02 at T = 1000, both scaled by 1000 / T for
other T (Nichol & Dhariwal), so every T ends at about the same noise; ``cosine`` (Nichol & Dhariwal)
discretises ᾱ(s) = cos²((s + 0.008) / 1.008 · π/2) with each beta capped at 0.999, as diffusers'
``squaredcos_cap_v2``. At T = 1000 both equal diffusers' ``linear`` and ``squaredcos_cap_v2``.

Predictions (``scdkit.interfaces.PredictionType``): ``epsilon`` the noise, ``v`` = alpha·ε − sigma·x0
(Salimans & Ho), ``sample`` x0. :func:`split` turns one into the pair (x0, ε) a sampler steps with.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PositiveInt, field_validator
from torch import Tensor

from scdkit.interfaces import ComponentConfig, NoiseScheduler, SamplingState, expand_like

BetaSchedule = Literal["linear", "cosine"]
MAX_BETA = 0.999


def alpha_bar(betas: BetaSchedule, train_timesteps: int) -> Tensor:
    """ᾱ_0..ᾱ_T [T + 1] in float64 on the CPU, ᾱ_0 = 1."""
    T = train_timesteps
    if betas == "linear":
        scale = 1000 / T
        beta = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64, device="cpu")
    elif betas == "cosine":
        def f(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        beta = torch.tensor([min(1 - f((k + 1) / T) / f(k / T), MAX_BETA) for k in range(T)],
                            dtype=torch.float64, device="cpu")
    else:
        raise ValueError(f"unknown beta schedule {betas!r} (expected linear or cosine)")
    return torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), torch.cumprod(1 - beta, 0)])


def alpha_sigma(table: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(ᾱ) and sqrt(1 − ᾱ) at times ``t`` (any shape, any device) from the table ᾱ_0..ᾱ_T, exact at
    every k / T and linear in ᾱ between them."""
    T = len(table) - 1
    dtype = torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32
    position = t.to(dtype).clamp(0, 1) * T
    lower = position.floor().clamp(max=T - 1)
    fraction, lower = position - lower, lower.long()
    table = table.to(t.device, dtype)
    abar = table[lower] * (1 - fraction) + table[lower + 1] * fraction
    return abar.sqrt(), (1 - abar).sqrt()


def trailing_times(steps: int, train_timesteps: int) -> list[float]:
    """``steps + 1`` times k / T from T down to 0, the timesteps k = round(T·(steps − i) / steps): diffusers'
    ``timestep_spacing = "trailing"``, which starts at pure noise. More steps than T is a ValueError."""
    T = train_timesteps
    if steps > T:
        raise ValueError(f"at most train_timesteps = {T} sampling steps, got {steps}")
    ratio = T / steps
    return [round(T - i * ratio) / T for i in range(steps)] + [0.0]


def split(prediction_type: str, prediction: Tensor, x: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
    """(x0, ε) named by a model's ``prediction`` at x_t = alpha·x0 + sigma·ε (alpha² + sigma² = 1, sigma > 0)."""
    if prediction_type == "epsilon":
        return (x - sigma * prediction) / alpha, prediction
    if prediction_type == "v":
        return alpha * x - sigma * prediction, sigma * x + alpha * prediction
    if prediction_type == "sample":
        return prediction, (x - alpha * prediction) / sigma
    raise ValueError(f"no DDPM-family conversion for prediction type {prediction_type!r}")


def target(prediction_type: str, x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What a model of ``prediction_type`` is trained to predict; ``alpha``/``sigma`` broadcast from the left."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v":
        alpha, sigma = expand_like(alpha, x0), expand_like(sigma, x0)
        return alpha * noise - sigma * x0
    raise ValueError(f"no DDPM-family target for prediction type {prediction_type!r}")


def sample_timesteps(train_timesteps: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
    """Training times k / T with k uniform in 1..T."""
    k = torch.randint(1, train_timesteps + 1, shape, generator=generator, device=device)
    return k.float() / train_timesteps


class DdpmConfig(ComponentConfig):
    """The options every DDPM-family scheduler shares."""

    prediction: Literal["epsilon", "v"] = Field("epsilon", description="what the model predicts")
    betas: BetaSchedule = Field("linear", description="beta schedule")
    train_timesteps: PositiveInt = Field(1000, description="T: discrete noise levels trained on")
    steps: PositiveInt = Field(50, description="sampling steps, spread over the T timesteps (trailing)")

    @field_validator("steps")
    @classmethod
    def _at_most_train_timesteps(cls, steps: int, info) -> int:
        T = info.data.get("train_timesteps")
        if T is not None and steps > T:
            raise ValueError(f"at most train_timesteps = {T} sampling steps, got {steps}")
        return steps


class DdpmFamily(NoiseScheduler):
    """Training and the time grid of a DDPM-family scheduler; a subclass writes ``step``, which reads
    ᾱ at ``state.t`` and ``state.t_next`` with :meth:`abar`."""

    config_class = DdpmConfig

    def __init__(self, config: DdpmConfig):
        super().__init__(config)
        self.table = alpha_bar(config.betas, config.train_timesteps)  # CPU float64, even under a meta device

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return alpha_sigma(self.table, t)

    def sample_timesteps(self, shape, generator=None, device=None) -> Tensor:
        return sample_timesteps(self.config.train_timesteps, shape, generator, device)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return target(self.prediction_type, x0, noise, *self.alpha_sigma(t))

    def begin(self, steps=None, device=None) -> SamplingState:
        steps = self.check_steps(steps, self.config.steps)
        return SamplingState(trailing_times(steps, self.config.train_timesteps), torch.device(device or "cpu"))

    def abar(self, t: float) -> float:
        """ᾱ at a sampling time (a timestep k / T)."""
        return self.table[round(t * self.config.train_timesteps)].item()
