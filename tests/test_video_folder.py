"""The video-folder data set on small real files written here (PyAV for videos, Pillow for frame folders): each
container decodes to the right frames; grey and RGB; resize and centre crop; stride; the split by file; labels
from subfolders; the cache; every kind of bad file skipped with one line; and train -> generate through the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scdkit.cli import main
from scdkit.data import load_dataset
from scdkit.errors import UsageError
from scdkit.interfaces import FrameSpec
from scdkit.plugins.datasets import video_folder
from scdkit.plugins.datasets.video_folder import held_out_names

av = pytest.importorskip("av")

REPO = Path(__file__).resolve().parents[1]
GREY = FrameSpec(channels=1, height=32, width=48)  # the size of the files written here: no resizing
RGB = FrameSpec(channels=3, height=32, width=48)
DECODE_VIDEO = video_folder.decode_video


def moving_square(frames: int = 16, height: int = 32, width: int = 48, colour=(255, 255, 255)) -> np.ndarray:
    """[frames height width 3] uint8: an 8x8 square at rows 12-19 moving 2 pixels right per frame from column 4."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    for f in range(frames):
        video[f, 12:20, 4 + 2 * f:12 + 2 * f] = colour
    return video


def write_video(path: Path, video: np.ndarray, codec: str = "libx264", pix_fmt: str = "yuv420p") -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = pix_fmt
        for picture in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_frames(folder: Path, video: np.ndarray) -> Path:
    """A frame folder, its names unpadded (frame_2 before frame_10: the order is natural)."""
    folder.mkdir(parents=True)
    for f, picture in enumerate(video):
        Image.fromarray(picture).save(folder / f"frame_{f}.png")
    return folder


def uniform(frames: int, value: int, size: int = 8) -> np.ndarray:
    """Frames of one grey level each: ``value`` + the frame index, to tell files and frames apart."""
    return np.stack([np.full((size, size, 3), value + f, np.uint8) for f in range(frames)])


def square_centre(frame: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(frame > 0.5, as_tuple=True)
    return ys.float().mean().item(), xs.float().mean().item()


def skip_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "skipping" in line]


CONTAINERS = [("mp4", "libx264", "yuv420p"), ("webm", "libvpx-vp9", "yuv420p"), ("avi", "mpeg4", "yuv420p"),
              ("mov", "mjpeg", "yuvj420p"), ("mkv", "libx264", "yuv420p"), ("gif", "gif", "rgb8")]


@pytest.mark.parametrize("suffix, codec, pix_fmt", CONTAINERS)
def test_each_container_decodes_to_the_moving_square(tmp_path, suffix, codec, pix_fmt):
    write_video(tmp_path / f"clip.{suffix}", moving_square(), codec, pix_fmt)
    batch = load_dataset("video-folder", GREY, path=tmp_path).clips(2, 16)  # the whole video: it starts at frame 0
    assert batch.video.shape == (2, 16, 1, 32, 48) and batch.video.dtype == torch.float32
    assert 0 <= batch.video.min() and batch.video.max() <= 1 and batch.labels is None
    for f, frame in enumerate(batch.video[0, :, 0]):
        y, x = square_centre(frame)
        assert abs(y - 15.5) < 0.5 and abs(x - (7.5 + 2 * f)) < 0.5, f"frame {f}: square at {y, x}"
        inside = frame[12:20, 4 + 2 * f:12 + 2 * f]
        assert inside.mean() > 0.9 and frame[:, :2].mean() < 0.05 and frame[:4].mean() < 0.05


def test_grey_and_rgb_follow_the_frame_channels(tmp_path):
    write_frames(tmp_path / "red", moving_square(4, colour=(255, 0, 0)))
    rgb = load_dataset("video-folder", RGB, path=tmp_path).clips(1, 4).video[0, 0]
    grey = load_dataset("video-folder", GREY, path=tmp_path).clips(1, 4).video[0, 0]
    assert rgb.shape == (3, 32, 48) and grey.shape == (1, 32, 48)
    torch.testing.assert_close(rgb[:, 14, 6], torch.tensor([1.0, 0.0, 0.0]))
    assert abs(grey[0, 14, 6].item() - 76 / 255) < 0.01  # ITU-R 601 luma of pure red
    assert load_dataset("video-folder", FrameSpec(channels=2), path=tmp_path).frame_problems()[0][0] == "channels"


def test_frames_are_resized_keeping_the_aspect_then_cropped_at_the_centre(tmp_path):
    expected = torch.zeros(16, 16)
    expected[4:12, 4:12] = 1
    wide = np.zeros((2, 40, 80, 3), np.uint8)  # scaled to 16x32, then columns 8-23 kept
    wide[:, 10:30, 30:50] = 255  # the centre block: rows and columns 4-11 of the 16x16 frame
    wide[:, :, :15] = 255  # a band at the left edge: cropped away
    write_frames(tmp_path / "wide" / "frames", wide)
    frame = load_dataset("video-folder", FrameSpec(height=16, width=16), path=tmp_path / "wide").clips(1, 2).video
    torch.testing.assert_close(frame[0, 0, 0], expected)
    tall = np.zeros((2, 64, 32, 3), np.uint8)  # scaled to 32x16, then rows 8-23 kept
    tall[:, 24:40, 8:24] = 255
    tall[:, :12] = 255
    (tmp_path / "tall").mkdir()
    write_video(tmp_path / "tall" / "tall.mp4", tall)
    frame = load_dataset("video-folder", FrameSpec(height=16, width=16), path=tmp_path / "tall").clips(1, 2).video
    assert (frame[0, 0, 0] - expected).abs().mean() < 0.03  # within the codec's error


def test_stride_takes_every_nth_frame(tmp_path):
    write_frames(tmp_path / "ramp", uniform(16, 0) * 10)  # frame i is grey level 10·i
    data = load_dataset("video-folder", FrameSpec(height=8, width=8), path=tmp_path, stride=3)
    levels = (data.clips(20, 5, seed=1).video[:, :, 0, 0, 0] * 255).round() / 10  # [clip frame] frame indices
    assert torch.equal(levels[:, 1:] - levels[:, :-1], torch.full((20, 4), 3.0))
    assert set(levels[:, 0].tolist()) == {0.0, 1.0, 2.0, 3.0}  # every start that fits 13 frames
    assert data.clips(1, 6).video.shape[1] == 6  # 16 frames: exactly one clip of 6 at stride 3
    with pytest.raises(UsageError, match="too short for 7 frames at stride 3"):
        data.clips(1, 7)


def test_the_split_is_by_file_stable_and_never_empty(tmp_path):
    for k in range(12):
        write_frames(tmp_path / f"take{k}", uniform(4, 20 * k))
    frame = FrameSpec(height=8, width=8)
    data = load_dataset("video-folder", frame, path=tmp_path, held_out=0.3)
    files = {split: set(((data.clips(64, 2, split, seed=s).video[:, 0, 0, 0, 0] * 255).round() // 20).tolist())
             for split, s in [("train", 0), ("test", 1)]}
    assert files["train"] and files["test"] and not files["train"] & files["test"]
    assert files["train"] | files["test"] == set(range(12))  # every file, in one split only
    expected = held_out_names([f"take{k}" for k in range(12)], 0.3)
    assert {f"take{int(k)}" for k in files["test"]} == expected
    again = load_dataset("video-folder", frame, path=tmp_path, held_out=0.3)
    assert torch.equal(again.clips(5, 3, "test", seed=4).video, data.clips(5, 3, "test", seed=4).video)
    assert not torch.equal(data.clips(5, 3, "train", seed=4).video, data.clips(5, 3, "train", seed=5).video)
    names = ["a.mp4", "b.mp4"]
    assert len(held_out_names(names, 1e-9)) == 1 and len(held_out_names(names, 1 - 1e-9)) == 1
    assert held_out_names(["only.mp4"], 0.99) == set()


def test_labels_come_from_the_first_level_subfolders(tmp_path, capsys):
    write_frames(tmp_path / "cats" / "tom", uniform(4, 10))
    write_video(tmp_path / "cats" / "felix.mp4", uniform(4, 10, 16))
    write_frames(tmp_path / "dogs", uniform(4, 200))  # the class folder itself is a frame folder
    write_frames(tmp_path / "loose", uniform(4, 100))
    write_video(tmp_path / "unfiled.mp4", uniform(4, 100, 16))
    data = load_dataset("video-folder", FrameSpec(height=8, width=8), path=tmp_path, labels=True)
    assert data.provides.classes == 3 and data.classes == ["cats", "dogs", "loose"]
    batch = data.clips(32, 2)
    assert batch.labels.dtype == torch.int64 and batch.labels.shape == (32,)
    level = batch.video[:, 0, 0, 0, 0] * 255
    expected = torch.where(level < 50, 0, torch.where(level > 150, 1, 2))
    assert torch.equal(batch.labels, expected) and set(batch.labels.tolist()) <= {0, 1, 2}
    assert skip_lines(capsys.readouterr().err) == [
        f"video-folder: skipping {tmp_path / 'unfiled.mp4'}: not in a class subfolder (labels = true)"]
    assert ".scdkit-cache" not in load_dataset("video-folder", FrameSpec(height=8, width=8), path=tmp_path,
                                               labels=True).classes


def test_frames_are_decoded_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    clip = write_video(tmp_path / "clip.mp4", moving_square())
    first = load_dataset("video-folder", GREY, path=tmp_path).clips(3, 4, seed=7)
    [cached] = (tmp_path / ".scdkit-cache").glob("*.npy")
    frames = np.load(cached, mmap_mode="r")
    assert isinstance(frames, np.memmap) and frames.dtype == np.uint8 and frames.shape == (16, 1, 32, 48)

    def no_decoding(path, frame):
        raise AssertionError(f"decoded {path} again")
    monkeypatch.setattr(video_folder, "decode_video", no_decoding)
    assert torch.equal(load_dataset("video-folder", GREY, path=tmp_path).clips(3, 4, seed=7).video, first.video)
    assert len(list((tmp_path / ".scdkit-cache").glob("*.npy"))) == 1  # another geometry is another file, though
    monkeypatch.undo()

    write_video(clip, moving_square(20))  # size and modification time change
    decoded = []
    monkeypatch.setattr(video_folder, "decode_video", lambda path, frame: decoded.append(path) or
                        DECODE_VIDEO(path, frame))
    assert load_dataset("video-folder", GREY, path=tmp_path).clips(1, 20).video.shape[1] == 20
    assert decoded == [clip]


def test_each_bad_file_is_skipped_with_one_line(tmp_path, capsys):
    for name in ("good-a.mp4", "good-b.mp4"):
        write_video(tmp_path / name, moving_square())
    (tmp_path / "empty.mp4").touch()
    (tmp_path / "truncated.mp4").write_bytes((tmp_path / "good-a.mp4").read_bytes()[:1000])
    (tmp_path / "notes.mp4").write_text("not a video at all\n")
    write_video(tmp_path / "short.webm", moving_square(3), "libvpx-vp9")
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (tmp_path / "README.txt").write_text("ignored: not a video suffix")
    data = load_dataset("video-folder", GREY, path=tmp_path)
    for split in ("train", "test"):  # the short file is reported when its split is asked for
        try:
            batch = data.clips(4, 8, split)
            assert batch.video[:, :, 0, 12:20].mean() > 0.05  # clips of the good files
        except UsageError as exc:
            assert "1 too short for 8 frames" in str(exc)
    lines = skip_lines(capsys.readouterr().err)
    expected = {"empty.mp4": "empty (0 bytes)", "truncated.mp4": "truncated or corrupt",
                "notes.mp4": "not a video", "short.webm": "too short (3 frames) for 8 frames at stride 1",
                "gone.mp4": "unreadable (broken symbolic link)"}
    assert len(lines) == len(expected)
    for name, reason in expected.items():
        [line] = [line for line in lines if f"{tmp_path / name}:" in line]
        assert line.startswith(f"video-folder: skipping {tmp_path / name}: {reason}")
    load_dataset("video-folder", GREY, path=tmp_path).clips(1, 8)
    assert skip_lines(capsys.readouterr().err) == []  # once per process


def test_an_unreadable_file_is_skipped(tmp_path, capsys, monkeypatch):
    write_video(tmp_path / "good.mp4", moving_square())
    locked = write_video(tmp_path / "locked.mp4", moving_square())
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: answer as for anyone else
        real = video_folder.read_problem
        monkeypatch.setattr(video_folder, "read_problem",
                            lambda path: "permission denied" if path == locked else real(path))
    load_dataset("video-folder", GREY, path=tmp_path).clips(1, 4)
    assert skip_lines(capsys.readouterr().err) == [f"video-folder: skipping {locked}: unreadable (permission denied)"]


def test_nothing_usable_is_one_line_saying_why(tmp_path):
    (tmp_path / "empty.mp4").touch()
    (tmp_path / "notes.avi").write_text("hello")
    write_video(tmp_path / "short.mp4", moving_square(3))
    with pytest.raises(UsageError) as caught:
        load_dataset("video-folder", GREY, path=tmp_path).clips(1, 8, split="test")
    assert str(caught.value) == (f"video-folder {tmp_path}: no usable video for split 'test' (3 files: 1 empty, "
                                 "1 not a video, 1 in the train split); the split is by file: testing needs two "
                                 "usable videos")
    with pytest.raises(UsageError, match=r"no videos found \(looked for .mp4"):
        load_dataset("video-folder", GREY, path=tmp_path / ".scdkit-cache").clips(1, 2)


def test_a_missing_folder_or_pyav_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="not found"):
        load_dataset("video-folder", GREY, path=tmp_path / "nowhere")
    write_video(tmp_path / "clip.mp4", moving_square())
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails
    with pytest.raises(UsageError, match=r"pip install 'scdkit\[video\]'"):
        load_dataset("video-folder", GREY, path=tmp_path).clips(1, 4)


def test_shards_are_the_slices_of_the_whole_batch(tmp_path, monkeypatch):
    for k in range(3):
        write_frames(tmp_path / f"take{k}", uniform(6, 40 * k))
    data = load_dataset("video-folder", FrameSpec(height=8, width=8), path=tmp_path)
    whole = data.batch(4, 3, seed=2)
    assembled = []
    real = video_folder.VideoFolder._assemble
    monkeypatch.setattr(video_folder.VideoFolder, "_assemble",
                        lambda self, plan, frames: assembled.append(len(plan)) or real(self, plan, frames))
    parts = [data.batch(4, 3, seed=2, shard=(rank, 2)) for rank in range(2)]
    assert torch.equal(torch.cat([p.video for p in parts]), whole.video) and assembled == [2, 2]
    with pytest.raises(ValueError, match="equal shards"):
        data.batch(3, 3, shard=(0, 2))


# -- through the CLI ------------------------------------------------------------------------------

def registry(tmp_path: Path, footage: Path) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text(f'[scdkit]\nextends = "{REPO / "registry.toml"}"\n\n'
                    f'[datasets.clips]\nplugin = "video-folder"\npath = "{footage}"\n')
    return path


def test_train_then_generate_on_a_video_folder(tmp_path):
    footage = tmp_path / "footage"
    footage.mkdir()
    for k in range(2):
        write_video(footage / f"take{k}.mp4", moving_square(12))
    common = ["--registry", str(registry(tmp_path, footage)), "--pipeline", "scd-digits", "--data", "clips",
              "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def scdkit(*args):
        return subprocess.run([sys.executable, "-m", "scdkit.cli", *args, *common], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    run = scdkit("train", "--steps", "2", "--batch", "2", "--frames", "3", "--eval-every", "0",
                 "--checkpoint-every", "2", "--out", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr
    run = scdkit("generate", "--checkpoint", str(tmp_path / "run"), "--clips", "1", "--context", "2",
                 "--frames", "1", "--steps", "2", "--gif", str(tmp_path / "x.gif"))
    assert run.returncode == 0, run.stderr
    assert Image.open(tmp_path / "x.gif").n_frames == 3
    assert "decoding" not in run.stderr  # the cache of the training run


def test_a_folder_of_bad_files_exits_2_with_one_line(tmp_path, capsys):
    footage = tmp_path / "footage"
    footage.mkdir()
    (footage / "empty.mp4").touch()
    (footage / "notes.mp4").write_text("hello")
    code = main(["generate", "--registry", str(registry(tmp_path, footage)), "--data", "clips", "--device", "cpu",
                 "--clips", "1", "--context", "1", "--frames", "1", "--gif", str(tmp_path / "x.gif")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [error] = [line for line in err.splitlines() if "error" in line]
    assert error == (f"scdkit: error: video-folder {footage}: no usable video for split 'test' (2 files: "
                     "1 empty, 1 not a video)")


def test_train_on_a_folder_of_bad_files_stops_before_it_starts(tmp_path, capsys):
    """The data is drawn from before anything is said or made: no run folder, no 'training ... into' line."""
    footage = tmp_path / "footage"
    footage.mkdir()
    (footage / "empty.mp4").touch()
    out = tmp_path / "run"
    code = main(["train", "--registry", str(registry(tmp_path, footage)), "--data", "clips", "--device", "cpu",
                 "--steps", "2", "--batch", "2", "--frames", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert not out.exists() and "training" not in captured.out
    [error] = [line for line in captured.err.splitlines() if "error" in line]
    assert error == f"scdkit: error: video-folder {footage}: no usable video for split 'train' (1 file: 1 empty)"
