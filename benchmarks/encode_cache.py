"""What the encoder-output cache and prefill reuse save, on the shipped checkpoints (a markdown table).

    nice -n 19 python benchmarks/encode_cache.py

1. Render from a cache (what ``scdkit render`` does before scoring: read the file, check it, decode) against
   running the encoder and then the decoder over the same clips, at several sampling step counts.
2. N continuations of one context from one prefill (``Pipeline.prefill`` + ``continue_from``) against N full
   ``generate`` calls, with long contexts where the prefill matters; SCD and the causal-DiT baseline.

Both sides of each ratio are timed in the same run, interleaved, after an untimed warm-up of each; every
figure is the median of ``--runs`` runs. Nothing here is asserted: these are measurements of this machine.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scdkit.encode import (EncodeConfig, RenderConfig, check_cache, encode, encode_clips, read_cache, render,
                           write_cache)
from scdkit.interfaces import Batch
from scdkit.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "registry.toml"))
    parser.add_argument("--pipeline", default="scd-digits", help="the SCD pipeline (its shipped checkpoint)")
    parser.add_argument("--baseline", default="baseline-digits", help="the monolithic pipeline ('' to skip it)")
    parser.add_argument("--clips", type=int, default=16, help="cached clips")
    parser.add_argument("--frames", type=int, default=12, help="frames per cached clip")
    parser.add_argument("--render-steps", type=int, nargs="+", default=[30, 10, 4])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 64], help="context frames of the prefill runs")
    parser.add_argument("--continuations", type=int, default=4, help="continuations of one context")
    parser.add_argument("--continue-frames", type=int, default=4, help="frames per continuation")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps of the continuations (default: the scheduler's)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each side (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["render", "prefill"], default=None, help="run one section")
    return parser.parse_args(argv)


def medians(sides: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median wall time of each side: one untimed warm-up each, then ``runs`` rounds, the sides interleaved."""
    for run in sides.values():
        run()
    times = {name: [] for name in sides}
    for _ in range(runs):
        for name, run in sides.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def render_from_file(pipeline, path: Path, steps: int):
    """What `scdkit render` does before scoring: read the cache, check it against the pipeline, decode."""
    cache = read_cache(path)
    check_cache(pipeline, cache)
    return render(pipeline, cache.cond, cache.clips.conditioning, steps, pipeline.generator(0))


def render_table(pipeline, entry, data, args) -> list[str]:
    cache_path = Path(tempfile.mkdtemp()) / "encoded.safetensors"
    write_cache(encode(pipeline, data, EncodeConfig(clips=args.clips, frames=args.frames), entry.encoder),
                cache_path)
    clips = read_cache(cache_path).clips
    rows = ["| steps | encoder + decoder (s) | render from cache (s) | encoder alone (s) | saved | speedup |",
            "|---:|---:|---:|---:|---:|---:|"]
    for steps in args.render_steps:
        t = medians({
            "live": lambda: render(pipeline, encode_clips(pipeline, clips), clips.conditioning, steps,
                                   pipeline.generator(0)),
            "cached": lambda: render_from_file(pipeline, cache_path, steps),
            "encoder": lambda: encode_clips(pipeline, clips),
        }, args.runs)
        rows.append(f"| {steps} | {t['live']:.3f} | {t['cached']:.3f} | {t['encoder']:.3f} | "
                    f"{1 - t['cached'] / t['live']:.0%} | {t['live'] / t['cached']:.2f}× |")
    return rows


def prefill_rows(pipeline, args) -> list[str]:
    """One ``generate``, one ``prefill`` and one ``continue_from`` (of a shared prefill) timed interleaved; the
    N-continuation totals are composed from their medians: N × generate against prefill + N × continue_from."""
    n, frames, steps = args.continuations, args.continue_frames, args.steps
    rows = []
    for context_frames in args.contexts:
        context = Batch(torch.rand(1, context_frames, 1, pipeline.frame.height, pipeline.frame.width,
                                   generator=torch.Generator().manual_seed(0)))
        shared = pipeline.prefill(context, frames, steps)
        t = medians({"generate": lambda: pipeline.generate(context, frames, steps, pipeline.generator(0)),
                     "prefill": lambda: pipeline.prefill(context, frames, steps),
                     "continue": lambda: pipeline.continue_from(shared, generator=pipeline.generator(0))}, args.runs)
        fresh, reused = n * t["generate"], t["prefill"] + n * t["continue"]
        rows.append(f"| {pipeline.name} | {context_frames} | {t['prefill']:.3f} | {t['generate']:.3f} | "
                    f"{t['continue']:.3f} | {fresh:.2f} | {reused:.2f} | {1 - reused / fresh:.0%} | "
                    f"{fresh / reused:.2f}× |")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    registry = load_registry(args.registry)
    scd = registry.build(args.pipeline)
    steps = args.steps or scd.scheduler.steps
    print(f"{datetime.date.today()}, {torch.get_num_threads()} thread(s), fp32, CPU, torch {torch.__version__}; "
          f"medians of {args.runs} interleaved runs after a warm-up each\n")
    if args.only != "prefill":
        print(f"### Render from an encoder cache ({args.pipeline}, {args.clips} clips x {args.frames} frames: "
              f"{args.clips * (args.frames - 1)} teacher-forced frames, batch {RenderConfig().batch}; "
              "both sides decode only, no scoring)\n")
        print("\n".join(render_table(scd, registry.pipelines[args.pipeline], registry.dataset(args.pipeline), args)), flush=True)
    if args.only != "render":
        print(f"\n### {args.continuations} continuations of one context ({args.continue_frames} frames each, "
              f"{steps} steps, batch 1): one prefill reused vs a full `generate` each; the totals are composed "
              "from the medians of one call each\n")
        print("| pipeline | context frames | prefill (s) | generate (s) | continue_from (s) | N × generate (s) "
              "| prefill + N × continue_from (s) | saved | speedup |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        pipelines = [scd] + ([registry.build(args.baseline)] if args.baseline else [])
        for pipeline in pipelines:
            print("\n".join(prefill_rows(pipeline, args)), flush=True)
    print(f"\ncommand: {' '.join(['python', *sys.argv])}")


if __name__ == "__main__":
    main()
