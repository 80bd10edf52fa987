"""Issue 13's hostile inputs and faults, cause by cause: divergence, torn log lines, two runs on one folder, bad
seeds, output paths, registries, checkpoint contents and permissions, memory, plugin folders, reproducibility
(kills and signals during a save: tests/test_kills.py)."""

import hashlib
import json
import os
import re

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


# -- kills and signals: tests/test_kills.py; here what they leave behind, and who may read it --------------

def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_temporaries_of_killed_writers_are_removed_when_training_starts(tmp_path):
    import stat

    from scdkit.train import train

    run = tmp_path / "run"
    run.mkdir()
    dead, alive = _dead_pid(), os.getppid()
    stale = run / f".encoder.{dead}.tmp.safetensors"
    kept = [run / f".decoder.{alive}.tmp.safetensors", run / ".notes.tmp", run / f"notes.{dead}.tmp.txt"]
    for path in [stale, *kept]:
        path.write_bytes(b"x" * 10)
    config = TrainConfig(steps=1, batch=2, frames=3, eval_every=0, warmup=1)
    held = _lock(run)  # another run holds the folder: nothing of it is touched
    with pytest.raises(UsageError, match="another `scdkit train`"):
        train(tiny_pipeline(tmp_path), config, run, "moving-digits")
    assert stale.exists()
    del held
    train(tiny_pipeline(tmp_path), config, run, "moving-digits")
    assert not stale.exists() and all(path.exists() for path in kept)  # only our pattern, only dead writers
    umask = os.umask(0)
    os.umask(umask)
    written = ["encoder.safetensors", "decoder.safetensors", "train_state.safetensors", "train_log.jsonl", "run.json"]
    assert {name: stat.S_IMODE((run / name).stat().st_mode) for name in written} == dict.fromkeys(written, 0o666 & ~umask)


def _permissions_enforced() -> bool:
    """False as root (or without POSIX permissions): a file of mode 000 can still be read."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe")
        with open(probe, "w") as fh:
            fh.write("x")
        os.chmod(probe, 0)
        try:
            open(probe).close()
        except PermissionError:
            return True
        return False


needs_permissions = pytest.mark.skipif(not _permissions_enforced(), reason="file permissions are not enforced here (root)")


@needs_permissions
@pytest.mark.parametrize("unreadable", ["folder", "file"])
def test_unreadable_checkpoints_are_one_line_permission_errors(tmp_path, unreadable, capsys):
    registry = tmp_path / "registry.toml"
    registry.write_text(GOOD + 'checkpoint = "ckpt"\n')
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--registry", str(registry), "--steps", "1", "--batch", "1", "--frames", "2",
                 "--eval-every", "0"]) == 0
    target = ckpt if unreadable == "folder" else ckpt / "encoder.safetensors"
    target.chmod(0)
    commands = [["generate", "--registry", str(registry), "--checkpoint", str(ckpt), "--gif", str(tmp_path / "g.gif")],
                ["train", "--registry", str(registry), "--init", str(ckpt), "--out", str(tmp_path / "other")],
                ["validate", str(registry)]]
    try:
        for command in commands:
            capsys.readouterr()
            assert main(command) == 2, command
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "permission denied" in err and str(target) in err, (command, err)
            assert "not found" not in err and "No such file" not in err
    finally:
        target.chmod(0o755)


# -- checkpoint contents ----------------------------------------------------------------------------------

def test_a_wrong_shape_tensor_is_one_line_naming_the_file_and_the_tensor(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    registry = tmp_path / "registry.toml"
    registry.write_text(GOOD + 'checkpoint = "ckpt"\n')
    train = ["train", "--registry", str(registry), "--batch", "1", "--frames", "2", "--eval-every", "0"]
    assert main([*train, "--steps", "1"]) == 0
    for name, key in (("train_state", "decoder.blocks.0.mlp.0.bias"), ("encoder", "blocks.0.mlp.0.bias")):
        path = tmp_path / "ckpt" / f"{name}.safetensors"
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        tensors[key] = torch.zeros(tensors[key].numel() + 1)  # the right metadata, a wrong shape
        save_file(tensors, str(path), metadata=metadata)
    capsys.readouterr()
    assert main([*train, "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after the line that says where training runs
    assert "Traceback" not in err and last.startswith("scdkit: error: ") and "train_state.safetensors cannot be resumed" in last
    assert last.endswith("train_state.safetensors cannot be resumed: decoder.blocks.0.mlp.0.bias: checkpoint has shape "
                         "[129], the component [128]"), err
    assert main(["generate", "--registry", str(registry), "--gif", str(tmp_path / "g.gif")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "encoder.safetensors does not match" in err, err
    assert "blocks.0.mlp.0.bias: checkpoint has shape [129], the component [128]" in err


def test_plugin_version_within_a_weight_family_follows_the_major_version_rule(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from scdkit.checkpoint import component_metadata, load_component, metadata_mismatches, save_component
    from scdkit.errors import CheckpointError

    encoder = tiny_pipeline(tmp_path).components["encoder"]  # causal-transformer, weight family causal-transformer
    assert encoder.weight_family and encoder.plugin_version == "0.1.0"
    expected = component_metadata(encoder, "encoder", 0)
    other_member = expected | {"plugin": "another-member"}  # same family, same architecture
    assert metadata_mismatches(other_member | {"plugin_version": "0.7.3"}, expected) == []  # same major: loads
    refused = metadata_mismatches(other_member | {"plugin_version": "1.0.0"}, expected)
    assert refused == ["plugin_version: checkpoint has another-member '1.0.0', registry wants causal-transformer "
                       "'0.1.0': members of weight family 'causal-transformer' load one another's checkpoints only "
                       "at the same major version"]
    # the same plugin at another version: refused, family or not (it used to load silently)
    path = tmp_path / "e.safetensors"
    save_component(encoder, path, "encoder")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata=metadata | {"plugin_version": "0.1.1"})
    with pytest.raises(CheckpointError, match=r"plugin_version: checkpoint has '0.1.1', registry wants '0.1.0'"):
        load_component(encoder, path, "encoder")


# -- resources and reporting ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["generate", "--clips", "1000000000"], ["generate", "--frames", "1000000000"],
    ["generate", "--context", "1000000000"], ["generate", "--steps", "1000000000000"],
    ["train", "--batch", "100000000000", "--out", "{tmp}/run"], ["train", "--frames", "100000000000", "--out", "{tmp}/run"],
    ["probe", "--pipeline", "p", "--checkpoint", "{tmp}", "--clips", "100000000000"],
    ["swap-eval", "--clips", "100000000000"], ["bench", "--context-frames", "100000000000"],
])
def test_work_that_cannot_fit_in_memory_is_refused_up_front_saying_how_much(tmp_path, command, capsys):
    registry = tmp_path / "registry.toml"
    registry.write_text(GOOD)
    args = [a.format(tmp=tmp_path) for a in command] + ["--registry", str(registry)]
    if command[0] == "probe":  # probe loads trained weights: give it some
        from scdkit.checkpoint import save_component

        for role, module in tiny_pipeline(tmp_path).components.items():
            save_component(module, tmp_path / f"{role}.safetensors", role)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs at least" in err and "of memory, more than the" in err, err
    assert re.search(r"at least [\d.]+ (TB|PB)|at least about 10\^\d+ bytes", err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 400000000000 bytes."),
    MemoryError("Unable to allocate 2.79 TiB for an array with shape (1000000000, 12, 1, 8, 8) and data type float32"),
    getattr(torch, "OutOfMemoryError", RuntimeError)("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_an_allocator_error_is_one_line(tmp_path, monkeypatch, error, capsys):
    import scdkit.generate

    def run_generate(*args, **kwargs):
        raise error
    monkeypatch.setattr(scdkit.generate, "run_generate", run_generate)
    (tmp_path / "registry.toml").write_text(GOOD)
    assert main(["generate", "--registry", str(tmp_path / "registry.toml"), "--gif", str(tmp_path / "g.gif")]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # it happened during the work: after the line that says where it runs
    assert "Traceback" not in err and last.startswith("scdkit: error: out of memory (an allocation of "), err
    assert re.search(r"allocation of (372\.5 GB|2\.79 TiB|20\.00 GiB)\)", err), err


def test_curve_frames_below_the_timed_steps_are_one_line(capsys):
    assert main(["bench", "--encoders", "x", "--curve-frames", "16", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "scdkit: error: --curve-frames 4: each frame count must be at least 7 (each point ends with 2 " \
                  "warm-up and 5 timed steps)"


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback_above_the_one_line(tmp_path, how, monkeypatch, capsys):
    missing = ["generate", "--registry", str(tmp_path / "none.toml")]
    assert main(missing) == 2
    assert "Traceback" not in capsys.readouterr().err
    if how == "environment":
        monkeypatch.setenv("SCDKIT_DEBUG", "1")
    assert main(["--debug", *missing] if how == "flag" else missing) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "RegistryError" in err
    assert err.strip().splitlines()[-1] == f"scdkit: error: {tmp_path / 'none.toml'}: registry file not found"


def test_the_same_seed_gives_bit_identical_fresh_runs(tmp_path, capsys):
    from safetensors.torch import load_file

    (tmp_path / "registry.toml").write_text(GOOD)
    for run in ("a", "b"):
        torch.manual_seed(int(run == "b") + 123)  # whatever the global generator held before
        assert main(["--threads", "1", "train", "--registry", str(tmp_path / "registry.toml"), "--steps", "3",
                     "--batch", "2", "--frames", "3", "--eval-every", "0", "--seed", "0", "--out", str(tmp_path / run)]) == 0
    for name in ("encoder.safetensors", "decoder.safetensors", "train_state.safetensors"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_non_finite_probe_figures_are_an_error(tmp_path):
    from scdkit.errors import NotFinite
    from scdkit.probe import ProbeConfig, run_probe

    pipeline = tiny_pipeline(tmp_path)
    assert run_probe(pipeline, "moving-digits", ProbeConfig(context=1, clips=1, steps=2)).layers == 1
    with torch.no_grad():
        next(pipeline.components["decoder"].parameters()).fill_(float("nan"))
    with pytest.raises(NotFinite, match="the probe's feature similarity and attention shares and denoised frame are "
                                        "not finite") as info:
        run_probe(pipeline, "moving-digits", ProbeConfig(context=1, clips=1, steps=2))
    assert info.value.exit_code == 2


# -- plugin folders --------------------------------------------------------------------------------------

MARKER_PLUGIN = "from pathlib import Path\nPath(__file__).with_suffix('.ran').touch()\n"


@pytest.mark.parametrize("where", ["../outside", "absolute"])
def test_plugin_dirs_outside_the_registry_folder_need_the_opt_in(tmp_path, where, capsys):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "plugin.py").write_text(MARKER_PLUGIN)
    (tmp_path / "reg").mkdir()
    folder = "../outside" if where == "../outside" else str(tmp_path / "outside")
    registry = tmp_path / "reg" / "registry.toml"
    registry.write_text(f'[scdkit]\nplugin_dirs = ["{folder}"]\n' + GOOD)
    assert main(["validate", str(registry)]) == 2
    err = capsys.readouterr().err
    assert f"[scdkit].plugin_dirs: '{folder}' is outside the folder of {registry}" in err and "allow_import_paths" in err
    assert not (tmp_path / "outside" / "plugin.ran").exists()  # refused before anything ran
    registry.write_text(f'[scdkit]\nallow_import_paths = true\nplugin_dirs = ["{folder}"]\n' + GOOD)
    assert main(["validate", str(registry)]) == 0
    assert (tmp_path / "outside" / "plugin.ran").exists()


def test_a_base_registrys_own_plugin_dirs_are_inside(tmp_path, capsys):
    """[scdkit].extends makes the base's plugin_dirs absolute paths in the base's folder: still inside."""
    (tmp_path / "base" / "plugins").mkdir(parents=True)
    (tmp_path / "base" / "plugins" / "plugin.py").write_text(MARKER_PLUGIN)
    (tmp_path / "base" / "registry.toml").write_text('[scdkit]\nplugin_dirs = ["plugins"]\n' + GOOD)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "registry.toml").write_text('[scdkit]\nextends = "../base/registry.toml"\n')
    assert main(["validate", str(tmp_path / "mine" / "registry.toml")]) == 0
    assert (tmp_path / "base" / "plugins" / "plugin.ran").exists()
