"""Preallocated key/value cache for the incremental (streaming) attention path.

Growing a cache with ``torch.cat`` at every call copies the whole past each time; writing
into preallocated slots keeps a decoding step's cost independent of those copies.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values [b h capacity e] with a fill pointer; ``update`` appends and returns the filled part."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        self.keys = torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache is full: {end} tokens requested, capacity {self.capacity}")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
