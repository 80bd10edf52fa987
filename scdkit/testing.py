"""Conformance kit: the contract every encoder, decoder, scheduler and model plugin must keep.

A plugin author runs it from a test::

    from scdkit.testing import check_encoder
    def test_my_encoder():
        check_encoder(MyEncoder)            # uses MyEncoder.example_config()

Each ``check_*`` runs every check for its kind and raises AssertionError naming the failing
contract. The individual checks are public too. scdkit's own tests run the kit over every
registered built-in.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import get_args

import pydantic
import torch
from torch import Tensor

from scdkit.checkpoint import load_component, save_component
from scdkit.interfaces import (CausalEncoder, CondSpec, Conditioning, ConditioningSpec, FrameDecoder, FrameSpec,
                               NoiseScheduler, PredictionType, VideoModel, expand_like, given)

TINY_FRAME = FrameSpec(channels=1, height=8, width=8, patch_size=2)  # 16 tokens of 4 values
ATOL = 1e-5


def _patches(frame: FrameSpec, batch: int, frames: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, frame.tokens, frame.patch_dim, generator=g)


def _close(a: Tensor, b: Tensor, what: str, atol: float = ATOL) -> None:
    err = (a - b).abs().max().item()
    assert err <= atol, f"{what}: max difference {err:.3g} > {atol:g}"


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised (adaLN-Zero) weights random values, so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def check_rejects_unknown_keys(cls) -> None:
    fields = cls.example_config().model_dump()
    try:
        cls.config_class(**fields, not_a_real_option=1)
    except pydantic.ValidationError:
        return
    raise AssertionError(f"{cls.__name__}.config_class accepts unknown keys (set extra='forbid')")


def check_round_trip(module: torch.nn.Module, role: str, make_twin) -> None:
    """Save to safetensors, load into a freshly built twin, and compare every tensor."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{role}.safetensors"
        save_component(module, path, role, step=7)
        twin = make_twin()
        metadata = load_component(twin, path, role)
    assert metadata["step"] == "7" and metadata["plugin"] == module.plugin_name, "metadata lost in round trip"
    assert_same_weights(twin, module, "round trip")


def assert_same_weights(module: torch.nn.Module, reference: torch.nn.Module, what: str = "weights") -> None:
    """The same state-dict keys, and equal tensors under each key."""
    got, want = module.state_dict(), reference.state_dict()
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(got.keys() ^ want.keys())}"
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), f"{what} changed {name}"


def _conditioning(accepts: ConditioningSpec, batch: int, frames: int, seed: int) -> Conditioning:
    """Random labels and actions for whatever a component accepts (nothing for an unconditioned one)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, accepts.classes, (batch,), generator=g) if accepts.classes else None
    actions = torch.randn(batch, frames, accepts.actions, generator=g) if accepts.actions else None
    return Conditioning(labels, actions)


# -- encoders ----------------------------------------------------------------------------------

def check_encoder_contract(encoder: CausalEncoder, frame: FrameSpec) -> None:
    spec = encoder.contract
    assert isinstance(spec, CondSpec), "contract must be a CondSpec"
    assert isinstance(encoder.accepts, ConditioningSpec), "accepts must be a ConditioningSpec"
    out = encoder(_patches(frame, 2, 3, seed=1), **given(encoder, _conditioning(encoder.accepts, 2, 3, seed=1)))
    assert out.shape == (2, 3, spec.tokens, spec.dim), f"forward gave {tuple(out.shape)}, contract says {spec}"


@torch.no_grad()
def check_encoder_cached_matches_full(encoder: CausalEncoder, frame: FrameSpec, frames: int = 6) -> None:
    """Streaming in uneven chunks (a prefill, single frames, a pair) equals the whole-clip pass."""
    video = _patches(frame, 2, frames, seed=2)
    conditioning = _conditioning(encoder.accepts, 2, frames, seed=2)
    full = encoder(video, **given(encoder, conditioning))
    state = encoder.new_state(2, frames)
    chunks, start = [], 0
    for size in (2, 1, 1, 2, 1, 1, 1, 1, 1):
        if start >= frames:
            break
        chunk = conditioning.frames(start, start + size)
        out, state = encoder.step(state, video[:, start:start + size], **given(encoder, chunk))
        chunks.append(out)
        start += size
    _close(torch.cat(chunks, dim=1), full, f"{type(encoder).__name__}: cached step vs full forward")
    assert state.frames == frames, f"state.frames is {state.frames} after {frames} frames"


@torch.no_grad()
def check_encoder_causality(encoder: CausalEncoder, frame: FrameSpec, frames: int = 5) -> None:
    video = _patches(frame, 2, frames, seed=3)
    conditioning = _conditioning(encoder.accepts, 2, frames, seed=3)
    base = encoder(video, **given(encoder, conditioning))
    for k in range(frames):
        changed = video.clone()
        changed[:, k] += torch.randn_like(changed[:, k])
        out = encoder(changed, **given(encoder, conditioning))
        assert torch.equal(out[:, :k], base[:, :k]), f"changing frame {k} changed outputs of earlier frames"
        assert not torch.allclose(out[:, k], base[:, k]), f"output of frame {k} ignores frame {k}"
        if conditioning.actions is not None:
            actions = conditioning.actions.clone()
            actions[:, k] += 1
            out = encoder(video, conditioning=Conditioning(conditioning.labels, actions))
            assert torch.equal(out[:, :k], base[:, :k]), f"the action of frame {k} changed outputs of earlier frames"
            assert not torch.allclose(out[:, k], base[:, k]), f"output of frame {k} ignores its action"


def check_encoder(cls, config=None, frame: FrameSpec = TINY_FRAME) -> None:
    config = config or cls.example_config()
    check_rejects_unknown_keys(cls)
    encoder = cls(config, frame).eval()
    _randomise(encoder)
    check_encoder_contract(encoder, frame)
    check_encoder_cached_matches_full(encoder, frame)
    check_encoder_causality(encoder, frame)
    check_round_trip(encoder, "encoder", lambda: cls(config, frame))


# -- decoders ----------------------------------------------------------------------------------

@torch.no_grad()
def check_decoder_shapes_and_conditioning(decoder: FrameDecoder, frame: FrameSpec) -> None:
    spec = decoder.contract
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, frame.tokens, frame.patch_dim, generator=g)
    t = torch.rand(3, generator=g)
    cond = torch.randn(3, spec.tokens, spec.dim, generator=g)
    extra = _conditioning(decoder.accepts, 3, 1, seed=4).per_frame(1)
    out = decoder(x, t, cond, **given(decoder, extra))
    assert out.shape == x.shape, f"decoder output {tuple(out.shape)} != input {tuple(x.shape)}"
    assert not torch.allclose(decoder(x, t, cond + 1, **given(decoder, extra)), out), "decoder ignores its conditioning"
    assert not torch.allclose(decoder(x, t * 0.5, cond, **given(decoder, extra)), out), "decoder ignores the time"
    if extra.labels is not None:
        other = Conditioning((extra.labels + 1) % decoder.accepts.classes, extra.actions)
        assert not torch.allclose(decoder(x, t, cond, conditioning=other), out), "decoder ignores the labels"
    # batch items are independent: a frame never sees another clip's frame
    first = Conditioning(*(None if v is None else v[:1] for v in (extra.labels, extra.actions)))
    _close(decoder(x[:1], t[:1], cond[:1], **given(decoder, first)), out[:1], "decoder batch independence")


def check_decoder(cls, config=None, frame: FrameSpec = TINY_FRAME, cond: CondSpec | None = None) -> None:
    config = config or cls.example_config()
    cond = cond or CondSpec(dim=24, tokens=frame.tokens)
    check_rejects_unknown_keys(cls)
    decoder = cls(config, frame, cond).eval()
    _randomise(decoder)
    assert decoder.contract == cond, "decoder contract must be the conditioning it was built for"
    check_decoder_shapes_and_conditioning(decoder, frame)
    check_round_trip(decoder, "decoder", lambda: cls(config, frame, cond))


# -- schedulers --------------------------------------------------------------------------------

def _walk_with_exact_predictions(scheduler: NoiseScheduler, x0: Tensor, noise: Tensor, steps: int,
                                 seed: int) -> Tensor:
    """Sample from noise, feeding the scheduler at every step the prediction that names x0 exactly
    (from the noise implied by the current x and ``alpha_sigma``), with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    state = scheduler.begin(steps, x0.device)
    items = (x0.shape[0],)
    x = scheduler.add_noise(x0, noise, torch.full(items, state.t, device=x0.device))
    for _ in range(state.steps):
        t = torch.full(items, state.t, device=x0.device)
        alpha, sigma = (expand_like(v, x0) for v in scheduler.alpha_sigma(t))
        implied_noise = (x - alpha * x0) / sigma
        x = scheduler.step(state, scheduler.training_target(x0, implied_noise, t), x, g)
    assert state.index == state.steps, f"after {state.steps} steps the state's index is {state.index}"
    return x


def check_scheduler(cls, config=None) -> None:
    """The scheduler contract: declared steps and prediction type, times in [0, 1] from noise to clean,
    per-item times, no silent default for a bad step count, exact predictions recover x0, and the
    same generator gives the same samples (ancestral samplers included)."""
    check_rejects_unknown_keys(cls)
    scheduler: NoiseScheduler = cls(config or cls.example_config())
    assert isinstance(scheduler.steps, int) and scheduler.steps >= 1, f"steps must be a positive int, got {scheduler.steps!r}"
    assert scheduler.prediction_type in get_args(PredictionType), f"unknown prediction type {scheduler.prediction_type!r}"
    for bad in (0, -3):
        try:
            scheduler.begin(bad)
        except ValueError:
            continue
        raise AssertionError(f"begin({bad}) must raise ValueError, not fall back to a default")
    assert scheduler.begin().steps == scheduler.steps, "begin() must use the declared steps"
    g = torch.Generator().manual_seed(5)
    t = scheduler.sample_timesteps((64,), generator=g, device="cpu")
    assert t.shape == (64,) and bool(((t >= 0) & (t <= 1)).all()), "training times must lie in [0, 1]"
    times = scheduler.begin(8, "cpu").times
    assert len(times) == 9, f"begin(8) must give 9 times, got {len(times)}"
    assert all(a > b for a, b in zip(times, times[1:])), "sampling times must run from noise to clean"
    assert 0 <= times[-1] < times[0] <= 1, "sampling times must lie in [0, 1]"
    x0 = torch.randn(4, 16, 4, generator=g)
    noise = torch.randn(4, 16, 4, generator=g)
    _close(scheduler.add_noise(x0, noise, torch.zeros(4)), x0, "add_noise at t=0 must return the clean sample")
    # per-item times: a batch with four different times equals its items one by one
    per_item = torch.tensor([0.1, 0.4, 0.7, 0.95])
    noisy, target = scheduler.add_noise(x0, noise, per_item), scheduler.training_target(x0, noise, per_item)
    for i in range(4):
        one = slice(i, i + 1)
        _close(noisy[one], scheduler.add_noise(x0[one], noise[one], per_item[one]), "add_noise with per-item times")
        _close(target[one], scheduler.training_target(x0[one], noise[one], per_item[one]),
               "training_target with per-item times")
    assert float(scheduler.training_loss(target, x0, noise, per_item).abs().max()) < 1e-8, \
        "the training loss of the exact target must be 0"
    assert float(scheduler.training_loss(target + 1, x0, noise, per_item).min()) > 0, \
        "the training loss of a wrong prediction must be positive"
    # an exact prediction at every step walks the noise back to the clean sample, the same way for one seed
    first = _walk_with_exact_predictions(scheduler, x0, noise, 8, seed=6)
    _close(first, x0, "sampling with exact predictions must recover x0", atol=1e-4)
    again = _walk_with_exact_predictions(scheduler, x0, noise, 8, seed=6)
    assert torch.equal(first, again), "the same generator must give the same samples"
    check_scheduler_device(scheduler)


def check_scheduler_device(scheduler: NoiseScheduler) -> None:
    """Every tensor follows its inputs: run on meta tensors, where one made on the CPU would fail."""
    meta = torch.device("meta")
    x0, t = torch.zeros(2, 4, 3, device=meta), torch.full((2,), 0.5, device=meta)
    outputs = [scheduler.add_noise(x0, x0, t), scheduler.training_target(x0, x0, t),
               scheduler.training_loss(x0, x0, x0, t), scheduler.sample_timesteps((2,), device=meta)]
    state = scheduler.begin(2, meta)
    outputs += [scheduler.step(state, x0, x0), scheduler.step(state, x0, x0)]
    assert all(out.device == meta for out in outputs), "a scheduler must make its tensors on its inputs' device"


# -- monolithic models -------------------------------------------------------------------------

@torch.no_grad()
def check_model_cached_matches_full(model: VideoModel, frame: FrameSpec, frames: int = 5) -> None:
    clean, noisy = _patches(frame, 2, frames, seed=6), _patches(frame, 2, frames, seed=7)
    t = torch.rand(2, frames, generator=torch.Generator().manual_seed(8))
    full = model(clean, noisy, t)
    state = model.new_state(2, frames)
    for f in range(frames):
        if f:
            model.observe(state, clean[:, f - 1:f])
        pred = model.predict(state, noisy[:, f], t[:, f])
        _close(pred, full[:, f], f"{type(model).__name__}: cached predict vs full forward at frame {f}")


@torch.no_grad()
def check_model_causality(model: VideoModel, frame: FrameSpec, frames: int = 4) -> None:
    clean, noisy = _patches(frame, 2, frames, seed=9), _patches(frame, 2, frames, seed=10)
    t = torch.rand(2, frames, generator=torch.Generator().manual_seed(11))
    base = model(clean, noisy, t)
    assert base.shape == noisy.shape, f"forward gave {tuple(base.shape)} for noisy frames {tuple(noisy.shape)}"
    for k in range(frames):
        changed_clean, changed_noisy = clean.clone(), noisy.clone()
        changed_clean[:, k] += 1
        changed_noisy[:, k] += 1
        # the noisy frame k only shapes its own prediction; the clean frame k only later ones
        out = model(clean, changed_noisy, t)
        assert torch.equal(out[:, :k], base[:, :k]), f"changing noisy frame {k} changed predictions of earlier frames"
        assert not torch.allclose(out[:, k], base[:, k]), f"the prediction of frame {k} ignores noisy frame {k}"
        out = model(changed_clean, noisy, t)
        assert torch.equal(out[:, :k + 1], base[:, :k + 1]), \
            f"clean frame {k} leaked into the prediction of frame {k} or earlier"
        if k + 1 < frames:
            assert not torch.allclose(out[:, k + 1], base[:, k + 1]), f"frame {k + 1} ignores clean frame {k}"


def check_model(cls, config=None, frame: FrameSpec = TINY_FRAME) -> None:
    config = config or cls.example_config()
    check_rejects_unknown_keys(cls)
    model = cls(config, frame).eval()
    _randomise(model)
    check_model_cached_matches_full(model, frame)
    check_model_causality(model, frame)
    check_round_trip(model, "model", lambda: cls(config, frame))
