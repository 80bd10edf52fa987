"""`flow-match-euler`: rectified-flow noising with an Euler sampler.

    x_t = (1 - t)·x0 + t·ε,   target v = ε - x0 (velocity),   x_{t'} = x_t + (t' - t)·v

Training times are logit-normal, one per frame; sampling times run from 1 to 0 and are
optionally shifted towards the noisy end (shift > 1) as in SD3.
"""

from __future__ import annotations

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
        s = self.config.shift
        times = [(1 - i / steps) for i in range(steps + 1)]
        return SamplingState([s * t / (1 + (s - 1) * t) for t in times], torch.device(device or "cpu"))

    def step(self, state: SamplingState, prediction: Tensor, x: Tensor, generator=None) -> Tensor:
        x = x + (state.t_next - state.t) * prediction
        state.index += 1
        return x


@hookimpl
def scdkit_register_schedulers(register):
    register(FlowMatchEuler)
