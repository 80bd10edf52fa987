"""`scdkit swap-eval`: several encoders under one fixed, trained decoder, side by side.

The decoder is always the pipeline's checkpoint. Each encoder (a registry name) gets its weights
either from that same checkpoint — the pipeline's own encoder, or one declared with it in
``[scdkit].same_weights`` — or from its own run folder or file (``checkpoints={"name": path}``), e.g. a
run of ``scdkit train --encoder NAME --init DIR --freeze decoder``. Encoder and decoder must belong
together (``scdkit.runs.pairing_problem``): an encoder fitted under another decoder is refused unless
``force_pairing``. By default: the pipeline's encoder and its same-weights group.

Quality is measured on ``seeds`` sets of held-out clips (each seed draws its own clips and noise) and
reported as mean ± std over the seeds:

- ``psnr``/``ssim``/``mse``/``sharpness``: mean over clips and generated frames of the continuation
  against the true frames (``scdkit.evaluate.evaluate_continuation``: ``context`` true frames, then
  ``frames`` generated, ``steps`` denoising steps, seeded noise); ``sharpness`` is the mean spatial
  gradient of the generated frames (PSNR rewards blur; the true frames' is in the report).
- ``val_loss``: the training loss (default ``Recipe``) on those clips with a fixed generator, so
  every encoder sees the same noise and timesteps; no gradients.
- ``first_frame_s``/``per_frame_s``: batch-1 streaming of the same length after one untimed
  warm-up run: time to the first frame (prefill included) and the median time between frames.
- ``peak_mem_mb``: peak bytes of the tensors allocated during one more batch-1 generation and
  alive at the same time — encoder state (KV cache) and activations, weights excluded — tracked at
  the ATen dispatch level (``scdkit.encoder_bench.LiveBytes``). CPU PyTorch has no resettable
  allocator statistics and process RSS is monotone and process-wide, so this counts tensors, not
  allocator caching, fragmentation or scratch memory inside fused kernels.
- ``params``: the encoder's parameters (the decoder's count is under ``decoder``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich import box
from rich.table import Table

from scdkit.errors import UsageError
from scdkit.encoder_bench import generation_peak_mb
from scdkit.evaluate import EvalConfig, evaluate_continuation
from scdkit.generate import time_streaming
from scdkit.interfaces import Batch, Recipe
from scdkit.pipeline import Pipeline
from scdkit.registry import Registry


@dataclass
class SwapRow:
    encoder: str
    weights: str  # where the encoder's weights came from
    step: int  # its training step
    psnr: float
    psnr_std: float  # over the seeds
    ssim: float
    ssim_std: float
    sharpness: float
    val_loss: float
    val_loss_std: float
    first_frame_s: float
    per_frame_s: float
    peak_mem_mb: float
    params: int


@dataclass
class SwapReport:
    decoder: dict
    clips: str  # which held-out clips were scored
    true_sharpness: float
    rows: list[SwapRow]
    warnings: list[str]  # pairings forced by --force-pairing

    def to_json(self) -> dict:
        return {"decoder": self.decoder, "clips": self.clips, "true_sharpness": self.true_sharpness,
                "rows": [asdict(row) for row in self.rows], "warnings": self.warnings}


def parse_checkpoints(items: list[str], encoders: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` arguments (PATH: a run folder or a checkpoint file) into a mapping; every NAME must be
    one of the evaluated encoders and every PATH must exist."""
    found = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--checkpoint expects NAME=PATH (a run folder or an encoder file), got {item!r}")
        if name not in encoders:
            raise UsageError(f"--checkpoint {name}=...: {name!r} is not in --encoders ({', '.join(encoders)})")
        if not Path(path).exists():
            raise UsageError(f"--checkpoint {item}: {path} does not exist")
        found[name] = Path(path)
    return found


def default_encoders(registry: Registry, pipeline: str) -> list[str]:
    """The pipeline's encoder and the encoders declared with it in [scdkit].same_weights."""
    trained = registry.entry(pipeline).encoder
    group = next((g for g in registry.settings.same_weights if trained in g), [trained])
    return [trained, *(name for name in group if name != trained)]


def build_swapped(registry: Registry, pipeline: str, encoder: str, checkpoint: Path | None = None,
                  **build_options) -> tuple[Pipeline, str]:
    """The pipeline with ``encoder`` under its trained decoder, and where the encoder's weights came from.
    ``build_options`` (attention, device, precision, force_pairing) go to ``Registry.build``."""
    files = {"encoder": checkpoint} if checkpoint is not None else None
    built = registry.build(pipeline, encoder=encoder, files=files, **build_options)
    trained = registry.pipelines[pipeline].encoder
    if checkpoint is not None:
        return built, str(built.sources["encoder"].path)
    return built, "checkpoint" if encoder == trained else f"same as {trained}"


@torch.no_grad()
def validation_loss(pipeline: Pipeline, clips: Batch, seed: int = 0) -> float:
    pipeline.train(False)
    return pipeline.loss(clips, Recipe(), generator=pipeline.generator(seed)).item()


def stream_cost(pipeline: Pipeline, clip: Batch, frames: int, steps: int | None) -> tuple[float, float, float]:
    """(time to first frame s, per-frame s, peak MB) of batch-1 streaming; see the module doc."""
    timed = time_streaming(pipeline, clip, frames, steps)
    return timed.first_frame_s, timed.per_frame_s, generation_peak_mb(pipeline, clip, frames, steps)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std; a nan (the SSIM of frames smaller than its window) gives nan, not an error."""
    mean = statistics.fmean(values)
    spread = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(spread)


def swap_eval(registry: Registry, pipeline: str, encoders: list[str] | None = None,
              checkpoints: dict[str, Path] | None = None, config: EvalConfig = EvalConfig(),
              progress: Callable[[SwapRow], None] | None = None, seeds: list[int] = (0, 1, 2),
              warn: Callable[[str], None] = lambda message: None, data_name: str | None = None,
              **build_options) -> SwapReport:
    """Evaluate every encoder in ``encoders`` (default: ``default_encoders``) under ``pipeline``'s trained
    decoder on the held-out clips of each seed in ``seeds`` (see the module doc). ``build_options``
    (attention, device, precision, force_pairing) go to ``Registry.build``; ``config.seed`` is unused; ``data_name``
    replaces the pipeline's data set.
    ``warn`` hears each forced pairing before the evaluation starts."""
    checkpoints = checkpoints or {}
    if pipeline not in registry.pipelines:
        raise UsageError(f"unknown pipeline {pipeline!r}; known: {', '.join(registry.pipelines)}")
    entry = registry.pipelines[pipeline]
    if "encoder" not in entry.roles or registry.checkpoint_dir(pipeline) is None:
        raise UsageError(f"pipeline {pipeline!r} needs an encoder, a decoder and a checkpoint directory for swap-eval")
    encoders = list(encoders) if encoders else default_encoders(registry, pipeline)
    data = registry.dataset(pipeline, data_name)
    if not seeds:
        raise UsageError("swap-eval needs at least one seed")
    # every name, checkpoint, pairing and same-weights declaration is checked before any evaluation starts
    swapped = {name: build_swapped(registry, pipeline, name, checkpoints.get(name), **build_options)
               for name in encoders}
    first = next(iter(swapped.values()))[0]
    source = first.sources["decoder"]
    decoder = {"pipeline": pipeline, "name": entry.decoder, "checkpoint": str(source.path), "step": source.step,
               "weights_sha256": source.digest, "params": sum(p.numel() for p in first.components["decoder"].parameters())}
    clips = (f"{len(seeds)} x {config.clips} held-out {data.name} clips (split 'test', seeds "
             f"{', '.join(map(str, seeds))}): {config.context} context + {config.frames} generated frames, "
             f"{config.steps or 'scheduler default'} steps")
    for built, _ in swapped.values():
        for warning in built.warnings:
            warn(warning)
    rows, true_sharpness = [], []
    for name, (built, weights) in swapped.items():
        runs = [evaluate_continuation(built, data, config.model_copy(update={"seed": seed})) for seed in seeds]
        true_sharpness = [statistics.fmean(run.truth_sharpness) for run in runs]
        psnr, ssim = (_mean_std([run.model.mean()[key] for run in runs]) for key in ("psnr", "ssim"))
        losses = _mean_std([validation_loss(built, run.clips, seed) for run, seed in zip(runs, seeds)])
        clip = runs[0].clips.clips(0, 1).context(config.context)
        first_s, per_frame_s, peak_mb = stream_cost(built, clip, config.frames, config.steps)
        row = SwapRow(name, weights, built.sources["encoder"].step, *psnr, *ssim,
                      statistics.fmean(run.model.mean()["sharpness"] for run in runs), *losses,
                      first_s, per_frame_s, peak_mb, sum(p.numel() for p in built.components["encoder"].parameters()))
        rows.append(row)
        if progress is not None:
            progress(row)
    warnings = [warning for built, _ in swapped.values() for warning in built.warnings]
    return SwapReport(decoder, clips, statistics.fmean(true_sharpness), rows, warnings)


# (title, value, spread over the seeds or None, format); times shown in ms
COLUMNS = (("encoder", "encoder", None, "{}"), ("weights", "weights", None, "{}"), ("step", "step", None, "{}"),
           ("PSNR", "psnr", "psnr_std", "{:.2f}"), ("SSIM", "ssim", "ssim_std", "{:.3f}"),
           ("sharpness", "sharpness", None, "{:.4f}"), ("val loss", "val_loss", "val_loss_std", "{:.4f}"),
           ("1st frame ms", "first_frame_s", None, "{:.0f}"), ("ms/frame", "per_frame_s", None, "{:.1f}"),
           ("peak MB", "peak_mem_mb", None, "{:.2f}"), ("params", "params", None, "{:,}"))


def _cells(row: SwapRow) -> list[str]:
    values = asdict(row)
    cells = []
    for _, key, spread, fmt in COLUMNS:
        scale = 1e3 if key.endswith("_s") else 1
        cell = fmt.format(values[key] * scale)
        cells.append(f"{cell} ± {fmt.format(values[spread])}" if spread else cell)
    return cells


def _title(report: SwapReport) -> str:
    d = report.decoder
    return (f"encoder swaps under {d['name']} from {d['pipeline']} (step {d['step']}, {d['params']:,} parameters, "
            f"sha256 {d['weights_sha256'][:12]}); mean ± std over {report.clips}; true frames' sharpness "
            f"{report.true_sharpness:.4f}")


def rich_table(report: SwapReport) -> Table:
    table = Table(*(column[0] for column in COLUMNS), title=_title(report), box=box.SIMPLE, padding=(0, 1))
    for row in report.rows:
        table.add_row(*_cells(row))
    return table


def markdown(report: SwapReport) -> str:
    lines = [f"**{_title(report)}**", "", "| " + " | ".join(column[0] for column in COLUMNS) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.rows]
    return "\n".join(lines)
