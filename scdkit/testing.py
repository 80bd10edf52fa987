"""Conformance kit: the contract every encoder, decoder, scheduler and model plugin must keep.

A plugin author runs it from a test::

    from scdkit.testing import check_encoder
    def test_my_encoder():
        check_encoder(MyEncoder)            # uses MyEncoder.example_config()

Each ``check_*`` runs every check for its kind and raises AssertionError naming the failing
contract. The individual checks are public too, and ``encoder_checks`` (``decoder_checks``,
``scheduler_checks``, ``model_checks``) list them by name for a runner that reports each one
(``scdkit check``). scdkit's own tests run the kit over every registered built-in.

What is checked, beside shapes and declarations:

- streaming equals the whole-clip pass, and nothing flows from a frame to earlier ones, over a
  *long* clip (:func:`long_clip`: at least 16 frames and more than twice any window-like option),
  so a leak or a cache bug that starts late is seen;
- two streams from two ``new_state`` calls, stepped in turn, equal each stream run alone;
- batch items are independent: a batch of three distinct items equals each item run alone
  (conditioning included), in the whole-clip and the streaming path;
- a decoder uses every conditioning token; a scheduler gives each item its own time;
- after save and load the twin gives the same *outputs* (persistent buffers randomised first).

Axis legend: b batch · f frames · n tokens per frame · p patch values · d width.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import get_args

import pydantic
import torch
from torch import Tensor

from scdkit.checkpoint import load_component, save_component
from scdkit.interfaces import (CausalEncoder, CondSpec, Conditioning, ConditioningSpec, FrameDecoder, FrameSpec,
                               NoiseScheduler, PredictionType, StagedDecoder, VideoDataset, VideoModel, expand_like,
                               given)

TINY_FRAME = FrameSpec(channels=1, height=8, width=8, patch_size=2)  # 16 tokens of 4 values
ATOL = 1e-5
LONG_CLIP = 16  # frames of the long-clip checks, at least
BATCH = 3  # items of the batch-independence checks
#: Config fields that bound how many frames a component looks back (a window, sinks, a memory):
#: an integer field whose name contains one of these words.
WINDOW_WORDS = ("window", "sinks", "frames", "context", "memory", "horizon")

Checks = list[tuple[str, Callable[[], None]]]


def _patches(frame: FrameSpec, batch: int, frames: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, frame.tokens, frame.patch_dim, generator=g)


def _close(a: Tensor, b: Tensor, what: str, atol: float = ATOL) -> None:
    err = (a - b).abs().max().item()
    assert err <= atol, f"{what}: max difference {err:.3g} > {atol:g}"


def _close_frames(got: Tensor, want: Tensor, what: str, atol: float = ATOL) -> None:
    """Like :func:`_close` for [b f ...], naming the first frame that differs."""
    err = (got - want).abs().flatten(2).amax(dim=(0, 2))
    bad = (err > atol).nonzero()
    if len(bad):
        f = int(bad[0])
        raise AssertionError(f"{what}: frame {f} of {got.shape[1]} is the first to differ "
                             f"(max difference {err[f].item():.3g} > {atol:g})")


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised (adaLN-Zero) weights random values, so every path is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _randomise_buffers(module: torch.nn.Module, seed: int = 1) -> None:
    """Random values in the floating-point buffers a checkpoint holds (the persistent ones), as training
    or calibration would leave them: a twin only matches if they really are saved and loaded."""
    g = torch.Generator().manual_seed(seed)
    parameters = {id(p) for p in module.parameters()}
    with torch.no_grad():
        for tensor in module.state_dict(keep_vars=True).values():
            if id(tensor) not in parameters and tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=g).to(tensor.dtype))


def long_clip(config: pydantic.BaseModel | None = None) -> int:
    """Frames of the long-clip checks: :data:`LONG_CLIP`, or more when the config has window-like options
    (integer fields named with a word of :data:`WINDOW_WORDS`): twice their sum plus two, so that every
    window fills, slides and evicts within the clip."""
    fields = config.model_dump() if config is not None else {}
    span = sum(value for key, value in fields.items()
               if isinstance(value, int) and not isinstance(value, bool) and any(w in key for w in WINDOW_WORDS))
    return max(LONG_CLIP, 2 * span + 2)


def spread(frames: int, count: int | None) -> list[int]:
    """``count`` frames of a clip, evenly spaced from the first to the last (every frame for None): which
    frames a long-clip causality check perturbs when every frame would cost too much."""
    if count is None or count >= frames:
        return list(range(frames))
    return sorted({round(i * (frames - 1) / max(count - 1, 1)) for i in range(count)})


def _chunks(frames: int, pattern: Sequence[int] = (2, 1, 1, 2, 1, 3)) -> list[int]:
    """Uneven chunk sizes covering ``frames`` frames: a prefill, single frames, pairs and triples."""
    sizes, total = [], 0
    for size in itertools.cycle(pattern):
        if total >= frames:
            return sizes
        sizes.append(min(size, frames - total))
        total += sizes[-1]


def check_rejects_unknown_keys(cls) -> None:
    fields = cls.example_config().model_dump()
    try:
        cls.config_class(**fields, not_a_real_option=1)
    except pydantic.ValidationError:
        return
    raise AssertionError(f"{cls.__name__}.config_class accepts unknown keys (set extra='forbid')")


def check_round_trip(module: torch.nn.Module, role: str, make_twin,
                     run: Callable[[torch.nn.Module], Tensor] | None = None) -> None:
    """Save to safetensors, load into a freshly built twin: the same tensors under the same keys and,
    with ``run`` (module -> outputs), the same outputs. A copy of ``module`` is saved, with its
    persistent buffers randomised first; ``module`` itself is left alone."""
    original = copy.deepcopy(module)
    _randomise_buffers(original)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{role}.safetensors"
        save_component(original, path, role, step=7)
        twin = make_twin().train(original.training)
        metadata = load_component(twin, path, role)
    assert metadata["step"] == "7" and metadata["plugin"] == module.plugin_name, "metadata lost in round trip"
    assert_same_weights(twin, original, "round trip")
    if run is not None:
        with torch.no_grad():
            _close(run(twin), run(original),
                   f"{type(module).__name__}: outputs after save and load differ from the original's; state that "
                   "shapes the output must be a parameter or a persistent buffer (a plain tensor attribute, a "
                   "persistent=False buffer or a value drawn at init is not saved)")


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


def _item(conditioning: Conditioning, i: int) -> Conditioning:
    """Batch item ``i`` of ``conditioning``, keeping the batch axis."""
    return Conditioning(*(None if x is None else x[i:i + 1] for x in (conditioning.labels, conditioning.actions)))


def _distinct_labels(conditioning: Conditioning, classes: int) -> Conditioning:
    """Labels 0, 1, 2, ... (as far as there are classes), so that items differ in their labels."""
    if conditioning.labels is None:
        return conditioning
    labels = torch.arange(len(conditioning.labels)) % classes
    return Conditioning(labels, conditioning.actions)


# -- encoders ----------------------------------------------------------------------------------

def _encoder_steps(encoder: CausalEncoder, state, video: Tensor, conditioning: Conditioning,
                   chunks: Sequence[int]) -> Iterator[Tensor]:
    """Stream ``video`` through ``encoder.step`` chunk by chunk, yielding each chunk's output."""
    start = 0
    for size in chunks:
        stop = start + size
        out, state = encoder.step(state, video[:, start:stop], **given(encoder, conditioning.frames(start, stop)))
        yield out.clone()  # later steps must not be able to rewrite what was returned
        start = stop


def check_encoder_contract(encoder: CausalEncoder, frame: FrameSpec) -> None:
    spec = encoder.contract
    assert isinstance(spec, CondSpec), "contract must be a CondSpec"
    assert isinstance(encoder.accepts, ConditioningSpec), "accepts must be a ConditioningSpec"
    with torch.no_grad():
        out = encoder(_patches(frame, 2, 3, seed=1), **given(encoder, _conditioning(encoder.accepts, 2, 3, seed=1)))
    assert out.shape == (2, 3, spec.tokens, spec.dim), f"forward gave {tuple(out.shape)}, contract says {spec}"


@torch.no_grad()
def check_encoder_cached_matches_full(encoder: CausalEncoder, frame: FrameSpec, frames: int = LONG_CLIP) -> None:
    """Streaming a long clip in uneven chunks (a prefill, single frames, pairs, triples) equals the whole-clip pass."""
    video = _patches(frame, 2, frames, seed=2)
    conditioning = _conditioning(encoder.accepts, 2, frames, seed=2)
    full = encoder(video, **given(encoder, conditioning))
    state = encoder.new_state(2, frames)
    chunks = _chunks(frames)
    streamed = torch.cat(list(_encoder_steps(encoder, state, video, conditioning, chunks)), dim=1)
    _close_frames(streamed, full, f"{type(encoder).__name__}: cached step vs full forward ({frames} frames "
                                  f"streamed in chunks {chunks})")
    assert state.frames == frames, f"state.frames is {state.frames} after {frames} frames"


@torch.no_grad()
def check_encoder_causality(encoder: CausalEncoder, frame: FrameSpec, frames: int = LONG_CLIP,
                            perturb: Iterable[int] | None = None) -> None:
    """Over a long clip, changing frame k (or its action) leaves the outputs of frames < k bit for bit and
    changes frame k's. ``perturb``: the frames k to try (every frame by default)."""
    video = _patches(frame, 1, frames, seed=3)
    conditioning = _conditioning(encoder.accepts, 1, frames, seed=3)
    base = encoder(video, **given(encoder, conditioning))
    g = torch.Generator().manual_seed(3)
    for k in range(frames) if perturb is None else perturb:
        changed = video.clone()
        changed[:, k] += torch.randn(changed[:, k].shape, generator=g)
        out = encoder(changed, **given(encoder, conditioning))
        _assert_causal(out, base, k, f"changing frame {k} changed outputs of earlier frames")
        assert not torch.allclose(out[:, k], base[:, k]), f"output of frame {k} ignores frame {k}"
        if conditioning.actions is not None:
            actions = conditioning.actions.clone()
            actions[:, k] += 1
            out = encoder(video, conditioning=Conditioning(conditioning.labels, actions))
            _assert_causal(out, base, k, f"the action of frame {k} changed outputs of earlier frames")
            assert not torch.allclose(out[:, k], base[:, k]), f"output of frame {k} ignores its action"


def _assert_causal(out: Tensor, base: Tensor, k: int, what: str) -> None:
    """Frames < k of ``out`` equal ``base`` bit for bit; else name the first that does not."""
    same = [torch.equal(out[:, j], base[:, j]) for j in range(k)]
    if not all(same):
        raise AssertionError(f"{what} (first frame {same.index(False)}, in a clip of {out.shape[1]} frames): "
                             f"the output for a frame must not depend on later frames")


@torch.no_grad()
def check_encoder_batch_independence(encoder: CausalEncoder, frame: FrameSpec, frames: int = 4) -> None:
    """A batch of three distinct clips (and conditioning) gives each clip what it gets alone, through
    ``forward`` and through ``step``."""
    video = _patches(frame, BATCH, frames, seed=13)
    conditioning = _distinct_labels(_conditioning(encoder.accepts, BATCH, frames, seed=13), encoder.accepts.classes)
    chunks = _chunks(frames)
    full = encoder(video, **given(encoder, conditioning))
    streamed = torch.cat(list(_encoder_steps(encoder, encoder.new_state(BATCH, frames), video, conditioning, chunks)), 1)
    name = type(encoder).__name__
    for i in range(BATCH):
        alone = video[i:i + 1]
        _close(full[i:i + 1], encoder(alone, **given(encoder, _item(conditioning, i))),
               f"{name}.forward mixes batch items: item {i} of a batch of {BATCH} differs from that clip run alone "
               "(every item must be computed from its own frames and conditioning only)")
        alone_streamed = torch.cat(list(_encoder_steps(encoder, encoder.new_state(1, frames), alone,
                                                       _item(conditioning, i), chunks)), 1)
        _close(streamed[i:i + 1], alone_streamed,
               f"{name}.step mixes batch items: item {i} of a batch of {BATCH} differs from that clip streamed alone "
               "(every item must be computed from its own frames and conditioning only)")


@torch.no_grad()
def check_encoder_streams_are_independent(encoder: CausalEncoder, frame: FrameSpec, frames: int = 6) -> None:
    """Two states from two ``new_state`` calls, stepped in turn (stream A, stream B, A, ...), give each
    stream what it gets alone: all per-stream state lives in the state, none on the encoder."""
    clips = [_patches(frame, 1, frames, seed=s) for s in (14, 15)]
    conditionings = [_conditioning(encoder.accepts, 1, frames, seed=s) for s in (14, 15)]
    chunks = [_chunks(frames), _chunks(frames, (1, 2))]
    alone = [torch.cat(list(_encoder_steps(encoder, encoder.new_state(1, frames), clip, c, sizes)), 1)
             for clip, c, sizes in zip(clips, conditionings, chunks)]
    states = [encoder.new_state(1, frames), encoder.new_state(1, frames)]
    streams = [_encoder_steps(encoder, state, clip, c, sizes)
               for state, clip, c, sizes in zip(states, clips, conditionings, chunks)]
    what = (f"{type(encoder).__name__}: stream {{}} stepped in turn with another stream (two new_state() calls) "
            "vs run alone; each state must own its caches (nothing on self or the class)")
    outputs = _in_turn(streams, what.format("A or B"))
    for which, got, want in zip("AB", outputs, alone):
        _close_frames(torch.cat(got, 1), want, what.format(which))


def _in_turn(streams: list[Iterator], what: str) -> list[list]:
    """Advance the streams in turn (the first one step, the second one step, ...), collecting what each
    yields; an error raised meanwhile fails ``what``."""
    outputs: list[list] = [[] for _ in streams]
    try:
        for items in itertools.zip_longest(*streams):
            for out, item in zip(outputs, items):
                if item is not None:
                    out.append(item)
    except Exception as exc:
        raise AssertionError(f"{what}: raised {type(exc).__name__}: {exc}") from exc
    return outputs


def encoder_checks(cls, config=None, frame: FrameSpec = TINY_FRAME, perturb: int | None = None) -> Checks:
    """The encoder checks by name, for an encoder built (and randomised) from ``config``; ``perturb``: at
    most this many frames perturbed by the long-clip causality check (every frame for None)."""
    config = config or cls.example_config()
    encoder = cls(config, frame).eval()
    _randomise(encoder)
    frames = long_clip(config)
    video = _patches(frame, 2, 3, seed=16)
    conditioning = _conditioning(encoder.accepts, 2, 3, seed=16)
    return [
        ("rejects unknown config keys", lambda: check_rejects_unknown_keys(cls)),
        ("contract", lambda: check_encoder_contract(encoder, frame)),
        (f"cached step == full forward ({frames} frames)",
         lambda: check_encoder_cached_matches_full(encoder, frame, frames)),
        (f"causality ({frames} frames)",
         lambda: check_encoder_causality(encoder, frame, frames, spread(frames, perturb))),
        ("batch items independent", lambda: check_encoder_batch_independence(encoder, frame)),
        ("interleaved streams independent", lambda: check_encoder_streams_are_independent(encoder, frame)),
        ("save/load round trip", lambda: check_round_trip(encoder, "encoder", lambda: cls(config, frame),
                                                          lambda m: m(video, **given(m, conditioning)))),
    ]


def check_encoder(cls, config=None, frame: FrameSpec = TINY_FRAME) -> None:
    for _, check in encoder_checks(cls, config, frame):
        check()


# -- decoders ----------------------------------------------------------------------------------

def _decoder_inputs(decoder: FrameDecoder, frame: FrameSpec, batch: int, seed: int):
    """x_t [b n p], distinct times t [b], conditioning [b n_c d_c] and per-item labels/actions."""
    spec, g = decoder.contract, torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frame.tokens, frame.patch_dim, generator=g)
    t = torch.rand(batch, generator=g)
    cond = torch.randn(batch, spec.tokens, spec.dim, generator=g)
    extra = _distinct_labels(_conditioning(decoder.accepts, batch, 1, seed=seed).per_frame(1), decoder.accepts.classes)
    return x, t, cond, extra


@torch.no_grad()
def check_decoder_shapes_and_conditioning(decoder: FrameDecoder, frame: FrameSpec) -> None:
    x, t, cond, extra = _decoder_inputs(decoder, frame, 3, seed=4)
    out = decoder(x, t, cond, **given(decoder, extra))
    assert out.shape == x.shape, f"decoder output {tuple(out.shape)} != input {tuple(x.shape)}"
    assert not torch.allclose(decoder(x, t, cond + 1, **given(decoder, extra)), out), "decoder ignores its conditioning"
    assert not torch.allclose(decoder(x, t * 0.5, cond, **given(decoder, extra)), out), "decoder ignores the time"
    if extra.labels is not None:
        other = Conditioning((extra.labels + 1) % decoder.accepts.classes, extra.actions)
        assert not torch.allclose(decoder(x, t, cond, conditioning=other), out), "decoder ignores the labels"
    if extra.actions is not None:
        other = Conditioning(extra.labels, extra.actions + 1)
        assert not torch.allclose(decoder(x, t, cond, conditioning=other), out), "decoder ignores the actions"


@torch.no_grad()
def check_decoder_uses_every_cond_token(decoder: FrameDecoder, frame: FrameSpec) -> None:
    """Changing any single conditioning token changes the prediction: the decoder reads all of them."""
    x, t, cond, extra = _decoder_inputs(decoder, frame, 1, seed=17)
    out = decoder(x, t, cond, **given(decoder, extra))
    g = torch.Generator().manual_seed(17)
    tokens = cond.shape[1]
    for j in range(tokens):
        changed = cond.clone()
        changed[:, j] += torch.randn(changed[:, j].shape, generator=g)
        assert not torch.allclose(decoder(x, t, changed, **given(decoder, extra)), out), \
            f"decoder ignores conditioning token {j} of {tokens}: every token the encoder emits must shape the prediction"


@torch.no_grad()
def check_decoder_batch_independence(decoder: FrameDecoder, frame: FrameSpec) -> None:
    """A batch of three items with distinct x_t, t, conditioning and labels/actions gives each item what it
    gets alone."""
    x, t, cond, extra = _decoder_inputs(decoder, frame, BATCH, seed=18)
    out = decoder(x, t, cond, **given(decoder, extra))
    for i in range(BATCH):
        one = slice(i, i + 1)
        _close(out[one], decoder(x[one], t[one], cond[one], **given(decoder, _item(extra, i))),
               f"{type(decoder).__name__} mixes batch items: item {i} of a batch of {BATCH} differs from it run "
               "alone (each item must use its own x_t, t, conditioning tokens and labels/actions only)")


@torch.no_grad()
def check_decoder_staged_matches_forward(decoder: FrameDecoder, frame: FrameSpec) -> None:
    """A staged decoder (``StagedDecoder``) computes what ``forward`` does, also when streaming hands it the
    time terms of one time (a ``TimeTable`` row) for a whole batch."""
    if not isinstance(decoder, StagedDecoder):
        return
    x, t, cond, extra = _decoder_inputs(decoder, frame, BATCH, seed=21)
    kwargs = given(decoder, extra)
    out = decoder(x, t, cond, **kwargs)
    _close(decoder.denoise(x, decoder.condition(cond), decoder.time_terms(t, **kwargs)), out,
           "denoise(x_t, condition(cond), time_terms(t)) differs from forward(x_t, t, cond)")
    if decoder.accepts.classes == 0 and decoder.accepts.actions == 0:
        same_t = t[:1].expand_as(t)
        _close(decoder.denoise(x, decoder.condition(cond), decoder.time_terms(t[:1])), decoder(x, same_t, cond),
               "time terms of one time [1] must broadcast over the batch as streaming uses them")


def decoder_checks(cls, config=None, frame: FrameSpec = TINY_FRAME, cond: CondSpec | None = None) -> Checks:
    """The decoder checks by name, for a decoder built (and randomised) from ``config`` for ``cond``."""
    config = config or cls.example_config()
    cond = cond or CondSpec(dim=24, tokens=frame.tokens)
    decoder = cls(config, frame, cond).eval()
    _randomise(decoder)
    x, t, c, extra = _decoder_inputs(decoder, frame, 2, seed=19)

    def contract() -> None:
        assert decoder.contract == cond, "decoder contract must be the conditioning it was built for"

    return [
        ("rejects unknown config keys", lambda: check_rejects_unknown_keys(cls)),
        ("contract", contract),
        ("shapes and conditioning", lambda: check_decoder_shapes_and_conditioning(decoder, frame)),
        ("every conditioning token used", lambda: check_decoder_uses_every_cond_token(decoder, frame)),
        ("batch items independent", lambda: check_decoder_batch_independence(decoder, frame)),
        ("staged path equals forward", lambda: check_decoder_staged_matches_forward(decoder, frame)),
        ("save/load round trip", lambda: check_round_trip(decoder, "decoder", lambda: cls(config, frame, cond),
                                                          lambda m: m(x, t, c, **given(m, extra)))),
    ]


def check_decoder(cls, config=None, frame: FrameSpec = TINY_FRAME, cond: CondSpec | None = None) -> None:
    for _, check in decoder_checks(cls, config, frame, cond):
        check()


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


def check_scheduler_declarations(scheduler: NoiseScheduler) -> None:
    """Declared steps and prediction type; begin() uses the steps and refuses fewer than one; times in
    [0, 1] from noise to clean."""
    assert isinstance(scheduler.steps, int) and scheduler.steps >= 1, f"steps must be a positive int, got {scheduler.steps!r}"
    assert scheduler.prediction_type in get_args(PredictionType), f"unknown prediction type {scheduler.prediction_type!r}"
    for bad in (0, -3):
        try:
            scheduler.begin(bad)
        except ValueError:
            continue
        raise AssertionError(f"begin({bad}) must raise ValueError, not fall back to a default")
    assert scheduler.begin().steps == scheduler.steps, "begin() must use the declared steps"
    t = scheduler.sample_timesteps((64,), generator=torch.Generator().manual_seed(5), device="cpu")
    assert t.shape == (64,) and bool(((t >= 0) & (t <= 1)).all()), "training times must lie in [0, 1]"
    times = scheduler.begin(8, "cpu").times
    assert len(times) == 9, f"begin(8) must give 9 times, got {len(times)}"
    assert all(a > b for a, b in zip(times, times[1:])), "sampling times must run from noise to clean"
    assert 0 <= times[-1] < times[0] <= 1, "sampling times must lie in [0, 1]"


def check_scheduler_per_item_times(scheduler: NoiseScheduler) -> None:
    """Every item has its own time, per clip (t [b], x0 [b n p], as the SCD decoder trains) and per frame
    (t [b f], x0 [b f n p], as a monolithic model trains): add_noise, training_target, training_loss and
    alpha_sigma give each item what it gets alone. Every axis is 4 long, so a time broadcast over the
    wrong axis shows as a wrong value rather than a shape error."""
    g = torch.Generator().manual_seed(5)
    cases = [("per-clip times t [b] with x0 [b n p]", torch.tensor([0.1, 0.4, 0.7, 0.95]), (4, 4, 4)),
             ("per-frame times t [b f] with x0 [b f n p]", 0.05 + 0.9 * torch.rand(4, 4, generator=g), (4, 4, 4, 4))]
    for where, t, shape in cases:
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        prediction = torch.randn(shape, generator=g)
        try:
            noisy, target = scheduler.add_noise(x0, noise, t), scheduler.training_target(x0, noise, t)
            loss = scheduler.training_loss(prediction, x0, noise, t)
            alpha, sigma = (torch.as_tensor(v).expand(t.shape) for v in scheduler.alpha_sigma(t))
        except Exception as exc:
            raise AssertionError(f"the scheduler fails on {where}: {type(exc).__name__}: {exc}") from exc
        for item in itertools.product(*map(range, t.shape)):
            one = tuple(slice(i, i + 1) for i in item)
            alone = (x0[one], noise[one], t[one])
            what = f"with {where}, item {item} differs from that item alone (each item must get its own t)"
            _close(noisy[one], scheduler.add_noise(*alone), f"add_noise {what}")
            _close(target[one], scheduler.training_target(*alone), f"training_target {what}")
            _close(loss[one], scheduler.training_loss(prediction[one], *alone), f"training_loss {what}")
            a, s = scheduler.alpha_sigma(t[one])
            _close(alpha[one], torch.as_tensor(a).expand(t[one].shape), f"alpha_sigma {what}")
            _close(sigma[one], torch.as_tensor(s).expand(t[one].shape), f"alpha_sigma {what}")


def check_scheduler_sampling(scheduler: NoiseScheduler) -> None:
    """add_noise at t=0 is the clean sample; the exact target has zero loss, a wrong one positive loss; an
    exact prediction at every step walks noise back to x0, the same way for one seed."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 16, 4, generator=g)
    noise = torch.randn(4, 16, 4, generator=g)
    _close(scheduler.add_noise(x0, noise, torch.zeros(4)), x0, "add_noise at t=0 must return the clean sample")
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    target = scheduler.training_target(x0, noise, t)
    assert float(scheduler.training_loss(target, x0, noise, t).abs().max()) < 1e-8, \
        "the training loss of the exact target must be 0"
    assert float(scheduler.training_loss(target + 1, x0, noise, t).min()) > 0, \
        "the training loss of a wrong prediction must be positive"
    first = _walk_with_exact_predictions(scheduler, x0, noise, 8, seed=6)
    _close(first, x0, "sampling with exact predictions must recover x0", atol=1e-4)
    again = _walk_with_exact_predictions(scheduler, x0, noise, 8, seed=6)
    assert torch.equal(first, again), "the same generator must give the same samples"


def check_scheduler_seeded(scheduler: NoiseScheduler) -> None:
    """With an inexact model (where exact predictions would all but hide an ancestral sampler's noise), two runs
    from the same start with generators seeded alike give the same samples bit for bit, whatever the global
    random state: a stochastic sampler draws only from the generator passed to ``step``."""
    start = torch.randn(4, 16, 4, generator=torch.Generator().manual_seed(7))

    def run(global_seed: int) -> Tensor:
        torch.manual_seed(global_seed)
        g, state, x = torch.Generator().manual_seed(7), scheduler.begin(8, "cpu"), start.clone()
        for _ in range(state.steps):
            x = scheduler.step(state, 0.5 * x + state.t, x, g)
        return x

    with torch.random.fork_rng(devices=[]):
        first, again = run(1), run(2)
    assert torch.equal(first, again), ("the same generator gave different samples: a sampler must draw its noise "
                                       "from the generator passed to step, never from the global random state")


def check_scheduler_device(scheduler: NoiseScheduler) -> None:
    """Every tensor follows its inputs: run on meta tensors, where one made on the CPU would fail."""
    meta = torch.device("meta")
    x0, t = torch.zeros(2, 4, 3, device=meta), torch.full((2,), 0.5, device=meta)
    outputs = [scheduler.add_noise(x0, x0, t), scheduler.training_target(x0, x0, t),
               scheduler.training_loss(x0, x0, x0, t), scheduler.sample_timesteps((2,), device=meta)]
    state = scheduler.begin(2, meta)
    outputs += [scheduler.step(state, x0, x0), scheduler.step(state, x0, x0)]
    assert all(out.device == meta for out in outputs), "a scheduler must make its tensors on its inputs' device"


def scheduler_checks(cls, config=None) -> Checks:
    """The scheduler checks by name, for a scheduler built from ``config``."""
    scheduler: NoiseScheduler = cls(config or cls.example_config())
    return [
        ("rejects unknown config keys", lambda: check_rejects_unknown_keys(cls)),
        ("declarations", lambda: check_scheduler_declarations(scheduler)),
        ("per-item times", lambda: check_scheduler_per_item_times(scheduler)),
        ("sampling recovers x0", lambda: check_scheduler_sampling(scheduler)),
        ("seeded by its generator", lambda: check_scheduler_seeded(scheduler)),
        ("tensors on the inputs' device", lambda: check_scheduler_device(scheduler)),
    ]


def check_scheduler(cls, config=None) -> None:
    """The scheduler contract: declared steps and prediction type, times in [0, 1] from noise to clean,
    per-item times, no silent default for a bad step count, exact predictions recover x0, and the
    same generator gives the same samples whatever the global random state (ancestral samplers included)."""
    for _, check in scheduler_checks(cls, config):
        check()


# -- monolithic models -------------------------------------------------------------------------

def _model_inputs(model: VideoModel, frame: FrameSpec, batch: int, frames: int, seed: int):
    """Clean and noisy clips [b f n p], per-frame times [b f] and conditioning."""
    clean, noisy = _patches(frame, batch, frames, seed), _patches(frame, batch, frames, seed + 1)
    t = torch.rand(batch, frames, generator=torch.Generator().manual_seed(seed + 2))
    conditioning = _distinct_labels(_conditioning(model.accepts, batch, frames, seed), model.accepts.classes)
    return clean, noisy, t, conditioning


def _model_steps(model: VideoModel, state, clean: Tensor, noisy: Tensor, t: Tensor, conditioning: Conditioning,
                 chunks: Sequence[int]) -> Iterator[tuple[int, Tensor]]:
    """Stream a clip: before each chunk of clean frames is observed (and after the last), predict the next
    frame, yielding (frame, prediction). Each prediction is made twice, after a decoy, since ``predict``
    runs at every denoising step and must leave the state as it found it."""
    labels = given(model, Conditioning(labels=conditioning.labels))
    g = torch.Generator().manual_seed(20)
    start = 0
    for size in [*chunks, 0]:
        model.predict(state, torch.randn(noisy[:, start].shape, generator=g), t[:, start], **labels)
        yield start, model.predict(state, noisy[:, start], t[:, start], **labels).clone()
        if size:
            stop = start + size
            model.observe(state, clean[:, start:stop], **given(model, conditioning.frames(start, stop)))
            start = stop


def _streamed(steps: Iterable[tuple[int, Tensor]]) -> tuple[list[int], Tensor]:
    frames, predictions = zip(*steps)
    return list(frames), torch.stack(predictions, dim=1)


@torch.no_grad()
def check_model_cached_matches_full(model: VideoModel, frame: FrameSpec, frames: int = LONG_CLIP) -> None:
    """Observing a long clip in uneven chunks and predicting the frame after each equals the teacher-forced
    whole-clip pass."""
    clean, noisy, t, conditioning = _model_inputs(model, frame, 1, frames, seed=6)
    full = model(clean, noisy, t, **given(model, conditioning))
    chunks = _chunks(frames - 1)  # the last frame is only predicted
    at, streamed = _streamed(_model_steps(model, model.new_state(1, frames), clean, noisy, t, conditioning, chunks))
    for i, f in enumerate(at):
        _close(streamed[:, i], full[:, f],
               f"{type(model).__name__}: cached predict vs full forward at frame {f} of {frames} (observed in chunks "
               f"{chunks}; predict is called twice per frame and must leave the state as it found it)")


@torch.no_grad()
def check_model_causality(model: VideoModel, frame: FrameSpec, frames: int = LONG_CLIP,
                          perturb: Iterable[int] | None = None) -> None:
    """Over a long clip: noisy frame k shapes only its own prediction; clean frame k (and its action) only
    later ones. ``perturb``: the frames k to try (every frame by default)."""
    clean, noisy, t, conditioning = _model_inputs(model, frame, 1, frames, seed=9)
    extra = given(model, conditioning)
    base = model(clean, noisy, t, **extra)
    assert base.shape == noisy.shape, f"forward gave {tuple(base.shape)} for noisy frames {tuple(noisy.shape)}"
    for k in range(frames) if perturb is None else perturb:
        changed_clean, changed_noisy = clean.clone(), noisy.clone()
        changed_clean[:, k] += 1
        changed_noisy[:, k] += 1
        out = model(clean, changed_noisy, t, **extra)
        _assert_causal(out, base, k, f"changing noisy frame {k} changed predictions of earlier frames")
        assert not torch.allclose(out[:, k], base[:, k]), f"the prediction of frame {k} ignores noisy frame {k}"
        out = model(changed_clean, noisy, t, **extra)
        _assert_causal(out, base, k + 1, f"clean frame {k} leaked into the prediction of frame {k} or earlier")
        if k + 1 < frames:
            assert not torch.allclose(out[:, k + 1], base[:, k + 1]), f"frame {k + 1} ignores clean frame {k}"
        if conditioning.actions is not None:
            actions = conditioning.actions.clone()
            actions[:, k] += 1
            out = model(clean, noisy, t, conditioning=Conditioning(conditioning.labels, actions))
            _assert_causal(out, base, k + 1,
                           f"the action of frame {k} leaked into the prediction of frame {k} or earlier")
            if k + 1 < frames:
                assert not torch.allclose(out[:, k + 1], base[:, k + 1]), \
                    f"frame {k + 1} ignores the action of frame {k}"


@torch.no_grad()
def check_model_batch_independence(model: VideoModel, frame: FrameSpec, frames: int = 4) -> None:
    """A batch of three distinct clips (times and conditioning included) gives each clip what it gets alone,
    through ``forward`` and through ``observe``/``predict``."""
    clean, noisy, t, conditioning = _model_inputs(model, frame, BATCH, frames, seed=21)
    chunks = _chunks(frames - 1)
    full = model(clean, noisy, t, **given(model, conditioning))
    _, streamed = _streamed(_model_steps(model, model.new_state(BATCH, frames), clean, noisy, t, conditioning, chunks))
    name = type(model).__name__
    for i in range(BATCH):
        one = slice(i, i + 1)
        alone = (clean[one], noisy[one], t[one], _item(conditioning, i))
        _close(full[one], model(*alone[:3], **given(model, alone[3])),
               f"{name}.forward mixes batch items: item {i} of a batch of {BATCH} differs from that clip run alone "
               "(every item must be computed from its own frames, times and conditioning only)")
        _, alone_streamed = _streamed(_model_steps(model, model.new_state(1, frames), *alone, chunks))
        _close(streamed[one], alone_streamed,
               f"{name}.observe/predict mix batch items: item {i} of a batch of {BATCH} differs from that clip "
               "streamed alone (every item must be computed from its own frames, times and conditioning only)")


@torch.no_grad()
def check_model_streams_are_independent(model: VideoModel, frame: FrameSpec, frames: int = 6) -> None:
    """Two states from two ``new_state`` calls, used in turn (observe and predict in stream A, then in B,
    ...), give each stream what it gets alone: all per-stream state lives in the state."""
    inputs = [_model_inputs(model, frame, 1, frames, seed=s) for s in (22, 26)]
    chunks = [_chunks(frames - 1), _chunks(frames - 1, (1, 2))]
    alone = [_streamed(_model_steps(model, model.new_state(1, frames), *x, c))[1] for x, c in zip(inputs, chunks)]
    streams = [_model_steps(model, state, *x, c)
               for state, x, c in zip([model.new_state(1, frames), model.new_state(1, frames)], inputs, chunks)]
    what = (f"{type(model).__name__}: stream {{}} used in turn with another stream (two new_state() calls) "
            "vs run alone; each state must own its caches (nothing on self or the class)")
    outputs = _in_turn(streams, what.format("A or B"))
    for which, got, want in zip("AB", outputs, alone):
        _close_frames(torch.stack([prediction for _, prediction in got], 1), want, what.format(which))


def model_checks(cls, config=None, frame: FrameSpec = TINY_FRAME, perturb: int | None = None) -> Checks:
    """The model checks by name, for a model built (and randomised) from ``config``; ``perturb``: at most
    this many frames perturbed by the long-clip causality check (every frame for None)."""
    config = config or cls.example_config()
    model = cls(config, frame).eval()
    _randomise(model)
    frames = long_clip(config)
    clean, noisy, t, conditioning = _model_inputs(model, frame, 2, 3, seed=23)
    return [
        ("rejects unknown config keys", lambda: check_rejects_unknown_keys(cls)),
        (f"cached predict == full forward ({frames} frames)",
         lambda: check_model_cached_matches_full(model, frame, frames)),
        (f"causality ({frames} frames)",
         lambda: check_model_causality(model, frame, frames, spread(frames, perturb))),
        ("batch items independent", lambda: check_model_batch_independence(model, frame)),
        ("interleaved streams independent", lambda: check_model_streams_are_independent(model, frame)),
        ("save/load round trip", lambda: check_round_trip(model, "model", lambda: cls(config, frame),
                                                          lambda m: m(clean, noisy, t, **given(m, conditioning)))),
    ]


def check_model(cls, config=None, frame: FrameSpec = TINY_FRAME) -> None:
    for _, check in model_checks(cls, config, frame):
        check()


# -- data sets ---------------------------------------------------------------------------------

def check_dataset_clips(data: VideoDataset) -> None:
    """Shapes, dtype, range and device of the clips, and exactly the conditioning and states it declares."""
    frame, batch = data.frame, data.clips(2, 3, split="train", seed=0)
    video = batch.video
    assert video.shape == (2, 3, frame.channels, frame.height, frame.width), (
        f"{type(data).__name__}.clips(2, 3) gave video {list(video.shape)}, expected [2 3 {frame.channels} "
        f"{frame.height} {frame.width}]")
    assert video.dtype == torch.float32 and video.device.type == "cpu", "clips are float32 on the CPU"
    assert 0 <= float(video.min()) and float(video.max()) <= 1, "pixels must lie in [0, 1]"
    provides = data.provides
    assert (batch.labels is not None) == bool(provides.classes), (
        f"provides {provides.classes} classes but labels are {'missing' if batch.labels is None else 'given'}")
    if batch.labels is not None:
        labels = batch.labels
        assert labels.shape == (2,) and labels.dtype == torch.int64, "labels are int64 [count]"
        assert 0 <= int(labels.min()) and int(labels.max()) < provides.classes, (
            f"labels must lie in 0..{provides.classes - 1} (label {provides.classes} is the null label)")
    assert (batch.actions is not None) == bool(provides.actions), (
        f"provides actions of width {provides.actions} but actions are {'missing' if batch.actions is None else 'given'}")
    if batch.actions is not None:
        assert batch.actions.shape == (2, 3, provides.actions), f"actions are [count frames {provides.actions}]"
    assert (batch.states is not None) == data.has_states, "states must be given exactly when has_states is set"
    if batch.states is not None:
        assert batch.states.dim() == 4 and batch.states.shape[:2] == (2, 3) and batch.states.shape[3] == 3, (
            "states are [count frames objects 3]: centre y, x and radius")


def check_dataset_seeded_and_split(data: VideoDataset) -> None:
    """The same (split, seed) gives the same clips; another seed or the other split gives others."""
    first = data.clips(2, 3, split="train", seed=5).video
    assert torch.equal(first, data.clips(2, 3, split="train", seed=5).video), "the same seed gave other clips"
    assert not torch.equal(first, data.clips(2, 3, split="train", seed=6).video), "another seed gave the same clips"
    assert not torch.equal(first, data.clips(2, 3, split="test", seed=5).video), "the test split repeats the train split"


def check_dataset_shards(data: VideoDataset) -> None:
    """The shards of a batch, put together, are the batch (multi-process training reads shards)."""
    whole = data.batch(4, 2, seed=3)
    parts = [data.batch(4, 2, seed=3, shard=(rank, 2)) for rank in range(2)]
    assert torch.equal(torch.cat([part.video for part in parts]), whole.video), "shards do not make up the batch"


def dataset_checks(cls, config=None, frame: FrameSpec = TINY_FRAME) -> Checks:
    """The data set checks by name, for a data set built from ``config`` for ``frame``."""
    config = config or cls.example_config()
    data = cls(config, frame)
    return [
        ("rejects unknown config keys", lambda: check_rejects_unknown_keys(cls)),
        ("fits the frame", lambda: _no_frame_problems(data)),
        ("clips: shapes, range, conditioning, states", lambda: check_dataset_clips(data)),
        ("seeded, train and test apart", lambda: check_dataset_seeded_and_split(data)),
        ("shards make up the batch", lambda: check_dataset_shards(data)),
    ]


def _no_frame_problems(data: VideoDataset) -> None:
    problems = data.frame_problems()
    assert not problems, "; ".join(problem for _, problem in problems)


def check_dataset(cls, config=None, frame: FrameSpec = TINY_FRAME) -> None:
    """The data set contract: clips of the frame's shape in [0, 1] with exactly the declared conditioning and
    states, seeded, splits apart, and shards that make up the batch."""
    for _, check in dataset_checks(cls, config, frame):
        check()
