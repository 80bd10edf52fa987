"""Perceptual metrics from weights the user supplies by path: LPIPS per frame and FVD. Nothing is downloaded.

Without a path a metric is unavailable (:func:`perceptual_metrics` leaves it out; calling it raises
:class:`~scdkit.errors.UsageError` saying what to pass). A path that is missing, unreadable or holds the
wrong thing is a one-line ``UsageError`` naming the file and the problem, raised before any work is done.

Axes: ``b`` clips (videos), ``f`` frames, ``c`` channels (1 grey or 3 RGB), ``h w`` pixels, ``n`` images,
``d`` feature width. Videos are [b f c h w] in [0, 1], as for :mod:`scdkit.metrics`. Every tensor is made on
the inputs' device; only the Fréchet distance leaves it, for ``scipy.linalg.sqrtm`` on the CPU.

**LPIPS** (Zhang et al. 2018, the ``lpips`` package's ``LPIPS(net="alex", version="0.1")``): frames scaled to
[-1, 1], grey repeated to RGB, shifted and scaled per channel, passed through AlexNet's five conv+ReLU
layers; each layer's features are unit-normalised over channels, and the distance is the sum over layers of
the spatial mean of ``sum_c w_c (x_c - y_c)^2`` (the paper's ``||w ⊙ (x - y)||^2``). The weights are one
safetensors file holding exactly the tensors of :data:`LPIPS_ALEX_TENSORS` (extra tensors are ignored):
torchvision's AlexNet conv layers under their torchvision names and the lpips package's linear layers
under its names::

    features.0.weight  [64, 3, 11, 11]   features.0.bias  [64]     conv 11x11 stride 4 pad 2 -> relu1
    features.3.weight  [192, 64, 5, 5]   features.3.bias  [192]    maxpool 3/2, conv 5x5 pad 2 -> relu2
    features.6.weight  [384, 192, 3, 3]  features.6.bias  [384]    maxpool 3/2, conv 3x3 pad 1 -> relu3
    features.8.weight  [256, 384, 3, 3]  features.8.bias  [256]    conv 3x3 pad 1 -> relu4
    features.10.weight [256, 256, 3, 3]  features.10.bias [256]    conv 3x3 pad 1 -> relu5
    lin0.model.1.weight [1, 64, 1, 1]  lin1.model.1.weight [1, 192, 1, 1]  lin2.model.1.weight [1, 384, 1, 1]
    lin3.model.1.weight [1, 256, 1, 1]  lin4.model.1.weight [1, 256, 1, 1]

The official files are pickles (the lpips package's ``weights/v0.1/alex.pth`` and torchvision's
``alexnet-owt-7be5be79.pth``) and scdkit never unpickles. Convert them once, on the machine where you have
them, with ``python -m scdkit.perceptual convert-lpips alex.pth alexnet-owt-7be5be79.pth lpips_alex.safetensors``
(:func:`convert_lpips`). A saved ``lpips.LPIPS(net="alex").state_dict()``, whose backbone tensors are named
``net.sliceK.N.*``, converts as well. AlexNet needs frames of at least 31x31 pixels.

**FVD** (Unterthiner et al. 2018): the Fréchet distance between Gaussians fitted to I3D features of real and
generated videos. The I3D is the TorchScript file ``i3d_torchscript.pt`` of StyleGAN-V (Skorokhodov et al.
2022; a port of the tf.hub Kinetics-400 I3D used by the original FVD code). It is called as StyleGAN-V's
fvd-comparison scripts call it: videos [b 3 f 224 224] in [-1, 1], each frame resized bilinearly to 224x224
here, ``i3d(x, rescale=False, resize=False, return_features=True)`` -> [b 400] features before the softmax.
Loading a TorchScript file runs the code it holds: only pass files you trust.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from scdkit.errors import NotFinite, ScdkitError, UsageError
from scdkit.files import read_problem

#: The tensors an LPIPS (AlexNet, v0.1) weights file must hold, with their shapes.
LPIPS_ALEX_TENSORS: dict[str, tuple[int, ...]] = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
    "lin0.model.1.weight": (1, 64, 1, 1), "lin1.model.1.weight": (1, 192, 1, 1),
    "lin2.model.1.weight": (1, 384, 1, 1), "lin3.model.1.weight": (1, 256, 1, 1),
    "lin4.model.1.weight": (1, 256, 1, 1),
}
#: The lpips package's ScalingLayer: ImageNet statistics in [-1, 1] units.
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)
#: The smallest frame AlexNet's two 3/2 max-pools leave a pixel of.
LPIPS_MIN_SIZE = 31
#: The keyword arguments the StyleGAN-V I3D TorchScript is called with, and the frame size it wants.
I3D_KWARGS = {"rescale": False, "resize": False, "return_features": True}
I3D_SIZE = 224

CONVERT_HINT = "make it with `python -m scdkit.perceptual convert-lpips`"


def perceptual_metrics(lpips: Path | None = None, i3d: Path | None = None) -> list[str]:
    """The perceptual metrics these paths make available: ``"lpips"`` with LPIPS weights, ``"fvd"`` with an
    I3D TorchScript file; a metric whose path is None is unavailable. Each path given is checked now, so a bad
    one is a ``UsageError`` before an evaluation starts rather than after it has generated videos."""
    found = []
    if lpips is not None:
        load_lpips(lpips)
        found.append("lpips")
    if i3d is not None:
        load_i3d(i3d, torch.device("cpu"))
        found.append("fvd")
    return found


# ---------------------------------------------------------------------------------------------------- LPIPS


def load_lpips(path: Path | str | None) -> dict[str, Tensor]:
    """The checked LPIPS weights of a safetensors file (on the CPU, cached while the file is unchanged)."""
    path = _user_file(path, "LPIPS weights file",
                      f"LPIPS needs its weights: pass a safetensors file ({CONVERT_HINT}); nothing is downloaded")
    stat = path.stat()
    return _read_lpips(path, path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_lpips(path: Path, resolved: Path, mtime_ns: int, size: int) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(resolved), framework="pt", device="cpu") as file:
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
            problems = tensor_problems(shapes)
            tensors = {} if problems else {name: file.get_tensor(name) for name in LPIPS_ALEX_TENSORS}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    if problems:
        raise UsageError(f"{path}: not LPIPS AlexNet weights: {'; '.join(problems)} ({CONVERT_HINT})")
    if not all(t.is_floating_point() for t in tensors.values()):
        raise UsageError(f"{path}: LPIPS weights must be floating point")
    return tensors


def tensor_problems(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """How tensors (name -> shape) fall short of :data:`LPIPS_ALEX_TENSORS`: names missing, shapes wrong."""
    missing = [name for name in LPIPS_ALEX_TENSORS if name not in shapes]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    return problems + [f"{name} has shape {list(shapes[name])}, expected {list(shape)}"
                       for name, shape in LPIPS_ALEX_TENSORS.items() if name in shapes and shapes[name] != shape]


def lpips_per_frame(pred: Tensor, true: Tensor, weights: Path | str | None) -> Tensor:
    """LPIPS (AlexNet) of each clip's frame, averaged over clips: [f]. ``pred`` and ``true`` are [b f c h w] in
    [0, 1] with 1 or 3 channels; ``weights`` is the safetensors file described in the module docstring."""
    tensors = load_lpips(weights)
    if pred.shape != true.shape or pred.ndim != 5 or pred.shape[2] not in (1, 3):
        raise UsageError(f"LPIPS compares videos [b f c h w] with 1 or 3 channels of one shape; got "
                         f"{list(pred.shape)} and {list(true.shape)}")
    if min(pred.shape[-2:]) < LPIPS_MIN_SIZE:
        raise UsageError(f"LPIPS (AlexNet) needs frames of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE} pixels; "
                         f"got {pred.shape[-2]}x{pred.shape[-1]} (upsample them first)")
    b = pred.shape[0]
    x, y = (rearrange(v, "b f c h w -> (b f) c h w") for v in (pred, true))
    return rearrange(lpips_distance(x, y, tensors), "(b f) -> b f", b=b).mean(dim=0)


def lpips_distance(x: Tensor, y: Tensor, tensors: dict[str, Tensor]) -> Tensor:
    """LPIPS of each image pair: [n c h w] x2 in [0, 1] -> [n], computed in float32 (float64 if given)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = {name: t.to(device=x.device, dtype=dtype) for name, t in tensors.items()}
    shift = torch.tensor(LPIPS_SHIFT, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    scale = torch.tensor(LPIPS_SCALE, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    n = x.shape[0]
    images = torch.cat([x, y]).to(dtype).expand(-1, 3, -1, -1)  # grey -> RGB
    images = (images * 2 - 1 - shift) / scale
    distance = torch.zeros(n, device=x.device, dtype=dtype)
    for layer, features in enumerate(_alexnet_relus(images, w)):
        features = features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        fx, fy = features.split(n)
        lin = w[f"lin{layer}.model.1.weight"].view(1, -1, 1, 1)
        distance = distance + ((fx - fy).pow(2) * lin).sum(dim=1).mean(dim=(1, 2))
    return distance


def _alexnet_relus(x: Tensor, w: dict[str, Tensor]):
    """torchvision AlexNet's features after each of its five ReLUs (the lpips package's slices 1-5)."""
    def conv(x: Tensor, i: int, **kw) -> Tensor:
        return F.relu(F.conv2d(x, w[f"features.{i}.weight"], w[f"features.{i}.bias"], **kw))

    x = conv(x, 0, stride=4, padding=2)
    yield x
    x = conv(F.max_pool2d(x, 3, 2), 3, padding=2)
    yield x
    x = conv(F.max_pool2d(x, 3, 2), 6, padding=1)
    yield x
    x = conv(x, 8, padding=1)
    yield x
    yield conv(x, 10, padding=1)


def convert_lpips(sources: Sequence[Path | str], out: Path | str) -> None:
    """Write the LPIPS weights file from the official PyTorch files, once, on the machine that has them.

    ``sources`` are the lpips package's ``weights/v0.1/alex.pth`` (``lin0.model.1.weight`` ...) and torchvision's
    AlexNet state dict ``alexnet-owt-7be5be79.pth`` (``features.0.weight`` ...; its classifier is dropped), or a
    saved ``lpips.LPIPS(net="alex").state_dict()`` alone (``net.sliceK.N.*`` becomes ``features.N.*``). They are
    pickles, read with ``torch.load(weights_only=True)``, PyTorch's restricted loader that builds tensors and
    plain containers only: use it on your own files. scdkit itself reads only the safetensors file written."""
    from scdkit.checkpoint import atomic_save

    tensors: dict[str, Tensor] = {}
    for source in map(Path, sources):
        problem = read_problem(source)
        if problem:
            raise UsageError(f"{source}: {problem}")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors alike: the file is not weights
            raise UsageError(f"{source}: torch.load(weights_only=True) cannot read it ({_first_line(exc)})") from None
        if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
            raise UsageError(f"{source}: not a state dict (a mapping of names to tensors)")
        for name, tensor in state.items():
            name = _official_name(str(name))
            if name in LPIPS_ALEX_TENSORS:
                tensors[name] = tensor.float()
    problems = tensor_problems({name: tuple(t.shape) for name, t in tensors.items()})
    if problems:
        raise UsageError(f"{', '.join(map(str, sources))}: do not hold LPIPS AlexNet weights: {'; '.join(problems)}")
    metadata = {"format": "lpips-alex-v0.1", "converted_from": ", ".join(Path(s).name for s in sources)}
    atomic_save(tensors, Path(out), metadata)


def _official_name(name: str) -> str:
    """``features.N.*`` and ``linK.model.1.weight`` as they are; ``net.sliceK.N.*`` (an LPIPS state dict's
    backbone, which keeps torchvision's layer indices) as ``features.N.*``."""
    name = name.removeprefix("module.")
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice"):
        return f"features.{parts[2]}.{parts[3]}"
    return name


# ------------------------------------------------------------------------------------------------------ FVD


def load_i3d(path: Path | str | None, device: torch.device | str) -> torch.jit.ScriptModule:
    """The I3D TorchScript module of ``path`` on ``device``, in eval mode. This runs the code the file holds:
    only load files you trust."""
    path = _user_file(path, "I3D TorchScript file",
                      "FVD needs an I3D network: pass the TorchScript file i3d_torchscript.pt; nothing is downloaded")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is how the I3D is distributed
            warnings.filterwarnings("ignore", message="`torch.jit.load` is deprecated", category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise UsageError(f"{path}: not a TorchScript file ({_first_line(exc)})") from None
    forward = getattr(module, "forward", None)
    arguments = {a.name for a in forward.schema.arguments} if hasattr(forward, "schema") else set()
    missing = [name for name in I3D_KWARGS if name not in arguments]
    if missing:
        raise UsageError(f"{path}: TorchScript whose forward takes no {', '.join(missing)}: not StyleGAN-V's "
                         "I3D (i3d_torchscript.pt)")
    return module.eval()


def i3d_features(videos: Tensor, i3d: torch.jit.ScriptModule, batch_size: int = 16) -> Tensor:
    """I3D features of videos [b f c h w] in [0, 1]: [b d], on the videos' device. Grey is repeated to RGB,
    each frame resized bilinearly to 224x224 (``align_corners=False``, whatever its aspect), clamped to [0, 1] and
    scaled to [-1, 1], then ``i3d(x, **I3D_KWARGS)`` on [b 3 f 224 224], ``batch_size`` videos at a time."""
    if videos.ndim != 5 or videos.shape[2] not in (1, 3):
        raise UsageError(f"FVD takes videos [b f c h w] with 1 or 3 channels; got {list(videos.shape)}")
    found = []
    with torch.no_grad():
        for batch in videos.split(batch_size):
            b = batch.shape[0]
            frames = rearrange(batch.float(), "b f c h w -> (b f) c h w").expand(-1, 3, -1, -1)
            frames = F.interpolate(frames, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
            x = rearrange(frames.clamp(0, 1) * 2 - 1, "(b f) c h w -> b c f h w", b=b).contiguous()
            found.append(i3d(x, **I3D_KWARGS).reshape(b, -1))
    return torch.cat(found)


def fvd(real: Tensor, generated: Tensor, i3d: Path | str | None, batch_size: int = 16) -> float:
    """Fréchet video distance between ``real`` and ``generated`` videos [b f c h w] in [0, 1] (numbers of
    videos may differ, at least 2 each), with the I3D TorchScript file ``i3d`` run on their device."""
    if real.device != generated.device:
        raise UsageError(f"FVD compares videos on one device; got {real.device} and {generated.device}")
    network = load_i3d(i3d, real.device)
    return frechet_distance(i3d_features(real, network, batch_size), i3d_features(generated, network, batch_size))


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features [n d] and [m d]: ``|mu_a - mu_b|^2 + tr(S_a + S_b
    - 2 (S_a S_b)^(1/2))`` with sample means and unbiased covariances, the root by ``scipy.linalg.sqrtm`` in
    float64 on the CPU and its imaginary part dropped (as StyleGAN-V). When the product is singular enough to
    give a non-finite root, 1e-6 is added to both diagonals first (as pytorch-fid)."""
    from scipy.linalg import sqrtm

    if feats_a.ndim != 2 or feats_b.ndim != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise UsageError(f"the Fréchet distance takes features [n d] of one width; got {list(feats_a.shape)} "
                         f"and {list(feats_b.shape)}")
    if min(feats_a.shape[0], feats_b.shape[0]) < 2:
        raise UsageError(f"the Fréchet distance needs at least 2 samples a side for a covariance; got "
                         f"{feats_a.shape[0]} and {feats_b.shape[0]}")
    a, b = (f.detach().to(device="cpu", dtype=torch.float64).numpy() for f in (feats_a, feats_b))
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = (np.atleast_2d(np.cov(f, rowvar=False)) for f in (a, b))
    root = sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        offset = np.eye(len(cov_a)) * 1e-6
        root = sqrtm((cov_a + offset) @ (cov_b + offset))
    distance = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root.real))
    if not np.isfinite(distance):
        raise NotFinite(f"the Fréchet distance is {distance} (features that are not finite?)")
    return max(distance, 0.0)  # rounding in the matrix root can leave a tiny negative value for equal sets


# -------------------------------------------------------------------------------------------------- helpers


def _user_file(path: Path | str | None, what: str, when_missing: str) -> Path:
    """``path`` as a readable file, else a one-line UsageError (``when_missing`` when no path was given)."""
    if path is None:
        raise UsageError(when_missing)
    path = Path(path)
    problem = read_problem(path)
    if problem:
        raise UsageError(f"{path}: {what} {problem}")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an {what}")
    return path


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message (torch's run on for lines)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0].rstrip(".")


def main(argv: list[str] | None = None) -> int:
    """``python -m scdkit.perceptual convert-lpips SOURCE... OUT``: see :func:`convert_lpips`."""
    parser = argparse.ArgumentParser(prog="python -m scdkit.perceptual", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert-lpips", help="write the LPIPS safetensors file from the official .pth files (run once, where you "
        "have them; read with torch.load(weights_only=True))")
    convert.add_argument("sources", nargs="+", type=Path,
                         help="lpips' weights/v0.1/alex.pth and torchvision's alexnet-owt-7be5be79.pth "
                              "(or one saved lpips.LPIPS(net='alex').state_dict())")
    convert.add_argument("out", type=Path, help="the safetensors file to write")
    args = parser.parse_args(argv)
    try:
        convert_lpips(args.sources, args.out)
    except ScdkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
