"""What the built-in data sets share: the seeded split streams and objects moving at constant speed.

Every built-in generator draws from ``split_rng(split, seed, ...)``: train and test clips come from disjoint
seed streams, so held-out clips are never seen in training. Data set plugins live in ``plugins/datasets/``
(``scdkit.interfaces.VideoDataset``); a pipeline names one in its ``data`` key (``Registry.dataset``).
"""

from __future__ import annotations

import numpy as np

SPLIT_SEED = {"train": 0, "test": 1_000_003}


def split_rng(split: str, seed: int, *stream: int) -> np.random.Generator:
    """The random stream of (split, seed), optionally one of several ``stream``s within it."""
    return np.random.default_rng([SPLIT_SEED[split], seed, *stream])


def _bounce(pos: float, vel: float, lo: float, hi: float) -> tuple[float, float]:
    pos += vel
    while not lo <= pos <= hi:  # a loop, since a fast object in a small frame can bounce twice
        pos, vel = (2 * lo - pos, -vel) if pos < lo else (2 * hi - pos, -vel)
    return pos, vel


def bouncing_trajectory(rng: np.random.Generator, frames: int, span: float, speed: tuple[float, float],
                        centred: bool = False) -> np.ndarray:
    """Positions [frames, 2] moving at constant speed inside [0, span], bouncing at the edges; starting at a
    random position, or at the centre when ``centred``."""
    pos = np.full(2, span / 2) if centred else rng.uniform(0, span, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    v = rng.uniform(*speed) * np.array([np.cos(angle), np.sin(angle)])
    out = np.empty((frames, 2))
    for f in range(frames):
        out[f] = pos
        for axis in range(2):
            pos[axis], v[axis] = _bounce(pos[axis], v[axis], 0.0, span)
    return out


def draw_disc(canvas: np.ndarray, centre: tuple[float, float], radius: float) -> None:
    """Max-blend an anti-aliased disc (1 inside, a one-pixel ramp at the rim) into ``canvas`` [H W]."""
    yy, xx = np.mgrid[0:canvas.shape[0], 0:canvas.shape[1]].astype(np.float32)
    disc = np.clip(radius + 0.5 - np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2), 0, 1)
    np.maximum(canvas, disc, out=canvas)


def square_grey_problems(name: str, frame) -> list[tuple[str, str]]:
    """(pipeline key, problem) for a frame that a generator of square, one-channel frames cannot make."""
    found = []
    if frame.channels != 1:
        found.append(("channels", f"data {name!r} has 1 channel, the frame {frame.channels}"))
    if frame.height != frame.width:
        found.append(("width", f"data {name!r} makes square frames, the frame is {frame.height}x{frame.width}"))
    return found


def load_dataset(name: str, frame=None, **options):
    """Data set plugin ``name`` (built-in or installed) with config ``options``, for ``frame`` (default: the
    32x32 grey FrameSpec): no registry needed, e.g. in a notebook or a test. A UsageError for an unknown name."""
    from scdkit.errors import PluginError, UsageError
    from scdkit.interfaces import FrameSpec
    from scdkit.pluginmanager import default_catalog

    try:
        cls = default_catalog().get("datasets", name)
    except PluginError as exc:
        raise UsageError(str(exc)) from None
    return cls(cls.config_class(**options), frame or FrameSpec())


def as_dataset(data, frame):
    """``data`` as it is if it is a data set, else the data set plugin of that name (default options) for ``frame``."""
    return load_dataset(data, frame) if isinstance(data, str) else data


def check_range(config, low: str, high: str):
    """A config validator's body: ``high`` may not be below ``low`` (e.g. max_digits and min_digits)."""
    if getattr(config, high) < getattr(config, low):
        raise ValueError(f"{high} {getattr(config, high)} is below {low} {getattr(config, low)}")
    return config
