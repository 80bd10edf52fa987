"""DiT building blocks: adaLN-Zero transformer block with QK-RMSNorm and RoPE, timestep
embedding, and the final adaLN output layer. Shared by every encoder, decoder and baseline.

Axis legend: b batch · L sequence · d width · h heads · e head width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import PositiveFloat, PositiveInt, ValidationInfo, field_validator
from torch import Tensor, nn

from scdkit.interfaces import ComponentConfig
from scdkit.nn.attention import AttentionFn, sdpa_attention
from scdkit.nn.cache import KVCache
from scdkit.nn.rope import apply_rope, check_head_width


class DiTConfig(ComponentConfig):
    """The shape of a stack of DiT blocks, shared by the built-in encoder, decoder and baseline configs.
    The head width must suit 3-axis RoPE; checked on ``heads``, so ``scdkit validate`` names that key."""

    width: PositiveInt = 128
    heads: PositiveInt = 4
    mlp_ratio: PositiveFloat = 4.0

    @field_validator("heads")
    @classmethod
    def _head_width(cls, heads: int, info: ValidationInfo) -> int:
        if "width" in info.data:  # a bad width is reported on its own
            check_head_width(info.data["width"], heads)
        return heads


def zero_init(linear: nn.Linear) -> nn.Linear:
    """Zero weights and bias (adaLN-Zero: the block starts as the identity), kept by :func:`init_linear_weights`."""
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    linear.zero_init = True
    return linear


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x·(1 + scale) + shift, as one fused kernel over x."""
    return torch.addcmul(shift, x, 1 + scale)


_GELU_2C = 2 * math.sqrt(2 / math.pi)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation: ½x(1 + tanh u) = x·σ(2u), u = √(2/π)(x + 0.044715x³).

    Same function as ``F.gelu(x, approximate="tanh")`` to float rounding. Without autograd it
    runs as the sigmoid form, in place on one fresh buffer: torch's CPU tanh kernel is several
    times slower than its sigmoid, and this GELU sits in every block at every denoising step.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return F.gelu(x, approximate="tanh")
    u = x.square()
    u.mul_(_GELU_2C * 0.044715).add_(_GELU_2C).mul_(x)  # 2u
    return u.sigmoid_().mul_(x)


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last axis (``nn.RMSNorm`` without its weight)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t·1000 followed by a two-layer MLP."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]  # fp32 whatever the weights: t·1000 needs the bits
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


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
        self.ada = zero_init(nn.Linear(width, 6 * width))
        self.attend: AttentionFn = sdpa_attention  # replaced by set_attention_backend

    def modulation(self, cond: Tensor) -> tuple[Tensor, ...]:
        mod = self.ada(nn.functional.silu(cond))
        if mod.dim() == 2:
            mod = mod[:, None]
        return mod.chunk(6, dim=-1)

    def qkv_heads(self, x: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (RMS-normalised, rotated) and values [b h L e] of the modulated input x."""
        qkv = rearrange(self.qkv(x), "b L (three h e) -> three b h L e", three=3, h=self.heads)
        # q and k go through the norm and RoPE stacked, each with its own RMSNorm weight: one
        # pass instead of two, which counts when the sequence is one frame of a few dozen tokens
        weight = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None, None, None]
        qk = (rms_norm(qkv[:2], self.q_norm.eps) * weight).to(qkv.dtype)  # under autocast q, k, v share a dtype
        if rope is not None:
            qk = apply_rope(qk, rope)
        return qk[0], qk[1], qkv[2]

    def forward(self, x: Tensor, cond: Tensor | None, rope: Tensor | None = None, mask: Tensor | None = None,
                cache: KVCache | None = None, modulation: tuple[Tensor, ...] | None = None) -> Tensor:
        """``modulation`` (from :meth:`modulation`) replaces ``cond`` when the caller precomputed it."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation if modulation is not None else self.modulation(cond)
        q, k, v = self.qkv_heads(modulate(self.norm1(x), shift1, scale1), rope)
        if cache is not None:
            k, v = cache.update(k, v)
        out = rearrange(self.attend(q, k, v, mask), "b h L e -> b L (h e)")
        x = torch.addcmul(x, gate1, self.proj(out))
        # self.mlp is Linear-GELU-Linear (its indices are checkpoint keys); the GELU runs as gelu_tanh
        hidden = gelu_tanh(self.mlp[0](modulate(self.norm2(x), shift2, scale2)))
        return torch.addcmul(x, gate2, self.mlp[2](hidden))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, optionally followed by a zero-initialised projection."""

    def __init__(self, width: int, out_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = zero_init(nn.Linear(width, 2 * width))
        self.out = zero_init(nn.Linear(width, out_dim)) if out_dim is not None else None

    def modulation(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        mod = self.ada(nn.functional.silu(cond))
        if mod.dim() == 2:
            mod = mod[:, None]
        return mod.chunk(2, dim=-1)

    def forward(self, x: Tensor, cond: Tensor | None, modulation: tuple[Tensor, Tensor] | None = None) -> Tensor:
        shift, scale = modulation if modulation is not None else self.modulation(cond)
        x = modulate(self.norm(x), shift, scale)
        return self.out(x) if self.out is not None else x


class TimeTable:
    """Terms that depend on the denoising time alone (and on per-clip labels, fixed for a generation),
    computed for a whole sampling schedule at once: one batched matmul per layer instead of one per step.

    ``terms(t)`` maps times [len(times)·rows] (each time repeated ``rows`` times) to tensors with that
    leading axis, possibly nested in tuples and lists (e.g. the adaLN modulations of every block).
    ``table[t]`` for a scheduled time ``t`` (a float: no device sync) is its ``rows`` rows, which
    broadcast over the batch when ``rows`` is 1; ``table.get(t)`` is None for any other time.
    """

    def __init__(self, terms: Callable[[Tensor], Any], times: list[float], device: torch.device, rows: int = 1):
        batched = terms(torch.tensor(times, device=device).repeat_interleave(rows))
        self.by_time = {t: _rows(batched, i * rows, (i + 1) * rows) for i, t in enumerate(times)}

    def get(self, t: float) -> Any:
        return self.by_time.get(t)


def _rows(tree: Any, start: int, stop: int) -> Any:
    if isinstance(tree, Tensor):
        return tree[start:stop]
    return type(tree)(_rows(item, start, stop) for item in tree)


class LabelEmbedding(nn.Module):
    """A learned vector per class, plus one for "no label" (index ``classes``, the classifier-free
    guidance null label), added to the adaLN conditioning."""

    def __init__(self, classes: int, width: int):
        super().__init__()
        self.classes = classes
        self.table = nn.Embedding(classes + 1, width)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        return self.table(labels)


def init_linear_weights(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear not marked by :func:`zero_init`."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and not getattr(m, "zero_init", False):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
