"""Attention backends behind one signature.

    attend(q, k, v, mask=None) -> out      q [b h nq e], k/v [b h nk e], mask bool [nq nk] (True = attend)

Axis legend: b batch · h heads · n / nq / nk tokens (queries, keys) · e head width.

Backends are registered through the ``scdkit_register_attention_backends`` hook; the
built-in ones are below. The backend is a runtime choice (registry, CLI flag, or the
SCDKIT_ATTENTION environment variable), never stored in a checkpoint; choosing one by
name (and ``auto``) lives in ``scdkit.backends``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from scdkit.errors import install_hint as extra_install_hint
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


def import_flash_attn_func() -> tuple[Callable | None, str | None]:
    """``flash_attn.flash_attn_func`` or why it cannot be had.

    Imported lazily and guarded against any exception: flash-attn is often installed yet
    unimportable (built against another torch or CUDA, missing shared libraries).
    """
    try:
        from flash_attn import flash_attn_func
    except ModuleNotFoundError as exc:
        if exc.name == "flash_attn":
            return None, "flash-attn is not installed"
        return None, f"flash-attn is installed but failed to import: {type(exc).__name__}: {exc}"
    except Exception as exc:
        return None, f"flash-attn is installed but failed to import: {type(exc).__name__}: {exc}"
    return flash_attn_func, None


def flash_unavailable(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Every reason flash-attn cannot run for this device/dtype, or None."""
    reasons = []
    _, import_problem = import_flash_attn_func()
    if import_problem:
        reasons.append(import_problem)
    if torch.device(device).type != "cuda":
        reasons.append(f"needs a CUDA device (got {torch.device(device).type})")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"needs fp16 or bf16 (got {str(dtype).removeprefix('torch.')})")
    return "; ".join(reasons) or None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """flash-attn for unmasked attention; any mask falls back to SDPA.

    flash-attn's only mask is its ``causal`` flag, which is causal per *token*; the
    block-causal mask (full within a frame) is not expressible with it, so a masked call
    (training, prefill of several frames) runs SDPA, which on CUDA picks its own fused
    masked kernel. The unmasked calls — one new frame against the KV cache in streaming
    generation, and every call of the frame decoder — run flash-attn.
    """
    if mask is not None:
        return sdpa_attention(q, k, v, mask)
    flash_attn_func, problem = import_flash_attn_func()
    if flash_attn_func is None:
        raise RuntimeError(f"flash attention backend: {problem}")
    out = flash_attn_func(*(rearrange(t, "b h n e -> b n h e") for t in (q, k, v)))
    return rearrange(out, "b n h e -> b h n e")


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
    AttentionBackend("flash", flash_attention, flash_unavailable, install_hint=extra_install_hint("flash")),
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
