"""Frame-quality metrics on videos [b f c H W] in [0, 1]; each returns one value per frame index."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure


def mse_per_frame(pred: Tensor, true: Tensor) -> Tensor:
    return (pred - true).pow(2).mean(dim=(0, 2, 3, 4))


def psnr_per_frame(pred: Tensor, true: Tensor) -> Tensor:
    """PSNR of each clip's frame, averaged over clips (data range 1)."""
    mse = (pred - true).pow(2).mean(dim=(2, 3, 4)).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).mean(dim=0)


def ssim_per_frame(pred: Tensor, true: Tensor) -> Tensor:
    frames = pred.shape[1]
    return torch.stack([
        structural_similarity_index_measure(pred[:, f], true[:, f], data_range=1.0, kernel_size=7)
        for f in range(frames)
    ])


def sharpness_per_frame(video: Tensor) -> Tensor:
    """Mean absolute spatial gradient: PSNR rewards blur, this shows whether frames stay crisp."""
    dy = (video[..., 1:, :] - video[..., :-1, :]).abs().mean(dim=(0, 2, 3, 4))
    dx = (video[..., :, 1:] - video[..., :, :-1]).abs().mean(dim=(0, 2, 3, 4))
    return (dx + dy) / 2
