"""Conditioning inputs: a toy labelled (and action-carrying) batch reaches the components that accept it,
through the loss and generation; unconditioned plugins keep their plain signatures."""

import pytest
import torch

from scdkit import testing
from scdkit.interfaces import Batch, Conditioning, ConditioningSpec
from scdkit.plugins.decoders.dit_frame import DiTFrameDecoder
from scdkit.plugins.encoders.causal_transformer import CausalTransformerEncoder
from scdkit.registry import load_registry
from tests.test_registry import GOOD

CLASSES, ACTIONS = 10, 3
CONDITIONED = (GOOD.replace("heads = 2\n\n[decoders.dec]", f"heads = 2\nactions = {ACTIONS}\n\n[decoders.dec]")
               .replace("heads = 2\n\n[schedulers", f"heads = 2\nclasses = {CLASSES}\n\n[schedulers"))


@pytest.fixture
def pipeline(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text(CONDITIONED)
    built = load_registry(path).build("p", load=False)
    testing._randomise(built)  # adaLN-Zero and a zero output layer would hide every input at first
    return built


def toy_batch(clips: int = 2, frames: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(clips, frames, 1, 8, 8, generator=g), torch.randint(0, CLASSES, (clips,), generator=g),
                 torch.randn(clips, frames, ACTIONS, generator=g))


def test_components_declare_what_they_accept(pipeline):
    assert pipeline.components["encoder"].accepts == ConditioningSpec(actions=ACTIONS)
    assert pipeline.components["decoder"].accepts == ConditioningSpec(classes=CLASSES)
    assert pipeline.model.accepts == ConditioningSpec(classes=CLASSES, actions=ACTIONS)


def test_the_kit_checks_conditioned_components():
    testing.check_encoder(CausalTransformerEncoder, CausalTransformerEncoder.config_class(
        width=32, layers=2, heads=2, actions=ACTIONS))  # cached == full and causality, actions included
    testing.check_decoder(DiTFrameDecoder, DiTFrameDecoder.config_class(width=32, layers=1, heads=2, classes=CLASSES))


@torch.no_grad()
def test_labels_and_actions_shape_the_loss(pipeline):
    batch = toy_batch()
    loss = pipeline.loss(batch, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    other_labels = Batch(batch.video, (batch.labels + 1) % CLASSES, batch.actions)
    other_actions = Batch(batch.video, batch.labels, batch.actions + 1)
    for other in (other_labels, other_actions):
        assert pipeline.loss(other, generator=torch.Generator().manual_seed(1)) != loss


@torch.no_grad()
def test_labels_steer_generation_and_actions_steer_only_later_frames(pipeline):
    batch = toy_batch(frames=5)
    context = batch.context(2)  # 2 context frames; the actions of every frame
    base = pipeline.generate(context, 3, steps=2, generator=torch.Generator().manual_seed(0)).video
    relabelled = Batch(context.video, (context.labels + 1) % CLASSES, context.actions)
    assert not torch.allclose(pipeline.generate(relabelled, 3, steps=2, generator=torch.Generator().manual_seed(0)).video,
                              base)
    # the action taken at frame 3 (the 2nd generated frame) decides frame 4 and nothing before it
    actions = context.actions.clone()
    actions[:, 3] += 1
    steered = pipeline.generate(Batch(context.video, context.labels, actions), 3, steps=2,
                                generator=torch.Generator().manual_seed(0)).video
    assert torch.equal(steered[:, :2], base[:, :2]) and not torch.allclose(steered[:, 2], base[:, 2])


@torch.no_grad()
def test_streaming_uses_the_labels_like_the_full_decoder(pipeline):
    """The tabulated per-generation time terms (labels included) equal the decoder's own forward."""
    batch = toy_batch(frames=3)
    model, decoder = pipeline.model, pipeline.components["decoder"]
    state = model.new_state(2, 3, batch.conditioning)
    times = pipeline.scheduler.begin(2).times
    model.prepare(state, times[:-1])
    patches = torch.randn(2, 2, 16, 4)
    model.observe(state, patches, batch.conditioning.frames(0, 2))
    x = torch.randn(2, 16, 4)
    cond = pipeline.components["encoder"](patches, conditioning=batch.conditioning.frames(0, 2))[:, -1]
    direct = decoder(x, torch.full((2,), times[0]), cond, conditioning=Conditioning(batch.labels))
    torch.testing.assert_close(model.predict(state, x, times[0]), direct, atol=1e-5, rtol=0)


def test_missing_conditioning_is_a_clear_error(pipeline):
    batch = toy_batch()
    with pytest.raises(ValueError, match="class-conditioned: give labels"):
        pipeline.loss(Batch(batch.video, None, batch.actions))
    with pytest.raises(ValueError, match=r"action-conditioned: give actions for 4 frames \(\[b 4 3\]\), got 2"):
        pipeline.generate(Batch(batch.video[:, :2], batch.labels, batch.actions[:, :2]), 3)


def test_unconditioned_plugins_keep_their_plain_signatures(tmp_path):
    """A plugin written before conditioning existed (no ``conditioning`` parameter) runs with a labelled batch."""
    class PlainDecoder(DiTFrameDecoder):
        plugin_name = "plain-decoder"

        def forward(self, x_t, t, cond):  # the v1 signatures
            return self.denoise(x_t, self.condition(cond), self.time_terms(t))

        def time_terms(self, t):
            return super().time_terms(t)

    path = tmp_path / "registry.toml"
    path.write_text(GOOD)
    pipeline = load_registry(path).build("p", load=False)
    frame, contract = pipeline.frame, pipeline.components["encoder"].contract
    pipeline.model.decoder = PlainDecoder(pipeline.components["decoder"].config, frame, contract)
    batch = toy_batch()
    assert torch.isfinite(pipeline.loss(batch))
    assert pipeline.generate(batch.context(2), 2, steps=1).video.shape == (2, 2, 1, 8, 8)
