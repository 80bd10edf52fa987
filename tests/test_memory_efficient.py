"""The memory-efficient encoder: one memory policy in both paths, bounded memory, checkpointing, same weights."""

import pytest
import torch

from scdkit import testing
from scdkit.checkpoint import load_component, save_component
from scdkit.encoder_bench import LiveBytes, training_point
from scdkit.interfaces import FrameSpec
from scdkit.nn.memory import ClipMemory, MemoryPolicy, StreamingMemory
from scdkit.plugins.encoders.causal_transformer import CausalTransformerConfig, CausalTransformerEncoder
from scdkit.plugins.encoders.memory_efficient import MemoryEfficientConfig, MemoryEfficientEncoder

FRAME = FrameSpec(channels=1, height=8, width=8, patch_size=2)  # 4x4 grid: 16 tokens, 4 once pooled


def tiny(**overrides) -> MemoryEfficientEncoder:
    fields = dict(width=32, layers=2, heads=2, recent_frames=2, compressed_frames=3) | overrides
    encoder = MemoryEfficientEncoder(MemoryEfficientConfig(**fields), FRAME).eval()
    randomise(encoder)
    return encoder


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero adaLN weights: at initialisation every block is the identity and hides the policy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def clip(frames: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, FRAME.tokens, FRAME.patch_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{"compressed_frames": 0}, {"recent_frames": 1, "pool": 4},
                                       {"recent_frames": 3, "compressed_frames": 1}])
def test_conformance_kit(overrides):
    testing.check_encoder(MemoryEfficientEncoder, MemoryEfficientEncoder.example_config().model_copy(update=overrides),
                          frame=FRAME)


@torch.no_grad()
def test_streaming_equals_full_clip_over_many_evictions():
    encoder, video = tiny(), clip(17)
    full = encoder(video)
    state = encoder.new_state(2, 17)
    outs, start = [], 0
    for size in (3, 1, 1, 5, 1, 2, 4):  # a prefill, single frames, multi-frame steps
        outs.append(encoder.step(state, video[:, start:start + size])[0])
        start += size
    assert start == 17 and state.frames == 17
    assert (torch.cat(outs, dim=1) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_frames_beyond_the_memory_are_forgotten_and_pooled_ones_are_used():
    # one layer: frame i sees frames i-4..i (2 full + 3 pooled) and nothing older
    encoder, video = tiny(layers=1), clip(9)
    base = encoder(video)
    changed = video.clone()
    changed[:, 0] += 1
    out = encoder(changed)
    assert not torch.allclose(out[:, 4], base[:, 4]), "frame 4 must still see frame 0 through its pooled tokens"
    assert torch.equal(out[:, 5:], base[:, 5:]), "frames 5+ must no longer depend on frame 0"
    # with two layers the receptive field doubles: 2 * 4 frames back
    encoder, video = tiny(layers=2), clip(11)
    changed = video.clone()
    changed[:, 0] += 1
    base, out = encoder(video), encoder(changed)
    assert not torch.allclose(out[:, 8], base[:, 8])
    assert torch.equal(out[:, 9:], base[:, 9:])


@torch.no_grad()
def test_same_weights_as_causal_transformer():
    reference = CausalTransformerEncoder(CausalTransformerConfig(width=32, layers=2, heads=2), FRAME).eval()
    randomise(reference)
    encoder = tiny()
    encoder.load_state_dict(reference.state_dict(), strict=True)
    short, long = clip(2), clip(6)
    assert (encoder(short) - reference(short)).abs().max() <= 1e-5, "no older frame than `recent`: same outputs"
    assert not torch.allclose(encoder(long), reference(long), atol=1e-3), "older frames pooled: outputs differ"


def test_loads_a_causal_transformer_checkpoint(tmp_path):
    reference = CausalTransformerEncoder(CausalTransformerConfig(width=32, layers=2, heads=2), FRAME)
    randomise(reference)
    save_component(reference, tmp_path / "encoder.safetensors", "encoder")
    encoder = MemoryEfficientEncoder(MemoryEfficientConfig(width=32, layers=2, heads=2), FRAME)
    load_component(encoder, tmp_path / "encoder.safetensors", "encoder")
    testing.assert_same_weights(encoder, reference, "causal-transformer checkpoint")


def test_pool_must_divide_the_grid():
    with pytest.raises(ValueError, match="pool 3 does not divide the 4x4 token grid"):
        MemoryEfficientEncoder(MemoryEfficientConfig(width=32, heads=2, pool=3), FRAME)


def test_streaming_memory_stays_bounded_over_300_frames():
    policy = MemoryPolicy(recent=2, compressed=3, grid=(4, 4), pool=2)
    memory = StreamingMemory(policy, batch=1, heads=1, head_dim=1)
    buffer, nbytes = memory.keys.data_ptr(), memory.nbytes()
    tokens = torch.arange(16.0).reshape(1, 1, 16, 1)
    for i in range(300):
        keys, _ = memory.update(tokens + 1000 * i, tokens)
        assert keys.shape[2] == min(i + 1, 2) * 16 + min(max(i - 1, 0), 3) * 4 <= policy.capacity == 44
    assert memory.keys.data_ptr() == buffer and memory.nbytes() == nbytes, "the buffers were never reallocated"
    full, pooled = keys[0, 0, :32, 0], keys[0, 0, 32:, 0]
    # full slots hold frames 298, 299; pooled slots frames 295..297 as 2x2 means of the 4x4 grid
    assert sorted(set((full // 1000).tolist())) == [298, 299]
    patch_means = torch.tensor([2.5, 4.5, 10.5, 12.5])
    expected = torch.cat([1000 * j + patch_means for j in (297, 295, 296)])  # ring order: slot = frame % 3
    assert torch.equal(pooled, expected)


def test_clip_memory_window_matches_the_policy_mask():
    policy = MemoryPolicy(recent=2, compressed=3, grid=(2, 2), pool=2)  # 4 tokens, 1 once pooled
    memory = ClipMemory(policy)
    for start, stop in policy.groups(10):
        k = torch.arange(start, stop).float().repeat_interleave(4).reshape(1, 1, -1, 1)
        keys, _ = memory.update(k, k)
        mask = policy.group_mask(start, stop)
        assert mask.shape == ((stop - start) * 4, keys.shape[2])
    # last group, frames 8 and 9: full keys of frames 7..9, pooled keys of frames 4..7
    assert keys[0, 0, :, 0].tolist() == [7.0] * 4 + [8.0] * 4 + [9.0] * 4 + [4.0, 5.0, 6.0, 7.0]
    assert mask[0].tolist() == [True] * 8 + [False] * 4 + [True, True, True, False]  # frame 8
    assert mask[-1].tolist() == [False] * 4 + [True] * 8 + [False, True, True, True]  # frame 9


@torch.no_grad()
def test_long_stream_cache_and_step_memory_are_flat():
    encoder = tiny()
    state = encoder.new_state(1, 10_000)
    nbytes = state.nbytes()
    assert nbytes == 2 * 2 * 2 * (2 * 16 + 3 * 4) * 16 * 4  # layers · (k, v) · heads · capacity · head_dim · fp32
    peaks = {}
    for i in range(300):
        frame = clip(1, batch=1, seed=i)
        if i in (20, 299):
            with LiveBytes() as tracker:
                encoder.step(state, frame)
            peaks[i] = tracker.peak
        else:
            encoder.step(state, frame)
    assert state.frames == 300 and state.nbytes() == nbytes
    assert all(m.length == encoder.policy.capacity for m in state.memories)
    assert peaks[20] == peaks[299] > 0, "a step's temporaries do not grow with the frames seen"


def test_checkpointing_gives_the_same_gradients():
    encoder, video = tiny(), clip(7)
    encoder.train()
    grads = []
    for checkpointing in (True, False):
        encoder.checkpointing = checkpointing
        encoder.zero_grad(set_to_none=True)
        encoder(video).pow(2).mean().backward()
        grads.append({name: p.grad.clone() for name, p in encoder.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_checkpointing_lowers_training_memory():
    encoder = tiny()
    with_checkpoints = training_point(encoder, 12)["train_peak_mb"]
    encoder.checkpointing = False
    without = training_point(encoder, 12)["train_peak_mb"]
    assert with_checkpoints < 0.8 * without
