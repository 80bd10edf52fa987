"""`causal-transformer`: the reference SCD encoder.

DiT blocks (adaLN-Zero, QK-norm, 3-axis RoPE) under a block-causal mask: full attention
within a frame, backward across frames. The adaLN conditioning is a learned constant
(the paper's encoder runs at a fixed "clean" timestep), and the output is the final adaLN
LayerNorm without a projection, so the conditioning width equals the model width.

With ``actions = A`` the encoder is action-conditioned (a world model): each frame's action
[b f A] is projected to the width and added to that frame's tokens, so the conditioning for
frame f+1 knows what was done at frame f.

Two paths that must agree: ``forward`` over a whole clip (training) and ``step`` with a
preallocated KV cache (streaming generation).
"""

from __future__ import annotations

import torch
from einops import rearrange
from pydantic import NonNegativeInt, PositiveInt
from torch import Tensor, nn

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import (CausalEncoder, CondSpec, Conditioning, ConditioningSpec, EncoderState,
                               FrameSpec)
from scdkit.nn.attention import block_causal_mask
from scdkit.nn.cache import KVCache, compute_dtype
from scdkit.nn.dit import DiTBlock, DiTConfig, FinalLayer, init_linear_weights
from scdkit.nn.rope import rope_table


class CausalTransformerConfig(DiTConfig):
    layers: PositiveInt = 4
    actions: NonNegativeInt = 0  # width of a per-frame action (0: not action-conditioned)


class CausalTransformerState(EncoderState):
    def __init__(self, caches: list[KVCache]):
        self.caches = caches
        self.frames = 0


class CausalTransformerEncoder(CausalEncoder):
    plugin_name = "causal-transformer"
    plugin_version = "0.1.0"
    config_class = CausalTransformerConfig

    @classmethod
    def example_config(cls) -> CausalTransformerConfig:
        return CausalTransformerConfig(width=32, layers=2, heads=2)
    weight_family = "causal-transformer"

    def __init__(self, config: CausalTransformerConfig, frame: FrameSpec):
        super().__init__(config, frame)
        self.embed = nn.Linear(frame.patch_dim, config.width)
        self.clean = nn.Parameter(torch.zeros(config.width))  # stands in for the "clean" timestep embedding
        self.blocks = nn.ModuleList(DiTBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.final = FinalLayer(config.width)
        if config.actions:
            self.action_proj = nn.Linear(config.actions, config.width)
        init_linear_weights(self)
        nn.init.normal_(self.clean, std=0.02)

    @property
    def accepts(self) -> ConditioningSpec:
        return ConditioningSpec(actions=self.config.actions)

    @property
    def contract(self) -> CondSpec:
        return CondSpec(dim=self.config.width, tokens=self.frame.tokens)

    @property
    def head_dim(self) -> int:
        return self.config.width // self.config.heads

    def rope(self, first_frame: int, frames: int) -> Tensor:
        positions = torch.arange(first_frame, first_frame + frames, device=self.clean.device)
        return rope_table(positions, self.frame.grid, self.head_dim)

    def embed_frames(self, patches: Tensor, conditioning: Conditioning | None) -> Tensor:
        """Tokens [b (f n) d] of frames [b f n p], with each frame's action added when configured."""
        x = self.embed(patches)
        if self.config.actions:
            if conditioning is None or conditioning.actions is None:
                raise ValueError(f"{self.plugin_name} is action-conditioned: give conditioning.actions [b f a]")
            x = x + self.action_proj(conditioning.actions.to(x.dtype))[:, :, None]
        return rearrange(x, "b f n d -> b (f n) d")

    def run_blocks(self, patches: Tensor, first_frame: int, mask: Tensor | None, caches=None,
                   conditioning: Conditioning | None = None) -> Tensor:
        frames, tokens = patches.shape[1], patches.shape[2]
        x = self.embed_frames(patches, conditioning)
        cond = self.clean.expand(x.shape[0], -1)
        rope = self.rope(first_frame, frames)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, rope, mask, cache=None if caches is None else caches[i])
        return rearrange(self.final(x, cond), "b (f n) d -> b f n d", n=tokens)

    def forward(self, patches: Tensor, conditioning: Conditioning | None = None) -> Tensor:
        frames, tokens = patches.shape[1], patches.shape[2]
        mask = block_causal_mask(frames, frames, tokens, device=patches.device)
        return self.run_blocks(patches, 0, mask, conditioning=conditioning)

    def new_state(self, batch: int, max_frames: int) -> CausalTransformerState:
        p = self.clean
        capacity = max_frames * self.frame.tokens
        caches = [KVCache(batch, self.config.heads, capacity, self.head_dim, compute_dtype(p), p.device)
                  for _ in self.blocks]
        return CausalTransformerState(caches)

    def step(self, state: CausalTransformerState, patches: Tensor,
             conditioning: Conditioning | None = None) -> tuple[Tensor, CausalTransformerState]:
        frames, tokens = patches.shape[1], patches.shape[2]
        mask = None
        if frames > 1:  # a single new frame sees everything cached plus itself: no mask needed
            mask = block_causal_mask(frames, state.frames + frames, tokens, q_offset=state.frames,
                                     device=patches.device)
        out = self.run_blocks(patches, state.frames, mask, state.caches, conditioning)
        state.frames += frames
        return out, state


@hookimpl
def scdkit_register_encoders(register):
    register(CausalTransformerEncoder)
