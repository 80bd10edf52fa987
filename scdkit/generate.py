"""`scdkit generate`, the main job: continue held-out clips, write a GIF, and print how the
model compares with two non-learned references (repeat the last context frame; move it on at constant
velocity), plus streaming timings."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import Tensor

from scdkit.data import as_dataset
from scdkit.errors import NotFinite, UsageError, install_hint
from scdkit.evaluate import EvalConfig, Evaluation, evaluate_continuation, held_out_clips
from scdkit.files import atomic_path
from scdkit.interfaces import Batch, VideoDataset
from scdkit.pipeline import Generation, Pipeline
from scdkit.references import constant_velocity, repeat_last

CONTEXT_BORDER = (60, 200, 90)
GENERATED_BORDER = (230, 70, 60)


def comparison_frames(context: Tensor, truth: Tensor, generated: Tensor, clips: int = 4, scale: int = 4) -> list[np.ndarray]:
    """RGB frames [H W 3] uint8, one row per clip: true frames on the left, the model's on the right.
    A green border marks context frames, red marks generated ones."""
    clips = min(clips, context.shape[0])
    true_video = torch.cat([context, truth], dim=1)[:clips, :, 0]  # [c f H W]
    model_video = torch.cat([context, generated], dim=1)[:clips, :, 0]
    k = context.shape[1]
    frames = []
    for f in range(true_video.shape[1]):
        border = CONTEXT_BORDER if f < k else GENERATED_BORDER
        rows = [np.concatenate([_tile(true_video[c, f], border), _tile(model_video[c, f], border)], axis=1)
                for c in range(clips)]
        frames.append(np.concatenate(rows, axis=0).repeat(scale, axis=0).repeat(scale, axis=1))
    return frames


def write_gif(path: Path, frames: list[np.ndarray], frame_ms: int = 250) -> None:
    """An endlessly looping GIF, written atomically."""
    images = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


VIDEO_HINT = install_hint("video")


def check_video_support(path: Path) -> None:
    """A one-line error now if writing ``path`` would fail later: the video extra, an .mp4 name."""
    if path.suffix.lower() != ".mp4":
        raise UsageError(f"--video {path}: expected a .mp4 file name")
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401  (imageio's ffmpeg plugin needs it)
    except ImportError as exc:
        raise UsageError(f"writing {path} needs {exc.name}: {VIDEO_HINT}") from None


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 4) -> None:
    """An H.264 MP4 through imageio's ffmpeg plugin (the ``video`` extra), written atomically."""
    check_video_support(path)
    import imageio.v2 as imageio
    with atomic_path(path) as tmp:
        # macro_block_size 16 with frames padded to it: no rescaling, every player accepts the size
        imageio.mimwrite(tmp, [_pad_to(frame, 16) for frame in frames], fps=fps, format="FFMPEG",
                         codec="libx264", pixelformat="yuv420p", macro_block_size=16)


def _pad_to(frame: np.ndarray, multiple: int) -> np.ndarray:
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, -h % multiple), (0, -w % multiple), (0, 0)))


def _tile(frame: Tensor, border: tuple[int, int, int]) -> np.ndarray:
    gray = (frame.clamp(0, 1) * 255).to(torch.uint8).numpy()
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    out = np.empty((rgb.shape[0] + 2, rgb.shape[1] + 2, 3), dtype=np.uint8)
    out[:] = border
    out[1:-1, 1:-1] = rgb
    return out


def time_streaming(pipeline: Pipeline, clip: Batch, frames: int, steps: int | None = None,
                   guidance: float | None = None) -> Generation:
    """Streaming of ``frames`` frames after ``clip`` (its video is the context), timed after one untimed
    warm-up run; ``warmup_s`` on the result is that run's time (compilation, under ``--compile``)."""
    started = time.perf_counter()
    pipeline.generate(clip, min(frames, 2), steps=steps, guidance=guidance)  # warm-up: allocator, kernels, compilation
    warmup_s = time.perf_counter() - started
    timed = pipeline.generate(clip, frames, steps=steps, generator=pipeline.generator(0), guidance=guidance)
    timed.warmup_s = warmup_s
    return timed


# the non-learned references (scdkit.references): Evaluation field -> (name, column)
REFERENCES = {"repeat_last": ("repeat-last", "last"), "constant_velocity": ("constant velocity", "velocity")}
METRICS = (("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("sharpness", "sharp", "{:.4f}"))


def summary(result: Evaluation, timing: Generation, steps: int) -> dict:
    first4 = min(4, len(result.model.psnr))
    return {
        "steps": steps,
        "clips": result.context.shape[0],
        "context_frames": result.context.shape[1],
        "generated_frames": result.truth.shape[1],
        "model": vars(result.model),
        **{who: vars(getattr(result, who)) for who in REFERENCES},
        "true_sharpness": result.truth_sharpness,
        "psnr_first4": {who: getattr(result, who).mean(first4)["psnr"] for who in ("model", *REFERENCES)},
        # PSNR of the MSE pooled over clips: the mean of per-clip PSNRs counts an exact clip as 100 dB (its cap)
        "pooled_psnr_first4": {who: -10 * math.log10(max(getattr(result, who).mean(first4)["mse"], 1e-10))
                               for who in ("model", *REFERENCES)},
        "ssim_first4": {who: getattr(result, who).mean(first4)["ssim"] for who in ("model", *REFERENCES)},
        # pixels between true object centres and those found in the frames, when the data has true states
        **({"state_error_first4": {who: getattr(result, who).mean(first4)["state_error"] for who in ("model", *REFERENCES)}}
           if result.model.state_error is not None else {}),
        "guidance": result.guidance,
        # PSNR rewards blur: the generated frames' mean spatial gradient over the true frames', all frames
        "sharpness_ratio": result.model.mean()["sharpness"] / (sum(result.truth_sharpness) / len(result.truth_sharpness)),
        "timing_batch1": {"first_frame_s": timing.first_frame_s, "per_frame_s": timing.per_frame_s,
                          "fps": 1.0 / timing.per_frame_s, "warmup_s": timing.warmup_s},
    }


def scores_table(title: str, frames: list[str], scores: dict[str, dict[str, list[float]]],
                 true_sharpness: list[float]) -> Table:
    """One row per frame (named by ``frames``) and their mean: PSNR, SSIM and sharpness of each predictor in
    ``scores`` (column name -> its ``Scores`` as a dict), then the true frames' sharpness."""
    columns = [(f"{label}\n{who}", values[metric], fmt) for metric, label, fmt in METRICS
               for who, values in scores.items()] + [("sharp\ntrue", true_sharpness, "{:.4f}")]
    table = Table(title=title)
    table.add_column("frame")
    for name, *_ in columns:
        table.add_column(name, justify="right")
    for f, frame in enumerate(frames):
        table.add_row(frame, *[fmt.format(values[f]) for _, values, fmt in columns])
    table.add_row(f"mean of {len(frames)}", *[fmt.format(sum(values) / len(values)) for _, values, fmt in columns],
                  style="bold")
    return table


def print_whole(console, table: Table) -> None:
    """Print ``table`` uncut: piped or redirected output (80 columns to rich) gets the width the table needs;
    a terminal keeps its own width."""
    from rich.measure import Measurement

    needed = Measurement.get(console, console.options.update_width(1000), table).maximum
    if console.is_terminal or needed <= console.width:
        console.print(table)
    else:  # rich caps a print's width at its console's
        Console(file=console.file, width=needed, quiet=console.quiet, color_system=console.color_system).print(table)


def perceptual_scores(result: Evaluation, metrics: list[str], lpips: Path | None, i3d: Path | None) -> dict:
    """LPIPS over the first 4 generated frames and FVD of the generated frames against the true ones, for the
    model and the references, as far as ``metrics`` has them. FVD from a few clips is a rough figure: the
    feature covariances are fitted to as many videos as there are clips."""
    from scdkit.perceptual import fvd, lpips_per_frame

    k = result.truth.shape[1]
    videos = {"model": result.generation.video.float().cpu(), "repeat_last": repeat_last(result.context, k),
              "constant_velocity": constant_velocity(result.context, k)}
    scores = {}
    if "lpips" in metrics:
        first4 = min(4, k)
        scores["lpips_first4"] = {who: float(lpips_per_frame(v[:, :first4], result.truth[:, :first4], lpips).mean())
                                  for who, v in videos.items()}
    if "fvd" in metrics:
        scores["fvd"] = {who: fvd(result.truth, v, i3d) for who, v in videos.items()}
    return scores


def print_report(report: dict, console: Console) -> None:
    title = (f"held-out continuation: {report['clips']} clips, {report['context_frames']} context frames, "
             f"{report['steps']} steps; last = repeat the last context frame, velocity = move it on at constant "
             "velocity")
    frames = [f"+{f + 1}" for f in range(report["generated_frames"])]
    scores = {"model": report["model"]} | {column: report[who] for who, (_, column) in REFERENCES.items()}
    print_whole(console, scores_table(title, frames, scores, report["true_sharpness"]))
    first4, first = report["psnr_first4"], min(4, report["generated_frames"])
    model = first4["model"]
    against = " and ".join(f"{'beats' if model > first4[who] else 'does NOT beat'} {name} {first4[who]:.2f} dB "
                           f"({model - first4[who]:+.2f} dB)" for who, (name, _) in REFERENCES.items())
    console.print(f"PSNR over the first {first} generated frame{'s' * (first > 1)}: model {model:.2f} dB {against}")
    pooled = report["pooled_psnr_first4"]
    names = {"model": "model"} | {who: name for who, (name, _) in REFERENCES.items()}
    console.print("  the same from the MSE pooled over clips (an exactly predicted clip does not count as 100 dB): "
                  + ", ".join(f"{names[who]} {value:.2f} dB" for who, value in pooled.items()))
    ssim = report["ssim_first4"]
    console.print("SSIM over the same frames: " + ", ".join(f"{names[who]} {value:.3f}" for who, value in ssim.items())
                  + f"; sharpness of all {report['generated_frames']} generated frames: "
                  f"{report['sharpness_ratio']:.2f}x the true frames' (blur reads below 1)")
    for key, label in (("lpips_first4", f"LPIPS over the first {first} frames (lower is closer)"),
                       ("fvd", f"FVD of the {report['generated_frames']} generated frames against the true ones")):
        if key in report:
            console.print(f"{label}: " + ", ".join(f"{names[who]} {value:.3f}" for who, value in report[key].items()))
    if report.get("guidance") is not None:
        console.print(f"sampled with classifier-free guidance {report['guidance']:g} (the unconditional branch: noisy "
                      "encoder features and the null label)")
    if "state_error_first4" in report:
        console.print("state error (pixels from each true object centre to the nearest blob found) over the first "
                      f"{first} frames: " + ", ".join(f"{names[who]} {value:.2f}"
                                                     for who, value in report["state_error_first4"].items()))
    t = report["timing_batch1"]
    console.print(f"streaming, batch 1: time to first frame {t['first_frame_s'] * 1000:.1f} ms (prefill included), "
                  f"steady {t['per_frame_s'] * 1000:.1f} ms/frame, {t['fps']:.1f} frames/s; warm-up run "
                  f"{t['warmup_s']:.1f} s (compilation included, if any)")


def run_generate(pipeline: Pipeline, data: VideoDataset | str, config: EvalConfig = EvalConfig(), gif: Path = Path("out/generate.gif"),
                 video: Path | None = None, as_json: bool = False, console: Console | None = None,
                 lpips: Path | None = None, i3d: Path | None = None) -> dict:
    """The main job; ``lpips`` (LPIPS weights) and ``i3d`` (the FVD network) add those scores when given
    (``scdkit.perceptual``: nothing is downloaded; a bad file is refused before any work)."""
    from scdkit.perceptual import perceptual_metrics

    console = console or Console()
    perceptual = perceptual_metrics(lpips, i3d)
    data = as_dataset(data, pipeline.frame)
    clips, context, frames = config.clips, config.context, config.frames
    steps = config.steps or pipeline.scheduler.steps
    status = Console(stderr=True)  # progress on stderr: --json output stays clean
    status.print(f"{pipeline.name}: continuing {clips} held-out {data.name} clip{'s' * (clips > 1)} "
                 f"({context} context -> {frames} frames, {steps} steps), then timing batch-1 streaming ...",
                 highlight=False)
    result = evaluate_continuation(pipeline, data, config.model_copy(update={"steps": steps}))
    if not torch.isfinite(result.generation.video).all():  # scores of nan would read as numbers; nothing is written
        raise NotFinite(f"{pipeline.name}: the generated frames are not finite (nan or inf): the weights are broken "
                          f"or {pipeline.autocast_dtype or 'the precision'} overflows; nothing was written")
    timing = time_streaming(pipeline, held_out_clips(data, 1, context + frames, seed=99).context(context),
                            frames, steps, config.guidance)
    frames = comparison_frames(result.context, result.truth, result.generation.video.float().cpu())
    write_gif(gif, frames)
    report = summary(result, timing, steps) | {"gif": str(gif)} | perceptual_scores(result, perceptual, lpips, i3d)
    if video is not None:
        write_mp4(video, frames)
        report["video"] = str(video)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, console)
        written = f"{gif} and {video}" if video is not None else str(gif)
        console.print(f"wrote {written} (left: truth, right: model; green border = context, red = generated)")
    return report
