"""Seeded, deterministic synthetic videos; nothing is downloaded.

- ``moving-digits``: scikit-learn's bundled 8x8 digits, upscaled, moving at constant speed
  and bouncing off the frame edges (Moving-MNIST style), overlaid by max.
- ``bouncing-balls``: soft discs moving at constant speed, bouncing off the edges.

Videos are float32 [clips, frames, channels, height, width] in [0, 1]. Train and test clips
come from disjoint seed streams, so held-out clips are never seen in training. Each data set
declares what it provides (channels, square frames, conditioning), so ``scdkit validate`` can match
it against a pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from scdkit.errors import UsageError, did_you_mean
from scdkit.interfaces import Batch, ConditioningSpec, FrameSpec

SPLIT_SEED = {"train": 0, "test": 1_000_003}


@lru_cache(maxsize=4)
def _digit_sprites(size: int) -> np.ndarray:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no network

    images = load_digits().images.astype(np.float32) / 16.0  # [1797, 8, 8]
    t = torch.from_numpy(images)[:, None]
    sprites = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return sprites[:, 0].clamp(0, 1).numpy()


def _bounce(pos: float, vel: float, lo: float, hi: float) -> tuple[float, float]:
    pos += vel
    while not lo <= pos <= hi:  # a loop, since a fast object in a small frame can bounce twice
        pos, vel = (2 * lo - pos, -vel) if pos < lo else (2 * hi - pos, -vel)
    return pos, vel


def _trajectory(rng: np.random.Generator, frames: int, span: float, speed: tuple[float, float]) -> np.ndarray:
    """Positions [frames, 2] moving at constant speed inside [0, span], bouncing at the edges."""
    pos = rng.uniform(0, span, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    v = rng.uniform(*speed) * np.array([np.cos(angle), np.sin(angle)])
    out = np.empty((frames, 2))
    for f in range(frames):
        out[f] = pos
        for axis in range(2):
            pos[axis], v[axis] = _bounce(pos[axis], v[axis], 0.0, span)
    return out


def moving_digits(clips: int, frames: int, size: int = 32, digits: tuple[int, int] = (1, 2),
                  split: str = "train", seed: int = 0) -> Tensor:
    sprite_size = max(3, size * 7 // 16)
    sprites = _digit_sprites(sprite_size)
    rng = np.random.default_rng([SPLIT_SEED[split], seed])
    half = len(sprites) // 2  # train and test draw from disjoint halves of the digit images
    pool = np.arange(half) if split == "train" else np.arange(half, len(sprites))
    video = np.zeros((clips, frames, 1, size, size), dtype=np.float32)
    span = size - sprite_size
    for c in range(clips):
        for _ in range(rng.integers(digits[0], digits[1] + 1)):
            sprite = sprites[rng.choice(pool)]
            path = np.rint(_trajectory(rng, frames, span, (1.0, 2.5))).astype(int)
            for f, (y, x) in enumerate(path):
                window = video[c, f, 0, y:y + sprite_size, x:x + sprite_size]
                np.maximum(window, sprite, out=window)
    return torch.from_numpy(video)


def bouncing_balls(clips: int, frames: int, size: int = 32, balls: tuple[int, int] = (1, 3),
                   split: str = "train", seed: int = 0) -> Tensor:
    rng = np.random.default_rng([SPLIT_SEED[split], seed, 7])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    video = np.zeros((clips, frames, 1, size, size), dtype=np.float32)
    for c in range(clips):
        for _ in range(rng.integers(balls[0], balls[1] + 1)):
            radius = rng.uniform(size / 16, size / 8)
            path = _trajectory(rng, frames, size - 2 * radius, (1.0, 2.5)) + radius
            for f, (y, x) in enumerate(path):
                disc = np.clip(radius + 0.5 - np.sqrt((yy - y) ** 2 + (xx - x) ** 2), 0, 1)
                np.maximum(video[c, f, 0], disc, out=video[c, f, 0])
    return torch.from_numpy(video)


@dataclass(frozen=True)
class DataSet:
    """A named source of clips and what it provides: frames of ``channels`` channels (square, any size
    when ``square``), and the conditioning in ``provides``. ``make(clips, frames, size, split, seed)``
    returns the video [clips frames channels size size]."""

    name: str
    make: Callable[..., Tensor]
    channels: int = 1
    square: bool = True
    provides: ConditioningSpec = ConditioningSpec()

    def frame_problems(self, frame: FrameSpec) -> list[tuple[str, str]]:
        """(key, problem) for each way ``frame`` does not fit this data."""
        found = []
        if frame.channels != self.channels:
            found.append(("channels", f"data {self.name!r} has {self.channels} channel(s), the frame {frame.channels}"))
        if self.square and frame.height != frame.width:
            found.append(("width", f"data {self.name!r} makes square frames, the frame is {frame.height}x{frame.width}"))
        return found

    def batch(self, clips: int, frames: int, frame: FrameSpec, split: str = "train", seed: int = 0) -> Batch:
        return Batch(self.make(clips, frames, size=frame.height, split=split, seed=seed))


DATASETS = {data.name: data for data in (DataSet("moving-digits", moving_digits), DataSet("bouncing-balls", bouncing_balls))}


def get_dataset(name: str) -> DataSet:
    if name not in DATASETS:
        raise UsageError(f"unknown data set {name!r}{did_you_mean(name, DATASETS)}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def make_clips(name: str, clips: int, frames: int, frame: FrameSpec, split: str = "train", seed: int = 0) -> Batch:
    """A seeded batch of ``clips`` clips of ``frames`` frames from data set ``name`` (on the CPU; the
    pipeline moves it to its device)."""
    return get_dataset(name).batch(clips, frames, frame, split, seed)
