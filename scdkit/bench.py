"""`scdkit bench`: SCD and the monolithic causal-DiT baseline, side by side, in one process.

Both models are built from the same plugins and blocks at matched width, heads, total depth
(encoder + decoder layers = baseline layers), tokens per frame, denoising steps and context
length, with random weights (speed does not depend on them), and stream through the same
``Pipeline.generate`` loop at batch 1. Timings alternate between the models over ``repeats``
runs after a warm-up, and per-frame latency is the median over all steady frames (the first
frame of each run, which includes the prefill, is reported separately).

The FLOP model (:func:`flops_per_frame`) counts the matmul FLOPs of one steady generated frame,
as this implementation computes it: for each DiT block on q query tokens over k keys at width d
and MLP ratio r,

    linear: 2·q·d²·(3 + 1 + 2r)       (qkv, output projection, the MLP's two layers)
    attention: 4·q·k·d                 (scores and the weighted sum of values)
    adaLN: 2·d·6d                      (one modulation vector per call)

plus the patch embedding, the output projection and, where a call computes them, the timestep
MLP and the final layer's modulation. SCD's decoder computes its time terms once per generation
for the whole schedule (``TimeTable``), so they are not per-frame work. Elementwise work (norms,
softmax, GELU) is left out. ``tests/test_bench.py`` checks the count against torch's own
``FlopCounterMode`` on a tiny config.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator
from rich.table import Table

from scdkit.device import synchronize
from scdkit.encoder_bench import generation_peak_mb
from scdkit.errors import UsageError
from scdkit.interfaces import FrameSpec
from scdkit.pipeline import Pipeline, assemble
from scdkit.pluginmanager import default_catalog

TIME_FREQUENCIES = 256  # TimestepEmbedding's default


class BenchConfig(BaseModel):
    """The compared shapes; the defaults mirror the paper's protocol (8+4 vs 12 layers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: PositiveInt = Field(256, description="model width of every component")
    heads: PositiveInt = Field(4, description="attention heads")
    encoder_layers: PositiveInt = Field(8, description="SCD encoder layers")
    decoder_layers: PositiveInt = Field(4, description="SCD decoder layers")
    baseline_layers: PositiveInt | None = Field(None, description="causal-DiT layers (default: encoder + decoder layers)")
    tokens_per_frame: PositiveInt = Field(64, description="tokens per frame (a square grid)")
    steps: PositiveInt = Field(50, description="denoising steps per frame")
    context_frames: PositiveInt = Field(144, description="context frames before generating")
    patch_size: PositiveInt = Field(4, description="patch side in pixels")
    channels: PositiveInt = Field(1, description="frame channels")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP width / model width")

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if math.isqrt(self.tokens_per_frame) ** 2 != self.tokens_per_frame:
            raise ValueError(f"tokens_per_frame must be a square grid (16, 64, 256, ...), got {self.tokens_per_frame}")
        if self.baseline_layers is None:
            object.__setattr__(self, "baseline_layers", self.encoder_layers + self.decoder_layers)
        return self

    @property
    def frame(self) -> FrameSpec:
        side = math.isqrt(self.tokens_per_frame) * self.patch_size
        return FrameSpec(channels=self.channels, height=side, width=side, patch_size=self.patch_size)

    def summary(self) -> dict:
        return self.model_dump(include={"width", "heads", "encoder_layers", "decoder_layers", "baseline_layers",
                                        "tokens_per_frame", "steps", "context_frames"})


# -- FLOP model ----------------------------------------------------------------------------------

def block_flops(queries: int, keys: int, width: int, mlp_ratio: float = 4.0) -> int:
    """Matmul FLOPs of one DiT block: ``queries`` tokens attending over ``keys`` keys (adaLN excluded)."""
    hidden = int(width * mlp_ratio)
    linear = 2 * queries * width * (4 * width + 2 * hidden)
    return linear + 4 * queries * keys * width


def flops_per_frame(config: BenchConfig, context: int | None = None) -> dict[str, int]:
    """FLOPs of one steady frame generated after ``context`` frames (default: the config's).

    SCD: T decoder passes over the frame and its conditioning tokens (``token_concat``), one
    projection of the conditioning, and one encoder step of the new frame over the context.
    Baseline: T passes of the frame through every layer over the cached context, and one pass
    that commits the clean frame to the cache.
    """
    n, d, r, steps = config.tokens_per_frame, config.width, config.mlp_ratio, config.steps
    p = config.frame.patch_dim
    keys = (context if context is not None else config.context_frames) * n + n  # the context + the frame itself
    embed = unembed = 2 * n * p * d
    block_ada, final_ada, time_mlp = 2 * d * 6 * d, 2 * d * 2 * d, 2 * TIME_FREQUENCIES * d + 2 * d * d
    frame_block = block_flops(n, keys, d, r) + block_ada  # one frame over the cached context

    decoder_tokens = 2 * n  # token_concat: conditioning tokens + frame tokens
    decoder = steps * (embed + config.decoder_layers * block_flops(decoder_tokens, decoder_tokens, d, r) + unembed)
    condition = 2 * n * d * d  # projection of the encoder output (encoder width == decoder width here)
    encoder = embed + config.encoder_layers * frame_block + final_ada
    baseline_step = embed + time_mlp + config.baseline_layers * frame_block + final_ada + unembed
    baseline_observe = embed + config.baseline_layers * frame_block
    return {"scd": decoder + condition + encoder, "scd_decoder": decoder, "scd_encoder": encoder + condition,
            "baseline": steps * baseline_step + baseline_observe}


# -- building and measuring -------------------------------------------------------------------------

def build_pipelines(config: BenchConfig, seed: int = 0, device: torch.device | str = "cpu",
                    precision: str = "fp32") -> dict[str, Pipeline]:
    """SCD (causal-transformer + dit-frame) and the causal-dit baseline at the config's shapes, random weights,
    on ``device`` and under ``precision``."""
    catalog = default_catalog()
    frame, shape = config.frame, {"width": config.width, "heads": config.heads, "mlp_ratio": config.mlp_ratio}
    scheduler_cls = catalog.get("schedulers", "flow-match-euler")
    scheduler = scheduler_cls(scheduler_cls.config_class(steps=config.steps))

    def component(kind: str, name: str, *extra, **fields):
        cls = catalog.get(kind, name)
        try:
            return cls(cls.config_class(**shape, **fields), frame, *extra)
        except ValidationError as exc:
            raise UsageError(f"bench: {name} cannot take this shape: "
                             f"{exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        except ValueError as exc:
            raise UsageError(f"bench: {name} cannot take this shape: {exc}") from None

    torch.manual_seed(seed)
    encoder = component("encoders", "causal-transformer", layers=config.encoder_layers)
    decoder = component("decoders", "dit-frame", encoder.contract, layers=config.decoder_layers, combine="token_concat")
    model = component("models", "causal-dit", layers=config.baseline_layers)
    pipelines = {"scd": Pipeline("scd", scheduler, frame, assemble({"encoder": encoder, "decoder": decoder})),
                 "baseline": Pipeline("baseline", scheduler, frame, assemble({"model": model}))}
    for pipeline in pipelines.values():
        pipeline.to(device).set_precision(precision)
    return pipelines


def machine_gflops(size: int = 1024, repeats: int = 7, device: torch.device | str = "cpu") -> float:
    """The device's fp32 matmul rate (median of ``repeats`` square ``size`` matmuls after a warm-up)."""
    device = torch.device(device)
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    for _ in range(2):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        started = synchronize(device)
        torch.mm(a, b, out=out)
        times.append(synchronize(device) - started)
    return 2 * size**3 / statistics.median(times) / 1e9


def _context(pipeline: Pipeline, frames: int, seed: int) -> torch.Tensor:
    f = pipeline.frame
    return torch.rand(1, frames, f.channels, f.height, f.width, generator=pipeline.generator(seed),
                      device=pipeline.device)


@dataclass
class Timing:
    first_frame_s: list[float]
    frame_s: list[float]  # every steady frame: ready-to-ready
    denoise_s: list[float]  # the denoising loop alone of each steady frame

    def row(self, flops: int, decoder_flops: int | None = None) -> dict:
        per_frame = statistics.median(self.frame_s)
        row = {"first_frame_s": statistics.median(self.first_frame_s), "per_frame_s": per_frame,
               "fps": 1 / per_frame, "flops_per_frame": flops, "gflops": flops / per_frame / 1e9}
        if decoder_flops is not None:
            row["decoder_loop_gflops"] = decoder_flops / statistics.median(self.denoise_s) / 1e9
        return row


def time_generation(pipelines: dict[str, Pipeline], context: int, frames: int, repeats: int, seed: int = 0,
                    progress=None, steps: int | None = None) -> dict[str, Timing]:
    """Generate ``frames`` frames after ``context`` random frames with each pipeline, ``repeats`` times,
    alternating between the pipelines so that machine noise hits them alike."""
    timings = {name: Timing([], [], []) for name in pipelines}
    for repeat in range(repeats):
        for name, pipeline in pipelines.items():
            video = _context(pipeline, context, seed)
            gen = pipeline.generate(video, frames, steps=steps, generator=pipeline.generator(seed + repeat))
            t = timings[name]
            t.first_frame_s.append(gen.first_frame_s)
            t.frame_s.extend(gen.frame_gaps_s)
            t.denoise_s.extend(gen.denoise_s)
            if progress is not None:
                progress(f"{name}: run {repeat + 1}/{repeats}, {statistics.median(t.frame_s):.3f} s/frame")
    return timings


class BenchRun(BaseModel):
    """How the comparison is timed (the shapes are a :class:`BenchConfig`)."""

    model_config = ConfigDict(extra="forbid")
    generate: int = Field(5, ge=2, description="frames generated per timed run (the first includes the prefill)")
    repeats: int = Field(2, ge=1, description="timed runs per model, alternating")
    frames: list[int] | None = Field(None, description="also measure the per-frame cost once N frames exist, for "
                                                       "each N (e.g. 16 64 256 512)")
    seed: int = Field(0, ge=0, description="seed of the random weights and contexts")


def run_bench(config: BenchConfig, run: BenchRun = BenchRun(), progress=None, device: torch.device | str = "cpu",
              precision: str = "fp32", compile: bool = False) -> dict:
    """The whole comparison as one JSON-ready object (see the module doc and ``scdkit bench --help``).
    Under ``compile`` both models are compiled the same way and ``compile_s`` (the first warm-up run,
    compilation included) is reported for each."""
    generated, repeats, sweep, seed = run.generate, run.repeats, run.frames, run.seed
    say = progress or (lambda message: None)
    pipelines = build_pipelines(config, seed, device, precision)
    say(f"measuring on {torch.device(device)}, {precision}" + (", compiled" if compile else ""))
    for p in pipelines.values():
        p.train(False)
    say("measuring the machine's fp32 matmul rate")
    gflops_ref = machine_gflops(device=next(iter(pipelines.values())).device)
    warmup_s = {}
    for name, pipeline in pipelines.items():
        if compile:
            pipeline.compile_streaming()
        say(f"{name}: warming up" + (" (compiling)" if compile else ""))
        started = time.perf_counter()
        time_generation({name: pipeline}, 2, 2, 1, seed)
        warmup_s[name] = time.perf_counter() - started
    flops = flops_per_frame(config)
    timings = time_generation(pipelines, config.context_frames, generated, repeats, seed, say)
    result = {"config": config.summary(), "machine_gflops": gflops_ref, "device": str(next(iter(pipelines.values())).device),
              "precision": precision, "compile": compile}
    for name, pipeline in pipelines.items():
        row = timings[name].row(flops[name], flops["scd_decoder"] if name == "scd" else None)
        say(f"{name}: peak memory")
        # prefill of the whole context plus two frames, in a run of its own (tracking slows every op)
        row["peak_mem_mb"] = generation_peak_mb(pipeline, _context(pipeline, config.context_frames, seed), 2, seed=seed)
        row["params"] = sum(p.numel() for p in pipeline.parameters())
        row["share_of_machine"] = row["gflops"] / gflops_ref
        row["warmup_s"] = warmup_s[name]  # compilation included under compile
        result[name] = row
    scd, base = result["scd"], result["baseline"]
    scd["decoder_loop_share_of_machine"] = scd["decoder_loop_gflops"] / gflops_ref
    result["speedup"] = base["per_frame_s"] / scd["per_frame_s"]
    result["flop_model_speedup"] = flops["baseline"] / flops["scd"]
    result["speedup_vs_flop_model"] = result["speedup"] / result["flop_model_speedup"]
    if sweep:
        result["sweep"] = frame_sweep(pipelines, config, sweep, seed, say)
    return result


def frame_sweep(pipelines: dict[str, Pipeline], config: BenchConfig, frame_counts: list[int], seed: int = 0,
                progress=None) -> list[dict]:
    """Per-frame cost once ``N`` frames exist, for each N: prefill N frames, time 3 more (median of the
    last 2). The cost of the N-th frame of one long generation, without generating the N before it."""
    rows = []
    for frames in frame_counts:
        timings = time_generation(pipelines, frames, 3, 1, seed)
        flops = flops_per_frame(config, context=frames)
        row = {"frames": frames}
        for name, t in timings.items():
            row[name] = {"per_frame_s": statistics.median(t.frame_s), "flops_per_frame": flops[name]}
        row["speedup"] = row["baseline"]["per_frame_s"] / row["scd"]["per_frame_s"]
        rows.append(row)
        if progress is not None:
            progress(f"sweep {frames} frames: scd {row['scd']['per_frame_s']:.3f} s/frame, "
                     f"baseline {row['baseline']['per_frame_s']:.3f} s/frame")
    return rows


def plot_sweep(rows: list[dict], path) -> None:
    """Per-frame time (measured) and the FLOP model against frame count, both models (log-log)."""
    from scdkit.figures import frame_count_axes, new_figure, save_png

    fig = new_figure(10, 4)
    axes = fig.subplots(1, 2)
    frames = [r["frames"] for r in rows]
    for name, label in (("scd", "SCD"), ("baseline", "causal DiT")):
        axes[0].plot(frames, [r[name]["per_frame_s"] for r in rows], marker="o", label=label)
        axes[1].plot(frames, [r[name]["flops_per_frame"] / 1e9 for r in rows], marker="o", label=label)
    axes[0].set(title="measured per-frame time", ylabel="s / frame")
    axes[1].set(title="FLOP model", ylabel="GFLOP / frame")
    for ax in axes:
        frame_count_axes(ax, frames, "frames in the context")
    fig.tight_layout()
    save_png(fig, path)


def print_bench(result: dict, console) -> None:
    """The result of :func:`run_bench` as a rich table and a few lines."""
    scd, base = result["scd"], result["baseline"]
    table = Table("", "SCD", "causal DiT", title="scdkit bench: " + ", ".join(f"{k} {v}" for k, v in result["config"].items()))
    rows = [("parameters", "params", "{:,}"), ("time to first frame (s)", "first_frame_s", "{:.3f}"),
            ("per-frame latency (s)", "per_frame_s", "{:.4f}"), ("frames/s", "fps", "{:.2f}"),
            ("peak memory (MB)", "peak_mem_mb", "{:.1f}"), ("GFLOP per frame", "flops_per_frame", "{:.4g}"),
            ("achieved GFLOP/s", "gflops", "{:.1f}")]
    for label, key, fmt in rows:
        scale = 1e-9 if key == "flops_per_frame" else 1
        table.add_row(label, fmt.format(scd[key] * scale), fmt.format(base[key] * scale))
    console.print(table)
    if result.get("compile"):
        console.print(f"compiled: warm-up run (compilation included) SCD {scd['warmup_s']:.1f} s, "
                      f"causal DiT {base['warmup_s']:.1f} s")
    console.print(f"speedup {result['speedup']:.2f}x, FLOP model {result['flop_model_speedup']:.2f}x "
                  f"({100 * result['speedup_vs_flop_model']:.0f}% of it); machine fp32 matmul "
                  f"{result['machine_gflops']:.1f} GFLOP/s; SCD decoder loop {scd['decoder_loop_gflops']:.1f} GFLOP/s "
                  f"({100 * scd['decoder_loop_share_of_machine']:.0f}% of it)")
    for row in result.get("sweep", []):
        console.print(f"  {row['frames']:5d} frames: SCD {row['scd']['per_frame_s']:.4f} s/frame, "
                      f"causal DiT {row['baseline']['per_frame_s']:.4f} s/frame, speedup {row['speedup']:.2f}x")
    if "encoders" in result:
        console.print(result["encoders"]["markdown"], markup=False, highlight=False)
