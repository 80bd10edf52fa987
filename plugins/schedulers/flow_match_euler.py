"""`flow-match-euler`: rectified-flow noising with an Euler sampler.

    x_t = (1 - t)·x0 + t·ε,   target v = ε - x0 (velocity),   x_{t'} = x_t + (t' - t)·v

Training times are logit-normal, one per frame; sampling times run from 1 to 0 and are
optionally shifted towards the noisy end (shift > 1) as in SD3, s(t) = shift·t / (1 + (shift − 1)·t).

Two sampling grids of n steps:

- ``uniform`` (the default): t_i = s(1 − i/n), i = 0..n. Every step covers the same share of [0, 1]
  before the shift; the last one runs from s(1/n) to 0.
- ``diffusers``: diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n)``, which
  spaces n times evenly from 1 down to its smallest training sigma s(1/T), T = 1000, shifts them (so
  the shift is applied twice to the low end), then appends 0: t_i = s(1 + (s(1/T) − 1)·i/(n − 1)). Its
  last non-zero time is s(s(1/1000)) (0.001 at shift 1) instead of s(1/n), so the final step is tiny
  and the others are wider.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import ComponentConfig, NoiseScheduler, SamplingState


class FlowMatchEulerConfig(ComponentConfig):
    steps: PositiveInt = 50
    shift: PositiveFloat = 1.0
    logit_mean: float = 0.0
    logit_std: PositiveFloat = 1.0
    grid: Literal["uniform", "diffusers"] = "uniform"


DIFFUSERS_TRAIN_TIMESTEPS = 1000  # num_train_timesteps of FlowMatchEulerDiscreteScheduler's default config


class FlowMatchEuler(NoiseScheduler):
    plugin_name = "flow-match-euler"
    plugin_version = "0.1.0"
    config_class = FlowMatchEulerConfig
    prediction_type = "velocity"

    @property
    def steps(self) -> int:
        return self.config.steps

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, t

    def sample_timesteps(self, shape, generator=None, device=None) -> Tensor:
        normal = torch.randn(shape, generator=generator, device=device)
        return torch.sigmoid(normal * self.config.logit_std + self.config.logit_mean)

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def begin(self, steps=None, device=None) -> SamplingState:
        steps = self.check_steps(steps, self.config.steps)
        if self.config.grid == "uniform":
            times = [self.shifted(1 - i / steps) for i in range(steps + 1)]
        else:
            low = self.shifted(1 / DIFFUSERS_TRAIN_TIMESTEPS)
            evenly = [1 + (low - 1) * i / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]
            times = [self.shifted(t) for t in evenly] + [0.0]
        return SamplingState(times, torch.device(device or "cpu"))

    def shifted(self, t: float) -> float:
        s = self.config.shift
        return s * t / (1 + (s - 1) * t)

    def step(self, state: SamplingState, prediction: Tensor, x: Tensor, generator=None) -> Tensor:
        x = x + (state.t_next - state.t) * prediction
        state.index += 1
        return x


@hookimpl
def scdkit_register_schedulers(register):
    register(FlowMatchEuler)
