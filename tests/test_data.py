"""Data sets: seeded and split, what they provide (labels, actions, states) agrees with their frames, shards make
up the batch, and registries and --data name them."""

import numpy as np
import pytest
import torch

from scdkit.data import load_dataset
from scdkit.errors import UsageError
from scdkit.interfaces import FrameSpec
from scdkit.plugins.datasets.controlled_agent import MOVES


@pytest.mark.parametrize("name", ["moving-digits", "bouncing-balls", "controlled-agent"])
def test_data_sets_are_seeded_split_and_in_range(name):
    data = load_dataset(name)
    a, b = data.clips(3, 4, seed=5), data.clips(3, 4, seed=5)
    assert torch.equal(a.video, b.video)
    assert not torch.equal(a.video, data.clips(3, 4, seed=6).video)
    assert not torch.equal(a.video, data.clips(3, 4, seed=5, split="test").video)
    assert a.video.shape == (3, 4, 1, 32, 32) and a.video.dtype == torch.float32
    assert 0 <= a.video.min() and a.video.max() <= 1
    assert (a.video[:, 1:] - a.video[:, :-1]).abs().sum() > 0
    assert a.video.sum(dim=(2, 3, 4)).min() > 0  # something visible in every frame
    assert (a.labels is not None) == bool(data.provides.classes)
    assert (a.actions is not None) == bool(data.provides.actions)
    assert (a.states is not None) == data.has_states


@pytest.mark.parametrize("name", ["moving-digits", "bouncing-balls", "controlled-agent"])
def test_shards_make_up_the_batch(name):
    data = load_dataset(name)
    whole = data.batch(4, 3, seed=2)
    parts = [data.batch(4, 3, seed=2, shard=(rank, 2)) for rank in range(2)]
    assert torch.equal(torch.cat([p.video for p in parts]), whole.video)
    with pytest.raises(ValueError, match="equal shards"):
        data.batch(3, 3, shard=(0, 2))


def test_digit_labels_are_the_first_digits_class_and_blank_frames_are_empty():
    from scdkit.plugins.datasets.moving_digits import digit_sprites, sprite_size

    data = load_dataset("moving-digits", min_digits=1, max_digits=1, blank_frames=2)
    batch = data.clips(20, 5)
    assert batch.video[:, :2].sum() == 0 and batch.video[:, 2:].sum(dim=(2, 3, 4)).min() > 0
    sprites, classes = digit_sprites(sprite_size(32))
    for clip, label in zip(batch.video, batch.labels):  # the first visible frame holds a sprite of that class
        frame, side = clip[2, 0].numpy(), sprites.shape[1]
        corner = np.argwhere(frame > 0).min(axis=0)
        matches = []
        for i, sprite in enumerate(sprites):  # the sprite placed so that its ink starts where the frame's does
            y, x = corner - np.argwhere(sprite > 0).min(axis=0)
            if 0 <= y <= 32 - side and 0 <= x <= 32 - side and np.allclose(frame[y:y + side, x:x + side], sprite):
                matches.append(i)
        assert matches and {int(classes[i]) for i in matches} == {int(label)}
    assert len(set(batch.labels.tolist())) > 3


def test_ball_states_are_the_drawn_centres():
    batch = load_dataset("bouncing-balls", min_balls=1, max_balls=1).clips(4, 3)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mass = batch.video[:, :, 0]
    centre_y = (mass * yy).sum(dim=(2, 3)) / mass.sum(dim=(2, 3))
    centre_x = (mass * xx).sum(dim=(2, 3)) / mass.sum(dim=(2, 3))
    torch.testing.assert_close(torch.stack([centre_y, centre_x], -1), batch.states[:, :, 0, :2], atol=0.05, rtol=0)
    several = load_dataset("bouncing-balls").clips(8, 2)
    assert several.states.shape == (8, 2, 3, 3) and several.states[..., 2].isnan().any()  # absent balls: NaN rows


def test_agent_moves_by_its_actions_and_stops_at_walls():
    data = load_dataset("controlled-agent")
    batch = data.clips(16, 12)
    speed, radius = data.config.speed, data.config.radius
    positions, actions = batch.states[..., 0, :2], batch.actions
    expected = (positions[:, :-1] + speed * actions[:, :-1]).clamp(radius, 31 - radius)
    torch.testing.assert_close(positions[:, 1:], expected)
    assert {tuple(a) for a in actions.reshape(-1, 2).tolist()} <= {tuple(m) for m in MOVES.tolist()}
    assert (positions == radius).any() or (positions == 31 - radius).any()  # some clip reaches a wall


def test_unknown_or_misconfigured_data_sets_are_usage_errors():
    with pytest.raises(UsageError, match="moving-digits"):
        load_dataset("moving-mnist")
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="below min_digits"):
        load_dataset("moving-digits", min_digits=3, max_digits=2)


def test_frame_problems_name_the_pipeline_key():
    assert load_dataset("bouncing-balls", FrameSpec(channels=3)).frame_problems()[0][0] == "channels"
    assert load_dataset("moving-digits", FrameSpec(height=32, width=16)).frame_problems()[0][0] == "width"
    assert load_dataset("controlled-agent", FrameSpec(height=4, width=4), radius=3).frame_problems()[0][0] == "height"


def test_commands_read_the_data_set_named_by_data(tmp_path):
    """--data picks another data set for a pipeline; a name it does not know, or data the pipeline cannot read,
    is one line and exit 2."""
    import subprocess
    import sys

    from tests.test_registry import GOOD

    registry = tmp_path / "registry.toml"
    registry.write_text(GOOD + '\n[datasets.balls]\nplugin = "bouncing-balls"\nmax_balls = 1\n'
                        '\n[datasets.agent]\nplugin = "controlled-agent"\nradius = 1.5\nspeed = 1\n')
    def run(*args):
        return subprocess.run([sys.executable, "-m", "scdkit.cli", "--threads", "1", "generate", "--registry", str(registry),
                               "--clips", "2", "--context", "2", "--frames", "2", "--steps", "1",
                               "--gif", str(tmp_path / "g.gif"), *args], capture_output=True, text=True)
    done = run("--data", "balls")  # the pipeline has no checkpoint: random weights, as a smoke test
    assert done.returncode == 0, done.stderr
    assert "held-out balls clips" in done.stderr and "state error" in done.stdout
    for args, message in ((["--data", "ball"], "unknown data set 'ball'; did you mean 'balls'"),
                          (["--data", "agent", "--pipeline", "p"], None)):
        failed = run(*args)
        if message is None:  # an unconditioned pipeline reads the agent's frames and ignores its actions
            assert failed.returncode == 0, failed.stderr
            continue
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr


@pytest.mark.parametrize("name", ["moving-digits", "bouncing-balls", "controlled-agent"])
def test_built_in_data_sets_pass_the_kit(name):
    from scdkit import testing
    from scdkit.pluginmanager import default_catalog

    testing.check_dataset(default_catalog().get("datasets", name), frame=FrameSpec())


def test_the_kit_catches_a_broken_data_set():
    """Mutants of controlled-agent: each breaks one part of the contract and the kit names it."""
    from scdkit import testing
    from scdkit.interfaces import Batch
    from scdkit.plugins.datasets.controlled_agent import ControlledAgent

    class IgnoresTheSeed(ControlledAgent):
        def clips(self, count, frames, split="train", seed=0):
            return super().clips(count, frames, split, 0)

    class NoActions(ControlledAgent):
        def clips(self, count, frames, split="train", seed=0):
            batch = super().clips(count, frames, split, seed)
            return Batch(batch.video, states=batch.states)

    class Overexposed(ControlledAgent):
        def clips(self, count, frames, split="train", seed=0):
            batch = super().clips(count, frames, split, seed)
            return Batch(batch.video * 2, actions=batch.actions, states=batch.states)

    for mutant, message in ((IgnoresTheSeed, "another seed gave the same clips"), (NoActions, "actions are missing"),
                            (Overexposed, "pixels must lie in")):
        with pytest.raises(AssertionError, match=message):
            testing.check_dataset(mutant, frame=FrameSpec())
