"""The causal-DiT baseline (`causal-dit`) and `scdkit probe`."""

import json
from pathlib import Path

import pytest
import torch

from scdkit.checkpoint import read_metadata
from scdkit.cli import main
from scdkit.plugins.models.causal_dit import CausalDiT, CausalDiTConfig, teacher_forcing_mask
from scdkit.plugins.schedulers.flow_match_euler import FlowMatchEuler
from scdkit.interfaces import Batch
from scdkit.nn.attention import sdpa_attention
from scdkit.pipeline import Pipeline, assemble, to_pixel_range, unpatchify
from scdkit.probe import probe_pipeline
from scdkit.registry import load_registry
from scdkit.testing import TINY_FRAME, _patches, _randomise

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def model():
    model = CausalDiT(CausalDiT.example_config(), TINY_FRAME).eval()
    _randomise(model)  # adaLN-Zero starts as the identity: give every path weight
    return model


def test_mask_over_clean_and_noisy_copies():
    mask = teacher_forcing_mask(frames=3, tokens=1)
    clean_rows = [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    noisy_rows = [[0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1]]
    assert mask.int().tolist() == clean_rows + noisy_rows


@torch.no_grad()
def test_prefill_of_several_frames_matches_the_full_pass(model):
    clean, noisy = _patches(TINY_FRAME, 2, 5, seed=1), _patches(TINY_FRAME, 2, 5, seed=2)
    t = torch.rand(2, 5)
    full = model(clean, noisy, t)
    state = model.new_state(2, 5)
    model.observe(state, clean[:, :3])  # block-causal masked prefill
    torch.testing.assert_close(model.predict(state, noisy[:, 3], t[:, 3]), full[:, 3], atol=1e-5, rtol=0)
    model.observe(state, clean[:, 3:4])
    torch.testing.assert_close(model.predict(state, noisy[:, 4], t[:, 4]), full[:, 4], atol=1e-5, rtol=0)


@torch.no_grad()
def test_only_observe_writes_the_cache(model):
    state = model.new_state(1, 4)
    model.observe(state, _patches(TINY_FRAME, 1, 2, seed=3))
    lengths = [c.length for c in state.caches]
    committed = [c.keys[:, :, :c.length].clone() for c in state.caches]
    assert lengths == [2 * TINY_FRAME.tokens] * len(model.blocks) and state.frames == 2
    x = torch.randn(1, TINY_FRAME.tokens, TINY_FRAME.patch_dim)
    first = model.predict(state, x, torch.tensor([0.9]))
    model.predict(state, x * 2, torch.tensor([0.3]))  # another step must not leave a trace
    assert [c.length for c in state.caches] == lengths and state.frames == 2
    for cache, before in zip(state.caches, committed):
        assert torch.equal(cache.keys[:, :, :cache.length], before)
    torch.testing.assert_close(model.predict(state, x, torch.tensor([0.9])), first, atol=0, rtol=0)
    model.observe(state, _patches(TINY_FRAME, 1, 1, seed=4))
    assert [c.length for c in state.caches] == [3 * TINY_FRAME.tokens] * len(model.blocks)


def test_predicting_past_capacity_is_refused(model):
    state = model.new_state(1, 1)
    model.observe(state, _patches(TINY_FRAME, 1, 1, seed=5))
    with pytest.raises(ValueError, match="max_frames=2"):
        model.predict(state, torch.randn(1, TINY_FRAME.tokens, TINY_FRAME.patch_dim), torch.tensor([0.5]))


def test_head_width_that_rope_cannot_split_is_rejected_at_config_time():
    with pytest.raises(ValueError, match="multiple of 16"):
        CausalDiTConfig(width=32, heads=4)  # head width 8: RoPE parts 2/3/3


def tiny_baseline_pipeline(model) -> Pipeline:
    return Pipeline("tiny", FlowMatchEuler(FlowMatchEuler.example_config()), TINY_FRAME, assemble({"model": model}))


def context_clips(frames: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(2, frames, TINY_FRAME.channels, TINY_FRAME.height, TINY_FRAME.width, generator=g))


def test_probe_shapes_and_attention_shares(model):
    result = probe_pipeline(tiny_baseline_pipeline(model), context_clips(3, seed=6), steps=4,
                            generator=torch.Generator().manual_seed(0))
    layers = len(model.blocks)
    assert result.similarity.shape == (layers, 4, 4)
    torch.testing.assert_close(result.similarity.diagonal(dim1=1, dim2=2), torch.ones(layers, 4))
    assert bool((result.similarity <= 1 + 1e-5).all() and (result.similarity >= -1 - 1e-5).all())
    assert result.mean_similarity().shape == (layers,)
    assert result.past_share.shape == result.current_share.shape == (layers, 4)
    assert bool(((result.past_share >= 0) & (result.past_share <= 1)).all())
    torch.testing.assert_close(result.past_share, 1 - result.current_share, atol=1e-5, rtol=0)
    assert bool((result.past_share > 0.05).all()), "random weights should look at the past a little"
    summary = result.summary()
    assert len(summary["mean_similarity"]) == len(summary["past_attention_share"]) == layers


@torch.no_grad()
def test_probe_measures_exactly_what_generation_computes(model):
    pipeline = tiny_baseline_pipeline(model)
    context = context_clips(3, seed=7)
    result = probe_pipeline(pipeline, context, steps=3, generator=torch.Generator().manual_seed(1))
    generated = pipeline.generate(context, 1, steps=3, generator=torch.Generator().manual_seed(1)).video
    probed = to_pixel_range(unpatchify(result.sample[:, None], TINY_FRAME))
    torch.testing.assert_close(probed, generated, atol=1e-6, rtol=0)
    assert all(block.attend is sdpa_attention for block in model.blocks), "the probe must restore attention"
    assert not any(block._forward_hooks for block in model.blocks), "the probe must remove its hooks"


def test_probe_reads_the_decoder_layers_of_an_scd_pipeline():
    registry = load_registry(REPO / "registry.toml")
    pipeline = registry.build("scd-digits")
    batch = Batch(torch.rand(2, 3, 1, 32, 32))
    result = probe_pipeline(pipeline, batch, steps=3, generator=torch.Generator().manual_seed(0))
    decoder_layers = len(pipeline.components["decoder"].blocks)
    assert result.similarity.shape == (decoder_layers, 3, 3)  # only the blocks that run at every step
    assert bool((result.past_share > 0).all()), "decoder queries attend to the conditioning tokens"


def test_train_then_probe_through_the_cli(tmp_path, capsys):
    registry = str(REPO / "registry.toml")
    out = tmp_path / "baseline"
    assert main(["--threads", "1", "train", "--registry", registry, "--pipeline", "baseline-digits", "--steps", "2",
                 "--batch", "2", "--eval-every", "0", "--out", str(out)]) == 0
    meta = read_metadata(out / "model.safetensors")
    assert meta["plugin"] == "causal-dit" and meta["step"] == "2"
    capsys.readouterr()
    assert main(["--threads", "1", "probe", "--registry", registry, "--checkpoint", str(out), "--steps", "3",
                 "--clips", "2", "--context", "2", "--out", str(tmp_path / "probe"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["checkpoint_step"] == 2 and payload["layers"] == 6 and payload["steps"] == 3
    assert len(payload["similarity"]) == 6 and len(payload["similarity"][0]) == 3
    assert all(0 <= s <= 1 for s in payload["past_attention_share"])
    assert (tmp_path / "probe" / "probe_similarity.png").stat().st_size > 0
    assert (tmp_path / "probe" / "probe_curves.png").stat().st_size > 0


def test_probe_of_a_pipeline_without_checkpoint_is_one_line(tmp_path, capsys):
    registry = tmp_path / "registry.toml"
    registry.write_text((REPO / "registry.toml").read_text().replace('checkpoint = "checkpoints/baseline-digits"\n', ""))
    assert main(["probe", "--registry", str(registry), "--pipeline", "baseline-digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no checkpoint directory; pass --checkpoint DIR" in err and len(err.splitlines()) == 1
