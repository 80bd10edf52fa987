"""flash-long-context: the rolling ring buffer, equality with causal-transformer, positions that do not
drift, 1,000-frame streaming, same-weights swaps through the registry, and `scdkit swap-eval --json`."""

import json

import pytest
import torch

from scdkit import testing
from scdkit.checkpoint import save_component
from scdkit.cli import main
from scdkit.errors import CheckpointError, RegistryError
from scdkit.nn import attention
from scdkit.nn.cache import RollingKVCache
from scdkit.plugins.encoders import flash_long_context as flc
from scdkit.plugins.encoders.causal_transformer import CausalTransformerConfig, CausalTransformerEncoder
from scdkit.plugins.encoders.flash_long_context import FlashLongContextConfig, FlashLongContextEncoder
from scdkit.registry import load_registry

FRAME = testing.TINY_FRAME  # 8x8, patch 2: 16 tokens per frame


def frame_kv(batch_values, frame: int, tokens: int = 2, head_dim: int = 4):
    """Keys/values [b 1 n e] whose every entry encodes (batch item, frame): item value · 1000 + frame."""
    k = torch.stack([torch.full((1, tokens, head_dim), value * 1000.0 + frame) for value in batch_values])
    return k, -k


# -- the ring buffer ---------------------------------------------------------------------------

def test_ring_buffer_appends_then_evicts_the_oldest_and_keeps_the_sinks():
    cache = RollingKVCache(batch=2, heads=1, tokens=2, sinks=1, window=3, head_dim=4)
    storage = cache.keys_buffer.data_ptr()
    for f in range(3):
        cache.update(*frame_kv([1, 2], f))
    assert cache.frame_ids == [0, 1, 2] and cache.keys.shape == (2, 1, 6, 4)
    for f in range(3, 50):
        keys, values = cache.update(*frame_kv([1, 2], f))
    assert sorted(cache.frame_ids) == [0, 47, 48, 49]  # the sink and the 3 most recent frames
    assert cache.frame_ids[0] == 0  # sinks stay in their slots
    assert keys.shape == (2, 1, 8, 4) and cache.keys_buffer.data_ptr() == storage  # fixed capacity, no reallocation
    for slot, frame in enumerate(cache.frame_ids):
        tokens = slice(2 * slot, 2 * slot + 2)
        for item, value in enumerate([1, 2]):  # each batch item holds only its own frames
            assert torch.all(keys[item, :, tokens] == value * 1000 + frame)
            assert torch.all(values[item, :, tokens] == -(value * 1000 + frame))


def test_ring_buffer_batch_items_are_isolated():
    a = RollingKVCache(batch=2, heads=1, tokens=2, sinks=1, window=2, head_dim=4)
    b = RollingKVCache(batch=1, heads=1, tokens=2, sinks=1, window=2, head_dim=4)
    for f in range(7):
        k, v = frame_kv([3, 5], f)
        a.append(k, v)
        b.append(k[1:], v[1:])
    assert torch.equal(a.keys[1:], b.keys) and torch.equal(a.values[1:], b.values)


def test_ring_buffer_presents_transformed_sinks_and_keeps_the_originals():
    cache = RollingKVCache(batch=1, heads=1, tokens=2, sinks=2, window=1, head_dim=4)
    for f in range(5):
        cache.append(*frame_kv([1], f))
    cache.present_sinks(lambda keys: keys + 0.5)
    assert torch.all(cache.keys[:, :, :2] == 1000.5) and torch.all(cache.keys[:, :, 2:4] == 1001.5)
    assert torch.all(cache.keys[:, :, 4:] == 1004)  # the ring is untouched
    assert torch.all(cache.pinned_keys[:, :, :2] == 1000)
    cache.present_sinks(lambda keys: keys)
    assert torch.all(cache.keys[:, :, :2] == 1000)


def test_ring_buffer_without_window_refuses_frames_past_its_sinks():
    cache = RollingKVCache(batch=1, heads=1, tokens=2, sinks=1, window=0, head_dim=4)
    cache.append(*frame_kv([1], 0))
    with pytest.raises(ValueError, match="no window"):
        cache.append(*frame_kv([1], 1))


# -- the encoder -------------------------------------------------------------------------------

def pair(window: int, sinks: int, layers: int = 2):
    """A randomised causal-transformer and a flash-long-context holding the very same weights."""
    reference = CausalTransformerEncoder(CausalTransformerConfig(width=32, layers=layers, heads=2), FRAME).eval()
    testing._randomise(reference)
    rolling = FlashLongContextEncoder(FlashLongContextConfig(width=32, layers=layers, heads=2, window=window,
                                                             sinks=sinks), FRAME).eval()
    rolling.load_state_dict(reference.state_dict())  # strict: the parameters are exactly the same
    return reference, rolling


def stream(encoder, video, chunks):
    state, outputs, start = encoder.new_state(video.shape[0], video.shape[1]), [], 0
    for size in chunks:
        out, state = encoder.step(state, video[:, start:start + size])
        outputs.append(out)
        start += size
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("window,sinks", [(7, 0), (6, 1), (20, 3)])
@torch.no_grad()
def test_window_covering_the_context_equals_causal_transformer(window, sinks):
    reference, rolling = pair(window, sinks)
    assert rolling.state_dict().keys() == reference.state_dict().keys()
    video = torch.randn(2, 7, FRAME.tokens, FRAME.patch_dim)
    expected = reference(video)
    testing._close(rolling(video), expected, "full forward")
    testing._close(stream(rolling, video, [3, 1, 2, 1]), expected, "streamed")


@pytest.mark.parametrize("window,sinks", [(1, 0), (3, 2), (1, 3), (4, 1)])
def test_conformance_with_evicting_windows(window, sinks):
    config = FlashLongContextConfig(width=32, layers=2, heads=2, window=window, sinks=sinks)
    testing.check_encoder(FlashLongContextEncoder, config)


@torch.no_grad()
def test_frames_outside_the_window_and_not_sinks_have_no_influence():
    _, rolling = pair(window=2, sinks=1, layers=1)
    video = torch.randn(1, 6, FRAME.tokens, FRAME.patch_dim)
    changed = video.clone()
    changed[:, 2] += 1.0  # frame 5 sees the sink 0 and frames 4, 5 only
    assert torch.equal(rolling(changed)[:, 5], rolling(video)[:, 5])
    assert not torch.allclose(rolling(changed)[:, 3], rolling(video)[:, 3])
    changed = video.clone()
    changed[:, 0] += 1.0  # the sink is always seen
    assert not torch.allclose(rolling(changed)[:, 5], rolling(video)[:, 5])


@torch.no_grad()
def test_positions_do_not_drift_with_stream_length():
    """One layer: frame t's output depends on the sinks and the window only, wherever t is in the stream,
    and equals causal-transformer's on the compacted clip [sinks, window] (positions 0..S+W-1)."""
    reference, rolling = pair(window=3, sinks=1, layers=1)
    g = torch.Generator().manual_seed(1)
    sink, tail = torch.randn(1, 1, 16, 4, generator=g), torch.randn(1, 3, 16, 4, generator=g)
    long = torch.cat([sink, torch.randn(1, 40, 16, 4, generator=g), tail], dim=1)
    short = torch.cat([sink, torch.randn(1, 2, 16, 4, generator=g), tail], dim=1)
    expected = reference(torch.cat([sink, tail], dim=1))[:, -1]
    testing._close(stream(rolling, long, [1] * long.shape[1])[:, -1], expected, "44-frame stream")
    testing._close(rolling(long)[:, -1], expected, "44-frame full forward")
    testing._close(rolling(short)[:, -1], expected, "6-frame full forward")


@torch.no_grad()
def test_flash_backend_streams_through_the_kvcache_kernel(monkeypatch):
    """The kernel is flash-attn's (CUDA only); stand in a reference with its layout to check the routing."""
    calls = []

    def fake_kernel(q, k_cache, v_cache):
        calls.append(k_cache.shape)
        assert q.shape[2] == k_cache.shape[2] == 2 and k_cache.stride(-1) == 1  # [b L h e], read in place
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k_cache, v_cache)))
        return out.transpose(1, 2)

    monkeypatch.setattr(flc, "import_kvcache_kernel", lambda: fake_kernel)
    reference, rolling = pair(window=2, sinks=1)
    video = torch.randn(2, 5, FRAME.tokens, FRAME.patch_dim)
    expected = stream(rolling, video, [2, 1, 1, 1])
    attention.set_attention_backend(rolling, attention.flash_attention)
    testing._close(stream(rolling, video, [2, 1, 1, 1]), expected, "kv-cache kernel stream")
    assert len(calls) == 5 * 2 and calls[-1][1] == 3 * FRAME.tokens  # every frame, every layer; sink + window
    assert all(block.attend is attention.flash_attention for block in rolling.blocks)  # restored


# -- registries --------------------------------------------------------------------------------

TINY_REGISTRY = """
[scdkit]
{settings}

[encoders.causal]
plugin = "causal-transformer"
width = 16
layers = 1
heads = 1

[encoders.long]
plugin = "flash-long-context"
width = {long_width}
layers = 1
heads = 1
window = 2
sinks = 1

[encoders.deeper]
plugin = "causal-transformer"
width = 16
layers = 2
heads = 1

[decoders.dec]
plugin = "dit-frame"
width = 16
layers = 1
heads = 1

[schedulers.flow]
plugin = "flow-match-euler"
steps = 2

[pipelines.p]
encoder = "causal"
decoder = "dec"
scheduler = "flow"
height = 8
width = 8
patch_size = 4
checkpoint = "ckpt"
"""


def tiny_registry(tmp_path, settings='same_weights = [["causal", "long"]]', long_width=16, checkpoint=True):
    path = tmp_path / "registry.toml"
    path.write_text(TINY_REGISTRY.format(settings=settings, long_width=long_width))
    registry = load_registry(path)
    if checkpoint:
        trained = registry.build("p", load=False)
        testing._randomise(trained.components["encoder"], seed=1)
        testing._randomise(trained.components["decoder"], seed=2)
        save_component(trained.components["encoder"], tmp_path / "ckpt" / "encoder.safetensors", "encoder", step=3)
        save_component(trained.components["decoder"], tmp_path / "ckpt" / "decoder.safetensors", "decoder", step=3)
    return registry


def test_thousand_frame_generation_keeps_a_constant_cache(tmp_path):
    pipeline = tiny_registry(tmp_path, checkpoint=False).build("p", load=False, encoder="long")
    states = []
    new_state = pipeline.components["encoder"].new_state
    pipeline.components["encoder"].new_state = lambda batch, max_frames: states.append(new_state(batch, max_frames)) or states[-1]
    context = torch.rand(1, 2, 1, 8, 8)
    generation = pipeline.generate(context, 1000, steps=1, generator=torch.Generator().manual_seed(0))
    assert generation.video.shape == (1, 1000, 1, 8, 8) and torch.isfinite(generation.video).all()
    [state] = states
    assert state.frames == 2 + 999  # the last generated frame is never fed back
    frame_slot_bytes = 4 * 16 * 4  # 4 tokens, width 16, fp32
    for cache in state.caches:  # sink + window frames of keys and values, plus the pinned sink keys
        assert cache.nbytes() == (2 * 3 + 1) * frame_slot_bytes
        assert sorted(cache.frame_ids) == [0, 999, 1000]


def test_same_weights_checkpoint_loads_into_the_rolling_encoder(tmp_path):
    registry = tiny_registry(tmp_path)
    trained, swapped = registry.build("p"), registry.build("p", encoder="long")
    assert isinstance(swapped.components["encoder"], FlashLongContextEncoder)
    testing.assert_same_weights(swapped.components["encoder"], trained.components["encoder"], "same-weights swap")
    video = torch.randn(2, 3, 4, 16)  # within the window + sink: the same outputs
    with torch.no_grad():
        testing._close(swapped.components["encoder"](video), trained.components["encoder"](video), "swapped encoder")


def test_undeclared_swap_is_refused_naming_the_differing_fields(tmp_path):
    registry = tiny_registry(tmp_path, settings="")
    with pytest.raises(CheckpointError) as info:
        registry.build("p", encoder="long")
    message = str(info.value)
    assert "'long' cannot load the checkpoint trained as 'causal'" in message and "same_weights" in message
    assert "plugin ('causal-transformer' vs 'flash-long-context')" in message
    assert "window ('absent' vs 2)" in message and "sinks ('absent' vs 1)" in message and "\n" not in message
    with pytest.raises(CheckpointError, match=r"layers \(1 vs 2\)"):
        registry.build("p", encoder="deeper")


def test_same_weights_group_with_different_shapes_is_a_registry_error(tmp_path):
    with pytest.raises(RegistryError) as info:
        tiny_registry(tmp_path, long_width=32, checkpoint=False)
    [problem] = info.value.problems
    assert "[scdkit].same_weights: 'causal' and 'long' cannot share weights: width (16 vs 32)" in problem


def test_swap_eval_json(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    deeper = registry.build("p", load=False, encoder="deeper")
    save_component(deeper.components["encoder"], tmp_path / "deeper.safetensors", "encoder")  # no provenance
    code = main(["--threads", "1", "swap-eval", "--registry", str(registry.path), "--pipeline", "p",
                 "--encoders", "causal,long,deeper", "--checkpoint", f"deeper={tmp_path / 'deeper.safetensors'}",
                 "--force-pairing", "--seeds", "0", "1",
                 "--clips", "2", "--context", "2", "--frames", "3", "--steps", "2", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # exactly one JSON object on stdout
    assert "do not belong together" in captured.err  # forced: a warning, not an error
    assert report["decoder"]["name"] == "dec" and report["decoder"]["step"] == 3
    assert report["clips"].startswith("2 x 2 held-out moving-digits clips") and "seeds 0, 1" in report["clips"]
    assert [row["encoder"] for row in report["rows"]] == ["causal", "long", "deeper"]
    for row in report["rows"]:
        assert {"encoder", "psnr", "psnr_std", "ssim", "sharpness", "val_loss", "per_frame_s", "peak_mem_mb",
                "params"} <= row.keys()
        assert all(row[k] > 0 for k in ("psnr", "psnr_std", "val_loss", "per_frame_s", "peak_mem_mb", "params"))
    causal, long, deeper = report["rows"]
    assert long["weights"] == "same as causal" and deeper["weights"].endswith("deeper.safetensors")
    assert long["params"] == causal["params"] < deeper["params"]


def test_swap_eval_defaults_to_the_pipeline_encoder_and_its_same_weights_group(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    code = main(["--threads", "1", "swap-eval", "--registry", str(registry.path), "--pipeline", "p",
                 "--seeds", "3", "--clips", "1", "--context", "1", "--frames", "1", "--steps", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["encoder"] for row in report["rows"]] == ["causal", "long"]
    assert report["rows"][0]["psnr_std"] == 0.0  # one seed: no spread


def test_swap_eval_refuses_an_encoder_without_weights(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    code = main(["--threads", "1", "swap-eval", "--registry", str(registry.path), "--pipeline", "p",
                 "--encoders", "causal,deeper", "--clips", "1", "--frames", "1", "--steps", "1", "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("scdkit: error:") and "layers (1 vs 2)" in err[-1]
    assert "--checkpoint deeper=" in err[-1] and "--encoder deeper" in err[-1] and "--freeze decoder" in err[-1]
    assert not any(line.startswith("evaluated") for line in err)  # refused before any evaluation


def test_swap_eval_checks_every_name_before_evaluating(tmp_path, capsys):
    registry = tiny_registry(tmp_path)
    code = main(["--threads", "1", "swap-eval", "--registry", str(registry.path), "--pipeline", "p",
                 "--encoders", "causal,lonng", "--clips", "1", "--frames", "1", "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown encoder 'lonng'; did you mean 'long'" in err[0]
