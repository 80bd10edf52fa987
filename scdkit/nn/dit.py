"""DiT building blocks: adaLN-Zero transformer block with QK-RMSNorm and RoPE, timestep
embedding, and the final adaLN output layer. Shared by every encoder, decoder and baseline.

Axis legend: b batch · L sequence · d width · h heads · e head width.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from scdkit.nn.attention import AttentionFn, sdpa_attention
from scdkit.nn.cache import KVCache
from scdkit.nn.rope import apply_rope


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t·1000 followed by a two-layer MLP."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, both modulated and gated by a conditioning vector (adaLN-Zero).

    ``cond`` is [b d] (one vector per sequence) or [b L d] (one per token).
    ``cache``, when given, receives this call's keys/values and attention runs over all of it.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.attend: AttentionFn = sdpa_attention  # replaced by set_attention_backend

    def modulation(self, cond: Tensor) -> tuple[Tensor, ...]:
        mod = self.ada(nn.functional.silu(cond))
        if mod.dim() == 2:
            mod = mod[:, None]
        return mod.chunk(6, dim=-1)

    def qkv_heads(self, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x), "b L (three h e) -> three b h L e", three=3, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: Tensor, cond: Tensor, rope: Tensor | None = None, mask: Tensor | None = None,
                cache: KVCache | None = None, modulation: tuple[Tensor, ...] | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation if modulation is not None else self.modulation(cond)
        q, k, v = self.qkv_heads(modulate(self.norm1(x), shift1, scale1), rope)
        if cache is not None:
            k, v = cache.update(k, v)
        out = rearrange(self.attend(q, k, v, mask), "b h L e -> b L (h e)")
        x = x + gate1 * self.proj(out)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, optionally followed by a zero-initialised projection."""

    def __init__(self, width: int, out_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(width, 2 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.out = nn.Linear(width, out_dim) if out_dim is not None else None
        if self.out is not None:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        mod = self.ada(nn.functional.silu(cond))
        if mod.dim() == 2:
            mod = mod[:, None]
        shift, scale = mod.chunk(2, dim=-1)
        x = modulate(self.norm(x), shift, scale)
        return self.out(x) if self.out is not None else x


def init_linear_weights(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear not explicitly zero-initialised."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.weight.abs().sum() > 0:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
