"""Safetensors checkpoints: metadata checked against the registry, atomic writes, bad files refused."""

import os
import stat

import pytest
import torch

from scdkit.checkpoint import load_component, read_metadata, save_component
from scdkit.errors import CheckpointError
from scdkit.interfaces import FrameSpec
from scdkit.plugins.encoders.causal_transformer import CausalTransformerEncoder
from scdkit.testing import assert_same_weights

FRAME = FrameSpec(channels=1, height=8, width=8, patch_size=2)


def encoder(**overrides):
    config = CausalTransformerEncoder.config_class(**(CausalTransformerEncoder.example_config().model_dump() | overrides))
    return CausalTransformerEncoder(config, FRAME)


def test_metadata_is_complete(tmp_path):
    save_component(encoder(), tmp_path / "e.safetensors", "encoder", step=42)
    meta = read_metadata(tmp_path / "e.safetensors")
    assert meta["plugin"] == "causal-transformer" and meta["step"] == "42" and meta["role"] == "encoder"
    assert {"plugin_version", "config", "contract", "frame", "scdkit_version"} <= meta.keys()


def test_checkpoints_get_normal_permissions(tmp_path):
    path = tmp_path / "e.safetensors"
    save_component(encoder(), path, "encoder")  # safetensors itself creates files 0600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]  # no temporary file left


def test_mismatch_lists_every_differing_field(tmp_path):
    save_component(encoder(), tmp_path / "e.safetensors", "encoder")
    with pytest.raises(CheckpointError) as info:
        load_component(encoder(width=64, layers=3), tmp_path / "e.safetensors", "encoder")
    message = str(info.value)
    assert "config.width: checkpoint has 32, registry wants 64" in message
    assert "config.layers: checkpoint has 2, registry wants 3" in message
    assert "contract.dim" in message


def test_garbage_and_missing_files_are_refused(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_component(encoder(), tmp_path / "bad.safetensors", "encoder")
    with pytest.raises(CheckpointError, match="not found"):
        load_component(encoder(), tmp_path / "missing.safetensors", "encoder")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import scdkit.checkpoint as ckpt

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", explode)
    with pytest.raises(OSError):
        save_component(encoder(), tmp_path / "e.safetensors", "encoder")
    assert list(tmp_path.iterdir()) == []


def test_round_trip_restores_weights(tmp_path):
    a, b = encoder(), encoder()
    with torch.no_grad():
        a.clean.add_(1.0)
    save_component(a, tmp_path / "e.safetensors", "encoder")
    load_component(b, tmp_path / "e.safetensors", "encoder")
    assert_same_weights(b, a)


def test_a_config_key_added_later_matches_its_default_in_an_older_checkpoint():
    import json

    from pydantic import Field

    from scdkit.checkpoint import config_defaults, metadata_mismatches
    from scdkit.interfaces import ComponentConfig

    class Newer(ComponentConfig):
        width: int = 8
        scales: tuple[int, ...] = (1, 2)  # options added after the checkpoint was written
        extra_layers: list[int] = Field(default_factory=list)

    module = type("M", (), {"config_class": Newer})()
    defaults = config_defaults(module)
    assert defaults == {"width": 8, "scales": [1, 2], "extra_layers": []}  # as the config's JSON dump writes them
    expected = {"config": Newer().model_dump_json()}
    assert metadata_mismatches({"config": json.dumps({"width": 8})}, expected, defaults) == []
    changed = {"config": Newer(scales=(3,)).model_dump_json()}
    assert metadata_mismatches({"config": json.dumps({"width": 8})}, changed, defaults) == [
        "config.scales: checkpoint has [1, 2], registry wants [3]"]
    assert metadata_mismatches({"config": json.dumps({"width": 8, "gone": 1})}, expected, defaults) == [
        "config.gone: checkpoint has 1, registry wants 'absent'"]
