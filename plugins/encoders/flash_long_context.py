"""`flash-long-context`: the reference encoder with a rolling attention window, for streams far
longer than training.

Frame t attends to the ``sinks`` first frames of the stream (pinned "attention sinks") and to the
``window`` most recent frames, itself included. Streaming keeps them in a fixed-capacity ring
buffer (:class:`~scdkit.nn.cache.RollingKVCache`), so per-frame cost and memory are constant.
The weights are exactly ``causal-transformer``'s (same modules, same ``weight_family``): a
checkpoint trained with it loads here unchanged, and with ``window`` >= the whole context the
outputs are the same.

Positions. RoPE enters attention only through q·k, which depends on the *difference* of the
query's and the key's frame positions. Attention sees sinks at 0..S-1 and window frames at
S..S+W-1 relative to the current frame at S+W-1, so no distance ever exceeds S+W-1, however long
the stream. Until the window is full these are the absolute frame indices, which is why the
encoder equals ``causal-transformer`` then. Afterwards, by the shift ``t + 1 - S - W`` of frame
t: queries and window keys keep their absolute rotation (a constant shift of every window
position changes no q·k, so cached keys are never rewritten), and only the S sink frames are
re-rotated by the shift (RoPE rotations compose; the shift touches only the frame axis).

Paths. ``step`` streams one frame at a time over the ring buffer, unmasked. ``forward`` (the whole
clip, training) gives the same result in one pass: a banded block-causal mask plus, for every
frame past the point where the window fills, a copy of the sink keys rotated by that frame's
shift. On CUDA with the ``flash`` attention backend, streaming uses flash-attn's KV-cache kernel
on the ring buffer; elsewhere the blocks' attention backend (sdpa, eager, chunked).

Axis legend: b batch · f frames · n tokens per frame · p patch values · h heads · e head width ·
c sink copies · L keys.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from einops import rearrange
from pydantic import NonNegativeInt, PositiveInt
from torch import Tensor

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import Conditioning, EncoderState
from scdkit.nn import attention
from scdkit.nn.cache import RollingKVCache, compute_dtype
from scdkit.nn.rope import apply_rope, rope_table
from scdkit.plugins.encoders.causal_transformer import CausalTransformerConfig, CausalTransformerEncoder


class FlashLongContextConfig(CausalTransformerConfig):
    window: PositiveInt = 16
    sinks: NonNegativeInt = 1


def rolling_mask(frames: int, tokens: int, sinks: int, window: int, device: torch.device | None = None) -> Tensor:
    """Bool mask [f·n, (f + c·sinks)·n] over the clip's keys followed by ``c`` re-rotated sink copies.

    Query frame t sees every earlier frame until the window is full (shift 0); after that, the last
    ``window`` frames and the sink copy made for its shift (copy i is shift i + 1).
    """
    t = torch.arange(frames, device=device)[:, None]
    i = torch.arange(frames, device=device)[None, :]
    shift = (t + 1 - sinks - window).clamp_min(0)
    clip = (i <= t) & ((t - i < window) | (shift == 0))
    copies = max(0, frames - sinks - window) if sinks else 0
    copy = torch.arange(copies, device=device).repeat_interleave(sinks)[None, :]
    frame_mask = torch.cat([clip, shift == copy + 1], dim=1)
    return frame_mask.repeat_interleave(tokens, dim=0).repeat_interleave(tokens, dim=1)


class SinkCopies:
    """The blocks' key/value source in ``forward``: the clip's keys plus one copy of the sink keys per
    shift (sinks re-rotated to stay at 0..S-1 relative to the window), in ``rolling_mask``'s order."""

    def __init__(self, sink_tokens: int, rotations: Tensor):
        self.sink_tokens, self.rotations = sink_tokens, rotations  # rotations [2 c 1 e/2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        copies = self.rotations.shape[1]
        sink_k = apply_rope(k[:, :, None, : self.sink_tokens], self.rotations).to(k.dtype)
        sink_v = v[:, :, None, : self.sink_tokens].expand(-1, -1, copies, -1, -1)
        return (torch.cat([k, rearrange(sink_k, "b h c L e -> b h (c L) e")], dim=2),
                torch.cat([v, rearrange(sink_v, "b h c L e -> b h (c L) e")], dim=2))


class StreamStep:
    """The blocks' key/value source for one streamed frame: append it to the ring buffer, present the
    sinks at the frame's shift, attend over the whole buffer."""

    def __init__(self, cache: RollingKVCache, sink_rotation: Tensor | None):
        self.cache, self.sink_rotation = cache, sink_rotation

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.cache.append(k, v)
        if self.sink_rotation is not None:
            self.cache.present_sinks(lambda keys: apply_rope(keys, self.sink_rotation).to(keys.dtype))
        return self.cache.keys, self.cache.values


class RollingState(EncoderState):
    def __init__(self, caches: list[RollingKVCache], max_frames: int):
        self.caches = caches
        self.max_frames = max_frames
        self.frames = 0


def import_kvcache_kernel():
    """``flash_attn.flash_attn_with_kvcache``, or None; imported lazily and guarded like the ``flash``
    backend (flash-attn can be installed yet fail to import)."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    return flash_attn_with_kvcache


def kvcache_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """The attention signature over flash-attn's KV-cache kernel; k/v are the cache's filled slots, read
    in place ([b h L e] with contiguous e is flash-attn's [b L h e] layout up to a free transpose)."""
    if mask is not None:
        raise ValueError("the KV-cache kernel runs one unmasked frame against the cache")
    out = import_kvcache_kernel()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class FlashLongContextEncoder(CausalTransformerEncoder):
    plugin_name = "flash-long-context"
    plugin_version = "0.1.0"
    config_class = FlashLongContextConfig
    weight_family = "causal-transformer"  # the parameters are exactly causal-transformer's

    @classmethod
    def example_config(cls) -> FlashLongContextConfig:
        # window 2 + 1 sink: the kit's 6-frame clips evict frames and re-rotate the sink
        return FlashLongContextConfig(width=32, layers=2, heads=2, window=2, sinks=1)

    def shift(self, frame: int) -> int:
        """How far frame ``frame``'s window has moved past the absolute positions (0 until it is full)."""
        return max(0, frame + 1 - self.config.sinks - self.config.window)

    def sink_rotation(self, shifts: Tensor) -> Tensor:
        """RoPE table [2 len(shifts) e/2] that moves a frame by ``shifts`` along the frame axis only
        (a one-token grid has row and column 0, whose rotations are the identity)."""
        return rope_table(shifts, (1, 1), self.head_dim)

    def forward(self, patches: Tensor, conditioning: Conditioning | None = None) -> Tensor:
        frames, tokens = patches.shape[1], patches.shape[2]
        sinks, window = self.config.sinks, self.config.window
        mask = rolling_mask(frames, tokens, sinks, window, device=patches.device)
        copies = frames - sinks - window if sinks else 0
        if copies <= 0:
            return self.run_blocks(patches, 0, mask, conditioning=conditioning)
        rotations = self.sink_rotation(torch.arange(1, copies + 1, device=patches.device))[:, :, None]
        return self.run_blocks(patches, 0, mask, [SinkCopies(sinks * tokens, rotations)] * len(self.blocks),
                               conditioning)

    def new_state(self, batch: int, max_frames: int) -> RollingState:
        p, sinks = self.clean, self.config.sinks
        # a stream shorter than sinks + window never needs the whole ring
        window = min(self.config.window, max(0, max_frames - sinks))
        caches = [RollingKVCache(batch, self.config.heads, self.frame.tokens, min(sinks, max_frames), window,
                                 self.head_dim, compute_dtype(p), p.device) for _ in self.blocks]
        return RollingState(caches, max_frames)

    def step(self, state: RollingState, patches: Tensor,
             conditioning: Conditioning | None = None) -> tuple[Tensor, RollingState]:
        frames = patches.shape[1]
        short_ring = state.caches[0].window < self.config.window
        if short_ring and state.frames + frames > state.max_frames:
            raise ValueError(f"stream of {state.frames + frames} frames is longer than the {state.max_frames} "
                             "this state was made for")
        outputs = []
        with self.attention_for_streaming():
            for f in range(frames):  # one frame at a time: each has its own shift and evicts one frame
                shift = self.shift(state.frames)
                rotation = None
                if shift and self.config.sinks:
                    rotation = self.sink_rotation(torch.tensor([shift], device=patches.device))
                sources = [StreamStep(cache, rotation) for cache in state.caches]
                frame_conditioning = None if conditioning is None else conditioning.frames(f, f + 1)
                outputs.append(self.run_blocks(patches[:, f:f + 1], state.frames, None, sources, frame_conditioning))
                state.frames += 1
        return torch.cat(outputs, dim=1), state

    @contextmanager
    def attention_for_streaming(self):
        """Under the ``flash`` backend, route the blocks' (unmasked, single-frame) streaming attention
        through flash-attn's KV-cache kernel; any other backend is used as it is."""
        flash = getattr(attention, "flash_attention", None)
        previous = [block.attend for block in self.blocks]
        if flash is None or any(fn is not flash for fn in previous) or import_kvcache_kernel() is None:
            yield
            return
        try:
            for block in self.blocks:
                block.attend = kvcache_attention
            yield
        finally:
            for block, fn in zip(self.blocks, previous):
                block.attend = fn


@hookimpl
def scdkit_register_encoders(register):
    register(FlashLongContextEncoder)
