"""Preallocated key/value cache for the incremental (streaming) attention path.

Growing a cache with ``torch.cat`` at every call copies the whole past each time; writing
into preallocated slots keeps a decoding step's cost independent of those copies.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(reference: Tensor) -> torch.dtype:
    """The dtype activations have next to ``reference`` (a parameter): the autocast dtype when autocast
    is on for its device, else its own. Caches allocated in it take keys/values without a cast."""
    device = reference.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else reference.dtype


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


class RollingKVCache:
    """Fixed-capacity keys/values for a rolling attention window: ``sinks`` pinned frames plus a ring
    of the ``window`` most recent other frames. Memory and per-call cost stay constant however long
    the stream runs.

    Slots [b h (sinks + window)·n e]: the first sinks·n hold the first ``sinks`` frames of the stream
    and are never evicted; the rest is a ring in which a new frame overwrites the oldest non-sink
    frame once it is full. The ring is never reordered: attention of new queries over the whole
    cache needs no mask and does not depend on slot order (keys carry their positions, e.g. RoPE),
    so ``keys``/``values`` are views of the filled slots and ``frame_ids`` says which frame each slot
    holds. Every batch item has its own rows; nothing mixes them.

    The sink slots that attention reads can be re-derived from the keys as first written
    (``present_sinks``), e.g. to re-rotate them to a new relative position; ``pinned_keys`` keeps
    those originals.
    """

    def __init__(self, batch: int, heads: int, tokens: int, sinks: int, window: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None):
        if sinks < 0 or window < 0 or sinks + window < 1:
            raise ValueError(f"need sinks >= 0, window >= 0 and at least one frame slot (got {sinks}, {window})")
        self.tokens, self.sinks, self.window = tokens, sinks, window
        slots = (sinks + window) * tokens
        self.keys_buffer = torch.empty(batch, heads, slots, head_dim, dtype=dtype, device=device)
        self.values_buffer = torch.empty_like(self.keys_buffer)
        self.pinned_keys = self.keys_buffer[:, :, : sinks * tokens].clone()
        self.slot_frame = [-1] * (sinks + window)  # frame held by each frame slot, -1 while empty
        self.frames = 0  # frames appended so far

    @property
    def filled_tokens(self) -> int:
        """Token slots holding a frame; they are always a prefix of the buffer."""
        return min(self.frames, self.sinks + self.window) * self.tokens

    @property
    def keys(self) -> Tensor:
        return self.keys_buffer[:, :, : self.filled_tokens]

    @property
    def values(self) -> Tensor:
        return self.values_buffer[:, :, : self.filled_tokens]

    @property
    def frame_ids(self) -> list[int]:
        """The stream index of the frame in each filled frame slot (sinks first, then the ring)."""
        return self.slot_frame[: self.filled_tokens // self.tokens]

    def append(self, k: Tensor, v: Tensor) -> None:
        """Add whole frames: k/v [b h (frames·n) e]. A frame past the sinks evicts the oldest ring frame."""
        if k.shape[2] % self.tokens:
            raise ValueError(f"{k.shape[2]} tokens is not a whole number of {self.tokens}-token frames")
        for start in range(0, k.shape[2], self.tokens):
            if self.frames < self.sinks:
                slot = self.frames
            elif self.window:
                slot = self.sinks + (self.frames - self.sinks) % self.window
            else:
                raise ValueError(f"cache holds only its {self.sinks} sink frames and has no window to append to")
            where = slice(slot * self.tokens, (slot + 1) * self.tokens)
            self.keys_buffer[:, :, where] = k[:, :, start:start + self.tokens]
            self.values_buffer[:, :, where] = v[:, :, start:start + self.tokens]
            if slot < self.sinks:
                self.pinned_keys[:, :, where] = k[:, :, start:start + self.tokens]
            self.slot_frame[slot] = self.frames
            self.frames += 1

    def present_sinks(self, transform) -> None:
        """Make attention read ``transform(pinned sink keys)`` in the sink slots; the pinned keys are kept."""
        filled = min(self.frames, self.sinks) * self.tokens
        self.keys_buffer[:, :, :filled] = transform(self.pinned_keys[:, :, :filled])

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``DiTBlock``'s cache protocol: append this call's frames and return what attention runs over.

        Queries of several frames in one call would miss the frames their own call evicts: once the
        ring is full, stream one frame per call.
        """
        self.append(k, v)
        return self.keys, self.values

    def nbytes(self) -> int:
        return self.keys_buffer.nbytes + self.values_buffer.nbytes + self.pinned_keys.nbytes
