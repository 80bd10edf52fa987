"""Frame decoders side by side at the shipped frame and conditioning (random weights): parameters, the time of
one denoising step at batch 1 (the streaming case: ``denoise`` on staged conditioning and time terms) and of
a training forward + backward at the training batch, and the peak memory of each.

    nice -n 19 python benchmarks/decoders.py --decoders dit-s unet-s

Timings are medians of ``--runs`` rounds after a warm-up, the decoders interleaved in each round; memory is
the peak of live tensors allocated during one call (``scdkit.encoder_bench.LiveBytes``: activations, not
weights). Nothing is asserted: these are measurements of this machine.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

from scdkit.encoder_bench import MB, LiveBytes
from scdkit.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default=str(ROOT / "registry.toml"))
    parser.add_argument("--pipeline", default="scd-digits", help="its frame and encoder set the contract")
    parser.add_argument("--decoders", nargs="+", default=["dit-s", "unet-s"])
    parser.add_argument("--train-batch", type=int, default=192, help="decoder items per training step "
                        "(scdkit train's default: 16 clips x 6 targets x 2 noise draws)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    registry = load_registry(args.registry)
    encoder = registry.build(args.pipeline, load=False).components["encoder"]
    frame, contract = encoder.frame, encoder.contract
    decoders = {name: registry.build_component("decoders", name, frame, cond=contract).eval() for name in args.decoders}
    g = torch.Generator().manual_seed(0)

    def inputs(batch: int):
        return (torch.randn(batch, frame.tokens, frame.patch_dim, generator=g), torch.rand(batch, generator=g),
                torch.randn(batch, contract.tokens, contract.dim, generator=g))

    x1, t1, c1 = inputs(1)
    xb, tb, cb = inputs(args.train_batch)
    staged = {name: (d.condition(c1), d.time_terms(t1)) for name, d in decoders.items()}

    @torch.no_grad()
    def step(name):
        return decoders[name].denoise(x1, *staged[name])

    def train(name):
        decoders[name].zero_grad(set_to_none=True)
        decoders[name](xb, tb, cb).square().mean().backward()

    rows = {name: {"params": sum(p.numel() for p in d.parameters())} for name, d in decoders.items()}
    for what, run, runs in (("step", step, args.runs), ("train", train, max(3, args.runs // 5))):
        for name in decoders:
            run(name)  # warm-up
            with LiveBytes() as tracker:
                run(name)
            rows[name][f"{what}_mb"] = tracker.peak / MB
        times = {name: [] for name in decoders}
        for _ in range(runs):
            for name in decoders:
                started = time.perf_counter()
                run(name)
                times[name].append(time.perf_counter() - started)
        for name in decoders:
            rows[name][f"{what}_ms"] = 1000 * statistics.median(times[name])
    print(f"<!-- {datetime.date.today()} · {' '.join(['python benchmarks/decoders.py', *sys.argv[1:]])} · "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads -->")
    print(f"| decoder | parameters | step ms (batch 1) | step peak MB | train ms (batch {args.train_batch}) | "
          "train peak MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['params']:,} | {r['step_ms']:.2f} | {r['step_mb']:.2f} | {r['train_ms']:.0f} | "
              f"{r['train_mb']:.0f} |")


if __name__ == "__main__":
    main()
