"""Classifier-free guidance as the official code does it: the unconditional branch sees the encoder features with
noise and the null label; label dropout in training teaches the null label."""

import pytest
import torch

from scdkit.errors import UsageError
from scdkit.interfaces import Batch, Conditioning, Recipe
from scdkit.pipeline import GUIDANCE_FEATURE_NOISE, patchify, to_model_range
from scdkit.registry import load_registry
from tests.test_conditioning import CLASSES, CONDITIONED, pipeline, toy_batch  # noqa: F401  (pipeline: a fixture)
from tests.test_registry import GOOD


@torch.no_grad()
def test_a_guided_step_mixes_the_labelled_and_the_unconditional_prediction(pipeline):
    batch, scale, k = toy_batch(clips=2, frames=5), 2.5, 3
    model, encoder, decoder = pipeline.model, pipeline.components["encoder"], pipeline.components["decoder"]
    guided = pipeline.prefill(batch.context(k), 2, guidance=scale).state
    x = torch.randn(2, pipeline.frame.tokens, pipeline.frame.patch_dim, generator=torch.Generator().manual_seed(3))
    t = 0.6
    # what the guided step must be, from the components alone
    patches = patchify(to_model_range(batch.video[:, :k]), pipeline.frame)
    features = encoder(patches, Conditioning(actions=batch.actions[:, :k]))[:, -1]
    noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(k))
    action = batch.actions[:, k - 1]
    times = torch.full((2,), t)
    conditioned = decoder(x, times, features, Conditioning(batch.labels, action))
    null = torch.full_like(batch.labels, CLASSES)
    unconditional = decoder(x, times, features + GUIDANCE_FEATURE_NOISE * noise, Conditioning(null, action))
    expected = unconditional + scale * (conditioned - unconditional)
    torch.testing.assert_close(model.predict(guided, x, t), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, conditioned, atol=1e-3)  # the two branches really differ


@torch.no_grad()
def test_guidance_one_is_no_guidance_and_guided_generation_is_reproducible(pipeline):
    context = toy_batch(clips=2, frames=5).context(2)
    def run(guidance):
        return pipeline.generate(context, 3, generator=pipeline.generator(7), guidance=guidance).video
    plain = run(None)
    assert torch.equal(run(1.0), plain)
    guided = run(3.0)
    assert torch.equal(run(3.0), guided)
    assert not torch.allclose(guided, plain, atol=1e-4)


def test_guidance_needs_an_scd_pipeline(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text(GOOD + '\n[models.m]\nplugin = "causal-dit"\nwidth = 32\nlayers = 1\nheads = 2\n'
                    '\n[pipelines.mono]\nmodel = "m"\nscheduler = "flow"\nheight = 8\nwidth = 8\npatch_size = 2\n')
    mono = load_registry(path).build("mono", load=False)
    with pytest.raises(UsageError, match="guidance is for SCD pipelines"):
        mono.generate(torch.rand(1, 2, 1, 8, 8), 1, guidance=2.0)


@torch.no_grad()
def test_label_dropout_replaces_labels_by_the_null_label(pipeline):
    batch = toy_batch()
    relabelled = Batch(batch.video, (batch.labels + 1) % CLASSES, batch.actions)
    def loss(b, dropout):
        return pipeline.loss(b, Recipe(label_dropout=dropout), torch.Generator().manual_seed(1))
    assert torch.equal(loss(batch, 1.0), loss(relabelled, 1.0))  # every label dropped: the labels do not matter
    assert not torch.equal(loss(batch, 0.0), loss(relabelled, 0.0))
    seen = []
    decoder = pipeline.components["decoder"]
    forward = decoder.forward
    decoder.forward = lambda x, t, c, conditioning: seen.append(conditioning.labels) or forward(x, t, c, conditioning)
    pipeline.loss(toy_batch(clips=64, frames=2), Recipe(label_dropout=0.5, noise_draws=1), torch.Generator().manual_seed(2))
    share = (seen[0] == CLASSES).float().mean()
    assert 0.3 < share < 0.7, share
