"""Writing files atomically: a temporary file beside the target, renamed over it only when complete,
so a crash or an error never leaves a half-written or replaced file."""

from __future__ import annotations

import errno
import os
import re
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
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # TEMPORARY matches it
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: The name of an ``atomic_path`` temporary file, with the id of the process that writes it.
TEMPORARY = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[^.]*)?$")


def stale_temporaries(folder: str | Path) -> list[Path]:
    """The ``atomic_path`` temporary files in ``folder`` whose writer is gone (killed before it could remove
    them). A file whose process id is alive is kept: it may be a write in progress."""
    found = []
    for path in sorted(Path(folder).iterdir()):
        match = TEMPORARY.match(path.name)
        if match and path.is_file() and not _alive(int(match["pid"])):
            found.append(path)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:  # EPERM: alive, another user's
        return exc.errno == errno.EPERM
    return True


def read_problem(path: str | Path) -> str | None:
    """Why ``path`` (a file or a folder) cannot be read, as a short phrase ("not found", "permission
    denied (FOLDER)"), or None when it can. It names the folder or file that refuses access, since a
    file in a folder without permission looks missing to ``Path.exists``."""
    path = Path(path)
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb"):
                pass
    except FileNotFoundError:
        return "not found"
    except PermissionError:
        denied = next((p for p in [*reversed(path.parents), path] if p.exists() and not _readable(p)), path)
        return f"permission denied{f' ({denied})' if denied != path else ''}"
    except IsADirectoryError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _readable(path: Path) -> bool:
    return os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0))


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
