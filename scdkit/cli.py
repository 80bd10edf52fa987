"""The `scdkit` command. Commands are thin: parse, call an importable function, print.

Every scdkit error becomes one line on stderr and a non-zero exit (2 for bad input).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scdkit.errors import ScdkitError, UsageError

console = Console()
err_console = Console(stderr=True)


# -- commands -----------------------------------------------------------------------------------

def cmd_plugins(args) -> int:
    from scdkit.pluginmanager import default_catalog

    catalog = default_catalog()
    kinds = ("encoders", "decoders", "schedulers", "models", "attention_backends")
    listing = {kind: [{"name": r.name, "provider": r.provider, "version": r.version}
                      for r in sorted(catalog.components[kind].values(), key=lambda r: r.name)] for kind in kinds}
    listing["broken"] = [{"provider": b.provider, "version": b.version, "error": b.error} for b in catalog.broken]
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    table = Table("kind", "name", "provider", "version", title="scdkit plugins")
    for kind in kinds:
        for row in listing[kind]:
            table.add_row(kind.rstrip("s"), row["name"], row["provider"], row["version"])
    console.print(table)
    for b in catalog.broken:
        console.print(f"[red]broken[/red] {b.provider} {b.version}: {b.error}")
    return 0


def cmd_validate(args) -> int:
    from scdkit.errors import RegistryError
    from scdkit.registry import load_registry

    try:
        registry = load_registry(args.registry)
    except RegistryError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    counts = ", ".join(f"{len(v)} {k}" for k, v in registry.components.items() if v)
    print(f"{args.registry}: valid ({counts}, {len(registry.pipelines)} pipelines)")
    return 0


def _pipeline(args, load: bool = True):
    from scdkit.registry import load_registry

    registry = load_registry(args.registry)
    name = args.pipeline or registry.default_pipeline
    pipeline = registry.build(name, load=load, attention=args.attention,
                              checkpoint=getattr(args, "checkpoint", None) if load else None)
    if args.attention:
        console.print(pipeline.attention)
    return registry, name, pipeline


def cmd_train(args) -> int:
    from scdkit.pipeline import Recipe
    from scdkit.train import TrainConfig, train

    registry, name, pipeline = _pipeline(args, load=False)
    recipe = Recipe(noise_draws=args.noise_draws, cond_noise=args.cond_noise,
                    clean_context_ratio=args.clean_context_ratio, context_noise=args.context_noise)
    config = TrainConfig(steps=args.steps, batch=args.batch, frames=args.frames, lr=args.lr, warmup=args.warmup,
                         ema=args.ema, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                         seed=args.seed, recipe=recipe)
    out = Path(args.out) if args.out else registry.checkpoint_dir(name)
    if out is None:
        raise UsageError(f"pipeline {name!r} has no checkpoint directory; pass --out")
    console.print(f"training [bold]{name}[/bold] ({sum(p.numel() for p in pipeline.parameters()):,} parameters) into {out}")
    train(pipeline, config, out, registry.pipelines[name].data, resume=not args.fresh, console=console)
    return 0


def cmd_generate(args) -> int:
    from scdkit.generate import check_video_support, run_generate

    if args.video:
        check_video_support(Path(args.video))  # before minutes of work, not after

    registry, name, pipeline = _pipeline(args)
    run_generate(pipeline, registry.pipelines[name].data, context=args.context, frames=args.frames, clips=args.clips,
                 steps=args.steps, seed=args.seed, gif=Path(args.gif),
                 video=Path(args.video) if args.video else None, as_json=args.json, console=console)
    return 0


def cmd_probe(args) -> int:
    from scdkit.probe import load_probe_pipeline, plot_probe, run_probe, write_json
    from scdkit.registry import load_registry

    registry = load_registry(args.registry)
    pipeline, step = load_probe_pipeline(registry, args.pipeline, args.checkpoint)
    result = run_probe(pipeline, registry.pipelines[args.pipeline].data, context=args.context, steps=args.steps,
                       clips=args.clips, seed=args.seed)
    out = Path(args.out)
    figures = plot_probe(result, out, title=f"{args.pipeline} (step {step})")
    payload = {"pipeline": args.pipeline, "checkpoint_step": step, **result.to_json(), "figures": figures}
    write_json(payload, out / "probe.json")
    if args.json:
        print(json.dumps(payload))
        return 0
    table = Table("layer", "mean similarity across steps", "attention share on past frames",
                  title=f"probe: {args.pipeline} at step {step}, {result.steps} steps, {result.context} context frames")
    summary = result.summary()
    for i, (sim, share) in enumerate(zip(summary["mean_similarity"], summary["past_attention_share"]), 1):
        table.add_row(str(i), f"{sim:.3f}", f"{share:.3f}")
    console.print(table)
    console.print(f"wrote {figures['similarity_png']}, {figures['curves_png']}, {out / 'probe.json'}")
    return 0


def cmd_swap_eval(args) -> int:
    from scdkit.registry import load_registry
    from scdkit.swap_eval import markdown, parse_checkpoints, rich_table, swap_eval

    registry = load_registry(args.registry)
    encoders = [name.strip() for name in args.encoders.split(",") if name.strip()]
    report = swap_eval(registry, args.pipeline or registry.default_pipeline, encoders,
                       parse_checkpoints(args.checkpoint, encoders), clips=args.clips, context=args.context,
                       frames=args.frames, steps=args.steps, seed=args.seed, attention=args.attention,
                       progress=lambda row: err_console.print(f"evaluated {row.encoder}"))
    if args.json:
        print(json.dumps(report.to_json()))
    elif args.markdown:
        print(markdown(report))
    else:
        console.print(rich_table(report))
    return 0


def cmd_bench(args) -> int:
    from scdkit.bench import BenchConfig, plot_sweep, print_bench, run_bench

    try:
        config = BenchConfig(width=args.width, heads=args.heads, encoder_layers=args.encoder_layers,
                             decoder_layers=args.decoder_layers, baseline_layers=args.baseline_layers,
                             tokens_per_frame=args.tokens, steps=args.steps, context_frames=args.context)
    except ValueError as exc:
        raise UsageError(f"scdkit bench: {_first_error(exc)}") from None
    encoders = _registry_encoders(args) if args.encoders else None  # bad names fail before minutes of bench
    sweep = args.frames or ([16, 32, 64, 128] if args.plot else None)
    say = (lambda message: err_console.print(message, highlight=False))
    result = run_bench(config, generated=args.generate, repeats=args.repeats, sweep=sweep, seed=args.seed,
                       progress=say)
    if args.plot:
        plot_sweep(result["sweep"], args.plot)
        result["plot"] = args.plot
    if encoders is not None:
        from scdkit.encoder_bench import run_curves

        frame, built = encoders
        result["encoders"] = run_curves(built, args.curve_frames, args.train_lengths, args.encoder_plot, say)
        result["encoders"]["frame"] = frame
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print_bench(result, console)
    return 0


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        e = errors()[0]
        return f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}"
    return str(exc)


def _registry_encoders(args) -> tuple[dict, dict]:
    """The frame (of the default pipeline) and the --encoders built from the registry, checked up front."""
    from scdkit.registry import load_registry

    registry = load_registry(args.registry)
    frame = registry.pipelines[registry.default_pipeline].frame
    names = [name.strip() for name in args.encoders.split(",") if name.strip()]
    unknown = [name for name in names if name not in registry.components["encoders"]]
    if unknown:
        raise UsageError(f"scdkit bench --encoders: unknown encoder(s) {', '.join(unknown)} in {args.registry}; "
                         f"known: {', '.join(registry.components['encoders'])}")
    return frame.model_dump(), {name: registry.build_component("encoders", name, frame) for name in names}


# -- parser -------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default, unless it is empty or the help text already says it."""

    def _get_help_string(self, action):
        help = action.help or ""
        empty = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS
        if not action.option_strings or empty or "default" in help:
            return help
        return f"{help} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2; main() adds the "scdkit: error:" prefix
        command = self.prog.removeprefix("scdkit").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scdkit", description="Separable Causal Diffusion video models.")
    parser.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: all cores)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plugins", help="list registered components and broken plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("validate", help="check a registry file")
    p.add_argument("registry", nargs="?", default="registry.toml")
    p.set_defaults(func=cmd_validate)

    def pipeline_args(p):
        p.add_argument("--registry", default="registry.toml", help="registry file")
        p.add_argument("--pipeline", default=None, help="pipeline name (default: the registry's default)")
        p.add_argument("--attention", default=None, help="attention backend (sdpa, eager, chunked, flash, auto)")

    p = sub.add_parser("train", help="train a pipeline")
    pipeline_args(p)
    p.add_argument("--steps", type=_positive, default=1500)
    p.add_argument("--batch", type=_positive, default=16)
    p.add_argument("--frames", type=_positive, default=7)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--noise-draws", type=_positive, default=2)
    p.add_argument("--cond-noise", type=float, default=0.05)
    p.add_argument("--clean-context-ratio", type=float, default=0.1)
    p.add_argument("--context-noise", type=float, default=0.05)
    p.add_argument("--checkpoint-every", type=_positive, default=100)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="checkpoint directory (default: the pipeline's)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing training state instead of resuming")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue held-out clips, write a GIF, compare with repeat-last")
    pipeline_args(p)
    p.add_argument("--context", type=_positive, default=4, help="true frames given as context")
    p.add_argument("--frames", type=_positive, default=8, help="frames generated after the context")
    p.add_argument("--clips", type=_positive, default=16, help="held-out clips evaluated")
    p.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: the scheduler's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out clips and the noise")
    p.add_argument("--gif", default="out/generate.gif", help="where the comparison GIF goes")
    p.add_argument("--video", default=None, metavar="FILE.mp4", help="also write an MP4 (needs the video extra)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="checkpoint directory to load instead of the pipeline's (e.g. a `train --out` run)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("probe", help="per-layer feature similarity across denoising steps and attention on past frames")
    p.add_argument("--registry", default="registry.toml", help="registry file")
    p.add_argument("--pipeline", default="baseline-digits", help="a monolithic (model = ...) pipeline")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the pipeline's)")
    p.add_argument("--context", type=_positive, default=4, help="clean context frames before the probed frame")
    p.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: the scheduler's)")
    p.add_argument("--clips", type=_positive, default=8, help="held-out clips averaged over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/probe", help="directory for the PNGs and probe.json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("swap-eval", help="several encoders under one trained decoder: quality, loss, speed, memory")
    pipeline_args(p)
    p.add_argument("--encoders", required=True, help="comma-separated registry encoder names")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="an encoder's own checkpoint file (otherwise: same weights as the pipeline's encoder)")
    p.add_argument("--clips", type=_positive, default=16)
    p.add_argument("--context", type=_positive, default=4)
    p.add_argument("--frames", type=_positive, default=8, help="generated frames per clip")
    p.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: the scheduler's)")
    p.add_argument("--seed", type=int, default=0)
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--markdown", action="store_true")
    p.set_defaults(func=cmd_swap_eval)

    p = sub.add_parser("bench", help="SCD vs the causal-DiT baseline: latency, FLOPs, memory (random weights)")
    p.add_argument("--width", type=_positive, default=256)
    p.add_argument("--heads", type=_positive, default=4)
    p.add_argument("--encoder-layers", type=_positive, default=8)
    p.add_argument("--decoder-layers", type=_positive, default=4)
    p.add_argument("--baseline-layers", type=_positive, default=None, help="default: encoder + decoder layers")
    p.add_argument("--tokens", type=_positive, default=64, help="tokens per frame (a square grid)")
    p.add_argument("--steps", type=_positive, default=50, help="denoising steps per frame")
    p.add_argument("--context", type=_positive, default=144, help="context frames before generating")
    p.add_argument("--generate", type=_positive, default=5, help="frames generated per timed run (>= 2)")
    p.add_argument("--repeats", type=_positive, default=2, help="timed runs per model, alternating")
    p.add_argument("--frames", type=_positive, nargs="+", default=None, metavar="N",
                   help="also measure per-frame cost once N frames exist, for each N (e.g. 16 64 256 512)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot the --frames sweep (default sweep 16..128)")
    p.add_argument("--encoders", default=None, metavar="NAMES",
                   help="comma-separated registry encoders: per-frame time and peak memory against frame count")
    p.add_argument("--curve-frames", type=_positive, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--train-lengths", type=_positive, nargs="*", default=[], metavar="N",
                   help="also peak training memory of the --encoders at these clip lengths")
    p.add_argument("--encoder-plot", default=None, metavar="FILE.png")
    p.add_argument("--registry", default="registry.toml", help="registry file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        import torch

        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        return args.func(args)
    except ScdkitError as exc:
        err_console.print(f"scdkit: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("scdkit: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
