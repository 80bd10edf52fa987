"""`ddim`: DDIM sampling (Song et al.) on a discrete beta schedule (``scdkit.diffusion``).

From timestep k to the next k' < k (the ``steps`` spread over the T timesteps, trailing), with the
model's x0 and ε:

    x_k' = sqrt(ᾱ_k')·x0 + sqrt(1 − ᾱ_k' − s²)·ε + s·z,   s = eta·sqrt((1 − ᾱ_k')/(1 − ᾱ_k)·(1 − ᾱ_k/ᾱ_k'))

``eta = 0`` is deterministic; ``eta = 1`` has the ancestral DDPM variance; z comes from the generator
passed to ``step`` (not drawn when s = 0). With ``timestep_spacing = "trailing"`` and
``clip_sample = False`` this is diffusers' ``DDIMScheduler``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from scdkit.diffusion import DdpmConfig, DdpmFamily, split
from scdkit.hookspecs import hookimpl
from scdkit.interfaces import SamplingState


class DDIMConfig(DdpmConfig):
    eta: float = Field(0.0, ge=0, le=1, description="noise per step: 0 deterministic, 1 the DDPM variance")


class DDIM(DdpmFamily):
    plugin_name = "ddim"
    plugin_version = "0.1.0"
    config_class = DDIMConfig

    def step(self, state: SamplingState, prediction: Tensor, x: Tensor, generator=None) -> Tensor:
        abar, abar_next = self.abar(state.t), self.abar(state.t_next)
        x0, eps = split(self.prediction_type, prediction, x, math.sqrt(abar), math.sqrt(1 - abar))
        std = self.config.eta * math.sqrt((1 - abar_next) / (1 - abar) * (1 - abar / abar_next))
        x = math.sqrt(abar_next) * x0 + math.sqrt(max(1 - abar_next - std**2, 0.0)) * eps
        state.index += 1
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x


@hookimpl
def scdkit_register_schedulers(register):
    register(DDIM)
