"""Bounded key/value memory: recent frames at full resolution, older frames pooled, the oldest forgotten.

The policy, identical in every layer, for a query in frame i and a key frame j (lag = i - j):

    0 <= lag < recent                      all n tokens of frame j              (short-term memory)
    recent <= lag < recent + compressed    m = n / pool² tokens of frame j      (long-term memory, FAR-style)
    otherwise                              nothing (lag < 0 is the future; larger lags are forgotten)

A compressed token is the mean of a pool x pool patch of frame j's keys (and values) of that
layer, taken *after* RoPE: by linearity its score is exactly the mean of the scores of the
tokens it replaces, and no parameter is added, so the weights of a full-context encoder fit.

Two implementations of the one policy, which must agree:

- :class:`StreamingMemory` (generation): fixed buffers [recent·n | compressed·m] per layer, one
  frame per ``update``. Memory and per-frame cost stop growing once the buffers are full.
- :class:`ClipMemory` (training): a whole clip in query groups of consecutive frames, each group
  attending to its window of keys under :meth:`MemoryPolicy.group_mask`. Nothing is written in
  place, so autograd sees every step, and the attention of a group never spans the whole clip.

Both are duck-compatible with :class:`scdkit.nn.cache.KVCache`: ``update(k, v)`` receives this
call's post-RoPE keys/values and returns the keys/values to attend to, so
:class:`scdkit.nn.dit.DiTBlock` runs them unchanged.

Axis legend: b batch · h heads · f frames · n tokens per frame · m pooled tokens per frame ·
e head width · r / c grid rows / columns after pooling · p / q pool offsets within a patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import reduce
from torch import Tensor


@dataclass(frozen=True)
class MemoryPolicy:
    """Which past frames a frame attends to, and at which resolution."""

    recent: int  # frames kept at full resolution, the query's own frame included
    compressed: int  # older frames kept pooled
    grid: tuple[int, int]  # token grid of a frame (rows, columns)
    pool: int  # pool x pool tokens become one

    def __post_init__(self) -> None:
        if self.recent < 1 or self.compressed < 0:
            raise ValueError(f"recent must be >= 1 and compressed >= 0, got {self.recent} and {self.compressed}")
        rows, cols = self.grid
        if self.pool < 1 or rows % self.pool or cols % self.pool:
            raise ValueError(f"pool {self.pool} does not divide the {rows}x{cols} token grid; "
                             f"choose a pool that divides both")

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def pooled_tokens(self) -> int:
        return self.tokens // self.pool**2

    @property
    def capacity(self) -> int:
        """Key/value tokens held per layer once the memory is full: the bound on memory and cost."""
        return self.recent * self.tokens + self.compressed * self.pooled_tokens

    def compress(self, x: Tensor) -> Tensor:
        """Average-pool whole frames of tokens: [b h (f n) e] -> [b h (f m) e]."""
        rows, cols = self.grid
        return reduce(x, "b h (f r p c q) e -> b h (f r c) e", "mean",
                      r=rows // self.pool, p=self.pool, c=cols // self.pool, q=self.pool)

    def window(self, start: int, stop: int) -> tuple[range, range]:
        """Key frames a query group [start, stop) needs: (full-resolution frames, pooled frames)."""
        full = range(max(0, start - self.recent + 1), stop)
        pooled_start = max(0, start - self.recent - self.compressed + 1)
        pooled_stop = max(pooled_start, stop - self.recent) if self.compressed else pooled_start
        return full, range(pooled_start, pooled_stop)

    def group_mask(self, start: int, stop: int, device: torch.device | None = None) -> Tensor:
        """Bool mask [(stop-start)·n, keys] over the keys that :meth:`window` lists, full then pooled."""
        full, pooled = self.window(start, stop)
        query = torch.arange(start, stop, device=device).repeat_interleave(self.tokens)[:, None]
        lag_full = query - torch.arange(full.start, full.stop, device=device).repeat_interleave(self.tokens)
        lag_pooled = query - torch.arange(pooled.start, pooled.stop, device=device).repeat_interleave(self.pooled_tokens)
        return torch.cat([(lag_full >= 0) & (lag_full < self.recent),
                          (lag_pooled >= self.recent) & (lag_pooled < self.recent + self.compressed)], dim=1)

    def groups(self, frames: int, size: int | None = None) -> list[tuple[int, int]]:
        """Consecutive query groups covering [0, frames); ``recent`` frames each by default, which keeps
        the masked-out share of a group's window small while needing few attention calls."""
        size = size or self.recent
        return [(start, min(start + size, frames)) for start in range(0, frames, size)]


class ClipMemory:
    """One layer's memory over a whole clip, fed query groups in order (the training path).

    ``update`` takes the group's keys/values [b h (g n) e] and returns its window (see
    :meth:`MemoryPolicy.window`); pair each call with :meth:`MemoryPolicy.group_mask` of the
    same group. Frames are kept as views, so the window is gathered without copying the clip.
    """

    def __init__(self, policy: MemoryPolicy):
        self.policy = policy
        self.full: list[tuple[Tensor, Tensor]] = []  # per frame: keys, values [b h n e]
        self.pooled: list[tuple[Tensor, Tensor]] = []  # per frame: keys, values [b h m e]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n, start = self.policy.tokens, len(self.full)
        k_pooled, v_pooled = self.policy.compress(k), self.policy.compress(v)
        m = self.policy.pooled_tokens
        self.full += zip(k.split(n, dim=2), v.split(n, dim=2))
        self.pooled += zip(k_pooled.split(m, dim=2), v_pooled.split(m, dim=2))
        full, pooled = self.policy.window(start, len(self.full))
        chosen = [self.full[j] for j in full] + [self.pooled[j] for j in pooled]
        return torch.cat([key for key, _ in chosen], dim=2), torch.cat([value for _, value in chosen], dim=2)


class StreamingMemory:
    """One layer's fixed-capacity memory for streaming, one frame per ``update`` (the generation path).

    Layout of the buffers [b h capacity e]: ``recent`` full-resolution slots, then ``compressed``
    pooled slots, both rings indexed by frame number. When frame i arrives, frame i - recent leaves
    its full slot: it is pooled into the compressed ring, overwriting frame i - recent - compressed.
    The filled part is always a prefix of the buffers, so attention reads a view, never a copy.
    """

    def __init__(self, policy: MemoryPolicy, batch: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        self.policy = policy
        self.keys = torch.empty(batch, heads, policy.capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.frames = 0

    @property
    def length(self) -> int:
        """Tokens currently held (the filled prefix)."""
        p, f = self.policy, self.frames
        return min(f, p.recent) * p.tokens + min(max(f - p.recent, 0), p.compressed) * p.pooled_tokens

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        p, n, m = self.policy, self.policy.tokens, self.policy.pooled_tokens
        if k.shape[2] != n:
            raise ValueError(f"StreamingMemory takes one frame ({n} tokens) per update, got {k.shape[2]} tokens")
        slot = slice((self.frames % p.recent) * n, (self.frames % p.recent + 1) * n)
        if self.frames >= p.recent and p.compressed:  # the frame leaving the recent window is compressed
            ring = (self.frames - p.recent) % p.compressed
            pooled = slice(p.recent * n + ring * m, p.recent * n + (ring + 1) * m)
            self.keys[:, :, pooled] = p.compress(self.keys[:, :, slot])
            self.values[:, :, pooled] = p.compress(self.values[:, :, slot])
        self.keys[:, :, slot] = k
        self.values[:, :, slot] = v
        self.frames += 1
        end = self.length
        return self.keys[:, :, :end], self.values[:, :, :end]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
