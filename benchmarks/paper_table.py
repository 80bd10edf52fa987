"""The paper's comparison table at CPU scale: SCD vs the monolithic causal-DiT baseline.

Both are trained with the same budget (steps, batch, clip length, data, seeds) by
``scdkit.train``, evaluated from their saved EMA checkpoints on the same held-out
moving-digits clips, and timed with the same streaming loop (``Pipeline.generate``). Then the
trained baseline is probed (``scdkit.probe``). The result goes into BENCHMARKS.md under
``## Paper table at CPU scale`` and ``## Probe``; other sections of that file are kept as they are.

    python benchmarks/paper_table.py --steps 300 --width 64 --seeds 0 1 --jobs 2

Checkpoints go to runs/paper_table/<budget>/<pipeline>-seed<N>/ (never the shipped checkpoint
directories); an interrupted run resumes there, a finished one is reused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from scdkit.bench import time_generation
from scdkit.checkpoint import load_component
from scdkit.evaluate import EvalConfig, evaluate_continuation
from scdkit.files import write_text_atomic
from scdkit.pipeline import Pipeline, assemble
from scdkit.probe import ProbeConfig, ProbeResult, plot_probe, run_probe
from scdkit.registry import load_registry
from scdkit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
TABLE, PROBE = "## Paper table at CPU scale", "## Probe"
SCD, BASELINE = "SCD", "causal DiT"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "registry.toml"))
    parser.add_argument("--scd", default="scd-digits", help="SCD pipeline in the registry")
    parser.add_argument("--baseline", default="baseline-digits", help="monolithic pipeline in the registry")
    parser.add_argument("--width", type=int, default=None, help="override the model width (default: the registry's)")
    parser.add_argument("--heads", type=int, default=None, help="override the head count (default: the registry's)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model and seed")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=7, help="frames per training clip")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-clips", type=int, default=32)
    parser.add_argument("--eval-context", type=int, default=4)
    parser.add_argument("--eval-frames", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=None, help="denoising steps (default: the scheduler's)")
    parser.add_argument("--time-context", type=int, default=16, help="context frames for the s/frame timing")
    parser.add_argument("--time-frames", type=int, default=5, help="generated frames per timing run")
    parser.add_argument("--time-repeats", type=int, default=3)
    parser.add_argument("--probe-clips", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time (each gets threads/jobs threads)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "paper_table"))
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--figures", default=str(ROOT / "benchmarks" / "figures"))
    return parser.parse_args(argv)


# -- building, training, loading ---------------------------------------------------------------

def build(registry, pipeline: str, width: int | None, heads: int | None) -> Pipeline:
    """The registry pipeline, optionally narrowed to ``width``/``heads`` (same layer counts), untrained."""
    entry = registry.pipelines[pipeline]
    overrides = {k: v for k, v in (("width", width), ("heads", heads)) if v is not None}
    scheduler = registry.build_component("schedulers", entry.scheduler, entry.frame)
    return Pipeline(pipeline, scheduler, entry.frame, assemble(registry.build_components(pipeline, overrides=overrides)))


def train_job(registry_path: str, pipeline: str, width: int | None, heads: int | None, config: dict, out: str,
              threads: int) -> str:
    """Train one (model, seed) into ``out``; top level so that a worker process can run it."""
    torch.set_num_threads(threads)
    registry = load_registry(registry_path)
    train(build(registry, pipeline, width, heads), TrainConfig(**config), Path(out),
          registry.dataset(pipeline), resume=True, console=Console(quiet=True))
    return out


def train_all(args, roles: dict[str, str], runs: Path, log) -> dict[tuple[str, int], Path]:
    config = TrainConfig(steps=args.steps, batch=args.batch, frames=args.frames, warmup=min(100, args.steps // 10),
                         checkpoint_every=max(50, args.steps // 4), eval_every=0).model_dump()
    # the baseline trains slower (its sequence holds a clean and a noisy copy of the clip): start it first
    jobs = [(role, roles[role], seed) for role in (BASELINE, SCD) for seed in args.seeds]
    out_of = {(role, seed): runs / f"{name}-seed{seed}" for role, name, seed in jobs}
    threads = max(1, args.threads // args.jobs)
    log(f"training {len(jobs)} runs into {runs}, {args.jobs} at a time with {threads} thread(s) each")
    spawn = multiprocessing.get_context("spawn")  # fork after torch has started its thread pools can hang
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
        futures = {pool.submit(train_job, args.registry, name, args.width, args.heads, config | {"seed": seed},
                               str(out_of[role, seed]), threads): (role, seed) for role, name, seed in jobs}
        for future in concurrent.futures.as_completed(futures):
            future.result()
            log("  {} seed {} trained".format(*futures[future]))
    return out_of


def load_trained(registry, pipeline: str, width: int | None, heads: int | None, out: Path) -> Pipeline:
    """The pipeline with the EMA weights saved in ``out`` (checked against their metadata)."""
    result = build(registry, pipeline, width, heads)
    for role, module in result.components.items():
        load_component(module, out / f"{role}.safetensors", role)
    return result


def training_seconds(log: Path) -> float:
    """Wall-clock training time from a train_log.jsonl, summed over resumed sessions."""
    total, last = 0.0, 0.0
    for line in log.read_text().splitlines():
        elapsed = json.loads(line)["elapsed_s"]
        if elapsed < last:  # a new session restarted the clock
            total += last
        last = elapsed
    return total + last


# -- measuring ---------------------------------------------------------------------------------

@dataclass
class Table:
    params: dict[str, int] = field(default_factory=dict)
    per_frame_s: dict[str, float] = field(default_factory=dict)
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # role -> metric -> one value per seed
    repeat_last: dict[str, float] = field(default_factory=dict)
    constant_velocity: dict[str, float] = field(default_factory=dict)
    truth_sharpness: float = 0.0


def measure(args, registry, roles, out_of, log) -> tuple[Table, dict[str, Pipeline]]:
    table, first = Table(), {}
    data = registry.dataset(args.scd)
    for role, name in roles.items():
        table.scores[role] = {}
        for seed in args.seeds:
            out = out_of[role, seed]
            pipeline = load_trained(registry, name, args.width, args.heads, out)
            first.setdefault(role, pipeline)
            evaluation = evaluate_continuation(pipeline, data, EvalConfig(clips=args.eval_clips, context=args.eval_context,
                                                                          frames=args.eval_frames, steps=args.sample_steps))
            scores = evaluation.model.mean() | {"train_s_per_step": training_seconds(out / "train_log.jsonl") / args.steps}
            for key, value in scores.items():
                table.scores[role].setdefault(key, []).append(value)
            table.repeat_last = evaluation.repeat_last.mean()  # the same clips for every model and seed
            table.constant_velocity = evaluation.constant_velocity.mean()
            table.truth_sharpness = statistics.fmean(evaluation.truth_sharpness)
            log(f"{role} seed {seed}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f}, sharpness "
                f"{scores['sharpness']:.4f} (true {table.truth_sharpness:.4f}); repeat-last PSNR "
                f"{table.repeat_last['psnr']:.2f} dB, constant-velocity PSNR {table.constant_velocity['psnr']:.2f} dB")
    table.params = {role: sum(p.numel() for p in pipeline.parameters()) for role, pipeline in first.items()}
    log("timing the streaming loop")
    timings = time_generation(first, args.time_context, args.time_frames, args.time_repeats, steps=args.sample_steps)
    table.per_frame_s = {role: statistics.median(t.frame_s) for role, t in timings.items()}
    log("  s/frame: " + ", ".join(f"{role} {s:.4f}" for role, s in table.per_frame_s.items()))
    return table, first


# -- the report --------------------------------------------------------------------------------

def fmt(values: list[float], digits: int) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {spread:.{digits}f}"


def render_table(args, roles, table: Table, shape: str, steps: str, command: str, minutes: float) -> str:
    base = table.per_frame_s[BASELINE]
    rows = ["| model | params | s/frame | speedup | PSNR (dB) | sharpness | SSIM | MSE | train s/step |",
            "|---|---|---|---|---|---|---|---|---|"]
    for role, name in roles.items():
        r = table.scores[role]
        rows.append(f"| {role} (`{name}`) | {table.params[role] / 1e6:.2f} M | {table.per_frame_s[role]:.4f} | "
                    f"{base / table.per_frame_s[role]:.2f}× | {fmt(r['psnr'], 2)} | {fmt(r['sharpness'], 4)} | "
                    f"{fmt(r['ssim'], 3)} | {fmt(r['mse'], 4)} | {fmt(r['train_s_per_step'], 2)} |")
    for name, r in (("repeat last context frame", table.repeat_last), ("constant velocity", table.constant_velocity)):
        rows.append(f"| {name} | – | – | – | {r['psnr']:.2f} | {r['sharpness']:.4f} | {r['ssim']:.3f} | "
                    f"{r['mse']:.4f} | – |")
    rows.append(f"| true frames | – | – | – | – | {table.truth_sharpness:.4f} | – | – | – |")
    threads = max(1, args.threads // args.jobs)
    return f"""{TABLE}

Run {datetime.date.today().isoformat()} on this {platform.machine()} CPU (fp32), {minutes:.1f} minutes in all:

    {command}

Budget, identical for both models: {args.steps} training steps × batch {args.batch} clips × {args.frames} frames of
32×32 moving digits (4×4 patches, 64 tokens/frame), seeds {', '.join(map(str, args.seeds))}; {shape}. Each model is
trained with its own loss (`Pipeline.loss`: SCD with 2 decoder noise draws per encoder pass, the baseline by teacher
forcing on a clean copy of the clip), {args.jobs} run(s) at a time with {threads} torch thread(s) each; the EMA
checkpoints are evaluated. Quality: {args.eval_clips} held-out clips, {args.eval_context} context → {args.eval_frames}
generated frames, {steps} Euler steps, averaged over the generated frames; mean ± sample std over seeds. Sharpness is
the mean absolute spatial gradient of the generated frames (PSNR rewards blur: compare with the true frames').
SSIM as Wang et al. (2004): 11×11 Gaussian window (σ 1.5), averaged over the valid interior (`scdkit.metrics`).
Constant velocity: the last context frame moved on by the whole-pixel shift between the last two (`scdkit.references`).
s/frame: steady per-frame latency of the same streaming loop (`Pipeline.generate`), batch 1, {args.time_context}
context frames, {steps} steps, {args.threads} threads, median over the steady frames of {args.time_repeats} interleaved
runs (the first frame, with prefill, excluded); speedup = causal DiT s/frame ÷ model s/frame.

{chr(10).join(rows)}
"""


def render_probe(args, probe: ProbeResult, figures: dict[str, str]) -> str:
    summary = probe.summary()

    def row(label: str, values: list[float]) -> str:
        return f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |"

    rows = ["| layer | " + " | ".join(str(i + 1) for i in range(probe.layers)) + " |", "|---|" + "---|" * probe.layers,
            row("mean similarity across steps", summary["mean_similarity"]),
            row("min similarity across steps", summary["min_similarity"]),
            row("attention share on past frames", summary["past_attention_share"])]
    here = Path(args.report).resolve().parent
    links = {k: Path(v).resolve().relative_to(here) if Path(v).resolve().is_relative_to(here) else v
             for k, v in figures.items()}
    uniform = probe.context / (probe.context + 1)
    return f"""{PROBE}

The causal DiT trained above (seed {args.seeds[0]}) probed by `scdkit.probe` (in the run above) on {probe.clips} held-out
clips: {probe.context} clean context frames, then the next frame denoised in {probe.steps} steps. Per layer: the mean
(and min) cosine similarity of that frame's block outputs between denoising steps (off-diagonal), and the share of
the frame's attention mass on the {probe.context} past frames (the rest is on the frame itself; attending uniformly
over all keys would put {uniform:.2f} on the past). On a registry checkpoint: `scdkit probe --pipeline baseline-digits`.

{chr(10).join(rows)}

![similarity across steps]({links['similarity_png']}) ![per-layer curves]({links['curves_png']})
"""


def update_report(path: Path, sections: dict[str, str]) -> None:
    """Replace (or append) this script's sections of the report; every other section is kept as is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    blocks, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith("## ") and current:
            blocks.append("".join(current))
            current = []
        current.append(line)
    blocks.append("".join(current))
    pending = dict(sections)
    for i, block in enumerate(blocks):
        heading = block.split("\n", 1)[0].strip()
        if heading in pending:
            blocks[i] = pending.pop(heading).rstrip("\n") + "\n\n"
    blocks = [b.rstrip("\n") + "\n\n" for b in blocks] + [body.rstrip("\n") + "\n\n" for body in pending.values()]
    write_text_atomic(path, "".join(blocks).rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, console = time.perf_counter(), Console()

    def log(message: str) -> None:
        console.print(f"[{time.perf_counter() - started:6.0f}s] {message}", markup=False, highlight=False)

    registry = load_registry(args.registry)
    roles = {SCD: args.scd, BASELINE: args.baseline}
    runs = Path(args.runs) / f"w{args.width or 'reg'}-h{args.heads or 'reg'}-s{args.steps}-b{args.batch}-f{args.frames}"
    out_of = train_all(args, roles, runs, log)
    table, trained = measure(args, registry, roles, out_of, log)

    log(f"probing the trained baseline (seed {args.seeds[0]})")
    baseline = trained[BASELINE]
    probe = run_probe(baseline, registry.dataset(args.baseline),
                      ProbeConfig(context=args.eval_context, steps=args.sample_steps, clips=args.probe_clips))
    figures = plot_probe(probe, Path(args.figures), title=f"causal DiT, {args.steps} steps, seed {args.seeds[0]}")

    scd = trained[SCD]
    encoder, decoder, model = scd.components["encoder"], scd.components["decoder"], baseline.components["model"]
    shape = (f"SCD {len(encoder.blocks)} encoder + {len(decoder.blocks)} decoder layers vs causal DiT "
             f"{len(model.blocks)} layers, width {encoder.config.width}, {encoder.config.heads} heads")
    command = " ".join(["python benchmarks/paper_table.py", *(sys.argv[1:] if argv is None else argv)])
    steps = str(args.sample_steps) if args.sample_steps else f"{scd.scheduler.steps} (the scheduler's)"
    minutes = (time.perf_counter() - started) / 60
    update_report(Path(args.report), {TABLE: render_table(args, roles, table, shape, steps, command, minutes),
                                      PROBE: render_probe(args, probe, figures)})
    raw = {"args": vars(args), "table": vars(table), "probe": probe.to_json(), "minutes": minutes}
    (runs / "paper_table.json").write_text(json.dumps(raw, indent=1))
    log(f"wrote {args.report} and {runs / 'paper_table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
