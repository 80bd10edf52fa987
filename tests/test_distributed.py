"""Training under torchrun (``scdkit.distributed``): real ``torchrun --nproc-per-node 2 --standalone -m scdkit.cli
train`` processes on the CPU (gloo), all started at once, against a single-process run in this process.

- One step of 2 processes equals one single-process step with ``--accumulate 2`` on the same global batch (the same
  micro-batches with the same noise): gradients (test hook ``SCDKIT_TEST_GRADS_DIR``) and weights within 1e-6.
- SIGTERM to one rank (``SCDKIT_TEST_TERM_AT`` with ``SCDKIT_TEST_FAULT_RANK``) stops every rank at the same step,
  saved; resumed under torchrun, the run ends bit-identical to the uninterrupted one. Resumed from the same
  checkpoint with ``--parallel fsdp`` (FSDP2 on gloo: loading, sharded steps, gathering saves and the EMA), it ends
  within 1e-6 of it.
- The log records the world size; a ``--batch`` the processes cannot share is one line, exit 2.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from scdkit.cli import main
from tests.test_registry import GOOD

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--steps", "3", "--batch", "4", "--frames", "3", "--eval-every", "2", "--eval-steps", "1",
         "--checkpoint-every", "2", "--seed", "0", "--data", "bouncing-balls"]
FILES = ("encoder.safetensors", "decoder.safetensors", "train_state.safetensors")
RUNS = {  # name: (options, environment); started at once
    "ddp": ([], {"SCDKIT_TEST_GRADS_DIR": "{root}/ddp-grads"}),
    "ddp stopped": ([], {"SCDKIT_TEST_TERM_AT": "after-step@1", "SCDKIT_TEST_FAULT_RANK": "1"}),
    "bad batch": (["--batch", "3"], {}),
}
#: then, each from a copy of what "ddp stopped" left: the checkpoint is the same file whichever way it was trained
RESUMED = {"ddp": [], "fsdp": ["--parallel", "fsdp"]}


def torchrun(root: Path, name: str, options: list[str], environment: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """``torchrun --nproc-per-node 2 --standalone -m scdkit.cli train`` into ``root/NAME``, output in ``root/NAME.txt``."""
    folder = name.replace(" ", "-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCDKIT_TEST_")}
    env |= {"OMP_NUM_THREADS": "1"} | {k: v.format(root=root) for k, v in environment.items()}
    output = root / f"{folder}.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "-m", "scdkit.cli", *TRAIN, "--registry", str(root / "registry.toml"), "--out", str(root / folder), *options]
    with open(output, "w") as fh:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT), output


def finish(process: subprocess.Popen, output: Path) -> tuple[int, str]:
    process.wait(timeout=300)
    return process.returncode, output.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every torchrun run, the stopped one resumed twice; meanwhile the single-process reference in this process.
    Each run's exit code and output by name; for "ddp stopped" also the steps of its files and of its log."""
    root = tmp_path_factory.mktemp("torchrun")
    (root / "registry.toml").write_text(GOOD)
    started = {name: torchrun(root, name, *run) for name, run in RUNS.items()}
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SCDKIT_TEST_GRADS_DIR", str(root / "single-grads"))
            assert main(["--threads", "1", *TRAIN, "--registry", str(root / "registry.toml"), "--out",
                         str(root / "single"), "--accumulate", "2"]) == 0
        stopped = root / "ddp-stopped"
        finished = {"ddp stopped": finish(*started["ddp stopped"])
                    + (steps(stopped), [line["step"] for line in log(stopped)])}
        for name, options in RESUMED.items():
            shutil.copytree(stopped, root / f"{name}-resumed")
            started[f"{name} resumed"] = torchrun(root, f"{name} resumed", options, {})
        return root, finished | {name: finish(*run) for name, run in started.items() if name not in finished}
    finally:
        for process, _ in started.values():
            if process.poll() is None:  # a test failed early: torchrun passes SIGTERM on to its processes
                process.terminate()
                process.wait(timeout=60)


def steps(folder: Path) -> dict[str, int]:
    found = {}
    for name in FILES:
        with safe_open(str(folder / name), "pt") as f:
            found[name] = int(f.metadata()["step"])
    return found


def log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_a_two_process_step_equals_a_single_process_step_with_two_micro_batches(runs):
    root, finished = runs
    code, output = finished["ddp"]
    assert code == 0, output
    for step in (1, 3):
        ddp = load_file(str(root / "ddp-grads" / f"step-{step}.safetensors"))
        single = load_file(str(root / "single-grads" / f"step-{step}.safetensors"))
        assert ddp.keys() == single.keys() and any(k.startswith("grad.") for k in ddp)
        for kind in ("grad.", "weight."):
            assert largest_difference(*({k: v for k, v in tensors.items() if k.startswith(kind)}
                                        for tensors in (ddp, single))) <= 1e-6, (step, kind)
    for name in FILES:  # the whole run: raw and EMA weights, optimizer state
        assert largest_difference(load_file(str(root / "ddp" / name)), load_file(str(root / "single" / name))) <= 1e-6
    assert [line["loss"] for line in log(root / "ddp")] == pytest.approx([line["loss"] for line in log(root / "single")])


def test_the_log_records_the_world_size(runs):
    root, _ = runs
    lines = log(root / "ddp")
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert {(line["world_size"], line["accumulate"]) for line in lines} == {(2, 1)}
    assert {(line["world_size"], line["accumulate"]) for line in log(root / "single")} == {(1, 2)}
    assert "psnr" in lines[1] and "psnr" in lines[2]  # the held-out check, on rank 0


def test_a_signal_to_one_rank_stops_every_rank_at_that_step_with_a_checkpoint(runs):
    _, finished = runs
    code, output, saved, logged = finished["ddp stopped"]
    # the signal went to rank 1; rank 0, which writes, stopped with it
    assert code != 0 and "scdkit: interrupted: a stop signal to another process at step 1: saved a checkpoint" in output
    assert "exitcode  : 130" in output and "exitcode  : 1 " not in output, output  # stopped, not crashed
    assert set(saved.values()) == {1} and logged == [1]


@pytest.mark.parametrize("run", RESUMED)
def test_a_stopped_run_resumed_under_torchrun_ends_where_the_uninterrupted_run_does(runs, run):
    """Resumed under DDP: bit-identical. Under FSDP2 (from the same checkpoint): within 1e-6, the EMA and the held-out
    check included (the gradient norm for clipping sums the shards in another order)."""
    root, finished = runs
    code, output = finished[f"{run} resumed"]
    folder = root / f"{run}-resumed"
    assert code == 0 and f"resumed from {folder} at step 1" in " ".join(output.split()), output
    assert [line["step"] for line in log(folder)] == [1, 2, 3] and set(steps(folder).values()) == {3}
    for name in FILES:
        resumed, uninterrupted = load_file(str(folder / name)), load_file(str(root / "ddp" / name))
        if run == "ddp":
            assert resumed.keys() == uninterrupted.keys(), name
            assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed), name
        else:
            assert largest_difference(resumed, uninterrupted) <= 1e-6, name
    for step in (1, 2):  # log lines 2 and 3: the held-out check of the EMA, on rank 0
        assert log(folder)[step]["psnr"] == pytest.approx(log(root / "ddp")[step]["psnr"], abs=1e-4)


def test_a_batch_the_processes_cannot_share_is_one_line_exit_2(runs):
    _, finished = runs
    code, output = finished["bad batch"]
    errors = [line for line in output.splitlines() if re.match(r"scdkit( \(rank \d+\))?: ", line)]  # any rank's
    assert errors == ["scdkit: error: --batch 3: the clips of a step are split over 2 processes × 1 micro-batch each "
                      "(--accumulate): give a multiple of 2"], output
    assert code != 0 and "exitcode  : 2 " in output, output  # torchrun reports the exit code of its processes


def test_the_batch_check_reads_the_world_size_from_torchruns_environment(monkeypatch, capsys):
    """In-process, without a process group: the check comes before any work, and only rank 0 says it (the others
    leave a little later, so that torchrun does not end rank 0 first)."""
    import signal
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(signal, "signal", lambda number, handler: None)  # this process keeps its handlers
    for rank, lines in (("0", 1), ("1", 0)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert main(["train", "--batch", "6", "--accumulate", "2", "--out", "unused"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == lines and all("give a multiple of 4" in line for line in err), err
    assert slept == [5.0]  # rank 1 only
