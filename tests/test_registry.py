"""Registry validation: every problem reported, each naming file, TOML path and expectation."""

from pathlib import Path

import pytest
import torch

from scdkit.errors import RegistryError
from scdkit.pipeline import Recipe
from scdkit.registry import load_registry

REPO = Path(__file__).resolve().parents[1]

GOOD = """
[encoders.enc]
plugin = "causal-transformer"
width = 32
layers = 1
heads = 2

[decoders.dec]
plugin = "dit-frame"
width = 32
layers = 1
heads = 2

[schedulers.flow]
plugin = "flow-match-euler"
steps = 4

[pipelines.p]
encoder = "enc"
decoder = "dec"
scheduler = "flow"
height = 8
width = 8
patch_size = 2
"""


def write(tmp_path, text):
    path = tmp_path / "registry.toml"
    path.write_text(text)
    return path


def problems(tmp_path, text) -> list[str]:
    with pytest.raises(RegistryError) as info:
        load_registry(write(tmp_path, text))
    return info.value.problems


def test_shipped_registry_is_valid_and_builds():
    registry = load_registry(REPO / "registry.toml")
    pipeline = registry.build(registry.default_pipeline, load=False)
    frame = pipeline.frame
    loss = pipeline.loss(torch.rand(1, 3, frame.channels, frame.height, frame.width), Recipe())
    assert torch.isfinite(loss) and loss > 0  # encoder, decoder and scheduler fit together end to end


def test_good_registry_builds(tmp_path):
    pipeline = load_registry(write(tmp_path, GOOD)).build("p", load=False)
    assert pipeline.components["encoder"].contract.tokens == 16
    assert pipeline.scheduler.config.steps == 4


def test_unknown_plugin_suggests_close_match(tmp_path):
    problem, cascade = problems(tmp_path, GOOD.replace('"causal-transformer"', '"causal-transfomer"'))
    assert "[pipelines.p].encoder: encoder 'enc' is declared but invalid" in cascade
    assert "registry.toml: [encoders.enc].plugin" in problem
    assert "did you mean 'causal-transformer'" in problem


def test_unknown_key_suggests_field(tmp_path):
    found = problems(tmp_path, GOOD.replace("layers = 1\nheads = 2\n\n[decoders", "layres = 1\nheads = 2\n\n[decoders"))
    assert any("[encoders.enc].layres: unknown key; did you mean 'layers'" in p for p in found), found


def test_every_problem_is_collected(tmp_path):
    text = (GOOD.replace("width = 32\nlayers = 1\nheads = 2\n\n[decoders", "width = -3\nlayers = 1\nheads = 2\n\n[decoders")
            .replace('scheduler = "flow"', 'scheduler = "flwo"')
            + '\n[encoderz.x]\nplugin = "a"\n')
    found = problems(tmp_path, text)
    assert len(found) == 4, found
    assert any("[encoders.enc].width" in p and "greater than 0" in p for p in found)
    assert any("[pipelines.p].scheduler" in p and "did you mean 'flow'" in p for p in found)
    assert any("[encoderz]: unknown table; did you mean 'encoders'" in p for p in found)
    assert any("[pipelines.p].encoder" in p and "declared but invalid" in p for p in found)


def test_wrong_type_names_the_value(tmp_path):
    problem, _ = problems(tmp_path, GOOD.replace("steps = 4", 'steps = "many"'))
    assert "[schedulers.flow].steps" in problem and "'many'" in problem


def test_import_paths_are_off_by_default(tmp_path):
    text = GOOD.replace('"causal-transformer"', '"scdkit.plugins.encoders.causal_transformer:CausalTransformerEncoder"')
    problem, _ = problems(tmp_path, text)
    assert "allow_import_paths = true" in problem
    registry = load_registry(write(tmp_path, "[scdkit]\nallow_import_paths = true\n" + text))
    assert registry.build("p", load=False).components["encoder"].plugin_name == "causal-transformer"


def test_bad_toml_and_missing_file(tmp_path):
    [problem] = problems(tmp_path, "[encoders.x\n")
    assert "not valid TOML" in problem
    with pytest.raises(RegistryError, match="not found"):
        load_registry(tmp_path / "nope.toml")


def test_pipeline_needs_encoder_and_decoder_or_model(tmp_path):
    found = problems(tmp_path, GOOD.replace('decoder = "dec"\n', ""))
    assert any("either encoder and decoder" in p for p in found)


def test_frame_geometry_must_divide(tmp_path):
    found = problems(tmp_path, GOOD.replace("patch_size = 2", "patch_size = 3"))
    assert any("[pipelines.p]" in p and "not divisible by patch_size 3" in p for p in found)


def test_plugin_dirs_load_local_plugins(tmp_path):
    (tmp_path / "myplugins").mkdir()
    (tmp_path / "myplugins" / "wide.py").write_text(
        "from scdkit.hookspecs import hookimpl\n"
        "from scdkit.plugins.encoders.causal_transformer import CausalTransformerEncoder\n"
        "class Wide(CausalTransformerEncoder):\n    plugin_name = 'wide-local'\n"
        "@hookimpl\ndef scdkit_register_encoders(register):\n    register(Wide)\n"
    )
    text = '[scdkit]\nplugin_dirs = ["myplugins"]\n' + GOOD.replace('"causal-transformer"', '"wide-local"')
    assert load_registry(write(tmp_path, text)).build("p", load=False).components["encoder"].plugin_name == "wide-local"


def test_a_registry_extends_another_with_its_paths_relative_to_the_base(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "registry.toml").write_text(GOOD.replace('[pipelines.p]', '[pipelines.p]\ncheckpoint = "ckpt"'))
    (tmp_path / "mine").mkdir()
    mine = tmp_path / "mine" / "registry.toml"
    mine.write_text('[scdkit]\nextends = "../base/registry.toml"\n\n'
                    '[encoders.enc2]\nplugin = "causal-transformer"\nwidth = 16\nlayers = 2\nheads = 1\n\n'
                    '[schedulers.flow]\nplugin = "flow-match-euler"\nsteps = 3\n')
    registry = load_registry(mine)
    assert set(registry.components["encoders"]) == {"enc", "enc2"}  # the base's tables plus this file's
    assert registry.components["schedulers"]["flow"].config.steps == 3  # a table given here replaces the base's
    assert registry.checkpoint_dir("p").resolve() == (tmp_path / "base" / "ckpt").resolve()
    (tmp_path / "base" / "registry.toml").write_text('[scdkit]\nextends = "../mine/registry.toml"\n' + GOOD)
    with pytest.raises(RegistryError, match="a cycle"):
        load_registry(mine)
    mine.write_text('[scdkit]\nextends = "../nowhere.toml"\n')
    with pytest.raises(RegistryError, match="nowhere.toml: registry file not found"):
        load_registry(mine)
