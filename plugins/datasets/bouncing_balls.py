"""``bouncing-balls``: soft discs moving at constant speed, bouncing off the edges. Every batch carries the
balls' true centres and radii (``Batch.states``), for the state error of ``scdkit.metrics``."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, model_validator

from scdkit.hookspecs import hookimpl
from scdkit.data import bouncing_trajectory, check_range, draw_disc, split_rng, square_grey_problems
from scdkit.interfaces import Batch, ComponentConfig, VideoDataset


class BouncingBallsConfig(ComponentConfig):
    min_balls: int = Field(1, ge=1, description="fewest balls in a clip")
    max_balls: int = Field(3, ge=1, description="most balls in a clip")

    @model_validator(mode="after")
    def _ordered(self):
        return check_range(self, "min_balls", "max_balls")


class BouncingBalls(VideoDataset):
    plugin_name = "bouncing-balls"
    plugin_version = "0.2.0"
    config_class = BouncingBallsConfig
    has_states = True

    def frame_problems(self) -> list[tuple[str, str]]:
        return square_grey_problems(self.plugin_name, self.frame)

    def clips(self, count: int, frames: int, split: str = "train", seed: int = 0) -> Batch:
        size, most = self.frame.height, self.config.max_balls
        rng = split_rng(split, seed, 7)
        video = np.zeros((count, frames, 1, size, size), dtype=np.float32)
        states = np.full((count, frames, most, 3), np.nan, dtype=np.float32)
        for c in range(count):
            for ball in range(rng.integers(self.config.min_balls, most + 1)):
                radius = rng.uniform(size / 16, size / 8)
                path = bouncing_trajectory(rng, frames, size - 2 * radius, (1.0, 2.5)) + radius
                for f, centre in enumerate(path):
                    draw_disc(video[c, f, 0], centre, radius)
                    states[c, f, ball] = (*centre, radius)
        return Batch(torch.from_numpy(video), states=torch.from_numpy(states))


@hookimpl
def scdkit_register_datasets(register):
    register(BouncingBalls)
