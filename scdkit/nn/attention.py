"""Attention backends behind one signature.

    attend(q, k, v, mask=None) -> out      q [b h nq e], k/v [b h nk e], mask bool [nq nk] (True = attend)

Backends are registered through the ``scdkit_register_attention_backends`` hook; the
built-in ones are below. The backend is a runtime choice (registry, CLI flag, or the
SCDKIT_ATTENTION environment variable), never stored in a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from scdkit.hookspecs import hookimpl

ENV_VAR = "SCDKIT_ATTENTION"


class AttentionFn(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor: ...


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reference implementation: the full score matrix, softmax, weighted sum."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None,
                      chunk_size: int = 256) -> Tensor:
    """Memory-bounded attention: keys in blocks of ``chunk_size`` with an online softmax.

    Peak extra memory is [b h nq chunk] instead of [b h nq nk], whatever the key length.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    running_max = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    normaliser = torch.zeros(q.shape[:-1], dtype=q.dtype, device=q.device)
    for start in range(0, k.shape[-2], chunk_size):
        stop = start + chunk_size
        scores = (q @ k[..., start:stop, :].transpose(-2, -1)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask[:, start:stop], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(dim=-1))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)  # rows fully masked so far
        weights = torch.exp(scores - safe_max[..., None])
        correction = torch.exp(running_max - safe_max)
        normaliser = normaliser * correction + weights.sum(dim=-1)
        out = out * correction[..., None] + weights @ v[..., start:stop, :]
        running_max = new_max
    return out / normaliser[..., None]


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention probabilities [b h nq nk]; used by probes, not by models."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def block_causal_mask(q_frames: int, k_frames: int, tokens: int, q_offset: int = 0,
                      device: torch.device | None = None) -> Tensor:
    """Bool mask [q_frames·n, k_frames·n]: full within a frame, backward across frames.

    Query frame i (global index ``q_offset + i``) sees key frames 0..q_offset+i.
    """
    q_frame = torch.arange(q_frames, device=device).repeat_interleave(tokens) + q_offset
    k_frame = torch.arange(k_frames, device=device).repeat_interleave(tokens)
    return k_frame[None, :] <= q_frame[:, None]



@dataclass(frozen=True)
class AttentionBackend:
    """A named attention implementation and what it needs to run."""

    name: str
    fn: AttentionFn
    #: Returns why the backend cannot run for this device/dtype, or None when it can.
    unavailable: Callable[[torch.device, torch.dtype], str | None] = lambda device, dtype: None
    install_hint: str = ""


BUILTIN_BACKENDS = (
    AttentionBackend("sdpa", sdpa_attention),
    AttentionBackend("eager", eager_attention),
    AttentionBackend("chunked", chunked_attention),
)


def set_attention_backend(module: torch.nn.Module, fn: AttentionFn) -> None:
    """Route every attention call inside ``module`` through ``fn`` (weights are untouched)."""
    for m in module.modules():
        if hasattr(m, "attend"):
            m.attend = fn


@hookimpl
def scdkit_register_attention_backends(register):
    for backend in BUILTIN_BACKENDS:
        register(backend)
