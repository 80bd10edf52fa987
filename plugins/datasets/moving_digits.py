"""``moving-digits``: scikit-learn's bundled 8x8 digits, upscaled, moving at constant speed and bouncing off the
frame edges (Moving-MNIST style), overlaid by max. The label of a clip is the class of its first digit.

``blank_frames`` empty frames before the digits appear make a class-conditioned test bed: continuing a blank
context, a model can draw the digit from its label alone (with ``centred_start``, where it appears is known too).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from pydantic import Field, model_validator

from scdkit.hookspecs import hookimpl
from scdkit.data import bouncing_trajectory, check_range, split_rng, square_grey_problems
from scdkit.interfaces import Batch, ComponentConfig, ConditioningSpec, VideoDataset

CLASSES = 10


@lru_cache(maxsize=4)
def digit_sprites(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 bundled digits upscaled to [size size] in [0, 1], and their classes."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no network

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [1797 1 8 8]
    sprites = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return sprites[:, 0].clamp(0, 1).numpy(), digits.target.astype(np.int64)


def sprite_size(frame_size: int) -> int:
    return max(3, frame_size * 7 // 16)


class MovingDigitsConfig(ComponentConfig):
    min_digits: int = Field(1, ge=1, description="fewest digits in a clip")
    max_digits: int = Field(2, ge=1, description="most digits in a clip")
    blank_frames: int = Field(0, ge=0, description="empty frames at the start of every clip, before the digits appear")
    centred_start: bool = Field(False, description="digits start at the centre of the frame (then move as usual)")

    @model_validator(mode="after")
    def _ordered(self):
        return check_range(self, "min_digits", "max_digits")


class MovingDigits(VideoDataset):
    plugin_name = "moving-digits"
    plugin_version = "0.2.0"
    config_class = MovingDigitsConfig

    @property
    def provides(self) -> ConditioningSpec:
        return ConditioningSpec(classes=CLASSES)

    def frame_problems(self) -> list[tuple[str, str]]:
        return square_grey_problems(self.plugin_name, self.frame)

    def clips(self, count: int, frames: int, split: str = "train", seed: int = 0) -> Batch:
        cfg = self.config
        video, labels = moving_digits(count, frames, self.frame.height, (cfg.min_digits, cfg.max_digits), split, seed,
                                      cfg.blank_frames, cfg.centred_start)
        return Batch(video, labels)


def moving_digits(clips: int, frames: int, size: int = 32, digits: tuple[int, int] = (1, 2), split: str = "train",
                  seed: int = 0, blank_frames: int = 0, centred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Video [clips frames 1 size size] and the class of each clip's first digit [clips]."""
    side = sprite_size(size)
    sprites, classes = digit_sprites(side)
    rng = split_rng(split, seed)
    half = len(sprites) // 2  # train and test draw from disjoint halves of the digit images
    pool = np.arange(half) if split == "train" else np.arange(half, len(sprites))
    video = np.zeros((clips, frames, 1, size, size), dtype=np.float32)
    labels = np.zeros(clips, dtype=np.int64)
    span = size - side
    moving = max(0, frames - blank_frames)
    for c in range(clips):
        for d in range(rng.integers(digits[0], digits[1] + 1)):
            index = rng.choice(pool)
            if d == 0:
                labels[c] = classes[index]
            path = np.rint(bouncing_trajectory(rng, moving, span, (1.0, 2.5), centred)).astype(int)
            for f, (y, x) in enumerate(path, start=blank_frames):
                window = video[c, f, 0, y:y + side, x:x + side]
                np.maximum(window, sprites[index], out=window)
    return torch.from_numpy(video), torch.from_numpy(labels)


@hookimpl
def scdkit_register_datasets(register):
    register(MovingDigits)
