"""Few-step sampling of a trained pipeline: streaming speed against quality, per step count and time shift.

    nice -n 19 python benchmarks/few_step.py --pipeline scd-digits
    python benchmarks/few_step.py --steps 8 10 --shifts 2 --student scd-digits-fast   # with a distilled decoder

For each (steps, shift, grid) of ``flow-match-euler``: quality on the main job's held-out clips (``scdkit generate``'s 16 clips, 4 context
-> 8 frames, seed 0) and the steady batch-1 streaming latency (median over ``--runs`` timed runs, each after a
warm-up, all settings interleaved in each round so that a noisy host affects them alike). A setting meets the
bar when its PSNR over the first 4 frames is no more than ``--psnr-tolerance`` dB below the reference setting's
(``--reference-steps`` at shift 1 on the uniform grid) and its sharpness over all frames is 0.85-1.15x the true frames'.
Prints a markdown table; nothing is asserted: these are measurements of this machine.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

from scdkit.evaluate import EvalConfig, evaluate_continuation, held_out_clips
from scdkit.generate import time_streaming
from scdkit.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
SHARPNESS_BAR = (0.85, 1.15)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "registry.toml"))
    parser.add_argument("--pipeline", default="scd-digits")
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the pipeline's)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8, 10])
    parser.add_argument("--shifts", type=float, nargs="+", default=[1.0])
    parser.add_argument("--grids", nargs="+", default=["uniform"], choices=["uniform", "diffusers"])
    parser.add_argument("--reference-steps", type=int, default=30)
    parser.add_argument("--psnr-tolerance", type=float, default=0.3)
    parser.add_argument("--runs", type=int, default=5, help="timed streaming runs per setting (median)")
    parser.add_argument("--stream-frames", type=int, default=24, help="frames streamed per timed run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--student", default=None, help="also a pipeline with a distilled few-step decoder (e.g. "
                        "scd-digits-fast), sampled with its own scheduler, against the same reference")
    parser.add_argument("--student-checkpoint", default=None, help="its checkpoint folder (default: its own)")
    parser.add_argument("--student-steps", type=int, nargs="+", default=[1, 2])
    return parser.parse_args(argv)


def variant(scheduler, shift: float, grid: str):
    return type(scheduler)(scheduler.config.model_copy(update={"shift": shift, "grid": grid}))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = load_registry(args.registry)
    pipeline = registry.build(args.pipeline, checkpoint=args.checkpoint)
    data = registry.dataset(args.pipeline)
    base = pipeline.scheduler
    # a setting: (pipeline name, steps, shift, grid); the student samples with its own scheduler's shift and grid
    reference_setting = (args.pipeline, args.reference_steps, 1.0, "uniform")
    settings = [reference_setting] + [(args.pipeline, s, shift, grid)
                                      for grid in args.grids for shift in args.shifts for s in args.steps]
    pipelines = {args.pipeline: pipeline}
    if args.student:
        pipelines[args.student] = registry.build(args.student, checkpoint=args.student_checkpoint)
        own = pipelines[args.student].scheduler.config
        settings += [(args.student, s, getattr(own, "shift", 1.0), getattr(own, "grid", "-")) for s in args.student_steps]

    def use(setting):
        name, steps, shift, grid = setting
        chosen = pipelines[name]
        if name == args.pipeline:
            chosen.scheduler = variant(base, shift, grid)
        return chosen, steps

    quality = {}
    for setting in settings:
        chosen, steps = use(setting)
        result = evaluate_continuation(chosen, data, EvalConfig(steps=steps))
        true_sharpness = sum(result.truth_sharpness) / len(result.truth_sharpness)
        quality[setting] = {"psnr4": result.model.mean(4)["psnr"], "ssim4": result.model.mean(4)["ssim"],
                            "sharpness": result.model.mean()["sharpness"] / true_sharpness,
                            "references": {"repeat-last": result.repeat_last.mean(4)["psnr"],
                                           "constant velocity": result.constant_velocity.mean(4)["psnr"]}}
    clip = held_out_clips(data, 1, 4 + args.stream_frames, seed=99).context(4)
    latency = {setting: [] for setting in settings}
    for _ in range(args.runs):
        for setting in settings:
            chosen, steps = use(setting)
            latency[setting].append(time_streaming(chosen, clip, args.stream_frames, steps).per_frame_s)
    reference = quality[reference_setting]
    refs = ", ".join(f"{name} {value:.2f} dB" for name, value in reference["references"].items())
    print(f"<!-- {datetime.date.today()} · {' '.join(['python benchmarks/few_step.py', *sys.argv[1:]])} · "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads -->")
    print(f"{args.pipeline}: PSNR/SSIM over the first 4 of 8 generated frames (16 held-out clips; {refs}); "
          "sharpness over all 8, as a ratio to the true frames'; batch-1 streaming, median of "
          f"{args.runs} runs of {args.stream_frames} frames.\n")
    print("| pipeline | steps | shift | grid | ms/frame | frames/s | PSNR | SSIM | sharpness | meets the bar |")
    print("|:---|---:|---:|:---|---:|---:|---:|---:|---:|:---|")
    for setting in settings:
        name, steps, shift, grid = setting
        q, ms = quality[setting], 1000 * statistics.median(latency[setting])
        meets = (q["psnr4"] >= reference["psnr4"] - args.psnr_tolerance
                 and SHARPNESS_BAR[0] <= q["sharpness"] <= SHARPNESS_BAR[1])
        print(f"| {name} | {steps} | {shift:g} | {grid} | {ms:.1f} | {1000 / ms:.0f} | {q['psnr4']:.2f} | "
              f"{q['ssim4']:.3f} | {q['sharpness']:.2f}x | {'yes' if meets else 'no'} |")


if __name__ == "__main__":
    main()
