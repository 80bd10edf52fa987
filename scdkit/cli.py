"""The `scdkit` command. Commands are thin: parse, call an importable function, print.

Every error a user can act on becomes one line on stderr and a non-zero exit (2 for bad input), in one
place (``user_error``): scdkit's own errors, running out of memory, and OS errors on a named path.
``--debug`` (or ``SCDKIT_DEBUG=1``) shows the traceback as well, for bug reports; any other exception is a
bug and shows its traceback anyway. Ctrl-C and SIGTERM stop a command the same way (exit 130). Under torchrun
(``scdkit.distributed``) rank 0 speaks for the run: the other processes stay silent about what every process hits
alike (bad input, a stop), and mark their own errors with their rank.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scdkit.errors import RegistryError, ScdkitError, TrainingDiverged, UsageError

console = Console()
err_console = Console(stderr=True)


# -- commands -----------------------------------------------------------------------------------

def cmd_plugins(args) -> int:
    from scdkit.pluginmanager import KINDS, SINGULAR, default_catalog

    catalog = default_catalog()
    kinds = KINDS
    listing = {kind: [{"name": r.name, "provider": r.provider, "version": r.version}
                      for r in sorted(catalog.components[kind].values(), key=lambda r: r.name)] for kind in kinds}
    listing["broken"] = [{"provider": b.provider, "version": b.version, "error": b.error} for b in catalog.broken]
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    table = Table("kind", "name", "provider", "version", title="scdkit plugins")
    for kind in kinds:
        for row in listing[kind]:
            table.add_row(SINGULAR[kind], row["name"], row["provider"], row["version"])
    console.print(table)
    for b in catalog.broken:
        console.print(f"[red]broken[/red] {b.provider} {b.version}: {b.error}")
    return 0


def cmd_validate(args) -> int:
    from scdkit.errors import RegistryError
    from scdkit.registry import load_registry, validate

    try:
        registry = load_registry(args.registry, collect=True)
        notes = validate(registry)
    except RegistryError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    counts = ", ".join(f"{len(v)} {k}" for k, v in registry.components.items() if v)
    print(f"{args.registry}: valid ({counts}, {len(registry.pipelines)} pipelines; each dry-built on the meta device)")
    for note in notes:
        print(f"  {note}")
    return 0


def _runtime(args):
    """The --device/--precision/--compile/--attention options, the device resolved, and a line saying
    where the model(s) run (printed once the work starts, so that an error stays one line)."""
    from scdkit.device import Runtime, check_precision, resolve_device
    from scdkit.options import model_from_args

    runtime = model_from_args(Runtime, args)
    device, message = resolve_device(runtime.device)
    check_precision(runtime.precision, device)
    extras = [f"{runtime.precision} autocast"] * (runtime.precision != "fp32") + ["compiled"] * runtime.compile
    return runtime, device, ", ".join([message, *extras])


def _build_options(args) -> tuple[dict, str]:
    """Registry.build's runtime keywords (attention, device, precision, compile) and where it runs."""
    runtime, device, where = _runtime(args)
    return {"attention": runtime.attention, "device": device, "precision": runtime.precision,
            "compile": runtime.compile}, where


def _say(message: str) -> None:
    err_console.print(message, highlight=False)


def _continuation_needs(command: str, config, frames: int | None = None):
    """What continuing held-out clips needs (``_pipeline``'s ``needs``), for a config with clips and
    optionally context, frames and steps (``frames``: how many frames follow the context)."""
    from scdkit.memory import continuation_bytes

    context, steps = getattr(config, "context", 0), getattr(config, "steps", None)
    frames = config.frames if frames is None else frames
    given = {"clips": config.clips, "context": context, "frames": getattr(config, "frames", None), "steps": steps}
    what = " ".join([command, *(f"--{key} {value}" for key, value in given.items() if value)])

    def needs(pipeline):
        total = continuation_bytes(pipeline.frame, config.clips, context, frames,
                                   steps or getattr(pipeline.scheduler, "steps", 0))
        return total, what, "ask for fewer clips, frames or steps"
    return needs


def _pipeline(args, load: bool = True, steps: int | None = None, needs=None, reads: tuple = ()):
    """Build the pipeline the options name, check the memory the work ``needs`` (a function of the pipeline:
    bytes, what, hint; see ``scdkit.memory``) and the sampling ``steps`` it will use, then say where it runs
    (after every check, so that an error stays one line). A command that reads data gets its data set in
    ``args.dataset``, and one clip of each (split, frames) in ``reads`` is drawn first: a folder with nothing
    usable fails here, before a run folder is made or anything is said."""
    from scdkit.memory import check_fits
    from scdkit.registry import load_registry

    registry = load_registry(args.registry)
    name = args.pipeline or registry.default_pipeline
    options, where = _build_options(args)
    pipeline = registry.build(name, load=load, checkpoint=getattr(args, "checkpoint", None) if load else None,
                              encoder=getattr(args, "encoder", None),
                              force_pairing=getattr(args, "force_pairing", False), **options)
    if needs is not None:
        needed, what, hint = needs(pipeline)
        check_fits(needed, what, pipeline.device, hint)
    pipeline.sampling_times(steps)
    if hasattr(args, "data"):  # the commands that read data: their data set, checked before anything is said
        args.dataset = _data(args, registry, name, pipeline)
        for split, frames in reads:
            args.dataset.clips(1, frames, split=split)
    _say(where)
    if args.attention:
        _say(pipeline.attention)
    for role, source in pipeline.sources.items():
        _say(f"{role}: {source.describe()}")
    for warning in pipeline.warnings:
        _say(f"warning: {warning}")
    return registry, name, pipeline


def _data(args, registry, name: str, pipeline):
    """The data set the command reads (--data, else the pipeline's), checked against the pipeline's frame and
    the conditioning its components accept: a one-line UsageError otherwise."""
    from scdkit.errors import RegistryError

    try:
        data = registry.dataset(name, getattr(args, "data", None))
    except RegistryError as exc:
        raise UsageError(f"--data: {exc.problems[0]}") from None
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--data {data_name(args, registry, name)}: cannot be built for pipeline {name!r}: {exc}") from None
    problems = [problem for _, problem in data.frame_problems()]
    problems += [f"{role} {problem}" for role, component in pipeline.components.items()
                 for problem in component.accepts.unmet_by(data.provides)]
    if problems:
        raise UsageError(f"pipeline {name!r} cannot read data set {data.name!r}: {'; '.join(problems)}")
    return data


def data_name(args, registry, name: str) -> str:
    return getattr(args, "data", None) or registry.pipelines[name].data


def cmd_train(args) -> int:
    """``scdkit train``; under torchrun (``scdkit.distributed``) each process joins the process group first and
    leaves it at the end, and only rank 0 prints."""
    from scdkit import distributed
    from scdkit.interfaces import Recipe
    from scdkit.options import model_from_args
    from scdkit.train import TrainConfig, micro_batch_size

    config = model_from_args(TrainConfig, args, recipe=model_from_args(Recipe, args))  # bad values: before any work
    place = distributed.from_environment()
    micro_batch_size(config, place.world if place else 1)
    if place is None:
        if config.parallel == "fsdp":
            raise UsageError("--parallel fsdp: shards the model over the processes torchrun starts (torchrun "
                             "--nproc-per-node N -m scdkit.cli train ...); a single process holds it whole")
        return _train(args, config, distributed.Ranks())
    if config.parallel == "fsdp" and args.precision == "fp16":
        raise UsageError("--precision fp16: not with --parallel fsdp (its loss scaling would differ between shards); "
                         "use bf16")
    from scdkit.device import resolve_device

    args.device = distributed.device_name(args.device or "auto", place)
    device, _ = resolve_device(args.device)
    ranks = distributed.start(place, device)
    try:
        with _quiet_unless(ranks.main):
            return _train(args, config, ranks)
    finally:
        distributed.stop()


@contextmanager
def _quiet_unless(speaking: bool):
    """Console output only from the process that speaks for a torchrun run (rank 0)."""
    quiet = console.quiet, err_console.quiet
    console.quiet, err_console.quiet = quiet[0] or not speaking, quiet[1] or not speaking
    try:
        yield
    finally:
        console.quiet, err_console.quiet = quiet


def _train(args, config, ranks) -> int:
    from scdkit.files import check_writable
    from scdkit.registry import load_registry
    from scdkit.runs import STATE, manifest_encoder, read_manifest
    from scdkit.train import HELD_OUT_CHECK_FRAMES, micro_batch_size, train

    registry = load_registry(args.registry)
    name = args.pipeline or registry.default_pipeline
    out = Path(args.out) if args.out else registry.checkpoint_dir(name)
    if out is None:
        raise UsageError(f"pipeline {name!r} has no checkpoint directory; pass --out")
    if ranks.main:  # the one that writes
        check_writable(out, "--out", folder=True)
    if not args.fresh and (out / STATE).exists():  # resuming: the encoder the run was started with
        recorded = manifest_encoder(out)
        if args.encoder and recorded and args.encoder != recorded:
            raise UsageError(f"--encoder {args.encoder}: the run in {out} trains encoder {recorded!r}; resume it "
                             "with that encoder, or pass --fresh")
        args.encoder = args.encoder or recorded
        recorded_teacher = read_manifest(out).get("teacher")  # ... and the teacher it distils from
        if recorded_teacher and not config.teacher:
            config = config.model_copy(update={"teacher": recorded_teacher["name"],
                                               "teacher_steps": recorded_teacher["steps"]})
    import torch

    from scdkit.memory import training_bytes
    from scdkit.runs import check_init_readable

    check_init_readable(args.init)
    torch.manual_seed(config.seed)  # the initial weights too: the same seed, the same run (on every rank)
    clips = micro_batch_size(config, ranks.world)  # what one backward holds at once
    registry, name, pipeline = _pipeline(args, load=False, needs=lambda p: (
        training_bytes(p.frame, clips, config.frames, config.recipe.noise_draws),
        f"train --batch {config.batch} --frames {config.frames}", "use a smaller --batch or --frames, or --accumulate"),
        reads=(("train", config.frames), *((("test", HELD_OUT_CHECK_FRAMES),) if config.eval_every else ())))
    freeze = [role.strip() for item in args.freeze for role in item.split(",") if role.strip()]
    names = registry.role_names(name, args.encoder)
    processes = (f"; {ranks.world} processes ({config.parallel}, {config.batch // ranks.world} clips each per step)"
                 if ranks.distributed else "")
    console.print(f"training [bold]{name}[/bold] ({', '.join(f'{r} {n}' for r, n in names.items())}; "
                  f"{sum(p.numel() for p in pipeline.parameters()):,} parameters) into {out}{processes}")
    teacher = None
    if config.teacher:
        from scdkit.distill import Teacher

        options, _ = _build_options(args)
        if config.teacher not in registry.pipelines:
            raise UsageError(f"--teacher {config.teacher}: not a pipeline of {registry.path} "
                             f"({', '.join(registry.pipelines)})")
        teacher = Teacher(registry.build(config.teacher, **options), config.teacher_steps, config.teacher)
        steps = len(pipeline.sampling_times()) - 1
        console.print(f"distilling from [bold]{config.teacher}[/bold] ({teacher.pipeline.scheduler.plugin_name}, "
                      f"{len(teacher.times) - 1} steps) to {steps} step{'s' * (steps > 1)} of "
                      f"{pipeline.scheduler.plugin_name}")
    elif config.teacher_steps:
        raise UsageError("--teacher-steps: only with --teacher")
    train(pipeline, config, out, args.dataset, resume=not args.fresh, console=console,
          names=names, init=args.init, freeze=freeze, overwrite=args.overwrite, ranks=ranks, teacher=teacher)
    return 0


def cmd_generate(args) -> int:
    from scdkit.evaluate import EvalConfig
    from scdkit.files import check_writable
    from scdkit.generate import check_video_support, run_generate
    from scdkit.options import model_from_args

    config = model_from_args(EvalConfig, args)
    check_writable(args.gif, "--gif")  # before minutes of work, not after
    if args.video:
        check_video_support(Path(args.video))
        check_writable(args.video, "--video")
    registry, name, pipeline = _pipeline(args, steps=config.steps, needs=_continuation_needs("generate", config),
                                         reads=(("test", config.context + config.frames),))
    run_generate(pipeline, args.dataset, config, gif=Path(args.gif),
                 video=Path(args.video) if args.video else None, as_json=args.json, console=console,
                 lpips=Path(args.lpips) if args.lpips else None, i3d=Path(args.i3d) if args.i3d else None)
    return 0


def cmd_probe(args) -> int:
    from scdkit.files import check_writable
    from scdkit.memory import check_fits
    from scdkit.options import model_from_args
    from scdkit.probe import ProbeConfig, load_probe_pipeline, plot_probe, run_probe, write_json
    from scdkit.registry import load_registry

    config = model_from_args(ProbeConfig, args)
    check_writable(args.out, "--out", folder=True)
    registry = load_registry(args.registry)
    options, where = _build_options(args)
    pipeline, step = load_probe_pipeline(registry, args.pipeline, args.checkpoint, **options)
    needed, what, hint = _continuation_needs("probe", config, frames=1)(pipeline)
    check_fits(needed, what, pipeline.device, hint)
    data = _data(args, registry, args.pipeline, pipeline)
    _say(where)
    result = run_probe(pipeline, data, config)
    out = Path(args.out)
    figures = plot_probe(result, out, title=f"{args.pipeline} (step {step})")
    payload = {"pipeline": args.pipeline, "checkpoint_step": step, **result.to_json(), "figures": figures}
    write_json(payload, out / "probe.json")
    if args.json:
        print(json.dumps(payload))
        return 0
    table = Table("layer", "mean similarity across steps", "attention share outside the frame",
                  title=f"probe: {args.pipeline} at step {step}, {result.steps} steps, {result.context} context frames")
    summary = result.summary()
    for i, (sim, share) in enumerate(zip(summary["mean_similarity"], summary["past_attention_share"]), 1):
        table.add_row(str(i), f"{sim:.3f}", f"{share:.3f}")
    console.print(table)
    console.print(f"wrote {figures['similarity_png']}, {figures['curves_png']}, {out / 'probe.json'}")
    return 0


def cmd_swap_eval(args) -> int:
    from scdkit.evaluate import EvalConfig
    from scdkit.memory import check_fits, continuation_bytes
    from scdkit.options import model_from_args
    from scdkit.registry import load_registry
    from scdkit.swap_eval import default_encoders, markdown, parse_checkpoints, rich_table, swap_eval

    config = model_from_args(EvalConfig, args, seed=0)  # --seeds replaces --seed
    registry = load_registry(args.registry)
    pipeline = args.pipeline or registry.default_pipeline
    encoders = ([name.strip() for name in args.encoders.split(",") if name.strip()] if args.encoders
                else default_encoders(registry, pipeline))
    options, where = _build_options(args)
    if pipeline in registry.pipelines:
        frame = registry.pipelines[pipeline].frame
        check_fits(continuation_bytes(frame, config.clips, config.context, config.frames, config.steps or 0),
                   f"swap-eval --clips {config.clips} --context {config.context} --frames {config.frames}",
                   options["device"], "ask for fewer clips or frames")
    report = swap_eval(registry, pipeline, encoders, parse_checkpoints(args.checkpoint, encoders), config,
                       progress=lambda row: _say(f"evaluated {row.encoder} ({where})"), seeds=args.seeds,
                       warn=lambda message: _say(f"warning: {message}"),
                       force_pairing=args.force_pairing, data_name=args.data, **options)
    if args.json:
        print(json.dumps(report.to_json()))
    elif args.markdown:
        print(markdown(report))
    else:
        console.print(rich_table(report))
    return 0


def cmd_encode(args) -> int:
    from scdkit.encode import EncodeConfig, check_writable, encode, write_cache
    from scdkit.options import model_from_args

    config = model_from_args(EncodeConfig, args)
    out = Path(args.out)
    check_writable(out, args.overwrite)  # before any work
    registry, name, pipeline = _pipeline(args, needs=_continuation_needs("encode", config),
                                         reads=(("test", config.frames),))
    cache = encode(pipeline, args.dataset, config, registry.pipelines[name].encoder)
    write_cache(cache, out, args.overwrite)
    info = cache.info
    console.print(f"wrote {out}: the conditioning {list(cache.cond.shape)} of {info.clips} held-out {info.data} clips "
                  f"by {name}'s encoder {info.encoder} (step {info.step}, sha256 {info.weights_sha256[:12]})")
    return 0


def cmd_render(args) -> int:
    from scdkit.encode import RenderConfig, print_render, read_cache, render_cache
    from scdkit.generate import comparison_frames, write_gif
    from scdkit.options import model_from_args

    config = model_from_args(RenderConfig, args)
    cache = read_cache(Path(args.cache))
    args.pipeline = args.pipeline or cache.info.pipeline
    _, _, pipeline = _pipeline(args, steps=config.steps)
    result = render_cache(pipeline, cache, config)
    print_render(result, console)
    if args.gif:
        write_gif(Path(args.gif), comparison_frames(cache.clips.video[:, :1], result.truth, result.video))
        console.print(f"wrote {args.gif} (left: truth, right: rendered; green border = first frame, red = rendered)")
    return 0


def cmd_check(args) -> int:
    from scdkit.check import check_component
    from scdkit.registry import load_registry

    registry = load_registry(args.registry)
    results = check_component(registry, args.name)
    build, *checks = results
    if args.json:
        print(json.dumps([result._asdict() for result in results]))
    else:
        console.print(f"conformance kit on {build.message if build.passed else args.name}", highlight=False)
        table = Table("check", "result", "why", box=None)
        for result in results if not build.passed else checks:
            table.add_row(result.check, "[green]pass[/green]" if result.passed else "[red]FAIL[/red]", result.message)
        console.print(table)
    return 0 if all(result.passed for result in results) else 1


def cmd_bench(args) -> int:
    from scdkit.bench import BenchConfig, BenchRun, plot_sweep, print_bench, run_bench
    from scdkit.encoder_bench import REPEATS, WARMUP
    from scdkit.files import check_writable
    from scdkit.memory import check_fits, clip_bytes, kv_cache_bytes
    from scdkit.options import model_from_args

    config = model_from_args(BenchConfig, args)
    run = model_from_args(BenchRun, args)
    for option, path in (("--plot", args.plot), ("--encoder-plot", args.encoders and args.encoder_plot)):
        if path:
            check_writable(path, option)  # before minutes of bench
    if args.plot and not run.frames:
        run = run.model_copy(update={"frames": [16, 32, 64, 128]})
    short = [str(n) for n in args.curve_frames if n < REPEATS + WARMUP]
    if short:
        raise UsageError(f"--curve-frames {' '.join(short)}: each frame count must be at least {REPEATS + WARMUP} "
                         f"(each point ends with {WARMUP} warm-up and {REPEATS} timed steps)")
    encoders = _registry_encoders(args) if args.encoders else None  # bad names fail before minutes of bench
    runtime, device, _ = _runtime(args)
    longest = max([config.context_frames + run.generate, *(n + 3 for n in run.frames or [])])
    check_fits(kv_cache_bytes(config.baseline_layers, longest, config.tokens_per_frame, config.width)
               + clip_bytes(config.frame, 1, longest), f"bench with {longest} frames in the context", device,
               "ask for fewer --context-frames or --frames")
    result = run_bench(config, run, progress=_say, device=device, precision=runtime.precision,
                       compile=runtime.compile)
    if args.plot:
        plot_sweep(result["sweep"], args.plot)
        result["plot"] = args.plot
    if encoders is not None:
        from scdkit.encoder_bench import run_curves

        frame, built = encoders
        built = {name: encoder.to(device) for name, encoder in built.items()}
        result["encoders"] = run_curves(built, args.curve_frames, args.train_lengths, args.encoder_plot, _say)
        result["encoders"]["frame"] = frame
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print_bench(result, console)
    return 0


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

def _integer_from(minimum: int, kind: str):
    """An argparse type: an integer of at least ``minimum``, else a one-line error naming ``kind``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
        return value
    return parse


_positive = _integer_from(1, "positive")
_natural = _integer_from(0, "non-negative")


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
    from scdkit.bench import BenchConfig, BenchRun
    from scdkit.device import Runtime
    from scdkit.evaluate import EvalConfig
    from scdkit.interfaces import Recipe
    from scdkit.options import add_model_options
    from scdkit.probe import ProbeConfig
    from scdkit.train import TrainConfig

    parser = _Parser(prog="scdkit", description="Separable Causal Diffusion video models.")
    parser.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: $OMP_NUM_THREADS, else all cores)")
    parser.add_argument("--debug", action="store_true",
                        help="show an error's traceback above its one line, for bug reports (also: SCDKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plugins", help="list registered components and broken plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("validate", help="check a registry: every pipeline dry-built, matched with its data and checkpoint")
    p.add_argument("registry", nargs="?", default="registry.toml")
    p.set_defaults(func=cmd_validate)

    def registry_args(p, pipeline_help="pipeline name (default: the registry's default)", pipeline_default=None,
                      runtime_exclude=(), data=True):
        p.add_argument("--registry", default="registry.toml", help="registry file")
        p.add_argument("--pipeline", default=pipeline_default, help=pipeline_help)
        if data:
            p.add_argument("--data", default=None, metavar="NAME",
                           help="data set: a [datasets.NAME] table or a data set plugin (default: the pipeline's)")
        add_model_options(p.add_argument_group("runtime"), Runtime, exclude=runtime_exclude)

    p = sub.add_parser("train", help="train a pipeline")
    registry_args(p, runtime_exclude=["compile"])  # compilation is for streaming generation
    add_model_options(p.add_argument_group("training"), TrainConfig)
    add_model_options(p.add_argument_group("SCD loss recipe"), Recipe)
    p.add_argument("--out", default=None, help="checkpoint directory (default: the pipeline's)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing training state instead of resuming")
    p.add_argument("--encoder", default=None, metavar="NAME",
                   help="put this registry encoder in the pipeline's encoder role (its contract must match)")
    p.add_argument("--init", action="append", default=[], metavar="DIR|FILE|ROLE=PATH",
                   help="start from trained weights: every component whose checkpoint in DIR fits (the others are "
                        "skipped, with the reason), one checkpoint FILE, or ROLE=PATH; repeatable")
    p.add_argument("--freeze", action="append", default=[], metavar="ROLE[,ROLE]",
                   help="keep these components as --init loaded them: no gradients, no optimizer state, never "
                        "written back (e.g. --freeze decoder to fit a new encoder under a trained decoder)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow replacing trained weights in --out that have no training state to resume")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate",
                       help="continue held-out clips, write a GIF, compare with repeat-last and constant velocity")
    registry_args(p)
    add_model_options(p.add_argument_group("evaluation"), EvalConfig)
    p.add_argument("--gif", default="out/generate.gif", help="where the comparison GIF goes")
    p.add_argument("--video", default=None, metavar="FILE.mp4", help="also write an MP4 (needs the video extra)")
    p.add_argument("--lpips", default=None, metavar="FILE.safetensors",
                   help="also score LPIPS with these AlexNet-LPIPS weights (scdkit.perceptual says how to convert the "
                        "official ones; nothing is downloaded)")
    p.add_argument("--i3d", default=None, metavar="FILE.pt",
                   help="also score FVD with this I3D TorchScript file (StyleGAN-V's i3d_torchscript.pt)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="checkpoint directory to load instead of the pipeline's (e.g. a `train --out` run; a run "
                        "trained with --encoder brings that encoder)")
    p.add_argument("--encoder", default=None, metavar="NAME", help="put this registry encoder in the encoder role")
    p.add_argument("--force-pairing", action="store_true",
                   help="use an encoder and a decoder that do not belong together (a warning instead of an error)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("probe", help="per-layer feature similarity across denoising steps and attention outside the frame")
    registry_args(p, "the pipeline probed: every layer of a monolithic model, the decoder layers of an SCD one",
                  "baseline-digits")
    add_model_options(p.add_argument_group("probe"), ProbeConfig)
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="checkpoint directory (default: the pipeline's)")
    p.add_argument("--out", default="out/probe", help="directory for the PNGs and probe.json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("swap-eval", help="several encoders under one trained decoder: quality, loss, speed, memory")
    registry_args(p, runtime_exclude=["compile"])  # each swapped pipeline would compile anew: eager runs only
    p.add_argument("--encoders", default=None, metavar="A,B,...",
                   help="comma-separated registry encoder names (default: the pipeline's encoder and its "
                        "[scdkit].same_weights group)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="an encoder's own weights: a run folder (train --out) or a checkpoint file; repeatable "
                        "(otherwise: the pipeline's checkpoint, for its encoder and its same-weights group)")
    p.add_argument("--force-pairing", action="store_true",
                   help="evaluate an encoder fitted under another decoder anyway (a warning instead of an error)")
    p.add_argument("--seeds", type=_natural, nargs="+", default=[0, 1, 2],
                   help="one set of held-out clips and noise per seed; rows give mean ± std over them")
    add_model_options(p.add_argument_group("evaluation"), EvalConfig, exclude=["seed"])
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true")
    output.add_argument("--markdown", action="store_true")
    p.set_defaults(func=cmd_swap_eval)

    from scdkit.encode import EncodeConfig, RenderConfig

    p = sub.add_parser("encode", help="run a pipeline's encoder once over held-out clips; cache its output")
    registry_args(p, runtime_exclude=["compile"])
    add_model_options(p.add_argument_group("clips"), EncodeConfig)
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="checkpoint directory (default: the pipeline's)")
    p.add_argument("--out", default="out/encoded.safetensors", help="the cache file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("render", help="next frames from an encoder cache (the encoder does not run), scored")
    p.add_argument("cache", help="a file written by `scdkit encode`")
    registry_args(p, "pipeline whose decoder renders (default: the one that wrote the cache)", data=False)
    add_model_options(p.add_argument_group("render"), RenderConfig)
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="checkpoint directory (default: the pipeline's)")
    p.add_argument("--gif", default=None, metavar="FILE.gif", help="also write a GIF: truth beside the render")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("check", help="the conformance kit on a component as the registry configures it (random weights)")
    p.add_argument("name", help="a registry component (KIND.NAME when several kinds use the name)")
    p.add_argument("--registry", default="registry.toml", help="registry file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("bench", help="SCD vs the causal-DiT baseline: latency, FLOPs, memory (random weights)")
    add_model_options(p.add_argument_group("compared shapes"), BenchConfig)
    add_model_options(p.add_argument_group("timing"), BenchRun)
    add_model_options(p.add_argument_group("runtime"), Runtime, exclude=["attention"])
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot the --frames sweep (default sweep 16..128)")
    p.add_argument("--encoders", default=None, metavar="NAMES",
                   help="comma-separated registry encoders: per-frame time and peak memory against frame count")
    p.add_argument("--curve-frames", type=_positive, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--train-lengths", type=_positive, nargs="*", default=[], metavar="N",
                   help="also peak training memory of the --encoders at these clip lengths")
    p.add_argument("--encoder-plot", default=None, metavar="FILE.png")
    p.add_argument("--registry", default="registry.toml", help="registry file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def user_error(exc: BaseException) -> tuple[str, int] | None:
    """The one line and exit code of an error a user can act on, or None for a bug (its traceback is shown)."""
    if isinstance(exc, ScdkitError):
        return str(exc), exc.exit_code
    text = str(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and re.search(
            r"out of memory|can't allocate memory|not enough memory", text, re.I)):
        from scdkit.memory import size

        amount = re.search(r"(?:tried to allocate|unable to allocate) ([\d.]+) ?([KMGTPE]i?B|bytes)", text, re.I)
        if amount is not None:
            amount = size(int(amount[1])) if amount[2] == "bytes" else " ".join(amount.groups())
        asked = f" (an allocation of {amount})" if amount else ""
        return (f"out of memory{asked}: ask for less (--batch, --frames, --clips, --context, --steps) or use a "
                "device with more memory", 2)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or text}", 2
    return None


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops a command as Ctrl-C does: a KeyboardInterrupt (atomic writes remove their temporary
    files; training saves a checkpoint first, see ``Trainer.stop_on_signals``)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        previous = [signal.signal(signal.SIGTERM, interrupt)]
    except ValueError:  # not the main thread: signals stay as they are
        previous = []
    try:
        yield
    finally:
        for handler in previous:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


def _speaks_for_the_run() -> bool:
    """False in the torchrun processes other than rank 0 (``scdkit.distributed``)."""
    from scdkit.distributed import is_main_process

    return is_main_process()


def _rank_label() -> str:
    """`` (rank N)`` in a torchrun process other than rank 0, so that its error says whose it is."""
    return "" if _speaks_for_the_run() else f" (rank {os.environ['RANK']})"


def _after_rank_0(code: int, seconds: float = 5.0) -> int:
    """``code``, a few seconds late: a torchrun process other than rank 0 that stops as rank 0 does (a bad argument,
    a stop signal) leaves rank 0 the time to say why, since torchrun ends every process as soon as one exits. Once
    rank 0 has exited, torchrun's SIGTERM ends this one at once, silently."""
    import time

    try:
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
    except ValueError:  # not the main thread
        pass
    time.sleep(seconds)
    return code


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("SCDKIT_DEBUG", "") not in ("", "0")
    with _sigterm_as_interrupt():
        try:
            args = build_parser().parse_args(argv)
            debug = debug or args.debug
            import torch

            if args.threads or "OMP_NUM_THREADS" not in os.environ:  # torch itself reads OMP_NUM_THREADS
                torch.set_num_threads(args.threads or os.cpu_count() or 1)
            return args.func(args)
        except KeyboardInterrupt as exc:
            if not _speaks_for_the_run():
                return _after_rank_0(130)
            err_console.print(f"scdkit: interrupted{f': {exc}' if str(exc) else ''}", markup=False, highlight=False,
                              soft_wrap=True)
            return 130
        except Exception as exc:
            known = user_error(exc)
            if known is None:
                raise
            if isinstance(exc, (UsageError, RegistryError, TrainingDiverged)) and not _speaks_for_the_run():
                return _after_rank_0(known[1])  # the same arguments and files, or agreed: rank 0 says it
            if debug:
                traceback.print_exc()
            err_console.print(f"scdkit{_rank_label()}: error: {known[0]}", markup=False, highlight=False, soft_wrap=True)
            return known[1]


if __name__ == "__main__":
    sys.exit(main())
