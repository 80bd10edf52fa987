"""`ddpm`: ancestral DDPM sampling (Ho et al.) on a discrete beta schedule (``scdkit.diffusion``).

Each step from timestep k to the next k' < k (the ``steps`` are spread over the T timesteps, trailing) draws
x_k' from the posterior q(x_k' | x_k, x0) at the model's x0:

    mean = sqrt(ᾱ_k')·β/(1 − ᾱ_k)·x0 + sqrt(1 − β)·(1 − ᾱ_k')/(1 − ᾱ_k)·x_k,   β = 1 − ᾱ_k/ᾱ_k'
    var  = (1 − ᾱ_k')/(1 − ᾱ_k)·β                     (the "fixed small" variance)

with fresh noise from the generator passed to ``step``, except at the last step (k' = 0, var = 0). With
``timestep_spacing = "trailing"`` and ``clip_sample = False`` this is diffusers' ``DDPMScheduler``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scdkit.diffusion import DdpmFamily, split
from scdkit.hookspecs import hookimpl
from scdkit.interfaces import SamplingState


class DDPM(DdpmFamily):
    plugin_name = "ddpm"
    plugin_version = "0.1.0"

    def step(self, state: SamplingState, prediction: Tensor, x: Tensor, generator=None) -> Tensor:
        abar, abar_next = self.abar(state.t), self.abar(state.t_next)
        x0, _ = split(self.prediction_type, prediction, x, math.sqrt(abar), math.sqrt(1 - abar))
        beta = 1 - abar / abar_next
        mean = (math.sqrt(abar_next) * beta / (1 - abar)) * x0 \
            + (math.sqrt(1 - beta) * (1 - abar_next) / (1 - abar)) * x
        last = state.t_next == 0  # the clean end: no noise
        state.index += 1
        if last:
            return mean
        std = math.sqrt((1 - abar_next) / (1 - abar) * beta)
        return mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@hookimpl
def scdkit_register_schedulers(register):
    register(DDPM)
