"""Encoder-output caches: run a pipeline's encoder over clips once, then render from its output with any
decoder fitted to that encoder (other sampling steps, seeds, another decoder checkpoint) without running
the encoder again.

A cache is one safetensors file (``scdkit encode``):

    cond     [b f n_c d_c]   the encoder's conditioning of every frame, in the dtype the encoder ran in
    video    [b f c H W]     the clips as uint8: the encoder saw exactly these pixels, renders are scored on them
    labels   [b], actions [b f a]    when the clips have them

and its metadata is a :class:`CacheInfo`, one key per field (strings as they are, the rest as JSON): which
encoder (registry name, plugin, version, config, checkpoint step, ``weights_sha256``), the frame and the
contract, and which clips (data set, split, seed, clips, frames).

A render (``scdkit render``) is teacher-forced: frame f + 1 of every clip is decoded from the conditioning
of true frame f, every (clip, frame) pair independently and many at once, then scored against the true
frames beside two non-learned references: repeating frame f, and moving it on at the velocity from frame
f - 1 to frame f (``scdkit.references``).

Axis legend: b clips · f frames · n tokens per frame · p patch values · n_c d_c conditioning tokens, width.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from torch import Tensor

import scdkit
from scdkit.checkpoint import atomic_save, read_checkpoint, weights_digest
from scdkit.errors import UsageError
from scdkit.evaluate import EvalConfig, Scores, held_out_clips
from scdkit.generate import print_whole, scores_table
from scdkit.data import as_dataset
from scdkit.interfaces import Batch, CondSpec, Conditioning, FrameSpec, VideoDataset, given
from scdkit.metrics import sharpness_per_frame
from scdkit.pipeline import Pipeline, ScdModel, patchify, to_model_range, to_pixel_range, unpatchify
from scdkit.references import constant_velocity_next

HELD_OUT_SPLIT = "test"  # the split ``held_out_clips`` draws from


class EncodeConfig(BaseModel):
    """Which held-out clips ``scdkit encode`` runs the encoder over."""

    model_config = ConfigDict(extra="forbid")
    clips: int = EvalConfig.model_fields["clips"]
    frames: int = Field(12, ge=2, description="frames per clip (a render decodes frames 2 to the last)")
    seed: int = EvalConfig.model_fields["seed"]


class RenderConfig(BaseModel):
    """How ``scdkit render`` samples from a cache."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = EvalConfig.model_fields["steps"]
    seed: int = Field(0, ge=0, description="seed of the noise")
    batch: int = Field(256, ge=1, description="frames decoded at once (the same seed and batch give the same frames)")


class CacheInfo(BaseModel):
    """Where an encoder-output cache came from: its safetensors metadata, one key per field."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    pipeline: str
    encoder: str  # registry name
    plugin: str
    plugin_version: str
    config: dict
    step: int | None  # of the encoder's checkpoint; None for weights not loaded from one
    weights_sha256: str  # checkpoint.weights_digest of the encoder
    frame: FrameSpec
    contract: CondSpec
    data: str
    split: str
    seed: int
    clips: int
    frames: int
    scdkit_version: str

    def metadata(self) -> dict[str, str]:
        return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                for k, v in self.model_dump(mode="json").items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> CacheInfo:
        """Raises ValidationError (a missing or bad key) or ValueError (bad JSON)."""
        return cls.model_validate({k: v if cls.model_fields[k].annotation is str else json.loads(v)
                                   for k, v in metadata.items() if k in cls.model_fields})


@dataclass
class EncoderCache:
    info: CacheInfo
    cond: Tensor  # [b f n_c d_c]
    clips: Batch  # video [b f c H W] in [0, 1] (multiples of 1/255), labels, actions


@dataclass
class Render:
    video: Tensor  # [b f-1 c H W] frames 2..f, each decoded from the conditioning of the true frame before it
    truth: Tensor  # the true frames 2..f
    model: Scores
    repeat_last: Scores  # the true frame before each, as the prediction
    constant_velocity: Scores  # the true frame before each, moved on as from the one before it
    truth_sharpness: list[float]
    steps: int
    seconds: float  # decoding alone


def scd_model(pipeline: Pipeline) -> ScdModel:
    if not isinstance(pipeline.model, ScdModel):
        raise UsageError(f"pipeline {pipeline.name!r} is monolithic: it has no encoder output to cache or render from")
    return pipeline.model


def quantize(video: Tensor) -> Tensor:
    """Pixels in [0, 1] -> uint8."""
    return (video.clamp(0, 1) * 255).round().to(torch.uint8)


def dequantize(video: Tensor) -> Tensor:
    """uint8 -> float32 pixels in [0, 1]."""
    return video.float() / 255


# -- encode ---------------------------------------------------------------------------------------

@torch.no_grad()
def encode_clips(pipeline: Pipeline, clips: Batch, batch: int = 16) -> Tensor:
    """The encoder's conditioning of every frame of ``clips``: [b f n_c d_c] on the pipeline's device, one
    block-causal pass (the training path, which equals streaming) per ``batch`` clips."""
    encoder = scd_model(pipeline).encoder
    pipeline.train(False)
    outputs = []
    for start in range(0, clips.video.shape[0], batch):
        part = clips.clips(start, start + batch).to(pipeline.device, pipeline.dtype)
        with pipeline.autocast():
            patches = patchify(to_model_range(part.video), pipeline.frame)
            outputs.append(encoder(patches, **given(encoder, part.conditioning)))
    return torch.cat(outputs)


def encode(pipeline: Pipeline, data: VideoDataset | str, config: EncodeConfig, encoder_name: str) -> EncoderCache:
    """Run ``pipeline``'s encoder once over held-out clips of data set ``data``. ``encoder_name`` is the
    encoder's registry name, recorded unless its checkpoint records its own."""
    encoder = scd_model(pipeline).encoder
    data = as_dataset(data, pipeline.frame)
    clips = held_out_clips(data, config.clips, config.frames, config.seed)
    clips = replace(clips, video=dequantize(quantize(clips.video)))  # encode exactly what the file will hold
    source = pipeline.sources.get("encoder")
    info = CacheInfo(
        pipeline=pipeline.name, encoder=source.name if source is not None and source.name else encoder_name,
        plugin=encoder.plugin_name, plugin_version=encoder.plugin_version,
        config=encoder.config.model_dump(mode="json"), step=None if source is None else source.step,
        weights_sha256=weights_digest(encoder), frame=pipeline.frame, contract=encoder.contract,
        data=data.name, split=HELD_OUT_SPLIT, seed=config.seed, clips=config.clips, frames=config.frames,
        scdkit_version=scdkit.__version__)
    return EncoderCache(info, encode_clips(pipeline, clips), clips)


def check_writable(path: Path, overwrite: bool) -> None:
    if Path(path).exists() and not overwrite:
        raise UsageError(f"{path} already exists; pass --overwrite to replace it")


def write_cache(cache: EncoderCache, path: Path, overwrite: bool = False) -> None:
    """Write ``cache`` atomically; an existing file is replaced only with ``overwrite``."""
    check_writable(path, overwrite)
    clips = cache.clips
    tensors = {"cond": cache.cond, "video": quantize(clips.video), "labels": clips.labels, "actions": clips.actions}
    atomic_save({k: v for k, v in tensors.items() if v is not None}, Path(path), cache.info.metadata())


def read_cache(path: Path) -> EncoderCache:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such encoder cache (`scdkit encode` writes one)")
    tensors, metadata = read_checkpoint(path)
    not_a_cache = f"{path}: not an encoder cache written by `scdkit encode`"
    try:
        info = CacheInfo.from_metadata(metadata)
    except ValidationError as exc:
        raise UsageError(f"{not_a_cache} (bad or missing metadata: "
                         f"{', '.join(str(e['loc'][0]) for e in exc.errors())})") from None
    except ValueError as exc:
        raise UsageError(f"{not_a_cache} (bad metadata: {exc})") from None
    expected = (info.clips, info.frames, info.contract.tokens, info.contract.dim)
    if "cond" not in tensors or "video" not in tensors or tuple(tensors["cond"].shape) != expected:
        raise UsageError(f"{not_a_cache} (expected cond {list(expected)} and video)")
    clips = Batch(dequantize(tensors["video"]), tensors.get("labels"), tensors.get("actions"))
    return EncoderCache(info, tensors["cond"], clips)


# -- render ---------------------------------------------------------------------------------------

def check_cache(pipeline: Pipeline, cache: EncoderCache) -> None:
    """A UsageError unless ``pipeline``'s decoder can render ``cache``: the encoder that wrote it has the very
    weights of the pipeline's (loaded) encoder, which its decoder was fitted to, and frame and contract agree."""
    encoder, info = scd_model(pipeline).encoder, cache.info
    problems = []
    if info.frame != pipeline.frame:
        problems.append(f"frame {info.frame} vs the pipeline's {pipeline.frame}")
    if info.contract != encoder.contract:
        problems.append(f"contract {info.contract} vs the pipeline's {encoder.contract}")
    digest = weights_digest(encoder)
    if info.weights_sha256 != digest:
        problems.append(f"encoder weights sha256 {info.weights_sha256[:12]} vs the pipeline's {digest[:12]}: "
                        "its decoder was not fitted to the encoder that wrote the cache")
    if problems:
        raise UsageError(f"the cache from {info.pipeline}'s encoder {info.encoder} (step {info.step}) does not fit "
                         f"pipeline {pipeline.name!r}: {'; '.join(problems)}")


@torch.no_grad()
def render(pipeline: Pipeline, cond: Tensor, conditioning: Conditioning = Conditioning(), steps: int | None = None,
           generator: torch.Generator | None = None, batch: int = RenderConfig.model_fields["batch"].default) -> Tensor:
    """Teacher-forced next frames from per-frame conditioning ``cond`` [b f n_c d_c]: frame f + 1 of every clip
    decoded from the conditioning of frame f, ``batch`` (clip, frame) pairs at once. Returns [b f-1 c H W] in
    [0, 1] on the CPU. The encoder never runs; ``conditioning`` holds the clips' labels [b] and actions [b f a]."""
    model, device = scd_model(pipeline), pipeline.device
    b, f = cond.shape[:2]
    times = pipeline.sampling_times(steps)
    pairs = rearrange(cond[:, :-1], "b f n d -> (b f) n d")
    per_pair = conditioning.frames(0, f - 1).per_frame(f - 1)  # the action at frame f shapes frame f + 1
    pipeline.train(False)
    outputs = []
    for start in range(0, pairs.shape[0], batch):
        part = pairs[start:start + batch].to(device, pipeline.dtype)
        extra = Conditioning(*(None if x is None else x[start:start + batch].to(device)
                               for x in (per_pair.labels, per_pair.actions)))
        with pipeline.autocast():
            state = model.decoding_state(part, extra)
            model.prepare(state, times[:-1])
            outputs.append(pipeline.denoise_frame(state, part.shape[0], steps, generator).float().cpu())
    patches = rearrange(torch.cat(outputs), "(b f) n p -> b f n p", b=b)
    return to_pixel_range(unpatchify(patches, pipeline.frame))


def render_cache(pipeline: Pipeline, cache: EncoderCache, config: RenderConfig = RenderConfig()) -> Render:
    """Check that ``pipeline`` fits ``cache``, render it and score the frames."""
    check_cache(pipeline, cache)
    started = time.perf_counter()
    video = render(pipeline, cache.cond, cache.clips.conditioning, config.steps, pipeline.generator(config.seed),
                   config.batch)
    seconds = time.perf_counter() - started
    true = cache.clips.video
    truth = true[:, 1:]
    return Render(video, truth, Scores.of(video, truth), Scores.of(true[:, :-1], truth),
                  Scores.of(constant_velocity_next(true), truth), sharpness_per_frame(truth).tolist(),
                  config.steps or pipeline.scheduler.steps, seconds)


def print_render(result: Render, console: Console) -> None:
    clips, pairs = result.video.shape[:2]
    title = (f"teacher-forced render: {clips} clips x {pairs} frames, {result.steps} steps, each frame from the "
             "encoder output of the true frame before it; last = that true frame, velocity = it moved on as from "
             "the one before (frame 2: repeated)")
    scores = {"render": vars(result.model), "last": vars(result.repeat_last),
              "velocity": vars(result.constant_velocity)}
    print_whole(console, scores_table(title, [str(f + 2) for f in range(pairs)], scores, result.truth_sharpness))
    console.print(f"decoded {clips * pairs} frames in {result.seconds:.2f} s; the encoder did not run")
