"""Writing files atomically: a temporary file beside the target, renamed over it only when complete,
so a crash or an error never leaves a half-written or replaced file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; it replaces ``path`` when the block succeeds and
    is removed when it fails. It keeps ``path``'s suffix (writers that pick a format by it) and ends with
    normal permissions (0666 less the umask), whatever the writer used (safetensors writes 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_writable(path: str | Path, option: str, folder: bool = False) -> None:
    """A one-line UsageError now, before any work, if ``path`` (a file, or a ``folder``) cannot be written:
    it exists as the other kind, or the nearest existing folder above it does not take new files (tried
    with a temporary file, which also catches read-only and virtual file systems such as /proc)."""
    from scdkit.errors import UsageError

    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{option} {path}: is {'a file' if folder else 'a directory'}, expected a {'folder' if folder else 'file'}")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write in {parent} ({exc.strerror or exc})") from None
