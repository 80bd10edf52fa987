"""Work that plainly cannot fit in memory is refused before it starts, saying how much it needs.

The estimates are lower bounds on what a command must hold at once, from the sizes asked for alone: the
clips it makes (as a numpy array and as a tensor), the frames it generates, the noise and predictions of
a training step, the times of a sampling schedule, and for ``bench`` the baseline's key/value cache.
Weights and activations come on top, so a run that passes may still run out; the allocator's error is
then one line too (``scdkit.cli``).
"""

from __future__ import annotations

import os

import torch

from scdkit.errors import UsageError
from scdkit.interfaces import FrameSpec

FLOAT = 4  # bytes: clips, noise and schedules are float32


def clip_bytes(frame: FrameSpec, clips: int, frames: int) -> int:
    return FLOAT * clips * frames * frame.channels * frame.height * frame.width


def continuation_bytes(frame: FrameSpec, clips: int, context: int, frames: int, steps: int) -> int:
    """Held-out clips continued (generate, swap-eval, probe, encode): the clips twice, the generated frames,
    the schedule's times."""
    return 2 * clip_bytes(frame, clips, context + frames) + clip_bytes(frame, clips, frames) + FLOAT * (steps + 1)


def training_bytes(frame: FrameSpec, batch: int, frames: int, noise_draws: int) -> int:
    """One training step: the clips twice, then noise, noisy input and prediction per draw of each target frame."""
    return 2 * clip_bytes(frame, batch, frames) + 3 * noise_draws * clip_bytes(frame, batch, frames - 1)


def kv_cache_bytes(layers: int, frames: int, tokens: int, width: int) -> int:
    """Keys and values of ``frames`` frames in every layer of a causal transformer (batch 1)."""
    return 2 * FLOAT * layers * frames * tokens * width


def capacity(device: torch.device | str = "cpu") -> tuple[int, str] | None:
    """Total memory of ``device`` in bytes and its name, or None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1], f"{torch.cuda.get_device_name(device)}"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(needed: int, what: str, device: torch.device | str = "cpu", hint: str = "") -> None:
    """A one-line UsageError when ``needed`` bytes exceed all the memory ``device`` has."""
    total = capacity(device)
    if total is not None and needed > total[0]:
        raise UsageError(f"{what} needs at least {size(needed)} of memory, more than the {size(total[0])} of "
                         f"{total[1]}{f': {hint}' if hint else ''}")


def size(n: int) -> str:
    """``n`` bytes for a reader: ``512 bytes``, ``3.7 TB``, ``about 10^40 bytes``."""
    if n >= 1024**6:
        return f"about 10^{len(str(int(n))) - 1} bytes"
    units = ("bytes", "KB", "MB", "GB", "TB", "PB")
    i = 0
    while n >= 1024:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"
