import torch

from scdkit.data import bouncing_balls, make_clips, moving_digits


def test_generators_are_seeded_and_split():
    a, b = moving_digits(3, 4, seed=5), moving_digits(3, 4, seed=5)
    assert torch.equal(a, b)
    assert not torch.equal(a, moving_digits(3, 4, seed=6))
    assert not torch.equal(a, moving_digits(3, 4, seed=5, split="test"))
    assert a.shape == (3, 4, 1, 32, 32) and 0 <= a.min() and a.max() <= 1


def test_objects_move_between_frames():
    for video in (moving_digits(4, 6), bouncing_balls(4, 6)):
        assert (video[:, 1:] - video[:, :-1]).abs().sum() > 0
        assert video.sum(dim=(2, 3, 4)).min() > 0  # something visible in every frame


def test_unknown_dataset_is_a_usage_error():
    import pytest

    from scdkit.errors import UsageError

    with pytest.raises(UsageError, match="moving-digits"):
        make_clips("moving-mnist", 1, 2, 32)
