"""SSIM in the convention of Wang et al. (2004), checked against scikit-image's reference implementation."""

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from scdkit.data import load_dataset
from scdkit.metrics import ssim_per_frame
from tests.test_device import default_device_meta


def reference(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """scikit-image's SSIM of every (clip, frame) in float64, averaged over clips: [f]."""
    b, f = pred.shape[:2]
    return torch.tensor([np.mean([
        structural_similarity(pred[i, j].double().numpy(), true[i, j].double().numpy(), gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0)
        for i in range(b)]) for j in range(f)], dtype=torch.float32)


def test_ssim_matches_scikit_image_on_random_frames():
    g = torch.Generator().manual_seed(0)
    true = torch.rand(3, 2, 1, 32, 32, generator=g)
    pred = (true + 0.3 * torch.randn(3, 2, 1, 32, 32, generator=g)).clamp(0, 1)
    torch.testing.assert_close(ssim_per_frame(pred, true), reference(pred, true), atol=1e-4, rtol=0)
    colour = torch.rand(2, 1, 3, 16, 20, generator=g), torch.rand(2, 1, 3, 16, 20, generator=g)  # channels averaged
    torch.testing.assert_close(ssim_per_frame(*colour), reference(*colour), atol=1e-4, rtol=0)


def test_ssim_matches_scikit_image_on_shifted_digits():
    video = load_dataset("moving-digits").clips(8, 5, split="test").video
    pred, true = video[:, :-1], video[:, 1:]  # each frame as the guess of the next: a shifted digit
    ours = ssim_per_frame(pred, true)
    torch.testing.assert_close(ours, reference(pred, true), atol=1e-4, rtol=0)
    assert torch.equal(ssim_per_frame(true, true), torch.ones(4))


def test_ssim_of_a_frame_smaller_than_the_window_is_nan_and_made_on_the_inputs_device():
    assert ssim_per_frame(torch.rand(1, 2, 1, 8, 8), torch.rand(1, 2, 1, 8, 8)).isnan().all()  # 8 < 11: no interior
    with default_device_meta():
        pred, true = torch.rand(1, 2, 1, 32, 32, device="cpu"), torch.rand(1, 2, 1, 32, 32, device="cpu")
        assert ssim_per_frame(pred, true).device.type == "cpu"
        assert ssim_per_frame(pred[..., :8, :8], true[..., :8, :8]).device.type == "cpu"


@pytest.mark.parametrize("size", [11, 12])
def test_ssim_of_the_smallest_frames_with_an_interior(size):
    g = torch.Generator().manual_seed(1)
    pred, true = torch.rand(2, 1, 1, size, size, generator=g), torch.rand(2, 1, 1, size, size, generator=g)
    torch.testing.assert_close(ssim_per_frame(pred, true), reference(pred, true), atol=1e-4, rtol=0)


def test_state_error_is_the_distance_to_the_objects_found():
    from scdkit.metrics import state_error_per_frame

    batch = load_dataset("bouncing-balls").clips(32, 3, split="test")
    exact = state_error_per_frame(batch.video, batch.states)
    assert exact.shape == (3,) and exact.mean() < 1.0  # not 0: balls that touch merge into one blob
    shifted = torch.roll(batch.video, shifts=3, dims=-1)  # every ball 3 px to the right (walls aside)
    assert 2.0 < state_error_per_frame(shifted, batch.states).mean() < 3.5
    blank = state_error_per_frame(torch.zeros_like(batch.video), batch.states)
    assert torch.allclose(blank, torch.full((3,), float(torch.tensor([32.0, 32.0]).norm())))
    smeared = batch.video.mean(dim=(-2, -1), keepdim=True).expand_as(batch.video)  # all blur, no ball left
    assert state_error_per_frame(smeared, batch.states).min() > 10
