"""Where a pipeline's weights come from: run folders, ``--init`` sources, frozen components, provenance.

A run folder (``scdkit train --out DIR``) holds one ``ROLE.safetensors`` per component the run trained,
``train_state.safetensors`` (to resume), ``train_log.jsonl`` and ``run.json``: the pipeline, each role's
registry name, and for each frozen component the checkpoint it was loaded from (path relative to the
folder, step, weights digest) instead of a copy with a step it was never trained at.

Each component checkpoint records its provenance in its metadata:

- ``name``: its registry name; ``weights_sha256``: the digest of its weights (``checkpoint.weights_digest``);
- ``trained_with``: for every other component of the pipeline at that save, its name, plugin, step and
  digest (a frozen one's as loaded, a trained one's as saved beside it).

An encoder and a decoder belong together when either records the other's digest: saved by the same run,
an encoder fitted under this frozen decoder, or a decoder fine-tuned under this frozen encoder. A
same-weights encoder loads the very weights of the encoder it stands in for, so it has their digest.
Checkpoints written before scdkit 0.3 record nothing; two of them from one folder count as one run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from scdkit.checkpoint import checkpoint_mismatches, load_component, weights_digest
from scdkit.errors import CheckpointError, UsageError
from scdkit.files import read_problem, write_text_atomic

MANIFEST = "run.json"
STATE = "train_state.safetensors"


@dataclass
class Source:
    """A component checkpoint as loaded: where from, its metadata and the digest of its weights."""

    role: str
    path: Path
    metadata: dict[str, str]
    digest: str

    @property
    def step(self) -> int:
        return int(self.metadata.get("step", 0))

    @property
    def name(self) -> str | None:
        return self.metadata.get("name")

    @property
    def trained_with(self) -> dict[str, dict]:
        return json.loads(self.metadata.get("trained_with", "{}"))

    def identity(self) -> dict:
        return {"name": self.name, "plugin": self.metadata.get("plugin"), "step": self.step,
                "weights_sha256": self.digest}

    def describe(self) -> str:
        name = f"{self.name}, " if self.name else ""
        return f"{self.path} ({name}{self.metadata.get('plugin')}, step {self.step}, sha256 {self.digest[:12]})"


def load_source(module: nn.Module, path: Path, role: str) -> Source:
    """Load ``path`` into ``module`` (checked against it, see ``load_component``) and say what was loaded."""
    metadata = load_component(module, path, role)
    return Source(role, Path(path), metadata, weights_digest(module))


def provenance(name: str, digest: str, others: dict[str, dict]) -> dict[str, str]:
    """The provenance metadata of a component checkpoint (see the module doc)."""
    return {"name": name, "weights_sha256": digest, "trained_with": json.dumps(others, sort_keys=True)}


# -- run folders --------------------------------------------------------------------------------

def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the run manifest: {(exc.strerror or str(exc)).lower()}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable run manifest ({exc})") from None
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(key, {}), dict)
                                                 for key in ("components", "frozen")):
        raise CheckpointError(f"{path}: not a readable run manifest (expected a JSON object with objects "
                              "'components' and 'frozen')")
    return manifest


def write_manifest(directory: Path, pipeline: str, names: dict[str, str], frozen: dict[str, dict],
                   teacher: dict | None = None) -> None:
    """``run.json``: the pipeline, each role's registry name, and each frozen component's identity (name,
    plugin, step, digest) with the path of its file, relative to the folder (both move together) and
    absolute (the folder moves alone); a distillation's ``teacher`` (``distill.teacher_identity``)."""
    directory = Path(directory)
    entries = {role: {k: v for k, v in entry.items() if k != "path"}
               | {"path": os.path.relpath(Path(entry["path"]).resolve(), directory.resolve()),
                  "absolute_path": str(Path(entry["path"]).resolve())}
               for role, entry in frozen.items()}
    manifest = {"pipeline": pipeline, "components": names, "frozen": entries} | ({"teacher": teacher} if teacher else {})
    write_text_atomic(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def checkpoint_files(directory: Path, roles) -> dict[str, Path]:
    """Each role's checkpoint file in a checkpoint folder: its own ``ROLE.safetensors``, else the frozen
    component's file that the folder's ``run.json`` points to."""
    directory = Path(directory)
    frozen = read_manifest(directory).get("frozen", {})
    files = {}
    for role in roles:
        own = directory / f"{role}.safetensors"
        if role in frozen and not own.is_file():
            entry = frozen[role]
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise CheckpointError(f"{directory / MANIFEST}: frozen.{role} has no path to its checkpoint")
            relative, absolute = directory / entry["path"], Path(entry.get("absolute_path", ""))
            own = absolute if not relative.is_file() and absolute.is_file() else relative
        files[role] = own
    return files


def manifest_encoder(directory: Path) -> str | None:
    """The registry name of the encoder a run folder was trained with, if it says."""
    return read_manifest(directory).get("components", {}).get("encoder")


def trained_weights(directory: Path) -> list[str]:
    """The component files a folder holds, e.g. ``["decoder.safetensors (step 1500)"]``."""
    from scdkit.checkpoint import read_metadata

    found = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        if path.name != STATE and not path.name.startswith("."):
            try:
                found.append(f"{path.name} (step {read_metadata(path).get('step', '?')})")
            except CheckpointError:
                found.append(path.name)
    return found


# -- provenance checks --------------------------------------------------------------------------

def mixed_steps_problem(sources: dict[str, Source]) -> str | None:
    """Why these component files cannot be used together because one training run wrote them at different
    steps (a save killed between them), or None. Two files of one folder belong to one save when each
    records the other as trained beside it: its ``trained_with`` entry has its own step."""
    for role, a in sources.items():
        for other, b in sources.items():
            beside = a.trained_with.get(other, {})
            if other != role and a.path.parent.resolve() == b.path.parent.resolve() \
                    and isinstance(beside, dict) and beside.get("step") == a.step and b.step != a.step:
                return (f"{a.path} (step {a.step}) and {b.path} (step {b.step}) are from different steps of one "
                        f"training run: a save was interrupted between them. Resuming the run (scdkit train --out "
                        f"{a.path.parent}) rewrites them from its training state")
    return None


def pairing_problem(encoder: Source, decoder: Source) -> str | None:
    """Why this encoder and decoder do not belong together (see the module doc), or None."""
    if encoder.trained_with.get("decoder", {}).get("weights_sha256") == decoder.digest:
        return None
    if decoder.trained_with.get("encoder", {}).get("weights_sha256") == encoder.digest:
        return None
    legacy = not {"trained_with", "weights_sha256"} & (encoder.metadata.keys() | decoder.metadata.keys())
    if legacy and encoder.path.parent.resolve() == decoder.path.parent.resolve():
        return None
    fitted = encoder.trained_with.get("decoder")
    history = (f"was trained with decoder {fitted.get('name') or fitted.get('plugin')} at step {fitted.get('step')} "
               f"(sha256 {str(fitted.get('weights_sha256'))[:12]})" if fitted else "records no decoder it was trained with")
    return f"encoder {encoder.describe()} {history}, not with decoder {decoder.describe()}: they do not belong together"


# -- --init -------------------------------------------------------------------------------------

@dataclass
class InitReport:
    loaded: dict[str, Source] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "role: why", for folders that held a non-matching file


def init_components(components: dict[str, nn.Module], items: list[str]) -> InitReport:
    """Load ``--init`` sources into ``components`` (role -> module, built but not loaded).

    Each item is a run folder (every role whose checkpoint there fits is loaded; one that does not fit is
    skipped, with the reason), a single checkpoint file (loaded into the role its metadata names), or
    ``ROLE=PATH`` (a file or a folder, for that role alone). An explicit file that does not fit is an error.
    """
    report = InitReport()
    for item in items:
        role, sep, rest = item.partition("=")
        explicit = bool(sep) and role in components
        if sep and not explicit:
            raise UsageError(f"--init {item}: {role!r} is not a role of this pipeline ({', '.join(components)})")
        path = Path(rest if explicit else item)
        check_init_readable([item])
        if path.is_dir():
            roles = [role] if explicit else list(components)
            files = {r: p for r, p in checkpoint_files(path, roles).items() if p.is_file()}
            if explicit and role not in files:
                raise UsageError(f"--init {item}: {path} holds no {role}.safetensors")
        else:
            file_role = _file_role(path, item)
            if explicit and file_role != role:
                raise UsageError(f"--init {item}: {path} is a {file_role} checkpoint, not a {role}")
            if file_role not in components:
                raise UsageError(f"--init {item}: {path} is a {file_role} checkpoint; this pipeline has "
                                 f"{', '.join(components)}")
            files, explicit = {file_role: path}, True
        for r, file in files.items():
            problems, _ = checkpoint_mismatches(components[r], file, r)
            if problems and explicit:
                raise UsageError(f"--init {item}: {file} does not fit the {r}: {'; '.join(problems)}")
            if problems:
                report.skipped.append(f"{r}: {file} does not fit ({'; '.join(problems)})")
                continue
            if r in report.loaded:
                raise UsageError(f"--init: two sources for the {r}: {report.loaded[r].path} and {file}")
            report.loaded[r] = load_source(components[r], file, r)
    if items and not report.loaded:
        raise UsageError(f"--init {' '.join(items)}: no checkpoint there fits this pipeline: {'; '.join(report.skipped)}")
    return report


def check_init_readable(items: list[str]) -> None:
    """A one-line UsageError for an ``--init`` item (``PATH`` or ``ROLE=PATH``) that does not exist or cannot
    be read: the file, or the folder and the checkpoint files and run.json in it. Cheap: run it before any work."""
    for item in items:
        _, sep, rest = item.partition("=")
        path = Path(rest if sep else item)
        problem = read_problem(path)
        if problem:
            raise UsageError(f"--init {item}: {path} "
                             f"{'does not exist' if problem == 'not found' else f'cannot be read: {problem}'}")
        inside = [*path.glob("*.safetensors"), path / MANIFEST] if path.is_dir() else []
        for file in inside:
            problem = read_problem(file) if file.exists() else None
            if problem:
                raise UsageError(f"--init {item}: {file} cannot be read: {problem}")


def _file_role(path: Path, item: str) -> str:
    from scdkit.checkpoint import read_metadata

    try:
        role = read_metadata(path).get("role")
    except CheckpointError as exc:
        raise UsageError(f"--init {item}: {exc}") from None
    if not role:
        raise UsageError(f"--init {item}: {path} does not say which component it is (no 'role' in its metadata)")
    return role
