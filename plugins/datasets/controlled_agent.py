"""``controlled-agent``: a world-model test bed. A disc (the agent) moves by per-frame actions: the action of
frame f is the move (dy, dx), each -1, 0 or +1, that takes frame f to frame f + 1, of ``speed`` pixels per
unit; the agent stops at the walls. Actions persist for a few frames (a new one with probability
``turn_probability`` per frame), so clips look like a walk rather than jitter.

Without its actions a model can only guess where the agent goes; with them the path is determined, which is
what the position error of ``scdkit.metrics.state_error`` measures. Batches carry the agent's true centre
and radius (``Batch.states``).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from scdkit.hookspecs import hookimpl
from scdkit.data import draw_disc, split_rng, square_grey_problems
from scdkit.interfaces import Batch, ComponentConfig, ConditioningSpec, VideoDataset

#: the nine moves (dy, dx), "stay" first
MOVES = np.array([(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)], dtype=np.float32)


class ControlledAgentConfig(ComponentConfig):
    speed: float = Field(2.0, gt=0, description="pixels moved per frame along each axis of the action")
    radius: float = Field(3.0, gt=0, description="radius of the agent in pixels")
    turn_probability: float = Field(0.3, ge=0, le=1, description="chance per frame of drawing a new action")


class ControlledAgent(VideoDataset):
    plugin_name = "controlled-agent"
    plugin_version = "0.1.0"
    config_class = ControlledAgentConfig
    has_states = True

    @property
    def provides(self) -> ConditioningSpec:
        return ConditioningSpec(actions=2)

    def frame_problems(self) -> list[tuple[str, str]]:
        found = square_grey_problems(self.plugin_name, self.frame)
        if 2 * self.config.radius >= self.frame.height:
            found.append(("height", f"data {self.plugin_name!r}: an agent of radius {self.config.radius} does not "
                                    f"fit a {self.frame.height}-pixel frame"))
        return found

    def clips(self, count: int, frames: int, split: str = "train", seed: int = 0) -> Batch:
        cfg, size = self.config, self.frame.height
        rng = split_rng(split, seed, 11)
        lo, hi = cfg.radius, size - 1 - cfg.radius
        video = np.zeros((count, frames, 1, size, size), dtype=np.float32)
        actions = np.zeros((count, frames, 2), dtype=np.float32)
        states = np.zeros((count, frames, 1, 3), dtype=np.float32)
        for c in range(count):
            pos = rng.uniform(lo, hi, size=2)
            move = MOVES[rng.integers(len(MOVES))]
            for f in range(frames):
                draw_disc(video[c, f, 0], pos, cfg.radius)
                states[c, f, 0] = (*pos, cfg.radius)
                if rng.random() < cfg.turn_probability:
                    move = MOVES[rng.integers(len(MOVES))]
                actions[c, f] = move
                pos = np.clip(pos + cfg.speed * move, lo, hi)
        return Batch(torch.from_numpy(video), actions=torch.from_numpy(actions), states=torch.from_numpy(states))


@hookimpl
def scdkit_register_datasets(register):
    register(ControlledAgent)
