"""`scdkit swap-eval`: several encoders under one fixed, trained decoder, side by side.

The decoder is always the pipeline's checkpoint. Each encoder (a registry name) gets its weights
either from that same checkpoint — the pipeline's own encoder, or one declared with it in
``[scdkit].same_weights`` (``Registry.build`` refuses anything else) — or from its own file
(``checkpoints={"name": path}``). For each encoder, on the same held-out clips:

- ``psnr``/``ssim``/``mse``: mean over clips and generated frames of the continuation against the
  true frames (``scdkit.evaluate.evaluate_continuation``: ``context`` true frames, then ``frames``
  generated, ``steps`` denoising steps, seeded noise).
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

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich import box
from rich.table import Table

from scdkit.checkpoint import load_component, read_metadata
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
    psnr: float
    ssim: float
    mse: float
    val_loss: float
    first_frame_s: float
    per_frame_s: float
    peak_mem_mb: float
    params: int


@dataclass
class SwapReport:
    decoder: dict
    rows: list[SwapRow]

    def to_json(self) -> dict:
        return {"decoder": self.decoder, "rows": [asdict(row) for row in self.rows]}


def parse_checkpoints(items: list[str], encoders: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` arguments into a mapping; every NAME must be one of the evaluated encoders."""
    found = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--checkpoint expects NAME=PATH, got {item!r}")
        if name not in encoders:
            raise UsageError(f"--checkpoint {name}=...: {name!r} is not in --encoders ({', '.join(encoders)})")
        found[name] = Path(path)
    return found


def build_swapped(registry: Registry, pipeline: str, encoder: str, checkpoint: Path | None = None,
                  **build_options) -> tuple[Pipeline, str]:
    """The pipeline with ``encoder`` under its trained decoder, and where the encoder's weights came from.
    ``build_options`` (attention, device, precision) go to ``Registry.build``."""
    directory = registry.checkpoint_dir(pipeline)
    if checkpoint is None:
        built = registry.build(pipeline, encoder=encoder, **build_options)
        trained = registry.pipelines[pipeline].encoder
        return built, "checkpoint" if encoder == trained else f"same as {trained}"
    built = registry.build(pipeline, load=False, encoder=encoder, **build_options)
    load_component(built.components["decoder"], directory / "decoder.safetensors", "decoder")
    load_component(built.components["encoder"], checkpoint, "encoder")
    return built, str(checkpoint)


@torch.no_grad()
def validation_loss(pipeline: Pipeline, clips: Batch, seed: int = 0) -> float:
    pipeline.train(False)
    return pipeline.loss(clips, Recipe(), generator=pipeline.generator(seed)).item()


def stream_cost(pipeline: Pipeline, clip: Batch, frames: int, steps: int | None) -> tuple[float, float, float]:
    """(time to first frame s, per-frame s, peak MB) of batch-1 streaming; see the module doc."""
    timed = time_streaming(pipeline, clip, frames, steps)
    return timed.first_frame_s, timed.per_frame_s, generation_peak_mb(pipeline, clip, frames, steps)


def swap_eval(registry: Registry, pipeline: str, encoders: list[str], checkpoints: dict[str, Path] | None = None,
              config: EvalConfig = EvalConfig(), progress: Callable[[SwapRow], None] | None = None,
              **build_options) -> SwapReport:
    """Evaluate every encoder in ``encoders`` under ``pipeline``'s trained decoder (see the module doc).
    ``build_options`` (attention, device, precision) go to ``Registry.build``."""
    checkpoints = checkpoints or {}
    if pipeline not in registry.pipelines:
        raise UsageError(f"unknown pipeline {pipeline!r}; known: {', '.join(registry.pipelines)}")
    entry = registry.pipelines[pipeline]
    directory = registry.checkpoint_dir(pipeline)
    if "encoder" not in entry.roles or directory is None:
        raise UsageError(f"pipeline {pipeline!r} needs an encoder, a decoder and a checkpoint directory for swap-eval")
    if not encoders:
        raise UsageError("swap-eval needs at least one encoder")
    meta = read_metadata(directory / "decoder.safetensors")
    # every name, checkpoint and same-weights declaration is checked before any evaluation starts
    swapped = {name: build_swapped(registry, pipeline, name, checkpoints.get(name), **build_options)
               for name in encoders}
    shared_decoder = next(iter(swapped.values()))[0].components["decoder"]
    decoder = {"pipeline": pipeline, "name": entry.decoder, "checkpoint": str(directory / "decoder.safetensors"),
               "step": int(meta.get("step", 0)), "params": sum(p.numel() for p in shared_decoder.parameters())}
    rows = []
    for name, (built, weights) in swapped.items():
        result = evaluate_continuation(built, entry.data, config)
        means = result.model.mean()  # scored on result.clips, which are reused below
        clip = result.clips.clips(0, 1).context(config.context)
        first_s, per_frame_s, peak_mb = stream_cost(built, clip, config.frames, config.steps)
        row = SwapRow(name, weights, means["psnr"], means["ssim"], means["mse"],
                      validation_loss(built, result.clips, config.seed), first_s, per_frame_s, peak_mb,
                      sum(p.numel() for p in built.components["encoder"].parameters()))
        rows.append(row)
        if progress is not None:
            progress(row)
    return SwapReport(decoder, rows)


COLUMNS = (("encoder", "encoder", "{}"), ("weights", "weights", "{}"), ("PSNR", "psnr", "{:.2f}"),
           ("SSIM", "ssim", "{:.3f}"), ("MSE", "mse", "{:.4f}"), ("val loss", "val_loss", "{:.4f}"),
           ("1st frame ms", "first_frame_s", "{:.0f}"), ("ms/frame", "per_frame_s", "{:.1f}"),
           ("peak MB", "peak_mem_mb", "{:.2f}"), ("params", "params", "{:,}"))


def _cells(row: SwapRow) -> list[str]:
    values = asdict(row)
    return [fmt.format(values[key] * 1e3 if key.endswith("_s") else values[key]) for _, key, fmt in COLUMNS]


def _title(report: SwapReport) -> str:
    d = report.decoder
    return f"encoder swaps under {d['name']} from {d['pipeline']} (step {d['step']}, {d['params']:,} parameters)"


def rich_table(report: SwapReport) -> Table:
    table = Table(*(title for title, _, _ in COLUMNS), title=_title(report), box=box.SIMPLE, padding=(0, 1))
    for row in report.rows:
        table.add_row(*_cells(row))
    return table


def markdown(report: SwapReport) -> str:
    lines = [f"**{_title(report)}**", "", "| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.rows]
    return "\n".join(lines)
