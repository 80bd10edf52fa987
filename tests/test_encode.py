"""Encoder-output caches (``scdkit encode`` / ``render``) and prefilled contexts reused for several continuations."""

import pytest
import torch
from safetensors import safe_open

from scdkit.checkpoint import save_component, weights_digest
from scdkit.cli import main
from scdkit.encode import (CacheInfo, EncodeConfig, RenderConfig, check_cache, encode, encode_clips, read_cache,
                           render, render_cache, write_cache)
from scdkit.errors import UsageError
from scdkit.interfaces import Batch
from scdkit.registry import load_registry
from tests.test_conditioning import pipeline as conditioned_pipeline  # noqa: F401  (a fixture)
from tests.test_conditioning import toy_batch
from tests.test_device import default_device_meta
from tests.test_registry import REPO

CLIPS = EncodeConfig(clips=2, frames=4, seed=3)
STEPS = 2


@pytest.fixture(scope="module")
def registry():
    return load_registry(REPO / "registry.toml")


@pytest.fixture(scope="module")
def scd(registry):
    return registry.build("scd-digits")  # the shipped checkpoint


@pytest.fixture(scope="module")
def cache_file(scd, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "encoded.safetensors"
    write_cache(encode(scd, "moving-digits", CLIPS, "causal-s"), path)
    return path


def forbid_encoder(monkeypatch, encoder):
    def refuse(*args, **kwargs):
        raise AssertionError("the encoder ran")
    monkeypatch.setattr(encoder, "forward", refuse)
    monkeypatch.setattr(encoder, "step", refuse)


def test_the_cache_holds_the_conditioning_the_clips_and_where_they_came_from(scd, cache_file):
    cache = read_cache(cache_file)
    encoder = scd.components["encoder"]
    assert cache.info == CacheInfo(
        pipeline="scd-digits", encoder="causal-s", plugin="causal-transformer", plugin_version=encoder.plugin_version,
        config=encoder.config.model_dump(), step=scd.sources["encoder"].step, weights_sha256=weights_digest(encoder),
        frame=scd.frame, contract=encoder.contract, data="moving-digits", split="test", seed=3, clips=2, frames=4,
        scdkit_version=cache.info.scdkit_version)
    with safe_open(str(cache_file), framework="pt") as f:
        assert f.get_tensor("video").dtype == torch.uint8 and set(f.keys()) == {"cond", "video", "labels"}  # moving-digits carries its labels
    assert cache.cond.shape == (2, 4, 64, 128)
    assert torch.equal(cache.cond, encode_clips(scd, cache.clips))  # the encoding of exactly the stored pixels


def test_render_never_runs_the_encoder_and_equals_the_live_encoders_conditioning(scd, cache_file, monkeypatch):
    cache = read_cache(cache_file)
    live = render(scd, encode_clips(scd, cache.clips), steps=STEPS, generator=scd.generator(5))
    forbid_encoder(monkeypatch, scd.components["encoder"])
    result = render_cache(scd, cache, RenderConfig(steps=STEPS, seed=5))
    assert torch.equal(result.video, live) and result.video.shape == (2, 3, 1, 32, 32)
    assert torch.equal(result.truth, cache.clips.video[:, 1:]) and len(result.model.psnr) == 3
    assert len(result.repeat_last.ssim) == len(result.constant_velocity.ssim) == 3
    other_seed = render_cache(scd, cache, RenderConfig(steps=STEPS, seed=6)).video
    assert not torch.equal(other_seed, live)


def test_a_rendered_frame_is_the_frame_generate_streams_after_the_same_context(scd):
    clip = Batch(torch.rand(1, 2, 1, 32, 32))  # one (clip, frame) pair: both draw the same noise
    rendered = render(scd, encode_clips(scd, clip), steps=STEPS, generator=scd.generator(1))
    streamed = scd.generate(clip.context(1), 1, steps=STEPS, generator=scd.generator(1)).video
    torch.testing.assert_close(rendered, streamed, atol=1e-5, rtol=0)


@torch.no_grad()
def test_render_passes_labels_and_actions_like_generate(conditioned_pipeline):  # noqa: F811
    clip = toy_batch(clips=1, frames=2)
    rendered = render(conditioned_pipeline, encode_clips(conditioned_pipeline, clip), clip.conditioning, STEPS,
                      conditioned_pipeline.generator(1))
    streamed = conditioned_pipeline.generate(clip.context(1), 1, STEPS, conditioned_pipeline.generator(1)).video
    torch.testing.assert_close(rendered, streamed, atol=1e-5, rtol=0)
    relabelled = Batch(clip.video, (clip.labels + 1) % 10, clip.actions)
    other = render(conditioned_pipeline, encode_clips(conditioned_pipeline, clip), relabelled.conditioning, STEPS,
                   conditioned_pipeline.generator(1))
    assert not torch.allclose(other, rendered)


def test_render_refuses_another_encoder_frame_or_contract(registry, scd, cache_file):
    cache = read_cache(cache_file)
    with pytest.raises(UsageError, match="encoder weights sha256 .* not fitted"):
        check_cache(registry.build("scd-digits", load=False), cache)
    info = cache.info
    for field, value in (("frame", scd.frame.model_copy(update={"patch_size": 8})),
                         ("contract", info.contract.model_copy(update={"dim": 64}))):
        cache.info = info.model_copy(update={field: value})
        with pytest.raises(UsageError, match=f"does not fit pipeline 'scd-digits': {field}"):
            check_cache(scd, cache)
    with pytest.raises(UsageError, match="monolithic"):
        check_cache(registry.build("baseline-digits", load=False), cache)


def test_encode_and_render_commands(registry, cache_file, tmp_path, capsys):
    threads = ["--threads", str(torch.get_num_threads())]  # main() would take every core for the next tests
    shipped = ["--registry", str(REPO / "registry.toml")]
    out = tmp_path / "encoded.safetensors"
    encode_args = [*threads, "encode", *shipped, "--clips", "1", "--frames", "2", "--out", str(out)]
    assert main(encode_args) == 0 and "sha256" in capsys.readouterr().out
    assert main(encode_args) == 2  # never replaces a cache unasked
    assert capsys.readouterr().err.strip() == f"scdkit: error: {out} already exists; pass --overwrite to replace it"
    assert main([*encode_args, "--overwrite"]) == 0
    gif = tmp_path / "render.gif"
    assert main([*threads, "render", str(cache_file), *shipped, "--steps", "2", "--gif", str(gif)]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "teacher-forced render" in printed and "the encoder did not run" in printed and gif.is_file()
    assert "velocity" in printed

    other = tmp_path / "other"  # another encoder with its own decoder: they pair, but the cache is not theirs
    for role, module in registry.build("scd-digits", load=False).components.items():
        save_component(module, other / f"{role}.safetensors", role)
    assert main([*threads, "render", str(cache_file), *shipped, "--checkpoint", str(other)]) == 2
    assert "not fitted to the encoder that wrote the cache" in one_line(capsys)
    assert main([*threads, "render", str(REPO / "checkpoints/scd-digits/encoder.safetensors"), *shipped]) == 2
    assert "not an encoder cache written by `scdkit encode`" in one_line(capsys)


def one_line(capsys) -> str:
    """The error: one line, the last on stderr (after the line saying where the pipeline runs, if it was built)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("scdkit: error: ") and not any("Traceback" in line for line in lines), lines
    return lines[-1]


def test_encode_and_render_make_every_tensor_on_the_pipelines_device(scd):
    with default_device_meta():
        cache = encode(scd, "moving-digits", EncodeConfig(clips=1, frames=2), "causal-s")
        assert render_cache(scd, cache, RenderConfig(steps=1)).video.device.type == "cpu"


# -- one prefill, several continuations ---------------------------------------------------------------

CONTINUED = [("scd-digits", None), ("scd-digits", "long-s"), ("scd-digits", "mem-s"), ("baseline-digits", None)]


@pytest.mark.parametrize("pipeline_name, encoder", CONTINUED)
def test_continuing_a_prefill_twice_equals_a_fresh_generation(registry, pipeline_name, encoder):
    """20 context frames: long-s's window (16 + 1 sink) slides and mem-s pools its older frames."""
    pipeline = registry.build(pipeline_name, encoder=encoder)
    context = Batch(torch.rand(1, 20, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    fresh = pipeline.generate(context, 3, STEPS, pipeline.generator(0)).video
    prefilled = pipeline.prefill(context, 3, STEPS)
    for _ in range(2):  # the first continuation must leave the prefill as it was
        assert torch.equal(pipeline.continue_from(prefilled, generator=pipeline.generator(0)).video, fresh)
    more_steps = pipeline.generate(context, 2, STEPS + 1, pipeline.generator(0)).video
    torch.testing.assert_close(pipeline.continue_from(prefilled, 2, STEPS + 1, pipeline.generator(0)).video,
                               more_steps, atol=1e-5, rtol=0)  # fewer frames than the room made: other cache sizes
    with pytest.raises(UsageError, match="room for 1 to 3 new frames, got 4"):
        pipeline.continue_from(prefilled, 4)


def test_prefill_and_continuations_make_every_tensor_on_the_pipelines_device(scd):
    with default_device_meta():
        prefilled = scd.prefill(torch.rand(1, 2, 1, 32, 32, device="cpu"), 2, STEPS)
        assert scd.continue_from(prefilled, generator=scd.generator(0)).video.device.type == "cpu"
