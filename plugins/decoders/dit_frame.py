"""`dit-frame`: the SCD frame decoder.

A small DiT over the tokens of one frame only (no cross-frame attention), conditioned by
adaLN on the denoising time and by the encoder output of the previous frame, combined as:

- ``token_concat`` (default, best in the paper): conditioning tokens are projected to the
  decoder width and prepended to the sequence; attention is full over both.
- ``concat``: per-token channel concatenation, fused by a Linear initialised to [I | I].
- ``add``: the projected conditioning is added to each token.

``concat`` and ``add`` pair tokens one to one, so they need as many conditioning tokens as
frame tokens; that is checked when the decoder is built.

With ``classes = K`` the decoder is class-conditioned: a label embedding (K classes plus a null
label for classifier-free guidance) is added to the time embedding that drives every adaLN.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import NonNegativeInt, PositiveInt
from torch import Tensor, nn

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import CondSpec, Conditioning, ConditioningSpec, FrameDecoder, FrameSpec
from scdkit.nn.dit import DiTBlock, DiTConfig, FinalLayer, LabelEmbedding, TimestepEmbedding, init_linear_weights
from scdkit.nn.rope import rope_table


class DiTFrameConfig(DiTConfig):
    layers: PositiveInt = 2
    combine: Literal["token_concat", "concat", "add"] = "token_concat"
    classes: NonNegativeInt = 0  # class labels (0: not class-conditioned)


class DiTFrameDecoder(FrameDecoder):
    plugin_name = "dit-frame"
    plugin_version = "0.1.0"
    config_class = DiTFrameConfig

    @classmethod
    def example_config(cls) -> DiTFrameConfig:
        return DiTFrameConfig(width=32, layers=2, heads=2)

    def __init__(self, config: DiTFrameConfig, frame: FrameSpec, cond: CondSpec):
        super().__init__(config, frame, cond)
        if config.combine != "token_concat" and cond.tokens != frame.tokens:
            raise ValueError(
                f"combine={config.combine!r} pairs tokens one to one, but the encoder emits {cond.tokens} "
                f"tokens per frame and the frame has {frame.tokens}; use combine='token_concat'"
            )
        width = config.width
        self.embed = nn.Linear(frame.patch_dim, width)
        self.time = TimestepEmbedding(width)
        if config.classes:
            self.label = LabelEmbedding(config.classes, width)
        self.cond_proj = nn.Linear(cond.dim, width)
        if config.combine == "concat":
            self.fuse = nn.Linear(2 * width, width)
        self.blocks = nn.ModuleList(DiTBlock(width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.final = FinalLayer(width, frame.patch_dim)
        init_linear_weights(self)
        if config.combine == "concat":
            with torch.no_grad():
                self.fuse.weight.copy_(torch.cat([torch.eye(width), torch.eye(width)], dim=1))
        # Positions never change: frame tokens sit at frame 1, conditioning tokens (the previous
        # frame's representation) at frame 0 of the same grid.
        head_dim = width // config.heads
        frames = [0, 1] if config.combine == "token_concat" else [1]
        self.register_buffer("rope", rope_table(torch.tensor(frames), frame.grid, head_dim), persistent=False)
        self.cond_tokens = cond.tokens if config.combine == "token_concat" else 0

    @property
    def accepts(self) -> ConditioningSpec:
        return ConditioningSpec(classes=self.config.classes)

    # forward(x_t, t, cond) == denoise(x_t, condition(cond), time_terms(t)). Streaming generation
    # calls the three parts as often as their inputs change: time_terms once per sampling time
    # (scdkit.nn.dit.TimeTable), condition once per frame, denoise at every step.

    def time_terms(self, t: Tensor, conditioning: Conditioning | None = None) -> list[tuple[Tensor, ...]]:
        """adaLN modulations for times t [b] (and labels [b]): one tuple per block, then the final layer's."""
        c = self.time(t)
        if self.config.classes:
            if conditioning is None or conditioning.labels is None:
                raise ValueError(f"{self.plugin_name} is class-conditioned: give conditioning.labels [b]")
            c = c + self.label(conditioning.labels)
        return [block.modulation(c) for block in self.blocks] + [self.final.modulation(c)]

    def condition(self, cond: Tensor) -> Tensor:
        """Encoder output [b n_c d_c] projected to the decoder width."""
        return self.cond_proj(cond)

    def combine(self, x: Tensor, cond: Tensor) -> Tensor:
        """Embedded frame tokens [b n d] with the projected conditioning (from :meth:`condition`)."""
        match self.config.combine:
            case "token_concat":
                return torch.cat([cond, x], dim=1)
            case "concat":
                return self.fuse(torch.cat([x, cond], dim=-1))
            case "add":
                return x + cond

    def denoise(self, x_t: Tensor, cond: Tensor, time_terms: list[tuple[Tensor, ...]]) -> Tensor:
        """The prediction from the projected conditioning and the time terms."""
        x = self.combine(self.embed(x_t), cond)
        rope = self.rope
        if self.cond_tokens and self.cond_tokens != self.frame.tokens:
            rope = None  # conditioning tokens without a grid position: rely on content alone
        for block, modulation in zip(self.blocks, time_terms):
            x = block(x, None, rope, modulation=modulation)
        return self.final(x[:, self.cond_tokens:], None, modulation=time_terms[-1])

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, conditioning: Conditioning | None = None) -> Tensor:
        return self.denoise(x_t, self.condition(cond), self.time_terms(t, conditioning))


@hookimpl
def scdkit_register_decoders(register):
    register(DiTFrameDecoder)
