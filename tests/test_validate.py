"""`scdkit validate`: every pipeline dry-built on the meta device and matched with its data set and its
checkpoint folder; every problem one stderr line naming file, TOML table and key, exit 2, no traceback."""

from pathlib import Path

import pytest

from scdkit.checkpoint import read_metadata, save_component
from scdkit.cli import main
from scdkit.errors import CheckpointError, RegistryError
from scdkit.registry import load_registry, validate
from scdkit.train import TrainConfig, Trainer
from tests.test_registry import GOOD, REPO, write

CHECKPOINTED = GOOD + 'checkpoint = "ckpt"\n'


def encoder(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced by ``new`` in the [encoders.enc] table only."""
    head, _, rest = text.partition("[decoders.dec]")
    assert old in head, old
    return head.replace(old, new, 1) + "[decoders.dec]" + rest


def decoder(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` replaced by ``new`` in the [decoders.dec] table only."""
    head, sep, rest = text.partition("[decoders.dec]")
    table, sep2, tail = rest.partition("[schedulers.flow]")
    assert old in table, old
    return head + sep + table.replace(old, new, 1) + sep2 + tail


def run(capsys, path: Path) -> tuple[int, str, list[str]]:
    """Exit code, stdout and the stderr lines of ``scdkit validate path``."""
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err.splitlines()


def api_problems(path: Path) -> list[str]:
    """The problems the library itself collects (static checks, then validate)."""
    with pytest.raises(RegistryError) as info:
        validate(load_registry(path))
    return info.value.problems


def assert_rejected(capsys, path: Path, count: int) -> list[str]:
    """Exit 2 and exactly ``count`` stderr lines, one per problem, each naming the file."""
    code, out, lines = run(capsys, path)
    assert code == 2, (out, lines)
    assert len(lines) == count, lines
    assert all(line.startswith(f"{path}: [") for line in lines), lines
    assert "valid (" not in out
    return lines


def save_pipeline(text: str, folder: Path, roles=("encoder", "decoder"), step: int = 5) -> None:
    """Build pipeline ``p`` of registry ``text`` (fresh weights) and save the given roles into ``folder``."""
    source = folder.parent / "source"
    source.mkdir(exist_ok=True)
    pipeline = load_registry(write(source, text)).build("p", load=False)
    folder.mkdir(exist_ok=True)
    for role, module in pipeline.components.items():
        if role in roles:
            save_component(module, folder / f"{role}.safetensors", role, step=step)


# -- 1. head width that 3-axis RoPE cannot split ------------------------------------------------

@pytest.mark.parametrize("width, heads", [(40, 4), (32, 3)])
def test_head_width_is_reported_on_heads(capsys, tmp_path, width, heads):
    path = write(tmp_path, encoder(GOOD, "width = 32\nlayers = 1\nheads = 2", f"width = {width}\nlayers = 1\nheads = {heads}"))
    problem, cascade = assert_rejected(capsys, path, 2)  # the problem, then the pipeline that uses the encoder
    assert f"{path}: [encoders.enc].heads: " in problem, problem
    assert f"width {width} / heads {heads}" in problem and "3-axis RoPE" in problem
    assert "[pipelines.p].encoder: encoder 'enc' is declared but invalid" in cascade


# -- 2-4. frame against data set ------------------------------------------------------------------

def test_channels_must_match_the_data(capsys, tmp_path):
    path = write(tmp_path, GOOD.replace("height = 8", "channels = 3\nheight = 8"))
    [line] = assert_rejected(capsys, path, 1)
    assert f"{path}: [pipelines.p].channels: " in line
    assert "'moving-digits' has 1 channel, the frame 3" in line


def test_non_square_frame_with_square_data(capsys, tmp_path):
    path = write(tmp_path, GOOD.replace("width = 8\npatch_size", "width = 16\npatch_size"))
    [line] = assert_rejected(capsys, path, 1)
    assert f"{path}: [pipelines.p].width: " in line
    assert "square" in line and "8x16" in line


def test_misspelled_data_set_suggests_the_close_match(capsys, tmp_path):
    path = write(tmp_path, GOOD + 'data = "moving-digit"\n')
    [line] = assert_rejected(capsys, path, 1)
    assert f"{path}: [pipelines.p].data: " in line
    assert "did you mean 'moving-digits'" in line


# -- 5-6. checkpoint folder, checked from file headers --------------------------------------------

def test_checkpoint_of_another_pipeline_names_the_mismatching_fields(capsys, tmp_path):
    other = encoder(GOOD, "width = 32", "width = 64")  # a wider encoder (and so a decoder for a wider contract)
    save_pipeline(other, tmp_path / "ckpt")
    path = write(tmp_path, CHECKPOINTED)
    expected = api_problems(path)
    lines = assert_rejected(capsys, path, len(expected))
    assert lines == expected
    assert all(line.startswith(f"{path}: [pipelines.p].checkpoint: ") for line in lines), lines
    assert any("encoder.safetensors: config.width: checkpoint has 64, registry wants 32" in line for line in lines)
    assert any("decoder.safetensors: contract.dim: checkpoint has 64, registry wants 32" in line for line in lines)


def test_empty_checkpoint_folder_is_not_trained_yet(capsys, tmp_path):
    (tmp_path / "ckpt").mkdir()
    path = write(tmp_path, CHECKPOINTED)
    code, out, lines = run(capsys, path)
    assert code == 0 and lines == []
    assert f"{path}: valid (" in out
    assert "pipeline p: " in out and "not trained yet" in out


def test_checkpoint_folder_missing_a_component(capsys, tmp_path):
    save_pipeline(GOOD, tmp_path / "ckpt", roles=("encoder",))
    path = write(tmp_path, CHECKPOINTED)
    [line] = assert_rejected(capsys, path, 1)
    assert f"{path}: [pipelines.p].checkpoint: " in line
    assert "holds encoder.safetensors but no decoder.safetensors" in line


def test_matching_checkpoint_folder_reports_its_step(capsys, tmp_path):
    save_pipeline(GOOD, tmp_path / "ckpt", step=5)
    path = write(tmp_path, CHECKPOINTED)
    code, out, lines = run(capsys, path)
    assert code == 0 and lines == []
    [note] = [line for line in out.splitlines() if "pipeline p:" in line]
    assert "trained, step 5" in note


def test_no_checkpoint_key_gives_no_note(capsys, tmp_path):
    code, out, lines = run(capsys, write(tmp_path, GOOD))
    assert code == 0 and lines == []
    assert "pipeline p:" not in out


# -- 7. conditioning the data cannot provide ------------------------------------------------------

def test_class_conditioned_decoder_needs_labelled_data(capsys, tmp_path):
    path = write(tmp_path, decoder(GOOD, "heads = 2", "heads = 2\nclasses = 10") + 'data = "bouncing-balls"\n')
    [line] = assert_rejected(capsys, path, 1)
    assert f"{path}: [pipelines.p].data: " in line
    assert "decoder 'dec' takes class labels (10 classes) but the data has none" in line
    path = write(tmp_path, decoder(GOOD, "heads = 2", "heads = 2\nclasses = 5"))  # moving-digits has 10
    [line] = assert_rejected(capsys, path, 1)
    assert "decoder 'dec' takes 5 classes but the data has 10" in line


def test_action_conditioned_encoder_needs_actions_in_the_data(capsys, tmp_path):
    path = write(tmp_path, encoder(GOOD, "heads = 2", "heads = 2\nactions = 4"))
    [line] = assert_rejected(capsys, path, 1)
    assert f"{path}: [pipelines.p].data: " in line
    assert "encoder 'enc' takes actions of width 4 but the data has no actions" in line


# -- 8. a component its constructor refuses for this frame ----------------------------------------

def test_component_refused_by_its_constructor_names_the_role(capsys, tmp_path):
    text = encoder(GOOD, '"causal-transformer"', '"memory-efficient"')
    path = write(tmp_path, encoder(text, "heads = 2", "heads = 2\npool = 3"))  # 8x8 frame, patch 2: 4x4 tokens
    [line] = assert_rejected(capsys, path, 1)
    assert f"{path}: [pipelines.p].encoder: " in line
    assert "encoder 'enc' cannot be built" in line and "pool 3 does not divide the 4x4 token grid" in line


# -- 9. several problems at once ------------------------------------------------------------------

def test_every_dry_build_problem_is_reported(capsys, tmp_path):
    text = (decoder(GOOD, "heads = 2", "heads = 2\nclasses = 5")  # moving-digits has 10 classes
            .replace("height = 8\nwidth = 8", "channels = 3\nheight = 8\nwidth = 16")
            + '\n[encoders.mem]\nplugin = "memory-efficient"\nwidth = 32\nlayers = 1\nheads = 2\npool = 3\n'
            + '\n[pipelines.q]\nencoder = "mem"\ndecoder = "dec"\nscheduler = "flow"\n'
            + 'height = 8\nwidth = 8\npatch_size = 2\n')
    path = write(tmp_path, text)
    lines = assert_rejected(capsys, path, 4)
    assert lines == api_problems(path)
    for key in ("[pipelines.p].channels: ", "[pipelines.p].width: ", "[pipelines.p].data: ", "[pipelines.q].encoder: "):
        assert sum(f"{path}: {key}" in line for line in lines) == 1, (key, lines)


def test_static_and_dry_build_problems_are_reported_together(capsys, tmp_path):
    q = GOOD[GOOD.index("[pipelines.p]"):].replace("[pipelines.p]", "[pipelines.q]")
    text = GOOD + 'data = "moving-digit"\n\n' + q.replace("height = 8", "channels = 3\nheight = 8")
    path = write(tmp_path, text)
    lines = assert_rejected(capsys, path, 2)
    assert any(f"{path}: [pipelines.p].data: " in line and "did you mean 'moving-digits'" in line for line in lines)
    assert any(f"{path}: [pipelines.q].channels: " in line for line in lines)


# -- 10. the shipped registry, and the meta device ------------------------------------------------

def test_shipped_registry_validates_with_trained_checkpoints(capsys):
    path = REPO / "registry.toml"
    code, out, lines = run(capsys, path)
    assert code == 0, lines
    assert lines == []
    assert f"{path}: valid (" in out
    for name in ("scd-digits", "baseline-digits"):
        [note] = [line for line in out.splitlines() if f"pipeline {name}:" in line]
        assert "trained, step" in note, note
    # the distilled decoder's folder holds the decoder alone; its run.json points to scd-digits' encoder
    [note] = [line for line in out.splitlines() if "pipeline scd-digits-fast:" in line]
    assert "trained, encoder step 1800, decoder step" in note, note


def test_validate_builds_on_the_meta_device_only(capsys, tmp_path):
    # ~14.5 billion encoder parameters: only the meta device can hold them in a test
    path = write(tmp_path, encoder(GOOD, "width = 32\nlayers = 1\nheads = 2", "width = 4096\nlayers = 48\nheads = 32"))
    code, out, lines = run(capsys, path)
    assert code == 0 and lines == []
    assert f"{path}: valid (" in out
    pipeline = load_registry(path).dry_build("p")
    tensors = [*pipeline.parameters(), *pipeline.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert sum(t.numel() for t in pipeline.components["encoder"].parameters()) > 10**10


# -- 11. the scheduler samples what the checkpoint was trained to predict ---------------------------

SCHEDULERS = """
[schedulers.ddim-v]
plugin = "ddim"
prediction = "v"
steps = 4

[schedulers.ddpm-v]
plugin = "ddpm"
prediction = "v"
steps = 4

[schedulers.ddim-eps]
plugin = "ddim"
steps = 4
"""


def sampled_with(scheduler: str) -> str:
    """The checkpointed registry with pipeline p sampling with ``scheduler``."""
    return CHECKPOINTED.replace('scheduler = "flow"', f'scheduler = "{scheduler}"') + SCHEDULERS


def test_a_scheduler_must_sample_the_prediction_and_noise_the_checkpoint_was_trained_for(capsys, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    pipeline = load_registry(write(source, sampled_with("ddim-v"))).build("p", load=False)
    trainer = Trainer(pipeline, TrainConfig(steps=1, batch=2, frames=3, eval_every=0), tmp_path / "ckpt",
                      "moving-digits")
    trainer.train_step()
    trainer.save()
    for role in ("encoder", "decoder"):
        metadata = read_metadata(tmp_path / "ckpt" / f"{role}.safetensors")
        assert (metadata["prediction_type"], metadata["noise_family"]) == ("v", "ddpm")

    path = write(tmp_path, sampled_with("ddpm-v"))  # another sampler of the same predictions and noise
    code, out, lines = run(capsys, path)
    assert code == 0 and lines == [], lines
    load_registry(path).build("p")

    decoder = tmp_path / "ckpt" / "decoder.safetensors"
    for scheduler, samples in [("flow", "'flow-match-euler' samples velocity on flow-matching noise"),
                               ("ddim-eps", "'ddim' samples epsilon on ddpm noise")]:
        path = write(tmp_path, sampled_with(scheduler))
        [line] = assert_rejected(capsys, path, 1)
        assert line.startswith(f"{path}: [pipelines.p].scheduler: {decoder}: trained to predict v on ddpm noise, "
                               f"but scheduler plugin {samples}"), line
        with pytest.raises(CheckpointError) as info:
            load_registry(path).build("p")
        assert str(info.value) == line


def test_a_checkpoint_that_records_no_scheduler_predicts_flow_matching_velocity(capsys, tmp_path):
    save_pipeline(GOOD, tmp_path / "ckpt")  # no prediction_type or noise_family in its metadata, as before 0.4
    assert run(capsys, write(tmp_path, sampled_with("flow")))[0] == 0
    path = write(tmp_path, sampled_with("ddim-v"))
    [line] = assert_rejected(capsys, path, 1)
    assert line.startswith(f"{path}: [pipelines.p].scheduler: {tmp_path / 'ckpt' / 'decoder.safetensors'}: trained to "
                           "predict velocity on flow-matching noise, but scheduler plugin 'ddim' samples v"), line
