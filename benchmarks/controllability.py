"""Do the conditioned pipelines do what they are asked? Measured, not asserted.

    nice -n 19 python benchmarks/controllability.py                 # both pipelines
    nice -n 19 python benchmarks/controllability.py --only classes  # or: --only actions

**Classes** (``scd-digit-classes``): every clip starts from the blank first frame of the ``digit-classes`` data, so
the digit the model draws can come from the requested label alone. ``--clips`` clips ask for the classes 0-9 in
turn; a digit classifier reads each generated frame, and the share it reads as the requested class is the
accuracy (chance: 10 %). The classifier is an SVM fitted on scikit-learn's bundled digits as the data set draws
them (upscaled to the sprite size, then pooled back to 8x8), applied to the 14x14 window of the frame holding the
most ink; its accuracy on the true held-out frames is the ceiling. Guidance scales: ``--guidance``.

**Actions** (``scd-agent``): held-out ``agent`` clips, ``--context`` true frames, then ``--frames`` generated frames
steered by the clips' true actions, by zeroed actions ("stay") and by another clip's actions. The state error is the
distance in pixels from the agent's true centre to the blob found in each generated frame
(``scdkit.metrics.state_error_per_frame``), beside repeat-last and constant velocity.

Writes ``benchmarks/results/controllability.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scdkit.interfaces import Batch
from scdkit.metrics import psnr_per_frame, sharpness_per_frame, state_error_per_frame
from scdkit.plugins.datasets.moving_digits import digit_sprites, sprite_size
from scdkit.references import constant_velocity, repeat_last
from scdkit.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "registry.toml"))
    parser.add_argument("--only", choices=["classes", "actions"], default=None)
    parser.add_argument("--classes-pipeline", default="scd-digit-classes")
    parser.add_argument("--actions-pipeline", default="scd-agent")
    parser.add_argument("--clips", type=int, default=100, help="clips per guidance scale (classes), held-out clips (actions)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 3.0])
    parser.add_argument("--context", type=int, default=2, help="true context frames (actions)")
    parser.add_argument("--frames", type=int, default=8, help="generated frames (4 for classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "controllability.json"))
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


# -- classes -------------------------------------------------------------------------------------

def pooled_digits(images: np.ndarray) -> np.ndarray:
    """[n s s] images in [0, 1] -> [n 64] features on the 0..16 scale of the bundled 8x8 digits."""
    return (F.adaptive_avg_pool2d(torch.as_tensor(images)[:, None].float(), 8) * 16).reshape(len(images), 64).numpy()


def digit_classifier(side: int):
    """An SVM on the bundled digits of the training half, as the data set draws them; its accuracy on the other half."""
    from sklearn.svm import SVC

    sprites, classes = digit_sprites(side)
    half = len(sprites) // 2
    classifier = SVC(gamma=0.001, C=10).fit(pooled_digits(sprites[:half]), classes[:half])
    return classifier, float((classifier.predict(pooled_digits(sprites[half:])) == classes[half:]).mean())


def digit_windows(frames: torch.Tensor, side: int) -> np.ndarray:
    """The ``side`` x ``side`` window holding the most ink of each frame [n 1 H W] -> [n side side]."""
    ink = F.avg_pool2d(frames.float(), side, stride=1)[:, 0]  # [n H-side+1 W-side+1]
    best = ink.flatten(1).argmax(dim=1)
    ys, xs = best // ink.shape[2], best % ink.shape[2]
    return np.stack([frames[i, 0, y:y + side, x:x + side].numpy() for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])


def classes_report(registry, args) -> dict:
    name = args.classes_pipeline
    pipeline = registry.build(name)
    data = registry.dataset(name)
    side = sprite_size(pipeline.frame.height)
    classifier, sprite_accuracy = digit_classifier(side)
    frames = 4
    truth = data.clips(args.clips, 1 + frames, split="test", seed=args.seed)
    true_frames = truth.video[:, 1:].flatten(0, 1)
    true_accuracy = float((classifier.predict(pooled_digits(digit_windows(true_frames, side)))
                           == truth.labels.repeat_interleave(frames).numpy()).mean())
    requested = torch.arange(args.clips) % data.provides.classes
    context = Batch(truth.video[:, :1], requested)  # the blank first frame: the label alone says which digit
    rows = []
    for scale in args.guidance:
        video = pipeline.generate(context, frames, generator=pipeline.generator(args.seed), guidance=scale).video
        predicted = classifier.predict(pooled_digits(digit_windows(video.flatten(0, 1), side))).reshape(args.clips, frames)
        hits = predicted == requested[:, None].numpy()
        per_class = [float(hits[requested.numpy() == c].mean()) for c in range(data.provides.classes)]
        rows.append({"guidance": scale, "accuracy": float(hits.mean()),
                     "accuracy_per_frame": hits.mean(axis=0).tolist(), "accuracy_per_class": per_class,
                     "sharpness_ratio": float(sharpness_per_frame(video).mean() / sharpness_per_frame(truth.video[:, 1:]).mean())})
        print(f"classes: guidance {scale}: accuracy {hits.mean():.3f}", file=sys.stderr, flush=True)
    return {"pipeline": name, "step": pipeline.sources["decoder"].step, "clips": args.clips, "frames": frames,
            "chance": 1 / data.provides.classes, "classifier_accuracy_on_held_out_sprites": sprite_accuracy,
            "classifier_accuracy_on_true_frames": true_accuracy, "rows": rows}


def classes_markdown(report: dict) -> list[str]:
    lines = [f"{report['pipeline']} (step {report['step']}): {report['clips']} clips from the blank first frame, classes "
             f"0-9 requested in turn, {report['frames']} generated frames each. The classifier reads the true frames "
             f"right {report['classifier_accuracy_on_true_frames']:.1%} of the time; chance is {report['chance']:.0%}.",
             "", "| guidance | accuracy | frame +1 | +2 | +3 | +4 | worst class | sharpness vs true |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        worst = min(range(len(row["accuracy_per_class"])), key=lambda c: row["accuracy_per_class"][c])
        lines.append(f"| {row['guidance']:g} | {row['accuracy']:.1%} | "
                     + " | ".join(f"{a:.0%}" for a in row["accuracy_per_frame"])
                     + f" | {worst} ({row['accuracy_per_class'][worst]:.0%}) | {row['sharpness_ratio']:.2f}x |")
    return lines


# -- actions -------------------------------------------------------------------------------------

def actions_report(registry, args) -> dict:
    name = args.actions_pipeline
    pipeline = registry.build(name)
    data = registry.dataset(name)
    k, frames = args.context, args.frames
    clips = data.clips(args.clips, k + frames, split="test", seed=args.seed)
    truth, states = clips.video[:, k:], clips.states[:, k:]
    steer = {"true actions": clips.actions, "zeroed actions": torch.zeros_like(clips.actions),
             "another clip's actions": clips.actions.roll(1, dims=0)}
    rows = []
    for label, actions in steer.items():
        context = Batch(clips.video[:, :k], actions=actions)
        video = pipeline.generate(context, frames, generator=pipeline.generator(args.seed)).video
        rows.append(row_of(label, video, truth, states))
        print(f"actions: {label}: state error {rows[-1]['state_error']:.2f} px", file=sys.stderr, flush=True)
    past = clips.video[:, :k]
    rows += [row_of("repeat last frame", repeat_last(past, frames), truth, states),
             row_of("constant velocity", constant_velocity(past, frames), truth, states)]
    return {"pipeline": name, "step": pipeline.sources["encoder"].step, "clips": args.clips, "context": k,
            "frames": frames, "rows": rows}


def row_of(label: str, video: torch.Tensor, truth: torch.Tensor, states: torch.Tensor) -> dict:
    error = state_error_per_frame(video, states)
    return {"steering": label, "state_error": float(error.mean()), "state_error_per_frame": error.tolist(),
            "psnr": float(psnr_per_frame(video, truth).mean()),
            "sharpness_ratio": float(sharpness_per_frame(video).mean() / sharpness_per_frame(truth).mean())}


def actions_markdown(report: dict) -> list[str]:
    frames = report["frames"]
    lines = [f"{report['pipeline']} (step {report['step']}): {report['clips']} held-out clips, {report['context']} true "
             f"context frames, {frames} generated. State error: pixels from the agent's true centre to the blob found.",
             "", "| steered by | state error (px) | +1 | +4 | +" + str(frames) + " | PSNR (dB) | sharpness vs true |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        per = row["state_error_per_frame"]
        lines.append(f"| {row['steering']} | {row['state_error']:.2f} | {per[0]:.2f} | {per[min(3, frames - 1)]:.2f} | "
                     f"{per[-1]:.2f} | {row['psnr']:.2f} | {row['sharpness_ratio']:.2f}x |")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = load_registry(args.registry)
    results = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    lines = []
    if args.only in (None, "classes"):
        results["classes"] = classes_report(registry, args)
        lines += classes_markdown(results["classes"]) + [""]
    if args.only in (None, "actions"):
        results["actions"] = actions_report(registry, args)
        lines += actions_markdown(results["actions"])
    out = Path(args.out)
    if out.exists():  # keep the other half of an earlier run with --only
        results = json.loads(out.read_text()) | results
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
