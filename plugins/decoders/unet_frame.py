"""`unet-frame`: a convolutional SCD frame decoder (the seed's "shallow, frame-wise UNet-style network").

Residual conv blocks over the frame's pixels, down-sampled by 2 per level and up-sampled back with
skip connections; the denoising time (and a class label, when configured) scales and shifts every
block's normalised activations (FiLM).

The encoder's conditioning is **concatenated on the token grid**, not cross-attended: the encoder emits
one token per patch, already aligned with the frame, so each level gets the tokens turned into a feature
map of its own resolution by a per-token linear map and a depth-to-space rearrangement (a token becomes
the (patch / 2^level)² pixels it covers at that level), added after the block's first convolution.
Motion here is a few pixels per frame, which a 3x3 convolution sees directly; cross-attention would cost
a softmax over all tokens at every denoising step for what a local operator does.

Streaming splits the work by lifetime (``StagedDecoder``): ``time_terms`` once per sampling time,
``condition`` (the per-level feature maps) once per frame, ``denoise`` (the convolutions) at every step.
Needs the encoder to emit one token per patch, and ``2^(levels - 1)`` to divide the patch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import NonNegativeInt, PositiveInt, field_validator
from torch import Tensor, nn

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import ComponentConfig, CondSpec, Conditioning, ConditioningSpec, FrameDecoder, FrameSpec
from scdkit.nn.dit import LabelEmbedding, TimestepEmbedding


class UNetFrameConfig(ComponentConfig):
    channels: PositiveInt = 32  # feature channels at full resolution
    multipliers: tuple[PositiveInt, ...] = (1, 2, 2)  # channels per level, relative; one level per entry
    groups: PositiveInt = 8  # GroupNorm groups; must divide every level's channels
    classes: NonNegativeInt = 0  # class labels (0: not class-conditioned)

    @field_validator("multipliers")
    @classmethod
    def _some_levels(cls, multipliers: tuple[int, ...]) -> tuple[int, ...]:
        if not multipliers:
            raise ValueError("needs at least one level")
        return multipliers

    @field_validator("groups")
    @classmethod
    def _groups_divide(cls, groups: int, info) -> int:
        for width in (info.data.get("channels", 0) * m for m in info.data.get("multipliers", ())):
            if width % groups:
                raise ValueError(f"{groups} groups do not divide a level of {width} channels")
        return groups


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + the level's conditioning map, GroupNorm → FiLM(time) → SiLU → conv (zero-init,
    so the block starts as its skip path)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, affine=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, film: tuple[Tensor, Tensor], cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + cond
        scale, shift = film
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        return self.skip(x) + self.conv2(F.silu(h))


class UNetFrameDecoder(FrameDecoder):
    plugin_name = "unet-frame"
    plugin_version = "0.1.0"
    config_class = UNetFrameConfig

    @classmethod
    def example_config(cls) -> UNetFrameConfig:
        return UNetFrameConfig(channels=8, multipliers=(1, 2), groups=4)

    def __init__(self, config: UNetFrameConfig, frame: FrameSpec, cond: CondSpec):
        super().__init__(config, frame, cond)
        levels = len(config.multipliers)
        if cond.tokens != frame.tokens:
            raise ValueError(f"unet-frame places one conditioning token per patch, but the encoder emits {cond.tokens} "
                             f"tokens per frame and the frame has {frame.tokens}")
        if frame.patch_size % 2 ** (levels - 1):
            raise ValueError(f"{levels} levels halve the frame {levels - 1} times, which needs a patch size divisible "
                             f"by {2 ** (levels - 1)}; the patch size is {frame.patch_size}: use fewer multipliers")
        widths = [config.channels * m for m in config.multipliers]
        emb = widths[-1]
        self.time = TimestepEmbedding(emb)
        if config.classes:
            self.label = LabelEmbedding(config.classes, emb)
        self.stem = nn.Conv2d(frame.channels, widths[0], 3, padding=1)
        # per level: the conditioning tokens -> that level's pixels under each token (depth-to-space)
        self.cond_maps = nn.ModuleList(nn.Linear(cond.dim, w * (frame.patch_size >> i) ** 2) for i, w in enumerate(widths))
        self.down = nn.ModuleList(ResBlock(widths[max(i - 1, 0)], w, config.groups) for i, w in enumerate(widths))
        self.downsample = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.middle = ResBlock(widths[-1], widths[-1], config.groups)
        self.up = nn.ModuleList(ResBlock(2 * w, w, config.groups) for w in widths)
        self.upsample = nn.ModuleList(nn.Conv2d(widths[i + 1], w, 3, padding=1) for i, w in enumerate(widths[:-1]))
        self.out_norm = nn.GroupNorm(config.groups, widths[0])
        self.out = nn.Conv2d(widths[0], frame.channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # the FiLM of every block from the time embedding, in block order: down, middle, up
        blocks = [*self.down, self.middle, *self.up]
        self.film = nn.ModuleList(nn.Linear(emb, 2 * block.norm2.num_channels) for block in blocks)
        for film in self.film:
            nn.init.zeros_(film.weight)
            nn.init.zeros_(film.bias)

    @property
    def accepts(self) -> ConditioningSpec:
        return ConditioningSpec(classes=self.config.classes)

    # forward(x_t, t, cond) == denoise(x_t, condition(cond), time_terms(t)) (see StagedDecoder)

    def time_terms(self, t: Tensor, conditioning: Conditioning | None = None) -> list[tuple[Tensor, Tensor]]:
        """(scale, shift) [b C 1 1] of every block, in order, for times t [b] (and labels [b])."""
        c = self.time(t)
        if self.config.classes:
            if conditioning is None or conditioning.labels is None:
                raise ValueError(f"{self.plugin_name} is class-conditioned: give conditioning.labels [b]")
            c = c + self.label(conditioning.labels)
        c = F.silu(c)
        return [tuple(film(c)[:, :, None, None].chunk(2, dim=1)) for film in self.film]

    def condition(self, cond: Tensor) -> list[Tensor]:
        """Encoder tokens [b n d_c] -> one feature map [b C_i h_i w_i] per level."""
        rows, cols = self.frame.grid
        maps = []
        for i, project in enumerate(self.cond_maps):
            s = self.frame.patch_size >> i
            maps.append(rearrange(project(cond), "b (r q) (c s1 s2) -> b c (r s1) (q s2)", r=rows, q=cols, s1=s, s2=s))
        return maps

    def denoise(self, x_t: Tensor, cond: list[Tensor], time_terms: list[tuple[Tensor, Tensor]]) -> Tensor:
        rows, _ = self.frame.grid
        s = self.frame.patch_size
        x = rearrange(x_t, "b (r q) (c s1 s2) -> b c (r s1) (q s2)", r=rows, s1=s, s2=s)
        films = iter(time_terms)
        h, skips = self.stem(x), []
        for i, block in enumerate(self.down):
            h = block(h, next(films), cond[i])
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.middle(h, next(films), cond[-1])
        up_films = [next(films) for _ in self.up]
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], dim=1), up_films[i], cond[i])
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.out(F.silu(self.out_norm(h)))
        return rearrange(h, "b c (r s1) (q s2) -> b (r q) (c s1 s2)", s1=s, s2=s)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, conditioning: Conditioning | None = None) -> Tensor:
        return self.denoise(x_t, self.condition(cond), self.time_terms(t, conditioning))


@hookimpl
def scdkit_register_decoders(register):
    register(UNetFrameDecoder)
