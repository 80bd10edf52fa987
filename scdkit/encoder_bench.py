"""Encoder scaling curves: per-frame ``step`` time and peak memory against the number of frames seen,
and peak memory of a training pass (forward + backward) against clip length.

What is measured, and how (CPU or not, the same way):

- ``step_s``: median wall time of single-frame ``step`` calls for the ``repeats`` frames ending at
  the frame count, after a prefill (in chunks) and ``warmup`` unmeasured steps.
- ``state_mb``: bytes of every tensor the encoder state holds, as allocated by
  ``new_state(batch, frames + 1)``: the KV cache or memory an application streaming that many
  frames must hold.
- ``step_peak_mb``: peak bytes of tensors allocated during one more step and still alive, tracked
  at the ATen dispatch level (:class:`LiveBytes`). It sees every tensor an op returns; it does not
  see scratch memory inside a fused kernel (e.g. SDPA's own blocks), allocator caching or
  fragmentation. Not the process RSS: CPU PyTorch has no resettable allocator statistics.
- ``peak_mb`` = ``state_mb + step_peak_mb`` (weights excluded, they do not depend on frames).
- training: ``train_peak_mb``, peak live tensor bytes during forward + backward of a random clip
  (saved activations, gradients and temporaries), tracked the same way.

Axis legend: b batch · f frames · n tokens per frame · p patch values.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from scdkit.interfaces import CausalEncoder

MB = 2**20
FRAME_COUNTS = (16, 32, 64, 128, 256, 512, 1024)
TRAIN_LENGTHS = (16, 32, 64, 128)
REPEATS, WARMUP = 5, 2  # timed and untimed steps at the end of each frame count: a count is at least their sum


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ATen ops allocate while the mode is active and that are still alive.

    Outputs that alias an input (views, in-place and ``out=`` ops) are not allocations; tensors that
    existed before the mode started (weights, caches) are never counted.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [ref for ref in self.live if ref.expired()]:
            self.current -= self.live.pop(ref)
        inputs = {StorageWeakRef(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref not in inputs and ref not in self.live:
                    self.live[ref] = storage.nbytes()
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def generation_peak_mb(pipeline, clip: Tensor, frames: int, steps: int | None = None, seed: int = 0) -> float:
    """Peak MB of tensors allocated during ``pipeline.generate(clip, frames)`` (state, activations;
    weights excluded). Tracked per ATen op, so measure it in a run of its own, never while timing."""
    gc.collect()
    with LiveBytes() as tracker:
        pipeline.generate(clip, frames, steps=steps, generator=pipeline.generator(seed))
    return tracker.peak / MB


def state_nbytes(state: object) -> int:
    """Bytes of every distinct tensor storage reachable from an encoder state (lists, dicts, attributes)."""
    seen: set[int] = set()

    def visit(obj: object, depth: int) -> int:
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if depth > 4 or isinstance(obj, (str, bytes, int, float, torch.nn.Module)):
            return 0
        if isinstance(obj, dict):
            return sum(visit(x, depth + 1) for x in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(visit(x, depth + 1) for x in obj)
        if hasattr(obj, "__dict__"):
            return sum(visit(x, depth + 1) for x in vars(obj).values())
        return 0

    return visit(state, 0)


def _frames(encoder: CausalEncoder, batch: int, count: int, generator: torch.Generator) -> Tensor:
    frame, p = encoder.frame, next(encoder.parameters())
    return torch.randn(batch, count, frame.tokens, frame.patch_dim, generator=generator, device=p.device, dtype=p.dtype)


def _generator(encoder: CausalEncoder, seed: int) -> torch.Generator:
    return torch.Generator(device=next(encoder.parameters()).device).manual_seed(seed)


@torch.no_grad()
def step_curve_point(encoder: CausalEncoder, frames: int, batch: int = 1, repeats: int = REPEATS,
                     warmup: int = WARMUP, prefill_chunk: int = 16, seed: int = 0) -> dict:
    """Per-frame step time and memory of ``encoder`` once it has seen ``frames`` frames (see module doc)."""
    if frames < repeats + warmup:
        raise ValueError(f"frame count {frames} is below repeats + warmup = {repeats + warmup}")
    g = _generator(encoder, seed)
    encoder.eval()
    state = encoder.new_state(batch, frames + 1)
    prefill = frames - repeats - warmup
    for start in range(0, prefill, prefill_chunk):
        encoder.step(state, _frames(encoder, batch, min(prefill_chunk, prefill - start), g))
    times = []
    for i in range(warmup + repeats):
        frame = _frames(encoder, batch, 1, g)
        started = time.perf_counter()
        encoder.step(state, frame)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    frame = _frames(encoder, batch, 1, g)
    gc.collect()
    with LiveBytes() as tracker:
        encoder.step(state, frame)
    state_mb = state_nbytes(state) / MB
    return {"frames": frames, "step_s": statistics.median(times), "state_mb": state_mb,
            "step_peak_mb": tracker.peak / MB, "peak_mb": state_mb + tracker.peak / MB}


def encoder_curves(encoders: dict[str, CausalEncoder], frame_counts: Iterable[int] = FRAME_COUNTS, batch: int = 1,
                   repeats: int = REPEATS, warmup: int = WARMUP, prefill_chunk: int = 16, seed: int = 0,
                   progress=None) -> list[dict]:
    """One row per encoder and frame count: ``{"encoder", "frames", "step_s", "state_mb", "step_peak_mb",
    "peak_mb"}``. ``progress``, if given, is called with each row as it is measured."""
    rows = []
    for name, encoder in encoders.items():
        for frames in frame_counts:
            row = {"encoder": name, **step_curve_point(encoder, frames, batch, repeats, warmup, prefill_chunk, seed)}
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def training_point(encoder: CausalEncoder, frames: int, batch: int = 1, seed: int = 0) -> dict:
    """Peak live tensor bytes and wall time of one forward + backward over a random clip of ``frames`` frames."""
    encoder.train()
    encoder.zero_grad(set_to_none=True)
    clip = _frames(encoder, batch, frames, _generator(encoder, seed))
    gc.collect()
    started = time.perf_counter()
    with LiveBytes() as tracker:
        encoder(clip).pow(2).mean().backward()
    elapsed = time.perf_counter() - started
    encoder.zero_grad(set_to_none=True)
    encoder.eval()
    return {"frames": frames, "train_peak_mb": tracker.peak / MB, "train_s": elapsed}


def training_curves(encoders: dict[str, CausalEncoder], clip_lengths: Iterable[int] = TRAIN_LENGTHS,
                    batch: int = 1, seed: int = 0, progress=None) -> list[dict]:
    """One row per encoder and clip length: ``{"encoder", "frames", "train_peak_mb", "train_s"}``."""
    rows = []
    for name, encoder in encoders.items():
        for frames in clip_lengths:
            row = {"encoder": name, **training_point(encoder, frames, batch, seed)}
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def ratio(rows: list[dict], encoder: str, key: str, at: int, base: int) -> float | None:
    """``key`` at ``at`` frames over ``key`` at ``base`` frames for one encoder, or None if not measured."""
    values = {row["frames"]: row[key] for row in rows if row["encoder"] == encoder}
    return values[at] / values[base] if at in values and base in values and values[base] else None


def curves_markdown(rows: list[dict]) -> str:
    """Markdown table of :func:`encoder_curves` rows, with each encoder's time ratio 512/16 and memory
    ratio 1024/64 (the issue's targets: rolling window time <= 1.1x, memory-efficient memory <= 1.1x)."""
    lines = ["| encoder | frames | step ms | state MB | step peak MB | peak MB |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['encoder']} | {r['frames']} | {r['step_s'] * 1e3:.2f} | {r['state_mb']:.2f} | "
              f"{r['step_peak_mb']:.2f} | {r['peak_mb']:.2f} |" for r in rows]
    lines += ["", "| encoder | step time 512 / 16 | peak memory 1024 / 64 |", "|---|---:|---:|"]
    for name in dict.fromkeys(r["encoder"] for r in rows):
        t, m = ratio(rows, name, "step_s", 512, 16), ratio(rows, name, "peak_mb", 1024, 64)
        lines.append(f"| {name} | {'-' if t is None else f'{t:.2f}x'} | {'-' if m is None else f'{m:.2f}x'} |")
    return "\n".join(lines)


def training_markdown(rows: list[dict]) -> str:
    lines = ["| encoder | clip frames | train peak MB | forward+backward s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['encoder']} | {r['frames']} | {r['train_peak_mb']:.1f} | {r['train_s']:.2f} |" for r in rows]
    return "\n".join(lines)


def plot_curves(rows: list[dict], train_rows: list[dict], path) -> None:
    """Three panels: per-frame step time, streaming peak memory, training peak memory (all log-log)."""
    from scdkit.figures import frame_count_axes, new_figure, save_png

    fig = new_figure(15, 4.2)
    axes = fig.subplots(1, 3)
    panels = [(rows, "step_s", 1e3, "per-frame step (ms)", "frames seen"),
              (rows, "peak_mb", 1, "streaming peak memory (MB)", "frames seen"),
              (train_rows, "train_peak_mb", 1, "training peak memory (MB)", "clip frames")]
    for ax, (data, key, scale, title, xlabel) in zip(axes, panels):
        for name in dict.fromkeys(r["encoder"] for r in data):
            points = [(r["frames"], r[key] * scale) for r in data if r["encoder"] == name]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_title(title)
        frame_count_axes(ax, [r["frames"] for r in data], xlabel)
    fig.tight_layout()
    save_png(fig, path)


def run_curves(encoders: dict[str, CausalEncoder], frame_counts: Iterable[int] = FRAME_COUNTS,
               train_lengths: Iterable[int] = (), plot=None, progress=None) -> dict:
    """Streaming curves, optional training curves and plot: ``{"curves", "training", "markdown"}``.
    ``progress``, if given, is called with one line per measured point."""
    say = progress or (lambda message: None)
    rows = encoder_curves(encoders, frame_counts, progress=lambda r: say(
        f"{r['encoder']} at {r['frames']} frames: {r['step_s'] * 1e3:.2f} ms/step, peak {r['peak_mb']:.1f} MB"))
    train_rows = training_curves(encoders, train_lengths) if train_lengths else []
    if plot:
        plot_curves(rows, train_rows, plot)
    return {"curves": rows, "training": train_rows, "markdown": curves_markdown(rows)}
