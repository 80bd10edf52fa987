"""``video-folder``: clips from a folder of your own footage.

Every video file (.mp4 .webm .avi .mov .mkv .gif) and every folder of frame images (.png .jpg .jpeg .bmp, in
name order) under ``path`` is one video; subfolders are searched too. Each frame is resized, keeping its
aspect, until it covers the pipeline's frame, then cropped to it around the centre, in grey or RGB as the
frame's channels say. With ``labels``, the sorted names of the first-level subfolders are the classes.

**Split by file.** A stable hash of each video's path relative to the folder puts about ``held_out`` of the
videos in the test split, never a file's frames in both; with two or more usable videos, at least one is
held out and at least one trains (a single video trains). "Usable" means decodable, not long enough for a
given clip length, so that the split does not change with ``frames``.

**Decoded once.** The first ``clips`` call decodes every video not cached yet into a uint8 .npy file [t c H W]
per video and frame geometry in ``cache`` (written atomically); later calls, epochs and processes memory-map
those. A cache file's name hashes the video's path, size and modification time and the frame geometry, so
an edited file is decoded again. Building the data set only looks at the folder (``scdkit validate`` builds it).

**Bad files** (empty, truncated or corrupt, not a video, unreadable, too short for a clip) are skipped with
one line each on stderr, once per process; a UsageError says why when nothing usable is left.

**Why PyAV** (``pip install 'scdkit[video]'``) rather than imageio-ffmpeg: PyAV decodes in-process and raises
a typed error per file (``av.error.InvalidDataError``, ``PermissionError``), and reads a file's streams
without decoding it (a file with no video stream is "not a video"); it also writes the videos of the tests
itself. imageio-ffmpeg runs an ffmpeg subprocess per file and reports failures as text to parse. Frame
folders need only Pillow.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from scdkit.data import split_rng
from scdkit.errors import UsageError, install_hint
from scdkit.files import atomic_path, read_problem, write_text_atomic
from scdkit.hookspecs import hookimpl
from scdkit.interfaces import Batch, ComponentConfig, ConditioningSpec, FrameSpec, Split, VideoDataset, shard_range

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: Part of every cache key: change it when decoding changes what a cache file holds.
CACHE_FORMAT = 1
#: How the first bytes of each container start (mp4/mov: a box type at offset 4), to tell a truncated or
#: corrupt video from a file that is no video at all.
SIGNATURES = (b"\x1a\x45\xdf\xa3", b"RIFF", b"GIF87a", b"GIF89a")
MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")

_reported: set[Path] = set()  # the files already reported as skipped by this process


class VideoFolderConfig(ComponentConfig):
    path: Path = Field(description="the folder of videos and frame folders (relative: to the current directory)")
    stride: int = Field(1, ge=1, description="frame stride within a clip (2: every other frame)")
    held_out: float = Field(0.1, gt=0, lt=1, description="fraction of the files in the test split (chosen by a "
                            "stable hash of each file's path in the folder, never by frame)")
    labels: bool = Field(False, description="class labels from the names of the first-level subfolders, sorted")
    cache: Path | None = Field(None, description="folder for the decoded frames (default: <path>/.scdkit-cache)")


@dataclass(frozen=True)
class Source:
    """One video found: a file, or a folder of frame ``images`` in order. ``name`` is its path relative to
    the folder (the key of the split); ``label`` its class, -1 for none."""

    path: Path
    name: str
    label: int
    images: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Decoded:
    """A usable video: its frames cached in ``frames`` (.npy [t c H W] uint8), ``length`` of them."""

    source: Source
    frames: Path
    length: int


class Unusable(Exception):
    """Why a video is skipped: ``reason`` (what the summary counts) and an optional ``detail``."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


# -- finding the videos ---------------------------------------------------------------------------

def _natural(name: str) -> list:
    """Sort key: digits compare as numbers, so frame_2 comes before frame_10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _visible(names: list[str], folder: Path, cache: Path) -> list[str]:
    return [n for n in names if not n.startswith(".") and folder / n != cache]


def class_names(root: Path, cache: Path) -> list[str]:
    """The first-level subfolders of ``root``, sorted: label i is the i-th."""
    return sorted(_visible([e.name for e in os.scandir(root) if e.is_dir()], root, cache))


def find_sources(root: Path, cache: Path, classes: list[str]) -> list[Source]:
    """Every video file and frame folder under ``root`` (symbolic links followed, once; hidden entries and
    the ``cache`` folder skipped), in a stable order."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        folder = Path(folder)
        real = folder.resolve()
        if real in seen:  # a link back up the tree
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(_visible(dirs, folder, cache))
        files = sorted(_visible(files, folder, cache), key=_natural)
        inside = folder.relative_to(root).parts
        label = classes.index(inside[0]) if inside and inside[0] in classes else -1
        images = tuple(folder / f for f in files if f.lower().endswith(IMAGE_SUFFIXES))
        if images:
            found.append(Source(folder, folder.relative_to(root).as_posix(), label, images))
        found += [Source(folder / f, (folder / f).relative_to(root).as_posix(), label)
                  for f in files if f.lower().endswith(VIDEO_SUFFIXES)]
    return found


# -- decoding -------------------------------------------------------------------------------------

def cover(height: int, width: int, frame: FrameSpec) -> tuple[int, int]:
    """The size (h, w) of a ``height`` x ``width`` picture scaled, aspect kept, to just cover ``frame``."""
    scale = max(frame.height / height, frame.width / width)
    return max(frame.height, round(height * scale)), max(frame.width, round(width * scale))


def centre_crop(picture: np.ndarray, frame: FrameSpec) -> np.ndarray:
    """[h w] or [h w c] covering the frame -> [c H W], its centre."""
    picture = picture.reshape(*picture.shape[:2], -1)
    top, left = (picture.shape[0] - frame.height) // 2, (picture.shape[1] - frame.width) // 2
    return picture[top:top + frame.height, left:left + frame.width].transpose(2, 0, 1)


def decode_video(path: Path, frame: FrameSpec) -> np.ndarray:
    """The frames of a video file [t c H W] uint8, through PyAV."""
    try:
        import av
    except ImportError:
        raise UsageError(f"video-folder: reading {path} needs PyAV: {install_hint('video')}") from None
    pixels = "gray" if frame.channels == 1 else "rgb24"
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise Unusable("not a video", "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads
        frames = []
        for picture in container.decode(stream):
            height, width = cover(picture.height, picture.width, frame)
            scaled = picture.reformat(width=width, height=height, format=pixels, interpolation="AREA")
            frames.append(centre_crop(scaled.to_ndarray(), frame))
    return np.stack(frames) if frames else np.zeros((0, frame.channels, frame.height, frame.width), np.uint8)


def decode_images(paths: tuple[Path, ...], frame: FrameSpec) -> np.ndarray:
    """The images of a frame folder [t c H W] uint8, through Pillow."""
    frames = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if frame.channels == 1 else "RGB")
        except UnidentifiedImageError:
            raise Unusable("not a video", f"{path.name} is not an image") from None
        except PermissionError:
            raise
        except Exception as exc:  # a damaged image skips its folder alone
            raise Unusable("truncated or corrupt", f"{path.name}: {exc}") from None
        height, width = cover(image.height, image.width, frame)
        frames.append(centre_crop(np.asarray(image.resize((width, height), Image.Resampling.BOX)), frame))
    return np.stack(frames)


def decode(source: Source, frame: FrameSpec) -> np.ndarray:
    """The frames of ``source`` [t c H W] uint8, or ``Unusable`` saying why not."""
    if source.images:
        return decode_images(source.images, frame)
    if source.path.stat().st_size == 0:
        raise Unusable("empty", "0 bytes")
    try:
        frames = decode_video(source.path, frame)
    except (Unusable, UsageError, PermissionError):
        raise
    except Exception as exc:  # anything a damaged file makes the decoder raise skips that file alone
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise Unusable("truncated or corrupt" if _looks_like_video(source.path) else "not a video", detail) from None
    if not len(frames):
        raise Unusable("truncated or corrupt", "no frames")
    return frames


def _looks_like_video(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(12)
    return head.startswith(SIGNATURES) or head[4:8] in MP4_BOXES


# -- the cache ------------------------------------------------------------------------------------

def cache_file(source: Source, frame: FrameSpec, cache: Path) -> Path:
    """Where ``source``'s frames for ``frame`` are cached: named by a hash of its path, size and modification
    time (each image's, for a frame folder) and the frame geometry."""
    files = source.images or (source.path,)
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = repr((CACHE_FORMAT, str(source.path), stats, frame.channels, frame.height, frame.width))
    readable = re.sub(r"[^\w.-]+", "_", source.name)[-60:]
    return cache / f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"


def cached_length(path: Path) -> int | None:
    """How many frames the cache file ``path`` holds, or None when it is missing or unreadable."""
    try:
        return np.load(path, mmap_mode="r").shape[0]
    except (OSError, ValueError):
        return None


def skip_file(path: Path) -> Path:
    """Where the reason a video is unusable is cached, beside where its frames would be."""
    return path.with_suffix(".skip")


def write_cache(path: Path, content: np.ndarray | Unusable, root: Path) -> None:
    """Cache a video's frames, or why it is unusable (so that a damaged file is not decoded again either)."""
    try:
        if isinstance(content, Unusable):
            write_text_atomic(skip_file(path), f"{content.reason}\n{content.detail}")
            return
        with atomic_path(path) as tmp:
            np.save(tmp, content)
    except OSError as exc:
        raise UsageError(f"video-folder {root}: cannot write the cache {path.parent} ({exc.strerror or exc}); "
                         "set `cache` to a writable folder") from None


# -- the split ------------------------------------------------------------------------------------

def _fraction(name: str) -> float:
    """A stable number in [0, 1) for ``name`` (the same in every process and on every machine)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def held_out_names(names: list[str], held_out: float) -> set[str]:
    """The ``names`` held out: those whose hash falls below ``held_out``, but never none or all of two or more
    (the lowest hash is then held out, the highest trains); a single name trains."""
    test = {n for n in names if _fraction(n) < held_out}
    if len(names) < 2:  # a single video trains; testing needs a second one
        return set()
    if not test:
        test = {min(names, key=_fraction)}
    if len(test) == len(names):
        test.remove(max(names, key=_fraction))
    return test


# -- the data set ---------------------------------------------------------------------------------

class VideoFolder(VideoDataset):
    plugin_name = "video-folder"
    plugin_version = "0.1.0"
    config_class = VideoFolderConfig

    def __init__(self, config: VideoFolderConfig, frame: FrameSpec):
        super().__init__(config, frame)
        self.root = config.path.expanduser().absolute()
        self.cache = config.cache.expanduser().absolute() if config.cache else self.root / ".scdkit-cache"
        problem = read_problem(self.root) or (None if self.root.is_dir() else "not a folder")
        if problem:
            raise UsageError(f"video-folder {self.root}: {problem}")
        self.classes = class_names(self.root, self.cache) if config.labels else []
        if config.labels and not self.classes:
            raise UsageError(f"video-folder {self.root}: labels = true needs one subfolder per class; there are none")
        self._videos: dict[str, list[Decoded]] | None = None  # by split, on first use
        self._skipped: Counter[str] = Counter()  # reason -> videos skipped for it

    @classmethod
    def example_config(cls) -> VideoFolderConfig:
        return cls.config_class(path="footage")

    @property
    def provides(self) -> ConditioningSpec:
        return ConditioningSpec(classes=len(self.classes))

    def frame_problems(self) -> list[tuple[str, str]]:
        if self.frame.channels in (1, 3):
            return []
        return [("channels", f"data {self.plugin_name!r} makes grey (1 channel) or RGB (3 channels) frames, "
                             f"the frame has {self.frame.channels}")]

    def clips(self, count: int, frames: int, split: Split = "train", seed: int = 0) -> Batch:
        return self._assemble(self._plan(count, frames, split, seed), frames)

    def batch(self, count: int, frames: int, split: Split = "train", seed: int = 0,
              shard: tuple[int, int] = (0, 1)) -> Batch:
        """Shard ``rank`` of ``world``: the same clips as the slice of ``clips(count, ...)``, only those read."""
        start, stop = shard_range(count, shard)
        return self._assemble(self._plan(count, frames, split, seed)[start:stop], frames)

    # -- internals ------------------------------------------------------------------------------

    def _plan(self, count: int, frames: int, split: Split, seed: int) -> list[tuple[Decoded, int]]:
        """(video, first frame) of each of ``count`` clips: a video drawn in proportion to its clip starts."""
        span = (frames - 1) * self.config.stride + 1
        videos = []
        for video in self._decoded()[split]:
            if video.length >= span:
                videos.append(video)
            else:  # not counted with the other skips: it depends on the clip length asked for
                self._report(video.source, f"too short ({video.length} frames) for {frames} frames at stride "
                                           f"{self.config.stride}")
        if not videos:
            raise UsageError(self._nothing_usable(split, frames, span))
        starts = np.array([v.length - span + 1 for v in videos])
        rng = split_rng(split, seed)
        which = rng.choice(len(videos), size=count, p=starts / starts.sum())
        first = rng.integers(0, starts[which])
        return [(videos[w], int(f)) for w, f in zip(which, first)]

    def _assemble(self, plan: list[tuple[Decoded, int]], frames: int) -> Batch:
        stride = self.config.stride
        video = np.empty((len(plan), frames, self.frame.channels, self.frame.height, self.frame.width), np.uint8)
        for clip, (source, first) in zip(video, plan):
            clip[:] = np.load(source.frames, mmap_mode="r")[first:first + (frames - 1) * stride + 1:stride]
        labels = torch.tensor([s.source.label for s, _ in plan], dtype=torch.int64) if self.config.labels else None
        return Batch(torch.from_numpy(video).float().div_(255), labels)

    def _decoded(self) -> dict[str, list[Decoded]]:
        """Every usable video by split, decoding those not cached yet (once per data set object)."""
        if self._videos is not None:
            return self._videos
        usable, pending = [], []
        for source in find_sources(self.root, self.cache, self.classes):
            if self.config.labels and source.label < 0:
                self._skip(source, Unusable("not in a class subfolder", "labels = true"))
                continue
            problem = read_problem(source.path)
            if problem:
                broken = source.path.is_symlink()  # it exists, so "not found" means its target does not
                self._skip(source, Unusable("unreadable", "broken symbolic link" if broken else problem))
                continue
            try:
                path = cache_file(source, self.frame, self.cache)
            except OSError as exc:  # an image of a frame folder vanished or cannot be read
                self._skip(source, Unusable("unreadable", exc.strerror or str(exc)))
                continue
            length = cached_length(path)
            if length is not None:
                usable.append(Decoded(source, path, length))
            elif skip_file(path).exists():  # found unusable before, and unchanged since
                self._skip(source, Unusable(*skip_file(path).read_text().split("\n", 1)))
            else:
                pending.append((source, path))
        if pending:
            usable += self._decode_all(pending)
        usable.sort(key=lambda v: v.source.name)
        test = held_out_names([v.source.name for v in usable], self.config.held_out)
        self._videos = {"train": [v for v in usable if v.source.name not in test],
                        "test": [v for v in usable if v.source.name in test]}
        if usable:  # which files a held-out score comes from is worth knowing (split by file: few, at first)
            print(f"video-folder {self.root}: {len(usable)} usable file(s); held out (split 'test'): "
                  f"{', '.join(sorted(test)) or 'none'}", file=sys.stderr)
        return self._videos

    def _decode_all(self, pending: list[tuple[Source, Path]]) -> list[Decoded]:
        print(f"video-folder {self.root}: decoding {len(pending)} file(s) into {self.cache} (once; later runs "
              "read the cache)", file=sys.stderr)
        start, decoded = time.perf_counter(), []
        for source, path in pending:
            try:
                frames = decode(source, self.frame)
            except Unusable as exc:
                write_cache(path, exc, self.root)
                self._skip(source, exc)
                continue
            except PermissionError as exc:  # not cached: changing permissions leaves the modification time
                self._skip(source, Unusable("unreadable", exc.strerror or "permission denied"))
                continue
            write_cache(path, frames, self.root)
            decoded.append(Decoded(source, path, len(frames)))
        print(f"video-folder {self.root}: decoded {len(decoded)} of {len(pending)} file(s), "
              f"{sum(d.length for d in decoded)} frames, in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return decoded

    def _skip(self, source: Source, why: Unusable) -> None:
        """Leave ``source`` out, counted for the nothing-usable message, and say so."""
        self._skipped[why.reason] += 1
        self._report(source, str(why))

    def _report(self, source: Source, why: str) -> None:
        """One line on stderr per skipped file and process."""
        if source.path not in _reported:
            _reported.add(source.path)
            print(f"video-folder: skipping {source.path}: {why}", file=sys.stderr)

    def _nothing_usable(self, split: str, frames: int, span: int) -> str:
        videos = self._decoded()
        if not videos["train"] and not videos["test"] and not self._skipped:
            return (f"video-folder {self.root}: no videos found (looked for {' '.join(VIDEO_SUFFIXES)} files and "
                    f"folders of {' '.join(IMAGE_SUFFIXES)} images)")
        other = "test" if split == "train" else "train"
        counts = Counter(self._skipped)
        counts[f"too short for {frames} frames at stride {self.config.stride}"] = \
            sum(v.length < span for v in videos[split])
        counts[f"in the {other} split"] = len(videos[other])
        total = sum(counts.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.most_common() if n)
        one = len(videos["train"]) + len(videos["test"]) == 1
        hint = "; the split is by file: testing needs two usable videos" if one else ""
        return (f"video-folder {self.root}: no usable video for split {split!r} ({total} file{'s' * (total != 1)}: "
                f"{reasons}){hint}")


@hookimpl
def scdkit_register_datasets(register):
    register(VideoFolder)
