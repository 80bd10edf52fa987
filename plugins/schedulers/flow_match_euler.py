"""`flow-match-euler`: rectified-flow noising with an Euler sampler.

    x_t = (1 - t)·x0 + t·ε,   target v = ε - x0,   x_{t'} = x_t + (t' - t)·v

Training times are logit-normal, one per frame; sampling times run from 1 to 0 and are
optionally shifted towards the noisy end (shift > 1) as in SD3.
"""

from __future__ import annotations

import torch
from pydantic import PositiveFloat, PositiveInt
from torch import Tensor

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import ComponentConfig, NoiseScheduler


class FlowMatchEulerConfig(ComponentConfig):
    steps: PositiveInt = 50
    shift: PositiveFloat = 1.0
    logit_mean: float = 0.0
    logit_std: PositiveFloat = 1.0


def _expand(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


class FlowMatchEuler(NoiseScheduler):
    plugin_name = "flow-match-euler"
    plugin_version = "0.1.0"
    config_class = FlowMatchEulerConfig

    def sample_timesteps(self, shape, generator=None) -> Tensor:
        normal = torch.randn(shape, generator=generator)
        return torch.sigmoid(normal * self.config.logit_std + self.config.logit_mean)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        t = _expand(t, x0)
        return (1 - t) * x0 + t * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def timesteps(self, steps: int | None = None) -> Tensor:
        t = torch.linspace(1.0, 0.0, (steps or self.config.steps) + 1, dtype=torch.float64)
        s = self.config.shift
        return (s * t / (1 + (s - 1) * t)).float()

    def step(self, prediction: Tensor, t: float, t_next: float, x: Tensor) -> Tensor:
        return x + (t_next - t) * prediction


@hookimpl
def scdkit_register_schedulers(register):
    register(FlowMatchEuler)
