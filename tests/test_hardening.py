"""Training faults that must not lose or mix data: divergence, torn log lines, two runs on one folder, bad seeds."""

import hashlib
import json

import pytest
import torch

from scdkit.cli import main
from scdkit.errors import TrainingDiverged, UsageError
from scdkit.train import TrainConfig, Trainer, _lock, trim_log
from tests.test_registry import GOOD
from tests.test_training import tiny_pipeline


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors")}


def test_divergence_never_overwrites_the_last_checkpoint(tmp_path):
    config = TrainConfig(steps=4, batch=2, frames=3, eval_every=0, warmup=1, checkpoint_every=2)
    trainer = Trainer(tiny_pipeline(tmp_path), config, tmp_path / "run", "moving-digits")
    (tmp_path / "run").mkdir()
    trainer.run()
    good = digests(tmp_path / "run")
    with torch.no_grad():  # a step that left the weights non-finite although its loss was finite
        next(trainer.pipeline.components["decoder"].parameters()).fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match=r"decoder weights are no longer finite at step 4.*\(step 4\) is untouched"):
        trainer.save()
    with pytest.raises(TrainingDiverged, match=r"the loss became (nan|inf) at step 5"):
        trainer.config = config.model_copy(update={"steps": 6})
        trainer.train_step()
    assert digests(tmp_path / "run") == good


def test_torn_log_lines_are_dropped_on_resume(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n\x00\x00garbage\n{"step": "x"}\n{"step": 3, "loss": 0.5}\n')
    trim_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1]


def test_one_training_run_per_folder(tmp_path):
    held = _lock(tmp_path)
    with pytest.raises(UsageError, match="another `scdkit train` is writing to this folder"):
        _lock(tmp_path)
    del held
    assert _lock(tmp_path) is not None  # released with its holder


@pytest.mark.parametrize("command", [["train", "--out", "x"], ["generate"], ["probe"], ["swap-eval", "--seeds", "-1"]])
def test_negative_seeds_are_one_line_errors(command, capsys):
    args = [*command, "--seed", "-1"] if command[0] != "swap-eval" else command
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "-1" in err[0] and ("greater than or equal to 0" in err[0] or "non-negative" in err[0])


@pytest.mark.parametrize("command", [
    ["generate", "--gif", "{dir}"],
    ["generate", "--gif", "{tmp}/ok.gif", "--video", "/proc/x.mp4"],
    ["probe", "--out", "{file}"],
    ["bench", "--plot", "/proc/sweep.png"],
    ["train", "--out", "{file}"],
])
def test_output_paths_are_checked_before_any_work(tmp_path, command, capsys):
    (tmp_path / "a-file").write_text("keep")
    (tmp_path / "keep.gif").write_text("keep")
    args = [a.format(dir=tmp_path, tmp=tmp_path, file=tmp_path / "a-file") for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scdkit: error: --"), err
    assert (tmp_path / "a-file").read_text() == "keep" and not (tmp_path / "ok.gif").exists()


def test_unreadable_registries_and_exiting_plugins_are_one_line(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 2  # a directory
    assert "cannot read the registry file" in capsys.readouterr().err
    (tmp_path / "quitter.py").write_text("import sys\nsys.exit('bye')\n")
    (tmp_path / "registry.toml").write_text('[scdkit]\nplugin_dirs = ["."]\n' + GOOD)
    assert main(["validate", str(tmp_path / "registry.toml")]) == 0  # the plugin is broken, not the CLI


def test_component_configs_refuse_nan_and_inf(tmp_path, capsys):
    (tmp_path / "registry.toml").write_text(GOOD.replace('plugin = "flow-match-euler"',
                                                         'plugin = "flow-match-euler"\nlogit_mean = nan\nshift = inf'))
    assert main(["validate", str(tmp_path / "registry.toml")]) == 2
    err = capsys.readouterr().err
    assert "schedulers.flow].logit_mean" in err and "shift" in err


def test_ill_shaped_registries_are_listed_not_tracebacks(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('encoders = 5\nscdkit = 5\n[[pipelines]]\nx = 1\n')
    assert main(["validate", str(tmp_path / "r.toml")]) == 2
    err = capsys.readouterr().err
    assert "[encoders]: expected a table" in err and "[scdkit]: expected a table" in err
    assert "[pipelines]: expected a table ([pipelines] or [pipelines.NAME]), got an array of tables" in err


@pytest.mark.parametrize("bad", [{"config": "[1, 2]"}, {"frame": "null"}, {"config": "not json"}])
def test_checkpoint_metadata_that_is_not_an_object_is_refused_by_name(tmp_path, bad):
    from safetensors.torch import save_file

    from scdkit.checkpoint import component_metadata, load_component
    from scdkit.errors import CheckpointError

    encoder = tiny_pipeline(tmp_path).components["encoder"]
    key = next(iter(bad))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(tmp_path / "e.safetensors"),
              metadata=component_metadata(encoder, "encoder", 0) | bad)
    with pytest.raises(CheckpointError, match=f"{key}: the checkpoint's metadata is not a JSON object"):
        load_component(encoder, tmp_path / "e.safetensors", "encoder")


@pytest.mark.parametrize("step", ["abc", "-5", ""])
def test_a_resume_state_with_a_bad_step_is_refused(tmp_path, step):
    from safetensors.torch import load_file, save_file

    from scdkit.errors import CheckpointError
    from scdkit.train import train

    config = TrainConfig(steps=1, batch=2, frames=3, eval_every=0, warmup=1)
    train(tiny_pipeline(tmp_path), config, tmp_path / "run", "moving-digits")
    state = tmp_path / "run" / "train_state.safetensors"
    save_file(load_file(str(state)), str(state), metadata={"step": step})
    with pytest.raises(CheckpointError, match="not a step count"):
        train(tiny_pipeline(tmp_path), config.model_copy(update={"steps": 2}), tmp_path / "run", "moving-digits")


def test_a_missing_plugin_folder_is_a_registry_problem(tmp_path, capsys):
    (tmp_path / "registry.toml").write_text('[scdkit]\nplugin_dirs = ["my_plugins"]\n' + GOOD)
    assert main(["validate", str(tmp_path / "registry.toml")]) == 2
    assert "[scdkit].plugin_dirs: no folder 'my_plugins'" in capsys.readouterr().err


def test_non_finite_generated_frames_are_an_error_and_nothing_is_written(tmp_path):
    from scdkit.errors import ScdkitError
    from scdkit.evaluate import EvalConfig
    from scdkit.generate import run_generate

    pipeline = tiny_pipeline(tmp_path)
    with torch.no_grad():
        next(pipeline.components["decoder"].parameters()).fill_(float("nan"))
    with pytest.raises(ScdkitError, match="generated frames are not finite"):
        run_generate(pipeline, "moving-digits", EvalConfig(clips=1, context=1, frames=1, steps=1),
                     gif=tmp_path / "g.gif")
    assert not (tmp_path / "g.gif").exists()
