"""`scdkit bench`: the FLOP model against a hand count and against torch's FLOP counter; the JSON shape."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scdkit.backends import use_attention_backend
from scdkit.bench import BenchConfig, build_pipelines, flops_per_frame
from scdkit.cli import main
from scdkit.interfaces import Conditioning

TINY = BenchConfig(width=32, heads=2, encoder_layers=2, decoder_layers=1, tokens_per_frame=16, steps=3,
                   context_frames=4)


def test_flop_model_matches_a_hand_count():
    # width 32, MLP 128, 16 tokens of 4x4x1 patches (16 values), 3 steps, 4 context frames + the new one
    qkv, proj, mlp = 2 * 32 * 96, 2 * 32 * 32, 2 * 32 * 128 * 2  # per token
    per_token = qkv + proj + mlp
    ada, final_ada, patch_io = 2 * 32 * 192, 2 * 32 * 64, 2 * 16 * 16 * 32
    time_mlp = 2 * 256 * 32 + 2 * 32 * 32
    context_block = 16 * per_token + 4 * 16 * 80 * 32 + ada  # 16 queries over 5 frames x 16 keys
    decoder_block = 32 * per_token + 4 * 32 * 32 * 32  # 32 tokens (conditioning + frame) over themselves
    scd = 3 * (patch_io + decoder_block + patch_io) + 2 * 16 * 32 * 32 + (patch_io + 2 * context_block + final_ada)
    baseline = 3 * (patch_io + time_mlp + 3 * context_block + final_ada + patch_io) + (patch_io + 3 * context_block)
    flops = flops_per_frame(TINY)
    assert flops["scd"] == scd
    assert flops["baseline"] == baseline
    assert flops["scd_decoder"] == 3 * (2 * patch_io + decoder_block)


@pytest.mark.parametrize("name", ["scd", "baseline"])
def test_flop_model_matches_torch_flop_counter(name):
    """One steady frame (T denoising steps + the frame entering the context), counted by torch."""
    pipeline = build_pipelines(TINY)[name].train(False)
    use_attention_backend(pipeline, "eager")  # plain matmuls, which the counter sees
    stream, frame, none = pipeline.model, pipeline.frame, Conditioning()
    times = pipeline.scheduler.begin(TINY.steps).times
    with torch.no_grad():
        state = stream.new_state(1, TINY.context_frames + 2, none)
        stream.prepare(state, times[:-1])  # once per generation, not per frame
        stream.observe(state, torch.randn(1, TINY.context_frames, frame.tokens, frame.patch_dim), none)
        x = torch.randn(1, frame.tokens, frame.patch_dim)
    with FlopCounterMode(display=False) as counter:  # its module tracking needs autograd on
        for t in times[:-1]:
            x = stream.predict(state, x, t)  # one time for the batch, as generation calls it
        stream.observe(state, x[:, None], none)
    assert counter.get_total_flops() == flops_per_frame(TINY)[name]


def test_flop_model_grows_with_context_only_in_attention():
    near, far = flops_per_frame(TINY, context=4), flops_per_frame(TINY, context=8)
    # four more frames of 16 keys: 4·q·Δk·d per block call; the decoder does not see the context
    assert far["scd"] - near["scd"] == 2 * 4 * 16 * 64 * 32
    assert far["baseline"] - near["baseline"] == 4 * 3 * 4 * 16 * 64 * 32
    assert far["scd_decoder"] == near["scd_decoder"]


def test_bench_json_has_the_documented_shape(capsys):
    args = ["--threads", "1", "bench", "--width", "32", "--heads", "2", "--encoder-layers", "2", "--decoder-layers",
            "1", "--tokens-per-frame", "16", "--steps", "2", "--context-frames", "4", "--generate", "3", "--repeats", "1",
            "--frames", "4", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"] == {"width": 32, "heads": 2, "encoder_layers": 2, "decoder_layers": 1,
                                "baseline_layers": 3, "tokens_per_frame": 16, "steps": 2, "context_frames": 4}
    for name in ("scd", "baseline"):
        row = result[name]
        for key in ("per_frame_s", "first_frame_s", "fps", "peak_mem_mb", "flops_per_frame", "gflops"):
            assert row[key] > 0, key
        assert row["fps"] == pytest.approx(1 / row["per_frame_s"])
    assert result["speedup"] == pytest.approx(result["baseline"]["per_frame_s"] / result["scd"]["per_frame_s"])
    assert result["flop_model_speedup"] == pytest.approx(result["baseline"]["flops_per_frame"]
                                                         / result["scd"]["flops_per_frame"])
    assert result["machine_gflops"] > 0
    assert [row["frames"] for row in result["sweep"]] == [4]


@pytest.mark.parametrize("args, named", [(["--tokens-per-frame", "15"], "tokens_per_frame"),
                                         (["--width", "40", "--heads", "4"], "head width 10"),
                                         (["--generate", "1"], "--generate 1: Input should be greater than or equal to 2")])
def test_bench_bad_shapes_are_one_line_errors(args, named, capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err


REGISTRY = str(Path(__file__).resolve().parents[1] / "registry.toml")
TINY_ARGS = ["--threads", "1", "bench", "--registry", REGISTRY, "--width", "32", "--heads", "2", "--encoder-layers", "1", "--decoder-layers", "1",
             "--tokens-per-frame", "16", "--steps", "1", "--context-frames", "2", "--generate", "2", "--repeats", "1", "--json"]


def test_bench_encoder_curves_from_the_registry(capsys):
    assert main([*TINY_ARGS, "--encoders", "long-s,mem-s", "--curve-frames", "8", "9"]) == 0
    curves = json.loads(capsys.readouterr().out)["encoders"]["curves"]
    assert [(r["encoder"], r["frames"]) for r in curves] == [("long-s", 8), ("long-s", 9), ("mem-s", 8), ("mem-s", 9)]
    assert all(r["step_s"] > 0 and r["peak_mb"] > 0 for r in curves)


def test_bench_unknown_encoder_fails_before_benchmarking(capsys):
    assert main([*TINY_ARGS, "--encoders", "causal-s,nope"]) == 2
    captured = capsys.readouterr()
    assert "unknown encoder(s) nope" in captured.err and "warming up" not in captured.err and captured.out == ""


def test_bench_prints_a_table_without_json(capsys):
    assert main([arg for arg in TINY_ARGS if arg != "--json"] + ["--frames", "3"]) == 0
    out = capsys.readouterr().out
    assert "per-frame latency (s)" in out and "speedup" in out and "3 frames: SCD" in out
