"""Frame-quality metrics on videos [b f c H W] in [0, 1]; each returns one value per frame index."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def mse_per_frame(pred: Tensor, true: Tensor) -> Tensor:
    return (pred - true).pow(2).mean(dim=(0, 2, 3, 4))


def psnr_per_frame(pred: Tensor, true: Tensor) -> Tensor:
    """PSNR of each clip's frame, averaged over clips (data range 1)."""
    mse = (pred - true).pow(2).mean(dim=(2, 3, 4)).clamp_min(1e-10)
    return (-10 * torch.log10(mse)).mean(dim=0)


def ssim_per_frame(pred: Tensor, true: Tensor, sigma: float = 1.5) -> Tensor:
    """SSIM of each clip's frame, averaged over clips, in the convention of Wang et al. (2004): a Gaussian
    window of std ``sigma`` truncated at 3.5 sigma (11x11 for 1.5), population (co)variances, K1 = 0.01,
    K2 = 0.03, data range 1, averaged over channels and over the valid interior only: the window is never
    slid over the border, so a 32x32 frame is scored on its 22x22 interior. This is scikit-image's
    ``structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)``. A frame smaller than the window has no interior: its SSIM is nan."""
    radius = int(3.5 * sigma + 0.5)  # as scipy.ndimage, which scikit-image filters with
    b, f, c, h, w = pred.shape
    if min(h, w) < 2 * radius + 1:
        return torch.full((f,), torch.nan, dtype=pred.dtype, device=pred.device)
    offsets = torch.arange(-radius, radius + 1, dtype=pred.dtype, device=pred.device)
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    window = window / window.sum()

    def local_mean(x: Tensor) -> Tensor:  # [n H W] -> [n H-2r W-2r], separable, no padding
        x = F.conv2d(x[:, None], window.view(1, 1, -1, 1))
        return F.conv2d(x, window.view(1, 1, 1, -1))[:, 0]

    x, y = (rearrange(v, "b f c h w -> (b f c) h w") for v in (pred, true))
    mx, my, mxx, myy, mxy = local_mean(torch.cat([x, y, x * x, y * y, x * y])).chunk(5)
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return rearrange(ssim, "(b f c) h w -> b f (c h w)", b=b, f=f).mean(dim=(0, 2))


def sharpness_per_frame(video: Tensor) -> Tensor:
    """Mean absolute spatial gradient: PSNR rewards blur, this shows whether frames stay crisp."""
    dy = (video[..., 1:, :] - video[..., :-1, :]).abs().mean(dim=(0, 2, 3, 4))
    dx = (video[..., :, 1:] - video[..., :, :-1]).abs().mean(dim=(0, 2, 3, 4))
    return (dx + dy) / 2


def object_centres(frame: Tensor, threshold: float = 0.5) -> Tensor:
    """Centres (y, x) [m 2] in pixels of the bright blobs of a frame [c H W] (channels averaged): the
    intensity-weighted centre of each 8-connected region above ``threshold``."""
    from scipy import ndimage

    image = frame.float().mean(dim=0).cpu().numpy()
    regions, count = ndimage.label(image > threshold, structure=[[1, 1, 1]] * 3)
    if count == 0:
        return torch.zeros(0, 2)
    return torch.tensor(ndimage.center_of_mass(image, regions, range(1, count + 1)), dtype=torch.float32)


def state_error_per_frame(video: Tensor, states: Tensor, threshold: float = 0.5) -> Tensor:
    """Position error in pixels of each frame, averaged over clips and objects: for every true object (its
    centre in ``states`` [b f k 3], NaN rows absent) the distance to the nearest blob found in the frame
    (``object_centres``). A frame in which no blob is found scores the frame diagonal for each object. Unlike
    PSNR this does not reward blur: a smeared object either leaves the threshold or moves its centre. Objects that
    touch merge into one blob centred between them, so even the true frames score above 0 (on
    held-out bouncing balls, 0.4-0.6 px)."""
    b, f = video.shape[:2]
    diagonal = float(torch.tensor(video.shape[-2:], dtype=torch.float32).norm())
    errors = torch.zeros(b, f)
    for c in range(b):
        for i in range(f):
            truth = states[c, i, :, :2].float().cpu()
            truth = truth[~truth.isnan().any(dim=1)]
            found = object_centres(video[c, i], threshold)
            if len(found) == 0:
                errors[c, i] = diagonal
            else:
                errors[c, i] = torch.cdist(truth, found).min(dim=1).values.mean()
    return errors.mean(dim=0)
