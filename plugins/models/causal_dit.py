"""`causal-dit`: the monolithic causal-DiT baseline that SCD is compared against.

Every layer attends causally across frames at every denoising step. It is built from the
same DiT blocks as the SCD encoder and decoder (adaLN-Zero, QK-norm, 3-axis RoPE), so speed
and quality comparisons measure the architecture, not the implementation.

Training is teacher forcing with a clean copy of the clip, one sequence [clean ; noisy]:

    clean frame i sees clean frames <= i     (like the SCD encoder)
    noisy frame i sees clean frames <  i  and itself

Clean tokens are modulated by a learned constant (the fixed "clean" time, as in the SCD
encoder); noisy tokens by the embedding of their own frame's time. The clean and noisy
copies of frame i share RoPE frame position i.

Streaming: ``observe`` runs clean frames through every layer once and commits their keys
and values to a preallocated KV cache per layer. ``predict`` reads that cache at every
denoising step; the noisy frame's own keys/values go to a scratch slot just past the
committed context (the cache length never changes, nothing is concatenated), and the next
``observe`` overwrites that slot with the clean frame.
"""

from __future__ import annotations

import torch
from einops import rearrange
from pydantic import PositiveInt
from torch import Tensor, nn

from scdkit.hookspecs import hookimpl
from scdkit.interfaces import EncoderState, FrameSpec, VideoModel
from scdkit.nn.attention import block_causal_mask
from scdkit.nn.cache import KVCache, compute_dtype
from scdkit.nn.dit import DiTBlock, DiTConfig, FinalLayer, TimestepEmbedding, init_linear_weights
from scdkit.nn.rope import rope_table

# Axis legend: b batch · f frames · n tokens per frame · p patch values · d width · L sequence.


class CausalDiTConfig(DiTConfig):
    layers: PositiveInt = 6


def teacher_forcing_mask(frames: int, tokens: int, device: torch.device | None = None) -> Tensor:
    """Bool mask [2·f·n, 2·f·n] over the sequence [clean frames ; noisy frames] (True = attend)."""
    frame = torch.arange(frames, device=device).repeat_interleave(tokens)
    q, k = frame[:, None], frame[None, :]
    clean_rows = torch.cat([k <= q, torch.zeros_like(k == q)], dim=1)  # clean never sees noisy
    noisy_rows = torch.cat([k < q, k == q], dim=1)
    return torch.cat([clean_rows, noisy_rows], dim=0)


class ScratchSlot:
    """Stands in for a KVCache inside ``DiTBlock``: the keys/values of the frame being denoised are
    written just past the committed context and attention runs over both, but the cache length is
    left alone, so the committed context is read-only across denoising steps."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cache
        end = c.length + k.shape[2]
        if end > c.capacity:
            raise ValueError(f"KV cache is full: predicting needs {end} slots, capacity {c.capacity}")
        c.keys[:, :, c.length:end] = k
        c.values[:, :, c.length:end] = v
        return c.keys[:, :, :end], c.values[:, :, :end]


class CausalDiTState(EncoderState):
    def __init__(self, caches: list[KVCache], rope: Tensor, max_frames: int):
        self.caches = caches
        self.scratch = [ScratchSlot(c) for c in caches]
        self.rope = rope  # [2, max_frames·n, e/2]: every position this stream can use, computed once
        self.max_frames = max_frames
        self.frames = 0


class CausalDiT(VideoModel):
    plugin_name = "causal-dit"
    plugin_version = "0.1.0"
    config_class = CausalDiTConfig

    @classmethod
    def example_config(cls) -> CausalDiTConfig:
        return CausalDiTConfig(width=32, layers=2, heads=2)

    def __init__(self, config: CausalDiTConfig, frame: FrameSpec):
        super().__init__(config, frame)
        width = config.width
        self.embed = nn.Linear(frame.patch_dim, width)
        self.time = TimestepEmbedding(width)
        self.clean = nn.Parameter(torch.zeros(width))  # adaLN conditioning of clean (context) tokens
        self.blocks = nn.ModuleList(DiTBlock(width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.final = FinalLayer(width, frame.patch_dim)
        init_linear_weights(self)
        nn.init.normal_(self.clean, std=0.02)

    @property
    def head_dim(self) -> int:
        return self.config.width // self.config.heads

    def rope(self, positions: Tensor) -> Tensor:
        return rope_table(positions, self.frame.grid, self.head_dim)

    # -- training: the whole clip at once ---------------------------------------------------------
    def forward(self, clean: Tensor, noisy: Tensor, t: Tensor) -> Tensor:
        """clean, noisy [b f n p], t [b f] -> prediction for every noisy frame [b f n p]."""
        if clean.shape != noisy.shape or t.shape != clean.shape[:2]:
            raise ValueError(f"expected clean and noisy [b f n p] and t [b f]; got {tuple(clean.shape)}, "
                             f"{tuple(noisy.shape)}, {tuple(t.shape)}")
        b, f, n, _ = clean.shape
        x = rearrange(self.embed(torch.cat([clean, noisy], dim=1)), "b f2 n d -> b (f2 n) d")
        time = rearrange(self.time(t.flatten()), "(b f) d -> b f d", b=b)
        cond = torch.cat([self.clean.expand(b, f, -1), time], dim=1)  # [b 2f d]: one vector per frame
        positions = torch.arange(f, device=clean.device)
        rope = self.rope(torch.cat([positions, positions]))
        mask = teacher_forcing_mask(f, n, device=clean.device)
        for block in self.blocks:
            # adaLN once per frame, then broadcast to its tokens (cheaper than per-token)
            modulation = tuple(m.repeat_interleave(n, dim=1) for m in block.modulation(cond))
            x = block(x, cond, rope, mask, modulation=modulation)
        out = self.final(x[:, f * n:], time.repeat_interleave(n, dim=1))
        return rearrange(out, "b (f n) p -> b f n p", n=n)

    # -- streaming ----------------------------------------------------------------------------------
    def new_state(self, batch: int, max_frames: int) -> CausalDiTState:
        p, n = self.clean, self.frame.tokens
        caches = [KVCache(batch, self.config.heads, max_frames * n, self.head_dim, compute_dtype(p), p.device)
                  for _ in self.blocks]
        return CausalDiTState(caches, self.rope(torch.arange(max_frames, device=p.device)), max_frames)

    def observe(self, state: CausalDiTState, patches: Tensor) -> None:
        """Clean frames [b k n p] enter the context: one pass through every layer, keys/values committed."""
        b, k, n, _ = patches.shape
        x = rearrange(self.embed(patches), "b f n d -> b (f n) d")
        cond = self.clean.expand(b, -1)
        rope = state.rope[:, state.frames * n:(state.frames + k) * n]
        mask = None
        if k > 1:  # a single frame sees everything cached plus itself: no mask needed
            mask = block_causal_mask(k, state.frames + k, n, q_offset=state.frames, device=patches.device)
        for block, cache in zip(self.blocks, state.caches):
            x = block(x, cond, rope, mask, cache=cache)
        state.frames += k

    def predict(self, state: CausalDiTState, x_t: Tensor, t: Tensor) -> Tensor:
        """Prediction [b n p] for the frame after the context, at noise time t [b]."""
        if state.frames >= state.max_frames:
            raise ValueError(f"the stream holds {state.frames} frames, its capacity; predicting one more needs "
                             f"new_state(..., max_frames={state.frames + 1})")
        n = self.frame.tokens
        rope = state.rope[:, state.frames * n:(state.frames + 1) * n]
        x, cond = self.embed(x_t), self.time(t)
        for block, slot in zip(self.blocks, state.scratch):
            x = block(x, cond, rope, cache=slot)
        return self.final(x, cond)


@hookimpl
def scdkit_register_models(register):
    register(CausalDiT)
