"""Non-learned predictors a continuation is compared with: repeat the last context frame, and move it on at
constant velocity (a global integer shift estimated from the last two context frames).

Axis legend: b clips · f frames · c channels · H W pixels.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

MAX_SHIFT = 4  # pixels per frame, each way, that the velocity estimate searches


def repeat_last(context: Tensor, frames: int) -> Tensor:
    """[b f c H W] -> [b frames c H W]: the last context frame, ``frames`` times."""
    return context[:, -1:].expand(-1, frames, -1, -1, -1)


def shift(images: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Images [n c H W] moved by whole pixels, ``dy`` [n] down and ``dx`` [n] right; pixels that enter are 0."""
    n, c, h, w = images.shape
    rows = torch.arange(h, device=images.device) - dy[:, None]  # [n H] the source row of each row
    cols = torch.arange(w, device=images.device) - dx[:, None]  # [n W]
    moved = images.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w))
    moved = moved.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w))
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # [n H W]
    return moved.masked_fill(~inside[:, None], 0)


def estimate_shift(before: Tensor, after: Tensor, max_shift: int = MAX_SHIFT) -> tuple[Tensor, Tensor]:
    """The whole-pixel shift (dy [n], dx [n]), each within ±``max_shift``, that best moves ``before`` [n c H W]
    onto ``after``: the least mean squared error over the pixels that ``before`` still covers once moved. On a
    tie the smallest shift wins, so a blank frame gives (0, 0)."""
    n = before.shape[0]
    span = torch.arange(-max_shift, max_shift + 1, device=before.device)
    dy, dx = (grid.flatten() for grid in torch.meshgrid(span, span, indexing="ij"))  # every candidate, [s]
    order = (dy * dy + dx * dx).argsort(stable=True)  # smallest first: argmin keeps the first of equal errors
    dy, dx = dy[order], dx[order]
    covers = torch.ones_like(before[:, :1])  # [n 1 H W]
    errors = []  # one candidate at a time, every clip at once: memory stays that of a few frames
    for y, x in zip(dy.expand(n, -1).T, dx.expand(n, -1).T):  # [n] each: one candidate for every clip
        covered = shift(covers, y, x)
        squared = (shift(before, y, x) - after).pow(2) * covered
        errors.append(squared.mean(dim=1).sum(dim=(1, 2)) / covered.sum(dim=(1, 2, 3)))
    best = torch.stack(errors, dim=1).argmin(dim=1)  # [n]
    return dy[best], dx[best]


def constant_velocity(context: Tensor, frames: int, max_shift: int = MAX_SHIFT) -> Tensor:
    """[b f c H W] -> [b frames c H W]: generated frame k is the last context frame moved by k·(dy, dx), the
    shift ``estimate_shift`` finds from the second-last context frame to the last. One context frame has no
    velocity: that is repeat-last."""
    if context.shape[1] < 2:
        return repeat_last(context, frames)
    dy, dx = estimate_shift(context[:, -2], context[:, -1], max_shift)
    k = torch.arange(1, frames + 1, device=context.device)
    last = context[:, -1:].expand(-1, frames, -1, -1, -1)
    moved = shift(rearrange(last, "b f c h w -> (b f) c h w"), (dy[:, None] * k).flatten(), (dx[:, None] * k).flatten())
    return rearrange(moved, "(b f) c h w -> b f c h w", f=frames)


def constant_velocity_next(video: Tensor, max_shift: int = MAX_SHIFT) -> Tensor:
    """[b f c H W] -> [b f-1 c H W]: teacher-forced, each of frames 2..f predicted at constant velocity from the
    two true frames before it; frame 2 has one frame before it, so it is frame 1 repeated."""
    b, f = video.shape[:2]
    pairs = rearrange(torch.stack([video[:, :-2], video[:, 1:-1]], dim=2), "b f t c h w -> (b f) t c h w")
    following = rearrange(constant_velocity(pairs, 1, max_shift), "(b f) 1 c h w -> b f c h w", b=b, f=f - 2)
    return torch.cat([video[:, :1], following], dim=1)
