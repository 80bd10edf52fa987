"""The non-learned references: repeat-last and constant velocity (``scdkit.references``)."""

import torch

from scdkit.references import constant_velocity, constant_velocity_next, estimate_shift, repeat_last, shift
from tests.test_device import default_device_meta


def sprite_clip(velocity: tuple[int, int], frames: int = 8, start: tuple[int, int] = (8, 4)) -> torch.Tensor:
    """[1 frames 1 32 32]: a 5x5 random sprite moving exactly ``velocity`` pixels per frame, away from the borders."""
    sprite = torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) + 0.1
    video = torch.zeros(1, frames, 1, 32, 32)
    for f in range(frames):
        y, x = start[0] + f * velocity[0], start[1] + f * velocity[1]
        video[0, f, 0, y:y + 5, x:x + 5] = sprite
    return video


def test_shift_moves_down_and_right_with_zeros_entering():
    image = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    moved = shift(image, torch.tensor([1]), torch.tensor([-2]))
    assert torch.equal(moved[0, 0], torch.tensor([[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0], [11, 12, 0, 0.]]))
    assert torch.equal(shift(image, torch.tensor([5]), torch.tensor([0])), torch.zeros_like(image))  # moved out


def test_constant_velocity_is_exact_on_a_sprite_moving_at_constant_velocity():
    video = torch.cat([sprite_clip((1, 2)), sprite_clip((-2, 1), start=(20, 6))])  # two clips, two velocities
    dy, dx = estimate_shift(video[:, 2], video[:, 3])
    assert dy.tolist() == [1, -2] and dx.tolist() == [2, 1]
    predicted = constant_velocity(video[:, :4], 4)
    assert torch.equal(predicted, video[:, 4:])  # MSE 0, PSNR inf
    assert not torch.equal(repeat_last(video[:, :4], 4), video[:, 4:])
    # teacher-forced: every frame after the second from the two before it; the second is the first repeated
    following = constant_velocity_next(video)
    assert torch.equal(following[:, 1:], video[:, 2:]) and torch.equal(following[:, 0], video[:, 0])
    assert torch.equal(constant_velocity_next(video[:, :2]), video[:, :1])  # two frames: the second from the first


def test_no_motion_or_one_context_frame_is_repeat_last():
    still = sprite_clip((0, 0))
    assert torch.equal(constant_velocity(still[:, :4], 3), repeat_last(still[:, :4], 3))
    moving = sprite_clip((1, 2))
    assert torch.equal(constant_velocity(moving[:, :1], 3), repeat_last(moving[:, :1], 3))  # no velocity to estimate
    blank = torch.zeros(2, 2, 1, 8, 8)  # every shift fits: the smallest, none, wins
    assert [t.tolist() for t in estimate_shift(blank[:, 0], blank[:, 1])] == [[0, 0], [0, 0]]


def test_references_make_every_tensor_on_the_inputs_device():
    video = sprite_clip((1, 2), frames=5)
    with default_device_meta():
        assert constant_velocity(video[:, :3], 2).device.type == "cpu"
        assert constant_velocity_next(video).device.type == "cpu"
