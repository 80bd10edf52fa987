"""Errors a user can act on. The CLI prints each as one line and exits non-zero."""

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'a', 'b'?"`` for the close matches of ``name`` among ``known``, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def install_hint(extra: str) -> str:
    """How to install one of scdkit's extras, from PyPI and from a clone (constraints.txt pins the CPU torch)."""
    return f"pip install 'scdkit[{extra}]' (from a clone: pip install -c constraints.txt -e \".[{extra}]\")"


class ScdkitError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""

    exit_code = 1


class UsageError(ScdkitError, ValueError):
    """Bad command-line arguments, configuration values or inputs (a ValueError to library callers)."""

    exit_code = 2


class RegistryError(ScdkitError):
    """One or more problems in a registry file; ``problems`` holds one line each."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class PluginError(ScdkitError):
    """A plugin is missing, broken, or registered twice."""

    exit_code = 2


class CheckpointError(ScdkitError):
    """A checkpoint is missing, corrupt, or does not match its registry entry."""

    exit_code = 2


class CheckpointMissing(CheckpointError):
    """A checkpoint file that does not exist (not one that exists but cannot be read)."""


class NotFinite(ScdkitError):
    """A result that is nan or inf (broken weights, or a precision that overflows): an error, never a figure."""

    exit_code = 2


class BackendUnavailable(ScdkitError):
    """An attention backend was requested explicitly but cannot run here."""

    exit_code = 2


class TrainingDiverged(ScdkitError):
    """The loss or the weights stopped being finite; the last checkpoint was not touched."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """Stopped by SIGINT (Ctrl-C) or SIGTERM, after finishing cleanly (training saves a checkpoint first);
    the message says what was kept. The CLI prints it as one line and exits 130, as for Ctrl-C."""
