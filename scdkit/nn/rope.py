"""Rotary position embedding over three axes: frame, row, column.

The head dimension is split into three even parts (for head_dim 64: 16 / 24 / 24, as in
the paper's code); each axis rotates its part by its own integer position.
"""

from __future__ import annotations

import torch
from torch import Tensor


def split_head_dim(head_dim: int) -> tuple[int, int, int]:
    if head_dim % 8:
        raise ValueError(f"head dimension {head_dim} must be a multiple of 8 for 3-axis RoPE")
    frame = 2 * (head_dim // 8)
    spatial = (head_dim - frame) // 2
    return frame, spatial, spatial


def check_head_width(width: int, heads: int) -> None:
    """A ValueError unless ``width`` splits into ``heads`` heads that 3-axis RoPE can rotate: each of
    the head's three parts must hold whole pairs, i.e. a head width that is a multiple of 16."""
    head = width // heads
    if width % heads or head % 16:
        raise ValueError(f"width {width} / heads {heads} gives head width {width / heads:g}; 3-axis RoPE needs "
                         "a whole multiple of 16 (e.g. 16, 32, 64)")


def _angle_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _axis_angles(positions: Tensor, dim: int, theta: float) -> Tensor:
    dtype = _angle_dtype(positions.device)
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=dtype, device=positions.device) / dim)
    return positions.to(dtype)[:, None] * inv_freq[None, :]


def rope_angles(frames: Tensor, grid: tuple[int, int], head_dim: int, theta: float = 10000.0) -> Tensor:
    """Angles [len(frames)·rows·cols, head_dim/2] for every token of the given frame positions,
    on the device of ``frames``."""
    rows, cols = grid
    f_dim, r_dim, c_dim = split_head_dim(head_dim)
    f_pos = frames.repeat_interleave(rows * cols)
    r_pos = torch.arange(rows, device=frames.device).repeat_interleave(cols).repeat(len(frames))
    c_pos = torch.arange(cols, device=frames.device).repeat(rows * len(frames))
    return torch.cat(
        [_axis_angles(f_pos, f_dim, theta), _axis_angles(r_pos, r_dim, theta), _axis_angles(c_pos, c_dim, theta)],
        dim=-1,
    )


def rope_table(frames: Tensor, grid: tuple[int, int], head_dim: int, dtype=torch.float32) -> Tensor:
    """cos and sin stacked: [2, tokens, head_dim/2], ready for :func:`apply_rope`."""
    angles = rope_angles(frames, grid, head_dim)
    return torch.stack([angles.cos(), angles.sin()]).to(dtype)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate x [b h L e] by a table [2, L, e/2] (rotate-half convention); the result keeps x's dtype
    (under autocast the table stays float32 and x may be bf16/fp16)."""
    cos, sin = table[0], table[1]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
