"""Choosing an attention backend by name and applying it to a pipeline or module.

Precedence, first given wins: the ``--attention`` flag, the ``SCDKIT_ATTENTION`` environment
variable, the registry's ``[scdkit].attention``, then ``sdpa``. ``auto`` picks the first of
flash → sdpa → eager that can run on the parameters' device and dtype. An explicit request for
a backend that cannot run here is a ``BackendUnavailable`` error; nothing falls back silently.
The choice only swaps functions (``DiTBlock.attend``): no weight changes and nothing is
written to a checkpoint.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from scdkit.errors import BackendUnavailable, PluginError, did_you_mean
from scdkit.nn.attention import ENV_VAR, AttentionBackend, set_attention_backend
from scdkit.pluginmanager import Catalog, default_catalog

KIND = "attention_backends"
DEFAULT = "sdpa"
AUTO = "auto"
AUTO_ORDER = ("flash", "sdpa", "eager")


def known_backends(catalog: Catalog) -> list[str]:
    """Every name a user may ask for: the registered backends and ``auto``."""
    return [*catalog.names(KIND), AUTO]


def choose_attention_backend(flag: str | None = None, setting: str | None = None) -> tuple[str, str]:
    """(name, where it came from), by precedence: flag, environment variable, registry setting, default."""
    for name, source in ((flag, "--attention"), (os.environ.get(ENV_VAR), f"${ENV_VAR}"),
                         (setting, "the registry's [scdkit].attention")):
        if name:
            return name, source
    return DEFAULT, "the default"


def resolve_attention_backend(name: str, device: torch.device | str, dtype: torch.dtype,
                              catalog: Catalog | None = None) -> tuple[AttentionBackend, str]:
    """The backend ``name`` (or ``auto``'s pick) for this device/dtype, with a message saying what was chosen."""
    if catalog is None:
        catalog = default_catalog()
    if name == AUTO:
        return _auto(device, dtype, catalog)
    if name not in catalog.components[KIND] and (KIND, name) not in catalog.conflicts:
        hint = did_you_mean(name, known_backends(catalog)) or f"; known: {', '.join(known_backends(catalog))}"
        broken = "".join(f"; broken plugin {b.provider} might provide it" for b in catalog.broken)
        raise PluginError(f"unknown attention backend {name!r}{hint}{broken}")
    backend: AttentionBackend = catalog.get(KIND, name)
    reason = backend.unavailable(torch.device(device), dtype)
    if reason:
        hint = f"; install: {backend.install_hint}" if backend.install_hint else ""
        raise BackendUnavailable(f"attention backend {name!r} cannot run here: {reason}{hint}")
    return backend, f"attention backend: {name}"


def _auto(device: torch.device | str, dtype: torch.dtype, catalog: Catalog) -> tuple[AttentionBackend, str]:
    skipped = []
    for name in AUTO_ORDER:
        if name not in catalog.components[KIND]:
            skipped.append(f"{name}: not registered")
            continue
        backend: AttentionBackend = catalog.get(KIND, name)
        reason = backend.unavailable(torch.device(device), dtype)
        if reason is None:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            return backend, f"attention backend: auto picked {name} for {torch.device(device).type}/" \
                            f"{str(dtype).removeprefix('torch.')}{why}"
        skipped.append(f"{name} skipped: {reason}")
    raise BackendUnavailable(f"attention backend 'auto' found nothing usable: {'; '.join(skipped)}")


def use_attention_backend(target: nn.Module, name: str, catalog: Catalog | None = None,
                          source: str | None = None) -> str:
    """Route every attention call of a pipeline (or module) through backend ``name``; return what was chosen.

    The device is the first parameter's; the dtype its autocast dtype when the pipeline has one, else
    the parameter's (CPU/float32 when there is none). Call again after moving a model to another
    device or dtype.
    """
    first = next(target.parameters(), None)
    device, dtype = (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)
    dtype = getattr(target, "autocast_dtype", None) or dtype
    try:
        backend, message = resolve_attention_backend(name, device, dtype, catalog)
    except (BackendUnavailable, PluginError) as exc:
        if source is None:
            raise
        raise type(exc)(f"{exc} (requested by {source})") from None
    set_attention_backend(target, backend.fn)
    return message if source is None else f"{message} (from {source})"
