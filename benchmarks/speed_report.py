"""Speed and memory sections of BENCHMARKS.md: `scdkit bench` at the paper's protocol with a frame
sweep, the encoder curves, and `scdkit swap-eval` on the shipped checkpoint.

    python benchmarks/speed_report.py

Each section is replaced in place (``paper_table.update_report``); the raw results go to
benchmarks/results/*.json. Nothing here is asserted: these are measurements of this machine.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from scdkit.bench import BenchConfig, BenchRun, build_pipelines, plot_sweep, run_bench, time_generation
from scdkit.encoder_bench import curves_markdown, encoder_curves, plot_curves, training_curves, training_markdown
from scdkit.evaluate import EvalConfig
from scdkit.registry import load_registry
from scdkit.swap_eval import markdown as swap_markdown
from scdkit.swap_eval import swap_eval

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import update_report  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parent.parent
BENCH, CURVES, SWAPS = "## SCD vs causal DiT (`scdkit bench`)", "## Encoder curves", "## Encoder swaps"
COMPILE = "## torch.compile (`--compile`)"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--encoders", default="causal-s,long-s,mem-s")
    parser.add_argument("--curve-frames", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--repeats", type=int, default=9, help="timed steps per curve point (median)")
    parser.add_argument("--train-lengths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--swap-frames", type=int, default=32, help="generated frames per clip in swap-eval")
    parser.add_argument("--only", choices=["bench", "curves", "swaps", "compile"], nargs="+",
                        default=["bench", "curves", "swaps", "compile"])
    parser.add_argument("--compile-repeats", type=int, default=3, help="timed runs per model in the compile section")
    parser.add_argument("--registry", default=str(ROOT / "registry.toml"))
    parser.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    return parser.parse_args(argv)


def bench_section(result: dict, command: str, plot: Path, stamp: str) -> str:
    scd, base, c = result["scd"], result["baseline"], result["config"]
    rows = [("parameters", "params", "{:,}", 1), ("time to first frame (s, 144-frame prefill)", "first_frame_s", "{:.2f}", 1),
            ("per-frame latency (s)", "per_frame_s", "{:.3f}", 1), ("frames/s", "fps", "{:.2f}", 1),
            ("peak memory (MB, tensors)", "peak_mem_mb", "{:.0f}", 1), ("GFLOP per frame (model)", "flops_per_frame", "{:.1f}", 1e-9),
            ("achieved GFLOP/s", "gflops", "{:.1f}", 1), ("share of the machine's matmul rate", "share_of_machine", "{:.0%}", 1)]
    table = ["| | SCD | causal DiT |", "|---|---:|---:|"]
    table += [f"| {label} | {fmt.format(scd[key] * s)} | {fmt.format(base[key] * s)} |" for label, key, fmt, s in rows]
    sweep = ["| frames in context | SCD s/frame | causal DiT s/frame | speedup | FLOP-model speedup |", "|---:|---:|---:|---:|---:|"]
    sweep += [f"| {r['frames']} | {r['scd']['per_frame_s']:.3f} | {r['baseline']['per_frame_s']:.3f} | {r['speedup']:.2f}× | "
              f"{r['baseline']['flops_per_frame'] / r['scd']['flops_per_frame']:.2f}× |" for r in result.get("sweep", [])]
    return f"""{BENCH}

{stamp} random weights, batch 1, fp32, {torch.get_num_threads()} threads; width {c['width']}, {c['heads']} heads, SCD
{c['encoder_layers']} encoder + {c['decoder_layers']} decoder layers vs causal DiT {c['baseline_layers']} layers,
{c['tokens_per_frame']} tokens per frame, {c['steps']} Euler steps, {c['context_frames']} context frames
(`token_concat`). Per-frame latency is the median over the steady frames of interleaved runs (warm-up excluded).

| | |
|---|---|
| **measured speedup** | **{result['speedup']:.2f}×** |
| FLOP-model speedup | {result['flop_model_speedup']:.2f}× (measured = {result['speedup_vs_flop_model']:.0%} of it) |
| machine fp32 matmul (1024², median) | {result['machine_gflops']:.1f} GFLOP/s |
| SCD decoder loop | {scd['decoder_loop_gflops']:.1f} GFLOP/s ({scd['decoder_loop_share_of_machine']:.0%} of the machine) |

{chr(10).join(table)}

Per-frame cost once N frames exist (prefill N, then the median of the last 2 of 3 generated frames):

{chr(10).join(sweep)}

![per-frame cost against frame count]({plot})

    {command}
"""


def compile_comparison(pipelines: dict, context: int, generated: int, repeats: int, say) -> dict:
    """Eager and compiled copies of each pipeline, timed interleaved in one process after their warm-up;
    ``warmup_s`` of a compiled copy is its first (compiling) generation."""
    runs = {}
    for name, pipeline in pipelines.items():
        compiled = copy.deepcopy(pipeline)
        compiled.compile_streaming()
        for variant, built in (("eager", pipeline), ("compiled", compiled)):
            say(f"{name} {variant}: warm-up")
            started = time.perf_counter()
            time_generation({f"{name} {variant}": built}, context, 2, 1)
            runs[f"{name} {variant}"] = {"pipeline": built, "warmup_s": time.perf_counter() - started}
    timings = time_generation({k: v["pipeline"] for k, v in runs.items()}, context, generated, repeats, progress=say)
    return {k: {"per_frame_s": statistics.median(timings[k].frame_s), "warmup_s": v["warmup_s"]} for k, v in runs.items()}


def compile_rows(result: dict) -> list[str]:
    rows = ["| model | eager s/frame | compiled s/frame | compiled / eager | warm-up eager (s) | warm-up compiled (s) |",
            "|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(key.split(" ")[0] for key in result):
        eager, compiled = result[f"{name} eager"], result[f"{name} compiled"]
        rows.append(f"| {name} | {eager['per_frame_s']:.4f} | {compiled['per_frame_s']:.4f} | "
                    f"{compiled['per_frame_s'] / eager['per_frame_s']:.2f}× | {eager['warmup_s']:.1f} | "
                    f"{compiled['warmup_s']:.1f} |")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    started, console = time.perf_counter(), Console(stderr=True)
    say = lambda message: console.print(f"[{time.perf_counter() - started:6.0f}s] {message}", markup=False, highlight=False)  # noqa: E731
    out, report = Path(args.out), Path(args.report)
    (out / "results").mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/speed_report.py", *(sys.argv[1:] if argv is None else argv)])
    stamp = f"Run {datetime.date.today().isoformat()} on this {platform.machine()} CPU:"
    registry = load_registry(args.registry)
    sections = {}
    if "bench" in args.only:
        result = run_bench(BenchConfig(), BenchRun(frames=args.sweep), progress=say)
        plot = out / "figures" / "bench_sweep.png"
        plot_sweep(result["sweep"], plot)
        (out / "results" / "bench.json").write_text(json.dumps(result, indent=1))
        sections[BENCH] = bench_section(result, command, plot.relative_to(report.parent), stamp)
    if "curves" in args.only:
        frame = registry.pipelines[registry.default_pipeline].frame
        names = args.encoders.split(",")
        encoders = {name: registry.build_component("encoders", name, frame) for name in names}
        rows = encoder_curves(encoders, args.curve_frames, repeats=args.repeats, progress=lambda r: say(f"{r['encoder']} {r['frames']}: {r['step_s'] * 1e3:.2f} ms"))
        train_rows = training_curves(encoders, args.train_lengths)
        plot = out / "figures" / "encoder_curves.png"
        plot_curves(rows, train_rows, plot)
        (out / "results" / "encoder_curves.json").write_text(json.dumps({"curves": rows, "training": train_rows}, indent=1))
        sections[CURVES] = f"""{CURVES}

{stamp} the registry's encoders ({', '.join(names)}: width 128, 4 layers, 64 tokens per frame), random
weights, batch 1. Streaming: per-frame `step` time (median of {args.repeats} after a prefill and 2 warm-up steps) and
memory (the encoder state plus the tensors alive during one more step) once N frames have been seen.
Training: peak tensor memory of one forward + backward over a clip of N frames.

{curves_markdown(rows)}

{training_markdown(train_rows)}

![encoder curves]({plot.relative_to(report.parent)})

    {command}
"""
    if "swaps" in args.only:
        names = args.encoders.split(",")
        swap = swap_eval(registry, registry.default_pipeline, names, {}, EvalConfig(frames=args.swap_frames),
                         progress=lambda row: say(f"swap-eval {row.encoder} done"))
        (out / "results" / "swap_eval.json").write_text(json.dumps(swap.to_json(), indent=1))
        sections[SWAPS] = f"""{SWAPS}

{stamp} the shipped `scd-digits` decoder with each encoder on the shipped encoder weights (same-weights
swaps), 16 held-out clips, 4 context → {args.swap_frames} generated frames (the model was trained on 7-frame
clips, so frames past the training length show how each context policy copes), 30 Euler steps.

{swap_markdown(swap)}

    scdkit swap-eval --encoders {args.encoders} --frames {args.swap_frames} --markdown
"""
    if "compile" in args.only:
        config = BenchConfig()
        paper = compile_comparison(build_pipelines(config), config.context_frames, 4, args.compile_repeats, say)
        shipped = {name: registry.build(name) for name in ("scd-digits", "baseline-digits")}
        small = compile_comparison(shipped, 4, 8, args.compile_repeats, say)
        (out / "results" / "compile.json").write_text(json.dumps({"paper": paper, "shipped": small}, indent=1))
        sections[COMPILE] = f"""{COMPILE}

{stamp} `torch.compile` (inductor, default options) of the per-step network call and the per-frame context
step — for SCD the decoder and the encoder step, for the causal DiT its `predict` and `observe` — applied to
both models the same way (`Pipeline.compile_streaming`, what `--compile` calls). Eager and compiled copies are
timed interleaved in one process after their warm-up; the compiled copy's warm-up is its first generation,
compilation included. Per-frame latency is the median over steady frames, batch 1, fp32,
{torch.get_num_threads()} threads.

At the paper protocol (random weights, width {config.width}, {config.encoder_layers} + {config.decoder_layers} vs
{config.baseline_layers} layers, {config.steps} steps, {config.context_frames} context frames, 4 frames per run):

{chr(10).join(compile_rows(paper))}

The shipped pipelines (`scd-digits`, `baseline-digits`: width 128, 30 steps, 4 context frames, 8 frames per run):

{chr(10).join(compile_rows(small))}

    {command}
"""
    update_report(report, sections)
    say(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
