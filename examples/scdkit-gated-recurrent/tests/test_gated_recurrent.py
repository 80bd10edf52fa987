"""The gated-recurrent encoder against scdkit's conformance kit and the shipped scd-digits pipeline."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch

from scdkit.checkpoint import load_component
from scdkit.interfaces import FrameSpec
from scdkit.pluginmanager import load_catalog
from scdkit.registry import load_registry
from scdkit.testing import TINY_FRAME, check_encoder
from scdkit_gated_recurrent import GatedRecurrentConfig, GatedRecurrentEncoder

PIPELINE = "scd-digits"
#: The registry table the README documents.
TABLE = """
[encoders.gru-s]
plugin = "gated-recurrent"
width = 128
layers = 3
heads = 4
"""


def shipped_registry() -> Path:
    """scdkit's registry.toml, in a folder above this file (the example lives in the scdkit repo)."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "registry.toml").is_file() and (folder / "scdkit").is_dir():
            return folder / "registry.toml"
    pytest.skip("scdkit's registry.toml not found above this file (example installed outside the scdkit repo)")


def installed() -> bool:
    try:
        importlib.metadata.distribution("scdkit-gated-recurrent")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_conformance():
    check_encoder(GatedRecurrentEncoder)


def test_conformance_at_the_pipeline_frame():
    check_encoder(GatedRecurrentEncoder, GatedRecurrentConfig(width=64, layers=3, heads=4),
                  FrameSpec(channels=1, height=32, width=32, patch_size=4))


def test_config_rejects_a_head_width_rope_cannot_split():
    with pytest.raises(ValueError, match="heads"):
        GatedRecurrentConfig(width=96, heads=4)


@torch.no_grad()
def test_state_does_not_grow_with_frames():
    encoder = GatedRecurrentEncoder(GatedRecurrentEncoder.example_config(), TINY_FRAME).eval()
    state = encoder.new_state(2, max_frames=4)
    assert state.nbytes() == encoder.new_state(2, max_frames=1000).nbytes(), "max_frames changed the state"
    size = state.nbytes()
    expected = 2 * encoder.config.layers * 2 * TINY_FRAME.tokens * encoder.config.width * 4  # h and z, fp32
    assert size == expected
    patches = torch.randn(2, 40, TINY_FRAME.tokens, TINY_FRAME.patch_dim)
    for f in range(40):  # well past max_frames: nothing is preallocated per frame
        encoder.step(state, patches[:, f:f + 1])
        assert state.nbytes() == size, f"state grew to {state.nbytes()} bytes after {f + 1} frames"
    assert state.frames == 40


def test_contract_matches_the_shipped_decoder():
    registry = load_registry(shipped_registry())
    frame = registry.entry(PIPELINE).frame
    decoder = registry.build_components(PIPELINE)["decoder"]  # built for the pipeline's own encoder
    encoder = GatedRecurrentEncoder(GatedRecurrentConfig(width=128, layers=3, heads=4), frame)
    assert encoder.contract == decoder.contract
    checkpoint = registry.checkpoint_dir(PIPELINE) / "decoder.safetensors"
    if not checkpoint.exists():
        pytest.skip(f"{checkpoint} not found: contract checked, trained weights not")
    load_component(decoder, checkpoint, "decoder")  # the trained decoder's weights fit that contract
    patches = torch.randn(2, 3, frame.tokens, frame.patch_dim)
    with torch.no_grad():
        cond = encoder(patches)
        out = decoder(patches[:, 1], torch.full((2,), 0.5), cond[:, 0])
    assert out.shape == patches[:, 1].shape


@pytest.mark.skipif(not installed(), reason="not installed: pip install -e examples/scdkit-gated-recurrent")
def test_registered_through_the_entry_point():
    catalog = load_catalog()
    registration = catalog.components["encoders"]["gated-recurrent"]
    assert registration.obj is GatedRecurrentEncoder
    assert registration.provider == "scdkit-gated-recurrent:gated-recurrent"
    assert not [b for b in catalog.broken if "gated" in b.provider]


@pytest.mark.skipif(not installed(), reason="not installed: pip install -e examples/scdkit-gated-recurrent")
def test_replaces_the_encoder_of_the_shipped_pipeline(tmp_path):
    shipped = shipped_registry()
    text = shipped.read_text().replace('checkpoint = "', f'checkpoint = "{shipped.parent.as_posix()}/')
    registry_path = tmp_path / "registry.toml"
    registry_path.write_text(text + TABLE)
    registry = load_registry(registry_path)
    pipeline = registry.build(PIPELINE, encoder="gru-s", load=False)  # scd-digits' checkpoint holds causal-s
    encoder, decoder = pipeline.components["encoder"], pipeline.components["decoder"]
    assert isinstance(encoder, GatedRecurrentEncoder)
    checkpoint = registry.checkpoint_dir(PIPELINE) / "decoder.safetensors"
    if not checkpoint.exists():
        pytest.skip(f"{checkpoint} not found")
    load_component(decoder, checkpoint, "decoder")  # the trained decoder, under the new encoder
    loss = pipeline.loss(torch.rand(2, 3, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    # the constant adaLN input reaches the output only through zero-initialised adaLN weights: no gradient yet
    silent = [name for name, p in encoder.named_parameters()
              if name != "clean" and (p.grad is None or not p.grad.abs().sum())]
    assert not silent, f"no gradient reaches {silent}"
