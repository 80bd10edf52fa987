"""LPIPS and FVD from user-supplied files, with random AlexNet-shaped LPIPS weights and a tiny scripted stand-in
for the I3D (nothing is downloaded); the Fréchet distance against its closed form."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from rich.console import Console
from torch import Tensor, nn

from scdkit import perceptual
from scdkit.errors import UsageError
from scdkit.perceptual import (LPIPS_ALEX_TENSORS, fvd, frechet_distance, lpips_per_frame, load_i3d,
                               perceptual_metrics)
from tests.test_device import default_device_meta

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def random_lpips_tensors(seed: int = 0) -> dict[str, Tensor]:
    """AlexNet-shaped LPIPS weights: He-scaled convs (features stay alive through five layers), positive lins."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in LPIPS_ALEX_TENSORS.items():
        if name.startswith("lin"):
            tensors[name] = torch.rand(shape, generator=g)
        elif name.endswith("bias"):
            tensors[name] = 0.01 * torch.randn(shape, generator=g)
        else:
            tensors[name] = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
    return tensors


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.safetensors"
    save_file(random_lpips_tensors(), str(path))
    return path


def frames(*shape: int, seed: int = 0) -> Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def noisy(video: Tensor, amount: float, seed: int = 1) -> Tensor:
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(seed))
    return (video + amount * noise).clamp(0, 1)


# ---------------------------------------------------------------------------------------------------- LPIPS


def reference_lpips(x: Tensor, y: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    """LPIPS as the lpips package builds it: torchvision's AlexNet layout as nn modules (loaded by name,
    strictly), tapped after each ReLU, then a 1x1 conv per layer. [n 3 h w] in [0, 1] -> [n]."""
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
    features.load_state_dict({k.removeprefix("features."): v for k, v in tensors.items() if k.startswith("features.")})
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

    def taps(image):
        out, h = [], (image * 2 - 1 - shift) / scale
        for index, module in enumerate(features[:12]):  # slice5 ends at relu5, before the last max-pool
            h = module(h)
            if index in (1, 4, 7, 9, 11):
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = torch.zeros(x.shape[0])
    for layer, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        lin = nn.functional.conv2d((fx - fy) ** 2, tensors[f"lin{layer}.model.1.weight"])
        total = total + lin.mean(dim=(1, 2, 3))
    return total


def test_lpips_matches_the_lpips_package_layout(lpips_file):
    true = frames(2, 3, 3, 40, 48)
    pred = noisy(true, 0.2)
    expected = reference_lpips(pred.flatten(0, 1), true.flatten(0, 1), random_lpips_tensors()).view(2, 3).mean(0)
    torch.testing.assert_close(lpips_per_frame(pred, true, lpips_file), expected, rtol=1e-5, atol=1e-6)


def test_lpips_of_identical_frames_is_zero_and_it_is_symmetric(lpips_file):
    a, b = frames(2, 3, 3, 32, 32), frames(2, 3, 3, 32, 32, seed=5)
    assert torch.equal(lpips_per_frame(a, a, lpips_file), torch.zeros(3))
    ab, ba = lpips_per_frame(a, b, lpips_file), lpips_per_frame(b, a, lpips_file)
    assert ab.shape == (3,) and (ab > 0).all()
    torch.testing.assert_close(ab, ba)


def test_lpips_grows_with_noise(lpips_file):
    true = frames(2, 2, 3, 64, 64)
    distances = [lpips_per_frame(noisy(true, amount), true, lpips_file) for amount in (0.02, 0.1, 0.3)]
    assert (distances[0] < distances[1]).all() and (distances[1] < distances[2]).all()


def test_lpips_of_grey_frames_equals_that_of_the_frames_repeated_to_rgb(lpips_file):
    grey = frames(2, 2, 1, 32, 36)
    other = noisy(grey, 0.2)
    torch.testing.assert_close(lpips_per_frame(grey, other, lpips_file),
                               lpips_per_frame(grey.repeat(1, 1, 3, 1, 1), other.repeat(1, 1, 3, 1, 1), lpips_file))


def test_lpips_is_per_frame_and_made_on_the_inputs_device(lpips_file):
    true = frames(2, 3, 3, 32, 32)
    pred = noisy(true, 0.2)
    whole = lpips_per_frame(pred, true, lpips_file)
    torch.testing.assert_close(lpips_per_frame(pred[:, 1:2], true[:, 1:2], lpips_file), whole[1:2])
    with default_device_meta():
        assert lpips_per_frame(pred, true, lpips_file).device.type == "cpu"


def bad_lpips_files(tmp_path):
    tensors = random_lpips_tensors()
    missing = {k: v for k, v in tensors.items() if not k.startswith("lin3")}
    wrong = tensors | {"features.3.weight": torch.zeros(96, 64, 5, 5)}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    (tmp_path / "alex.pth").write_bytes(b"PK\x03\x04 a pickle, not safetensors")
    return {
        "absent.safetensors": "LPIPS weights file not found",
        "missing.safetensors": "missing lin3.model.1.weight",
        "wrong.safetensors": "features.3.weight has shape [96, 64, 5, 5], expected [192, 64, 5, 5]",
        "alex.pth": "not a readable safetensors file",
        ".": "is a folder",
    }


def test_a_bad_lpips_file_is_a_one_line_usage_error_naming_it(tmp_path):
    for name, problem in bad_lpips_files(tmp_path).items():
        path = tmp_path / name
        for call in (lambda: perceptual.load_lpips(path), lambda: perceptual_metrics(lpips=path),
                     lambda: lpips_per_frame(frames(1, 1, 3, 32, 32), frames(1, 1, 3, 32, 32), path)):
            with pytest.raises(UsageError) as caught:
                call()
            message = str(caught.value)
            assert problem in message and str(path) in message and "\n" not in message, message


def test_lpips_without_weights_is_unavailable_and_small_frames_are_refused(lpips_file):
    assert perceptual_metrics() == []
    assert perceptual_metrics(lpips=lpips_file) == ["lpips"]
    with pytest.raises(UsageError, match="LPIPS needs its weights"):
        lpips_per_frame(frames(1, 1, 3, 32, 32), frames(1, 1, 3, 32, 32), None)
    with pytest.raises(UsageError, match="at least 31x31"):
        lpips_per_frame(frames(1, 1, 3, 30, 64), frames(1, 1, 3, 30, 64), lpips_file)
    lpips_per_frame(frames(1, 1, 3, 31, 31), frames(1, 1, 3, 31, 31), lpips_file)  # the smallest that works


@pytest.mark.parametrize("layout", ["lpips-and-torchvision", "lpips-state-dict"])
def test_convert_lpips_from_the_official_pickles(tmp_path, layout):
    tensors = random_lpips_tensors(seed=3)
    if layout == "lpips-and-torchvision":  # weights/v0.1/alex.pth, and torchvision's alexnet state dict
        torch.save({k: v for k, v in tensors.items() if k.startswith("lin")}, tmp_path / "alex.pth")
        backbone = {k: v for k, v in tensors.items() if k.startswith("features.")}
        torch.save(backbone | {"classifier.1.weight": torch.zeros(8, 9216)}, tmp_path / "alexnet.pth")
        sources = [tmp_path / "alex.pth", tmp_path / "alexnet.pth"]
    else:  # lpips.LPIPS(net="alex").state_dict(): net.sliceK.N.* keeps torchvision's indices
        slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
        state = {(f"net.slice{slices[int(k.split('.')[1])]}.{k.removeprefix('features.')}"
                  if k.startswith("features.") else k): v for k, v in tensors.items()}
        torch.save(state | {"scaling_layer.shift": torch.zeros(1, 3, 1, 1)}, tmp_path / "lpips_full.pth")
        sources = [tmp_path / "lpips_full.pth"]
    out = tmp_path / "lpips_alex.safetensors"
    assert perceptual.main(["convert-lpips", *map(str, sources), str(out)]) == 0
    loaded = perceptual.load_lpips(out)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_convert_lpips_refuses_incomplete_or_unreadable_sources(tmp_path, capsys):
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "alex.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    out = tmp_path / "out.safetensors"
    assert perceptual.main(["convert-lpips", str(tmp_path / "alex.pth"), str(out)]) == 2
    assert perceptual.main(["convert-lpips", str(tmp_path / "junk.pth"), str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "missing features.0.weight" in lines[0] and "junk.pth" in lines[1], lines
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------ FVD


class TinyI3D(nn.Module):
    """Called as StyleGAN-V's I3D is; refuses any other call. Features: per-channel mean and temporal std of
    the video, mixed by a fixed linear map."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(6, 6)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(6) + 0.1 * torch.ones(6, 6))
            self.mix.bias.zero_()

    def forward(self, x: Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False) -> Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError("called with the wrong flags")
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError("wants [b 3 t 224 224]")
        if bool(x.min() < -1.0) or bool(x.max() > 1.0):
            raise RuntimeError("wants [-1, 1]")
        pooled = x.mean(dim=(3, 4))  # [b 3 t]
        return self.mix(torch.cat([pooled.mean(dim=2), pooled.std(dim=2)], dim=1))


class NotI3D(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.script(TinyI3D()).save(str(path))
    return path


def videos(b: int, c: int = 3, seed: int = 0) -> Tensor:
    """[b 4 c 16 16] in [0, 0.8]: room to brighten without clamping."""
    return 0.8 * frames(b, 4, c, 16, 16, seed=seed)


def test_fvd_of_a_set_with_itself_is_zero_and_it_grows_as_one_set_shifts(i3d_file):
    real = videos(24)
    assert fvd(real, real, i3d_file) == pytest.approx(0, abs=1e-6)
    shifted = [fvd(real, real + shift, i3d_file, batch_size=5) for shift in (0.05, 0.1, 0.2)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    assert fvd(real, videos(24, seed=1), i3d_file) > 0


def test_fvd_takes_grey_videos_as_rgb_and_stays_on_the_inputs_device(i3d_file):
    real, generated = videos(12, c=1), videos(10, c=1, seed=2)
    assert fvd(real, generated, i3d_file) == pytest.approx(
        fvd(real.repeat(1, 1, 3, 1, 1), generated.repeat(1, 1, 3, 1, 1), i3d_file), rel=1e-9)
    with default_device_meta():
        assert math.isfinite(fvd(real, generated, i3d_file))


def test_a_bad_i3d_file_is_a_one_line_usage_error_naming_it(tmp_path, i3d_file, lpips_file):
    torch.jit.script(NotI3D()).save(str(tmp_path / "other.pt"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    cases = {tmp_path / "absent.pt": "I3D TorchScript file not found",
             tmp_path / "state_dict.pt": "not a TorchScript file",
             lpips_file: "not a TorchScript file",
             tmp_path / "other.pt": "forward takes no rescale, resize, return_features"}
    for path, problem in cases.items():
        for call in (lambda: load_i3d(path, "cpu"), lambda: perceptual_metrics(i3d=path),
                     lambda: fvd(videos(2), videos(2), path)):
            with pytest.raises(UsageError) as caught:
                call()
            message = str(caught.value)
            assert problem in message and str(path) in message and "\n" not in message, message
    with pytest.raises(UsageError, match="FVD needs an I3D network"):
        fvd(videos(2), videos(2), None)
    assert perceptual_metrics(lpips=lpips_file, i3d=i3d_file) == ["lpips", "fvd"]


# ------------------------------------------------------------------------------------------ Fréchet distance


def gaussian_sample(n: int, mean: np.ndarray, variances: np.ndarray, rotation: np.ndarray, seed: int) -> Tensor:
    """n samples whose sample mean is exactly ``mean`` and unbiased sample covariance exactly
    ``rotation @ diag(variances) @ rotation.T``: orthonormal centred columns, scaled and rotated."""
    x = np.random.default_rng(seed).standard_normal((n, len(mean)))
    q, _ = np.linalg.qr(x - x.mean(axis=0))  # centred columns span a space orthogonal to ones: q is centred
    return torch.from_numpy(mean + (q * np.sqrt(variances * (n - 1))) @ rotation.T)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    d = 5
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    var_a, var_b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    closed = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    a, b = gaussian_sample(40, mu_a, var_a, np.eye(d), 1), gaussian_sample(30, mu_b, var_b, np.eye(d), 2)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))  # the distance is invariant under a shared rotation
    a, b = gaussian_sample(40, mu_a, var_a, rotation, 1), gaussian_sample(30, mu_b, var_b, rotation, 2)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_of_one_feature_and_its_refusals():
    a = gaussian_sample(10, np.array([1.0]), np.array([4.0]), np.eye(1), 0)
    b = gaussian_sample(8, np.array([-2.0]), np.array([1.0]), np.eye(1), 1)
    assert frechet_distance(a, b) == pytest.approx(3 ** 2 + (2 - 1) ** 2)
    with pytest.raises(UsageError, match="at least 2 samples"):
        frechet_distance(a[:1], b)
    with pytest.raises(UsageError, match="of one width"):
        frechet_distance(torch.zeros(4, 2), torch.zeros(4, 3))


def test_generate_scores_lpips_and_fvd_only_when_given_their_files(lpips_file, i3d_file, tmp_path):
    from scdkit.evaluate import EvalConfig
    from scdkit.generate import run_generate
    from scdkit.registry import load_registry
    from tests.test_device import REPO

    pipeline = load_registry(REPO / "registry.toml").build("scd-digits", load=False)  # 32x32: AlexNet's smallest is 31
    config = EvalConfig(clips=2, context=2, frames=2, steps=1)
    quiet = Console(file=io.StringIO())
    plain = run_generate(pipeline, "moving-digits", config, gif=tmp_path / "a.gif", console=quiet)
    assert "lpips_first4" not in plain and "fvd" not in plain
    scored = run_generate(pipeline, "moving-digits", config, gif=tmp_path / "b.gif", console=quiet,
                          lpips=lpips_file, i3d=i3d_file)
    for key in ("lpips_first4", "fvd"):
        assert set(scored[key]) == {"model", "repeat_last", "constant_velocity"}
        assert all(math.isfinite(v) and v >= 0 for v in scored[key].values()), scored[key]
    with pytest.raises(UsageError, match="nowhere.safetensors"):  # refused before anything is generated or written
        run_generate(pipeline, "moving-digits", config, gif=tmp_path / "c.gif", console=quiet,
                     lpips=tmp_path / "nowhere.safetensors")
    assert not (tmp_path / "c.gif").exists()
