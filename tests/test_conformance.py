"""Every registered built-in runs the conformance kit: a new plugin is tested the day it is registered."""

import pytest

from scdkit import testing
from scdkit.interfaces import CondSpec, FrameSpec
from scdkit.pluginmanager import load_catalog

CATALOG = load_catalog(entry_points=False)


@pytest.mark.parametrize("name", CATALOG.names("encoders"))
def test_encoder_conformance(name):
    testing.check_encoder(CATALOG.get("encoders", name))


@pytest.mark.parametrize("name", CATALOG.names("decoders"))
def test_decoder_conformance(name):
    testing.check_decoder(CATALOG.get("decoders", name))


@pytest.mark.parametrize("name", CATALOG.names("schedulers"))
def test_scheduler_conformance(name):
    if name == "diffusers":  # registered without the optional extra, but only configurable with it
        pytest.importorskip("diffusers")
    testing.check_scheduler(CATALOG.get("schedulers", name))


@pytest.mark.parametrize("name", CATALOG.names("models"))
def test_model_conformance(name):
    testing.check_model(CATALOG.get("models", name))


def test_builtins_are_registered():  # the parametrized tests above would silently run for nothing otherwise
    assert {"causal-transformer", "flash-long-context", "memory-efficient"} <= set(CATALOG.names("encoders"))
    assert "causal-dit" in CATALOG.names("models")
    assert {"dit-frame", "unet-frame"} <= set(CATALOG.names("decoders"))
    assert {"flow-match-euler", "ddpm", "ddim", "diffusers"} <= set(CATALOG.names("schedulers"))
    assert not CATALOG.broken


@pytest.mark.parametrize("combine", ["token_concat", "concat", "add"])
def test_dit_frame_combine_modes_conform(combine):
    cls = CATALOG.get("decoders", "dit-frame")
    testing.check_decoder(cls, cls.config_class(width=32, layers=1, heads=2, combine=combine))


def test_dit_frame_rejects_token_count_mismatch_for_pairwise_combine():
    cls = CATALOG.get("decoders", "dit-frame")
    frame = FrameSpec(channels=1, height=8, width=8, patch_size=2)
    with pytest.raises(ValueError, match="token_concat"):
        cls(cls.config_class(width=32, heads=2, combine="add"), frame, CondSpec(dim=16, tokens=4))


@pytest.mark.parametrize("multipliers", [(1,), (1, 2), (1, 2, 2)])
def test_unet_frame_levels_conform(multipliers):
    """One level (no resampling) up to as many as a patch of 4 allows, class-conditioned at the deepest."""
    cls = CATALOG.get("decoders", "unet-frame")
    frame = FrameSpec(channels=2, height=16, width=8, patch_size=4)
    classes = 3 if len(multipliers) == 3 else 0
    testing.check_decoder(cls, cls.config_class(channels=8, multipliers=multipliers, groups=4, classes=classes), frame)


@pytest.mark.parametrize("cond, patch, match", [(CondSpec(dim=16, tokens=4), 2, "one conditioning token per patch"),
                                                (CondSpec(dim=16, tokens=16), 2, "patch size divisible by 4")])
def test_unet_frame_rejects_what_it_cannot_place(cond, patch, match):
    cls = CATALOG.get("decoders", "unet-frame")
    frame = FrameSpec(channels=1, height=8, width=8, patch_size=patch)
    with pytest.raises(ValueError, match=match):
        cls(cls.config_class(channels=8, multipliers=(1, 2, 2), groups=4), frame, cond)


def test_unet_frame_config_checks_groups():
    cls = CATALOG.get("decoders", "unet-frame")
    with pytest.raises(ValueError, match="6 groups do not divide"):
        cls.config_class(channels=8, multipliers=(1, 2), groups=6)


def test_concat_fuse_starts_as_sum_of_inputs():
    import torch

    cls = CATALOG.get("decoders", "dit-frame")
    frame = FrameSpec(channels=1, height=8, width=8, patch_size=2)
    dec = cls(cls.config_class(width=32, heads=2, combine="concat"), frame, CondSpec(dim=32, tokens=16))
    x, c = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    assert torch.allclose(dec.fuse(torch.cat([x, c], -1)), x + c, atol=1e-6)


def test_kit_catches_a_leaky_encoder():
    """The causality check must fail for an encoder that peeks at the future."""
    import torch

    base = CATALOG.get("encoders", "causal-transformer")

    class Leaky(base):
        plugin_name = "leaky"

        def forward(self, patches):
            out = super().forward(patches)
            return out + patches.mean(dim=(1, 2, 3))[:, None, None, None]

    enc = Leaky(base.example_config(), testing.TINY_FRAME).eval()
    with pytest.raises(AssertionError, match="earlier frames"):
        testing.check_encoder_causality(enc, testing.TINY_FRAME)
    with torch.no_grad(), pytest.raises(AssertionError, match="cached step vs full"):
        testing.check_encoder_cached_matches_full(enc, testing.TINY_FRAME)
