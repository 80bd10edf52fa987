"""Kills and signals during training (issue 13). A `scdkit train` process killed (as by kill -9) at any point
of a save never leaves a checkpoint that resume or `generate` would use with mixed steps, and resuming it
ends bit-identical to a run that was never killed; SIGTERM saves and stops like Ctrl-C; the log keeps the
line of every step a run resumes from.

Each fault is a real `scdkit train` process that the fault hook (``scdkit.train.fault_point``) stops at a named
point of step 4 (checkpoints every 2 steps, 6 steps in all): no sleeps. The processes are forked from a
fork server that imported scdkit once (a fresh interpreter, no threads), so that they start in
milliseconds rather than seconds; they all start at once."""

import json
import multiprocessing
import os
import re
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from scdkit.cli import main
from tests.test_registry import GOOD

TRAIN = ["--threads", "1", "train", "--steps", "6", "--batch", "2", "--frames", "3", "--eval-every", "0",
         "--checkpoint-every", "2", "--seed", "0"]
FAULTS = {  # name: (hook variable, point)
    "kill after the log line": ("SCDKIT_TEST_STOP_AT", "after-log@4"),
    "kill after the state": ("SCDKIT_TEST_STOP_AT", "after-state@4"),
    "kill after the encoder": ("SCDKIT_TEST_STOP_AT", "after-encoder@4"),
    "kill after the decoder": ("SCDKIT_TEST_STOP_AT", "after-decoder@4"),
    "SIGTERM after step 3": ("SCDKIT_TEST_TERM_AT", "after-step@3"),
}
FILES = ("encoder.safetensors", "decoder.safetensors", "train_state.safetensors")


def scdkit_process(argv: list[str], variable: str, point: str, output: str) -> None:
    """The body of a faulty run: `scdkit ARGV` with the fault hook set, its output in the file ``output``,
    its exit code the process's."""
    os.environ[variable] = point
    with open(output, "w") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh
        code = main(argv)
        fh.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every faulty run, started at once; meanwhile the same run never interrupted, in this process."""
    root = tmp_path_factory.mktemp("kills")
    registry = root / "registry.toml"
    registry.write_text(GOOD)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["scdkit.cli", "scdkit.train", "scdkit.registry", "tests.test_kills"])
    started = {}
    for i, (name, (variable, point)) in enumerate(FAULTS.items()):
        out, output = root / f"run{i}", root / f"run{i}.txt"
        argv = [*TRAIN, "--registry", str(registry), "--out", str(out)]
        started[name] = (out, output, context.Process(target=scdkit_process, args=(argv, variable, point, str(output))))
        started[name][2].start()
    reference = root / "reference"
    assert main([*TRAIN, "--registry", str(registry), "--out", str(reference)]) == 0
    finished = {}
    for name, (out, output, process) in started.items():
        process.join(timeout=300)
        finished[name] = (out, process.exitcode, output.read_text())
    return registry, reference, finished


def steps(folder):
    found = {}
    for name in FILES:
        with safe_open(str(folder / name), "pt") as f:
            found[name] = int(f.metadata()["step"])
    return found


def logged(folder):
    return [json.loads(line)["step"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


def generate(registry, folder, capsys):
    """`scdkit generate --checkpoint folder` (tiny): the exit code and stderr."""
    capsys.readouterr()
    code = main(["--threads", "1", "generate", "--registry", str(registry), "--checkpoint", str(folder), "--clips", "1",
                 "--context", "1", "--frames", "1", "--steps", "1", "--gif", str(folder.parent / f"{folder.name}.gif")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_during_a_save_never_mixes_steps_and_resume_ends_bit_identical(runs, fault, capsys):
    registry, reference, finished = runs
    out, code, err = finished[fault]
    if fault.startswith("SIGTERM"):  # handled: step 3 finished, saved, then a clean stop
        assert code == 130 and "interrupted: SIGTERM at step 3: saved a checkpoint" in err, err
        assert set(steps(out).values()) == {3} and logged(out) == [1, 2, 3]
    else:
        assert code == 137, err
        assert 4 in logged(out)  # the log line is written before anything of the save

    # generate uses files of one step, or refuses in one line
    code, err = generate(registry, out, capsys)
    used = dict(re.findall(r"^(encoder|decoder): .*?, step (\d+),", err, re.M | re.S))  # lines may wrap
    if fault == "kill after the encoder":  # encoder.safetensors of step 4 beside the decoder of step 2
        assert code == 2 and "different steps of one training run" in err and len(err.strip().splitlines()) == 1, err
    else:
        assert code == 0 and used.keys() == {"encoder", "decoder"} and len(set(used.values())) == 1, err

    # resume: from the training state, with the component files made whole, to the end
    capsys.readouterr()
    assert main([*TRAIN, "--registry", str(registry), "--out", str(out)]) == 0
    resumed = capsys.readouterr().out
    assert ("rewrote encoder.safetensors, decoder.safetensors" in resumed) == (fault == "kill after the state")
    assert logged(out) == [1, 2, 3, 4, 5, 6]
    assert set(steps(out).values()) == {6}
    for name in FILES:
        a, b = load_file(str(out / name)), load_file(str(reference / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_resume_repairs_component_files_from_the_training_state(tmp_path):
    """What a kill after the state leaves, made by hand: the state of step 4 beside component files of step 2.
    Resume rewrites the files from the state (its EMA weights) before anything else."""
    from scdkit.checkpoint import read_metadata, weights_digest
    from scdkit.train import TrainConfig, train
    from tests.test_training import tiny_pipeline

    config = TrainConfig(steps=2, batch=2, frames=3, eval_every=0, checkpoint_every=2)
    run = tmp_path / "run"
    train(tiny_pipeline(tmp_path), config, run, "moving-digits")
    old = {name: (run / name).read_bytes() for name in FILES[:2]}
    train(tiny_pipeline(tmp_path), config.model_copy(update={"steps": 4}), run, "moving-digits")
    for name, data in old.items():
        (run / name).write_bytes(data)
    assert steps(run) == {"encoder.safetensors": 2, "decoder.safetensors": 2, "train_state.safetensors": 4}
    trainer = train(tiny_pipeline(tmp_path), config.model_copy(update={"steps": 4}), run, "moving-digits")
    assert trainer.step == 4 and set(steps(run).values()) == {4}
    for role in ("encoder", "decoder"):
        assert read_metadata(run / f"{role}.safetensors")["weights_sha256"] == weights_digest(trainer.ema.components[role])


def test_ctrl_c_finishes_the_step_saves_and_stops_like_sigterm(tmp_path, monkeypatch):
    import signal

    from scdkit.errors import Interrupted
    from scdkit.train import TrainConfig, Trainer, train
    from tests.test_training import tiny_pipeline

    step = Trainer.train_step

    def interrupted_step(self):
        loss = step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2
        return loss

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    config = TrainConfig(steps=6, batch=2, frames=3, eval_every=0, checkpoint_every=100)
    with pytest.raises(Interrupted, match=r"SIGINT at step 2: saved a checkpoint in .*; the same command resumes"):
        train(tiny_pipeline(tmp_path), config, tmp_path / "run", "moving-digits")
    assert set(steps(tmp_path / "run").values()) == {2} and logged(tmp_path / "run") == [1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_training_state_without_ema_weights_resumes_only_beside_files_of_its_step(tmp_path):
    """States written before the EMA weights moved into them: the component files hold those, so they must
    be of the state's step (resume cannot repair them)."""
    from safetensors.torch import save_file

    from scdkit.errors import CheckpointError
    from scdkit.train import TrainConfig, train
    from tests.test_training import tiny_pipeline

    config = TrainConfig(steps=2, batch=2, frames=3, eval_every=0, checkpoint_every=1)
    run = tmp_path / "run"
    train(tiny_pipeline(tmp_path), config, run, "moving-digits")
    state = run / "train_state.safetensors"
    with safe_open(str(state), "pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in load_file(str(state)).items() if not k.startswith("ema.")}, str(state), metadata=metadata)
    later = config.model_copy(update={"steps": 3})
    assert train(tiny_pipeline(tmp_path), later, run, "moving-digits").step == 3  # files of step 2: resumed
    save_file({k: v for k, v in load_file(str(state)).items() if not k.startswith("ema.")}, str(state),
              metadata=metadata)  # a state that says step 2, beside files of step 3
    with pytest.raises(CheckpointError, match=r"encoder.safetensors is not from step 2 of .*train_state.safetensors"):
        train(tiny_pipeline(tmp_path), later, run, "moving-digits")
