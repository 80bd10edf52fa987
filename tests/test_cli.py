"""CLI behaviour: exit codes, one-line errors, the train -> generate round trip on a tiny registry."""

import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

from scdkit.cli import main
from tests.test_registry import GOOD

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_registry(tmp_path):
    path = tmp_path / "registry.toml"
    path.write_text(GOOD + 'checkpoint = "ckpt"\n')
    return path


def test_validate_shipped_registry_exits_0(capsys):
    assert main(["validate", str(REPO / "registry.toml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_bad_registry_exits_2_one_line_per_problem(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("layers = 1", "layres = 1").replace('"flow-match-euler"', '"flow-match"'))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 3 and all(line.startswith(str(bad)) for line in err)
    assert not any("Traceback" in line for line in err)


def test_bad_arguments_exit_2_with_one_line(capsys):
    assert main(["generate", "--frames", "zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--frames" in err
    assert main(["no-such-command"]) == 2
    capsys.readouterr()
    assert main(["bench", "--stepz", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "scdkit: error: unrecognized arguments: --stepz 3"  # one prefix, not two


def test_a_bad_config_value_is_one_line_before_any_work(tiny_registry, capsys):
    assert main(["train", "--registry", str(tiny_registry), "--ema", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "scdkit: error: --ema 1.5: Input should be less than 1"
    assert not (tiny_registry.parent / "ckpt").exists()
    assert main(["train", "--registry", str(tiny_registry), "--frames", "1", "--batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--frames 1: " in err and "--batch 0: " in err  # every bad value at once
    assert main(["train", "--registry", str(tiny_registry), "--noise-draws", "0"]) == 2  # the nested Recipe too
    assert "--noise-draws 0: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_steps_a_scheduler_refuses_are_one_line(tiny_registry, monkeypatch, capsys):
    from scdkit.plugins.schedulers.flow_match_euler import FlowMatchEuler

    def begin(self, steps=None, device=None):
        raise ValueError(f"{steps} sampling steps exceed the 1000 training timesteps")

    assert main(["train", "--registry", str(tiny_registry), "--steps", "1", "--batch", "1", "--frames", "2",
                 "--eval-every", "0"]) == 0
    monkeypatch.setattr(FlowMatchEuler, "begin", begin)
    capsys.readouterr()
    gif = tiny_registry.parent / "x.gif"
    assert main(["generate", "--registry", str(tiny_registry), "--steps", "3000", "--gif", str(gif)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("flow-match-euler: 3000 sampling steps exceed the 1000 training timesteps"), err
    assert len(err.splitlines()) == 1 and not gif.exists()


def test_missing_checkpoint_is_a_one_line_error(tiny_registry, capsys):
    assert main(["generate", "--registry", str(tiny_registry), "--gif", str(tiny_registry.parent / "x.gif")]) == 2
    err = capsys.readouterr().err.strip()
    assert "encoder.safetensors: checkpoint file not found" in err and len(err.splitlines()) == 1
    assert "scdkit train --pipeline p" in err  # says how to make it
    assert not (tiny_registry.parent / "x.gif").exists()


def test_train_then_generate_round_trip(tiny_registry, capsys):
    out = tiny_registry.parent / "ckpt"
    assert main(["train", "--registry", str(tiny_registry), "--steps", "3", "--batch", "2", "--frames", "3",
                 "--eval-every", "0", "--checkpoint-every", "2"]) == 0
    assert {p.name for p in out.iterdir()} >= {"encoder.safetensors", "decoder.safetensors", "train_state.safetensors"}
    # resume continues where it stopped; lines an interrupted run logged after its last checkpoint are dropped
    with open(out / "train_log.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 4, "loss": 9.0, "elapsed_s": 1.0}) + "\n")
    assert main(["train", "--registry", str(tiny_registry), "--steps", "4", "--batch", "2", "--frames", "3",
                 "--eval-every", "0"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["loss"] != 9.0
    capsys.readouterr()

    # a run trained elsewhere (--out) is generated from with --checkpoint
    other = tiny_registry.parent / "other"
    assert main(["train", "--registry", str(tiny_registry), "--steps", "1", "--batch", "1", "--frames", "2",
                 "--eval-every", "0", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["generate", "--registry", str(tiny_registry), "--checkpoint", str(other), "--clips", "1",
                 "--context", "1", "--frames", "1", "--gif", str(other / "g.gif"), "--json"]) == 0
    assert (other / "g.gif").exists()
    capsys.readouterr()

    gif, mp4 = tiny_registry.parent / "out.gif", tiny_registry.parent / "out.mp4"
    assert main(["generate", "--registry", str(tiny_registry), "--clips", "2", "--context", "2", "--frames", "3",
                 "--gif", str(gif), "--video", str(mp4), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["model"]["psnr"]) == 3 and len(report["repeat_last"]["ssim"]) == 3
    assert len(report["constant_velocity"]["sharpness"]) == 3
    assert report["psnr_first4"].keys() == {"model", "repeat_last", "constant_velocity"}
    ratio = sum(report["model"]["sharpness"]) / sum(report["true_sharpness"])
    assert report["sharpness_ratio"] == pytest.approx(ratio)
    pooled = -10 * math.log10(sum(report["model"]["mse"]) / 3)  # 3 frames: all within the first 4
    assert report["pooled_psnr_first4"]["model"] == pytest.approx(pooled)
    assert report["timing_batch1"]["per_frame_s"] > 0
    with Image.open(gif) as image:
        assert image.n_frames == 5  # 2 context + 3 generated
    import imageio.v3 as imageio  # the dev extra installs it

    video = imageio.imread(mp4)
    assert video.shape[0] == 5 and video.shape[-1] == 3
    assert [p.name for p in mp4.parent.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_video_is_checked_before_any_work(tiny_registry, monkeypatch, capsys):
    gif = tiny_registry.parent / "x.gif"
    args = ["generate", "--registry", str(tiny_registry), "--gif", str(gif), "--video"]
    assert main([*args, str(tiny_registry.parent / "x.avi")]) == 2
    assert "expected a .mp4 file name" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if the video extra were not installed
    assert main([*args, str(tiny_registry.parent / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs imageio_ffmpeg" in err and "[video]" in err
    assert not gif.exists()  # refused before generating anything


def test_checkpoint_mismatch_is_refused(tiny_registry, capsys):
    assert main(["train", "--registry", str(tiny_registry), "--steps", "1", "--batch", "1", "--frames", "2",
                 "--eval-every", "0"]) == 0
    tiny_registry.write_text(tiny_registry.read_text().replace("width = 32\nlayers = 1", "width = 64\nlayers = 1", 1))
    capsys.readouterr()
    assert main(["generate", "--registry", str(tiny_registry), "--gif", str(tiny_registry.parent / "y.gif")]) == 2
    err = capsys.readouterr().err
    assert "does not match the registry entry" in err and "config.width: checkpoint has 32, registry wants 64" in err
