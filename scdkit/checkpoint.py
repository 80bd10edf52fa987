"""Safetensors checkpoints: one file per component, metadata that says what it is.

Metadata (all strings, as safetensors requires): ``plugin``, ``plugin_version``, ``config``
(JSON), ``contract`` (JSON), ``frame`` (JSON), ``scdkit_version``, ``step``, ``role``.
Loading compares the metadata with the component built from the registry and refuses a
mismatch, naming every differing field. Writes go to a temporary file that is renamed into
place, so a crash never leaves a half-written checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import scdkit
from scdkit.errors import CheckpointError


def component_metadata(module: nn.Module, role: str, step: int) -> dict[str, str]:
    meta = {
        "role": role,
        "plugin": module.plugin_name,
        "plugin_version": module.plugin_version,
        "config": module.config.model_dump_json(),
        "frame": module.frame.model_dump_json(),
        "scdkit_version": scdkit.__version__,
        "step": str(step),
    }
    contract = getattr(module, "contract", None)
    if contract is not None:
        meta["contract"] = contract.model_dump_json()
    family = getattr(module, "weight_family", "")
    if family:
        meta["weight_family"] = family
    return meta


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not mkstemp: that would make the file 0600
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_component(module: nn.Module, path: Path, role: str, step: int = 0) -> None:
    atomic_save(module.state_dict(), path, component_metadata(module, role, step))


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    metadata = read_metadata(path)  # checks that the file exists and is safetensors
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


# Fields that must match between a checkpoint and the component it is loaded into. ``plugin`` may
# differ when both declare the same weight family (a same-weights swap).
CHECKED_FIELDS = ("plugin", "plugin_version", "config", "frame", "contract")


def metadata_mismatches(stored: dict[str, str], expected: dict[str, str]) -> list[str]:
    same_family = stored.get("weight_family") and stored.get("weight_family") == expected.get("weight_family")
    problems = []
    for key in CHECKED_FIELDS:
        if key not in expected:
            continue
        if same_family and key in ("plugin", "plugin_version", "config"):
            continue  # compared below on the shared architecture fields only
        have, want = stored.get(key), expected[key]
        if key in ("config", "frame", "contract") and have is not None:
            problems += _json_diff(key, have, want)
        elif have != want:
            problems.append(f"{key}: checkpoint has {have!r}, registry wants {want!r}")
    if same_family:
        problems += _json_diff("config", stored.get("config", "{}"), expected["config"], only_common=True)
    return problems


def _json_diff(key: str, have: str, want: str, only_common: bool = False) -> list[str]:
    a, b = json.loads(have), json.loads(want)
    keys = (a.keys() & b.keys()) if only_common else (a.keys() | b.keys())
    return [f"{key}.{k}: checkpoint has {a.get(k)!r}, registry wants {b.get(k)!r}"
            for k in sorted(keys) if a.get(k) != b.get(k)]


def load_component(module: nn.Module, path: Path, role: str) -> dict[str, str]:
    """Load weights into ``module`` after checking the metadata; returns the metadata."""
    tensors, metadata = read_checkpoint(path)
    expected = component_metadata(module, role, 0)
    problems = metadata_mismatches(metadata, expected)
    if problems:
        raise CheckpointError(f"{path} does not match the registry entry: " + "; ".join(problems))
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit {module.plugin_name}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return metadata
