"""Safetensors checkpoints: one file per component, metadata that says what it is.

Metadata (all strings, as safetensors requires): ``plugin``, ``plugin_version``, ``config``
(JSON), ``contract`` (JSON), ``frame`` (JSON), ``scdkit_version``, ``step``, ``role``; written by
training, also ``prediction_type`` and ``noise_family`` of the scheduler it trained with.
Loading compares the metadata with the component built from the registry and refuses a
mismatch, naming every differing field (:func:`scheduler_mismatch`: a scheduler sampling other
predictions or noise than the model was trained for). Writes go to a temporary file that is renamed
into place, so a crash never leaves a half-written checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import scdkit
from scdkit.errors import CheckpointError, CheckpointMissing
from scdkit.files import atomic_path, read_problem


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


#: The roles whose output is the prediction a scheduler samples with.
PREDICTING_ROLES = ("decoder", "model")
#: What a checkpoint that records no training scheduler was trained with. Every checkpoint written before
#: scdkit recorded it (the shipped ones included) was trained with flow-match-euler: flow-matching velocity.
UNRECORDED_SCHEDULER = {"prediction_type": "velocity", "noise_family": "flow-matching"}


def scheduler_metadata(scheduler) -> dict[str, str]:
    """What a checkpoint records of the scheduler it was trained with (``Trainer.save``)."""
    return {"prediction_type": scheduler.prediction_type, "noise_family": scheduler.noise_family}


def scheduler_mismatch(metadata: dict[str, str], scheduler) -> str | None:
    """Why ``scheduler`` cannot sample a model whose checkpoint has ``metadata``, or None: a model samples only
    with schedulers of the prediction type and noise family it was trained with."""
    trained = {key: metadata.get(key, default) for key, default in UNRECORDED_SCHEDULER.items()}
    wanted = scheduler_metadata(scheduler)
    if trained == wanted:
        return None
    return (f"trained to predict {trained['prediction_type']} on {trained['noise_family']} noise, but scheduler "
            f"plugin {scheduler.plugin_name!r} samples {wanted['prediction_type']} on {wanted['noise_family']} noise "
            "(a model samples only with schedulers of the prediction type and noise family it was trained with)")


def weights_digest(weights: nn.Module | dict[str, torch.Tensor]) -> str:
    """SHA-256 of a component's weights: every state-dict tensor's name, dtype, shape and bytes, in name
    order. It names the weights themselves, whatever file, device or metadata they came with, so two
    checkpoints with the same digest hold the same weights (a same-weights swap loads the same digest)."""
    tensors = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:  # safetensors files live on the CPU, whatever device trained them
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def save_component(module: nn.Module, path: Path, role: str, step: int = 0, extra: dict[str, str] | None = None) -> None:
    """Write ``module``'s weights with its metadata (plus ``extra``, e.g. ``runs.provenance``)."""
    atomic_save(module.state_dict(), path, component_metadata(module, role, step) | (extra or {}))


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
    problem = read_problem(path)
    if problem == "not found":
        raise CheckpointMissing(f"{path}: checkpoint file not found")
    if problem:
        raise CheckpointError(f"{path}: cannot read the checkpoint file: {problem}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


# Fields that must match between a checkpoint and the component it is loaded into. ``plugin`` may
# differ when both declare the same weight family (a same-weights swap); see ``version_problem``.
CHECKED_FIELDS = ("plugin", "plugin_version", "config", "frame", "contract")


def metadata_mismatches(stored: dict[str, str], expected: dict[str, str], defaults: dict | None = None) -> list[str]:
    """Every field in which a checkpoint's metadata differs from what the component expects. A config
    key the checkpoint lacks matches its default in ``defaults`` (an option added to the plugin later)."""
    defaults = defaults or {}
    same_family = stored.get("weight_family") and stored.get("weight_family") == expected.get("weight_family")
    problems = []
    for key in CHECKED_FIELDS:
        if key not in expected:
            continue
        if key == "plugin_version":
            problems += filter(None, [version_problem(stored, expected)])
            continue
        if same_family and key in ("plugin", "config"):
            continue  # compared below on the shared architecture fields only
        have, want = stored.get(key), expected[key]
        if key in ("config", "frame", "contract") and have is not None:
            problems += _json_diff(key, have, want, defaults=defaults if key == "config" else {})
        elif have != want:
            problems.append(f"{key}: checkpoint has {have!r}, registry wants {want!r}")
    if same_family:
        problems += _json_diff("config", stored.get("config", "{}"), expected["config"], only_common=True)
    return problems


def version_problem(stored: dict[str, str], expected: dict[str, str]) -> str | None:
    """Why a checkpoint's ``plugin_version`` refuses it, or None. A plugin loads its own checkpoints at
    exactly its version. Members of one weight family load one another's checkpoints when their versions
    have the same major number (``1`` of ``1.4.2``, ``0`` of ``0.1.0``): a member that changes what the
    shared weights compute bumps its major version, and the family's other members follow it when they make
    the same change."""
    have, want = stored.get("plugin_version"), expected.get("plugin_version")
    if have == want:
        return None
    plugin, family = expected.get("plugin"), expected.get("weight_family")
    if stored.get("plugin") == plugin or not family or stored.get("weight_family") != family:
        return f"plugin_version: checkpoint has {have!r}, registry wants {want!r}"
    if _major(have) == _major(want):
        return None
    return (f"plugin_version: checkpoint has {stored.get('plugin')} {have!r}, registry wants {plugin} {want!r}: "
            f"members of weight family {family!r} load one another's checkpoints only at the same major version")


def _major(version: str | None) -> str | None:
    return None if version is None else str(version).split(".", 1)[0]


def shape_problems(stored: dict[str, tuple], wanted: dict[str, tuple], what: str) -> list[str]:
    """How the tensors ``stored`` (name -> shape) do not fit the ones ``what`` wants: names missing or
    unexpected, shapes that differ (one line, not torch's size-mismatch report)."""
    missing, unexpected = sorted(wanted.keys() - stored.keys()), sorted(stored.keys() - wanted.keys())
    problems = [f"weights do not fit {what}: missing {missing[:5]}, unexpected {unexpected[:5]}"] \
        if missing or unexpected else []
    return problems + [f"{k}: checkpoint has shape {list(stored[k])}, the component {list(shape)}"
                       for k, shape in wanted.items() if k in stored and tuple(stored[k]) != tuple(shape)]


def _json_diff(key: str, have: str, want: str, only_common: bool = False, defaults: dict | None = None) -> list[str]:
    try:
        a = json.loads(have)
    except (json.JSONDecodeError, TypeError):
        a = None
    if not isinstance(a, dict):
        return [f"{key}: the checkpoint's metadata is not a JSON object ({str(have)[:40]!r})"]
    b = json.loads(want)
    a = {k: v for k, v in (defaults or {}).items() if k in b} | a
    keys = (a.keys() & b.keys()) if only_common else (a.keys() | b.keys())
    return [f"{key}.{k}: checkpoint has {a.get(k, 'absent')!r}, registry wants {b.get(k, 'absent')!r}"
            for k in sorted(keys) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


_ABSENT = object()


def config_defaults(module: nn.Module) -> dict:
    """The JSON form of each config field's default (what an older checkpoint that lacks it meant), as the
    config's own JSON dump would write it (tuples as lists, default factories called)."""
    from pydantic_core import to_jsonable_python

    fields = module.config_class.model_fields
    return {k: to_jsonable_python(f.get_default(call_default_factory=True))
            for k, f in fields.items() if not f.is_required()}


def checkpoint_mismatches(module: nn.Module, path: Path, role: str) -> tuple[list[str], dict[str, str]]:
    """Every way the checkpoint file at ``path`` does not fit ``module`` — metadata, tensor names and
    shapes — read from the file's header alone (no weights loaded; ``module`` may live on the meta
    device), and the file's metadata."""
    from safetensors import safe_open

    metadata = read_metadata(path)
    problems = metadata_mismatches(metadata, component_metadata(module, role, 0), config_defaults(module))
    with safe_open(str(path), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return problems + shape_problems(stored, wanted, module.plugin_name), metadata


def load_component(module: nn.Module, path: Path, role: str) -> dict[str, str]:
    """Load weights into ``module`` (on any device) after checking them; returns the metadata."""
    problems, metadata = checkpoint_mismatches(module, path, role)
    if problems:
        raise CheckpointError(f"{path} does not match the registry entry: " + "; ".join(problems))
    tensors, _ = read_checkpoint(path)
    module.load_state_dict(tensors)
    return metadata


def checkpoint_problems(components: dict[str, nn.Module], directory: Path,
                        files: dict[str, Path] | None = None) -> tuple[list[str], str]:
    """Check a pipeline's checkpoint folder against its components (e.g. built on the meta device):
    (problems, a one-line note on what the folder holds). ``files``: each role's file (default: the folder's own
    ``ROLE.safetensors``; ``runs.checkpoint_files`` follows a run's ``run.json`` to its frozen components). A folder
    without any component file is not trained yet, which is no problem."""
    problem = read_problem(directory)
    if problem and problem != "not found":
        return [f"{directory}: cannot read the checkpoint folder: {problem}"], f"{directory}: unreadable"
    files = files or {role: Path(directory) / f"{role}.safetensors" for role in components}
    present = [role for role, path in files.items() if path.is_file()]
    if not present:
        return [], f"{directory}: not trained yet"
    problems = [f"{directory} holds {', '.join(files[r].name for r in present)} but no {role}.safetensors"
                if files[role].parent == Path(directory) else
                f"{directory}/run.json names {os.path.normpath(files[role])} as its frozen {role}: not found"
                for role in files if role not in present]
    steps = {}
    for role in present:
        try:
            found, metadata = checkpoint_mismatches(components[role], files[role], role)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        problems += [f"{files[role]}: {problem}" for problem in found]
        steps[role] = metadata.get("step", "?")
    if len(set(steps.values())) <= 1:
        return problems, f"{directory}: trained, step {', '.join(set(steps.values()))}"
    return problems, f"{directory}: trained, " + ", ".join(f"{role} step {step}" for role, step in steps.items())


def scheduler_problems(components: dict[str, nn.Module], files: dict[str, Path], scheduler) -> list[str]:
    """``FILE: why`` for each checkpoint file of a predicting component (``files``: by role) that ``scheduler``
    cannot sample (:func:`scheduler_mismatch`). A file that cannot be read is :func:`checkpoint_problems`' to report."""
    problems = []
    for role in PREDICTING_ROLES:
        path = files.get(role)
        if role not in components or path is None or read_problem(path):  # missing, or unreadable (no permission)
            continue
        try:
            problem = scheduler_mismatch(read_metadata(path), scheduler)
        except CheckpointError:
            continue
        problems += [f"{path}: {problem}"] if problem else []
    return problems
