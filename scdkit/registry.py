"""registry.toml: named, configured components assembled into pipelines.

    [scdkit]                      # optional settings
    allow_import_paths = false    # "module:Class" as a plugin name executes code: opt in explicitly
    plugin_dirs = []              # extra folders of plugin modules (relative to this file)
    extends = "../registry.toml"  # optional: start from another registry's tables (relative to this file)
    default_pipeline = "scd-digits"
    attention = "sdpa"            # attention backend; $SCDKIT_ATTENTION and --attention override it

    [encoders.NAME]  plugin = "<registered name>", then the plugin's config keys
    [decoders.NAME]  ...          [schedulers.NAME] ...      [models.NAME] ...      [datasets.NAME] ...
    [pipelines.NAME] encoder/decoder (or model), scheduler, frame geometry, checkpoint, data
                     (data: a [datasets.NAME] table, or a data set plugin with its default options)

Validation collects every problem, each as one line naming the file, the TOML path and what
was expected, with close-match suggestions.
"""

from __future__ import annotations

import importlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from scdkit.backends import DEFAULT as DEFAULT_ATTENTION
from scdkit.backends import choose_attention_backend, known_backends, use_attention_backend
from scdkit.checkpoint import (PREDICTING_ROLES, checkpoint_problems, read_metadata, scheduler_mismatch,
                               scheduler_problems)
from scdkit.errors import CheckpointError, CheckpointMissing, RegistryError, did_you_mean
from scdkit.files import read_problem
from scdkit.interfaces import FrameSpec, VideoDataset
from scdkit.pipeline import ROLE_SETS, Pipeline, assemble
from scdkit.pluginmanager import COMPONENT_KINDS, SINGULAR, Catalog, load_catalog
from scdkit.runs import (Source, checkpoint_files, load_source, manifest_encoder, mixed_steps_problem,
                         pairing_problem)

TOP_LEVEL = ("scdkit", *COMPONENT_KINDS, "pipelines")


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow_import_paths: bool = False
    plugin_dirs: list[str] = []
    default_pipeline: str | None = None
    #: another registry file (relative to this one) whose tables this one adds to or replaces
    extends: str | None = None
    #: other encoders that can load each other's weights, by registry name
    same_weights: list[list[str]] = []
    #: attention backend (or "auto"); a runtime choice, never stored in a checkpoint
    attention: str = DEFAULT_ATTENTION


class PipelineEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoder: str | None = None
    decoder: str | None = None
    model: str | None = None
    scheduler: str
    channels: int = 1
    height: int = 32
    width: int = 32
    patch_size: int = 4
    data: str = "moving-digits"
    checkpoint: str | None = None

    @property
    def frame(self) -> FrameSpec:
        return FrameSpec(channels=self.channels, height=self.height, width=self.width, patch_size=self.patch_size)

    @property
    def roles(self) -> dict[str, str]:
        """The trained components by role (``encoder``/``decoder`` or ``model``) and their registry names."""
        return {role: getattr(self, role) for role in ("encoder", "decoder", "model") if getattr(self, role)}


@dataclass
class ComponentEntry:
    kind: str
    name: str
    plugin: str
    cls: Any
    config: Any


@dataclass
class Registry:
    path: Path
    settings: Settings
    catalog: Catalog
    components: dict[str, dict[str, ComponentEntry]] = field(default_factory=dict)
    pipelines: dict[str, PipelineEntry] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the static problems, when loaded with ``collect``
    unbuildable: set[str] = field(default_factory=set)  # pipelines whose own tables have static problems

    @property
    def default_pipeline(self) -> str | None:
        return self.settings.default_pipeline or next(iter(self.pipelines), None)

    def checkpoint_dir(self, pipeline: str) -> Path | None:
        entry = self.pipelines[pipeline]
        return None if entry.checkpoint is None else (self.path.parent / entry.checkpoint)

    def entry(self, pipeline: str) -> PipelineEntry:
        if pipeline not in self.pipelines:
            raise RegistryError([f"{self.path}: unknown pipeline {pipeline!r}{did_you_mean(pipeline, self.pipelines)}"])
        return self.pipelines[pipeline]

    def build_component(self, kind: str, name: str, frame: FrameSpec, overrides: dict | None = None, **extra):
        """Component ``name`` of ``kind`` for ``frame``; ``overrides`` replace fields of its config."""
        entry = self.components[kind][name]
        config = entry.cls.config_class(**(entry.config.model_dump() | overrides)) if overrides else entry.config
        if kind == "schedulers":
            return entry.cls(config)
        return entry.cls(config, frame, **extra)

    def dataset(self, pipeline: str, name: str | None = None) -> VideoDataset:
        """The pipeline's data set (``name``: another one, e.g. from --data) for its frame: a [datasets.NAME]
        table, else a data set plugin of that name with its default options."""
        entry = self.entry(pipeline)
        name = name or entry.data
        problem = self.data_problem(name)
        if problem:
            raise RegistryError([f"{self.path}: {problem}"])
        if name in self.components["datasets"]:
            data = self.build_component("datasets", name, entry.frame)
        else:
            cls = self.catalog.get("datasets", name)
            data = cls(cls.config_class(), entry.frame)
        data.name = name
        return data

    def data_problem(self, name: str) -> str | None:
        """Why ``name`` names no data set here, or None."""
        tables, plugins = self.components["datasets"], self.catalog.components["datasets"]
        if name in tables or name in plugins:
            return None
        known = sorted({*tables, *plugins})
        return (f"unknown data set {name!r}{did_you_mean(name, known)} (known: {', '.join(known)}; "
                "a [datasets.NAME] table or a data set plugin)")

    def role_names(self, pipeline: str, encoder: str | None = None) -> dict[str, str]:
        """Each role's registry name in ``pipeline``, with ``encoder`` (any registry encoder) in the encoder role."""
        entry = self.entry(pipeline)
        if encoder is None:
            return entry.roles
        if encoder not in self.components["encoders"]:
            raise RegistryError([f"{self.path}: unknown encoder {encoder!r}{did_you_mean(encoder, self.components['encoders'])}"])
        if "encoder" not in entry.roles:
            raise RegistryError([f"{self.path}: pipeline {pipeline!r} is monolithic: it has no encoder to replace"])
        return entry.roles | {"encoder": encoder}

    def build_components(self, pipeline: str, encoder: str | None = None,
                         overrides: dict | None = None) -> dict[str, nn.Module]:
        """The pipeline's trained components by role, freshly initialised (``encoder``: another registry
        encoder in the encoder role; ``overrides``: config fields replaced in each, e.g. a narrower width).
        A decoder is built for the contract of the encoder beside it."""
        entry = self.entry(pipeline)
        names = self.role_names(pipeline, encoder)
        built: dict[str, nn.Module] = {}
        for role in sorted(names, key=lambda r: r != "encoder"):  # the encoder first: its contract shapes the decoder
            extra = {"cond": built["encoder"].contract} if role == "decoder" else {}
            try:
                built[role] = self.build_component(f"{role}s", names[role], entry.frame, overrides, **extra)
            except (ValueError, TypeError) as exc:
                raise BuildError(role, f"{role} {names[role]!r} cannot be built for this pipeline: {exc}") from exc
        return built

    def build(self, pipeline: str, load: bool = True, encoder: str | None = None, attention: str | None = None,
              checkpoint: str | Path | None = None, device: torch.device | str = "cpu",
              precision: str = "fp32", compile: bool = False, files: dict[str, Path] | None = None,
              force_pairing: bool = False) -> Pipeline:
        """Build a pipeline (optionally with another registry encoder), load its checkpoint, move it to
        ``device`` and choose its attention backend for that device and ``precision``; ``compile`` wraps its
        streaming steps with ``torch.compile`` (``Pipeline.compile_streaming``).

        ``attention`` (the --attention flag) wins over $SCDKIT_ATTENTION, then [scdkit].attention.
        ``checkpoint`` (a directory) replaces the pipeline's own, e.g. a run trained with ``--out``; a run
        folder trained with ``--encoder NAME`` brings that encoder unless ``encoder`` says otherwise.
        ``files`` (role -> checkpoint file or run folder) replaces single components' checkpoints.
        Encoder and decoder must belong together (``runs.pairing_problem``); ``force_pairing`` turns a
        refusal into a warning in ``pipeline.warnings``. ``pipeline.sources`` says what was loaded. The scheduler
        must sample the prediction type and noise family the decoder (or model) checkpoint was trained with
        (``checkpoint.scheduler_mismatch``).
        """
        entry = self.entry(pipeline)
        directory = Path(checkpoint) if checkpoint is not None else self.checkpoint_dir(pipeline)
        problem = read_problem(directory) if load and directory is not None else None
        if problem and problem != "not found":
            raise CheckpointError(f"{directory}: cannot read the checkpoint folder: {problem}")
        if load and encoder is None and directory is not None and "encoder" in entry.roles and not (files or {}).get("encoder"):
            encoder = manifest_encoder(directory)
            if encoder is not None and encoder not in self.components["encoders"]:
                raise CheckpointError(f"{directory / 'run.json'}: the run was trained with encoder {encoder!r}, which "
                                      f"{self.path} does not declare: pass the --registry that does")
        components = self.build_components(pipeline, encoder)
        sources = self._load(pipeline, components, directory, files or {}, encoder) if load else {}
        mixed = mixed_steps_problem(sources)
        if mixed:  # not even with force_pairing: no one trained these weights together
            raise CheckpointError(mixed)
        warnings = []
        if "encoder" in sources and "decoder" in sources:
            problem = pairing_problem(sources["encoder"], sources["decoder"])
            if problem and not force_pairing:
                raise CheckpointError(f"{problem} (fit the encoder under this decoder with `scdkit train --encoder "
                                      f"NAME --init DIR --freeze decoder`, or pass --force-pairing to use them anyway)")
            warnings += [f"{problem} (used anyway: --force-pairing)"] if problem else []
        scheduler = self.build_component("schedulers", entry.scheduler, entry.frame)
        for role, source in sources.items():
            problem = scheduler_mismatch(source.metadata, scheduler) if role in PREDICTING_ROLES else None
            if problem:
                raise CheckpointError(f"{self.path}: [pipelines.{pipeline}].scheduler: {source.path}: {problem}")
        result = Pipeline(pipeline, scheduler, entry.frame, assemble(components)).to(device)
        result.sources, result.warnings = sources, warnings
        result.set_precision(precision)
        backend, source = choose_attention_backend(attention, self.settings.attention)
        result.attention = use_attention_backend(result, backend, self.catalog, source)
        if compile:
            result.compile_streaming()
        return result

    def _load(self, pipeline: str, components: dict[str, nn.Module], directory: Path | None,
              files: dict[str, Path], encoder: str | None) -> dict[str, Source]:
        """Load every component from ``files`` or the checkpoint folder (none: fresh weights); what was loaded."""
        entry = self.entry(pipeline)
        paths = checkpoint_files(directory, components) if directory is not None else {}
        for role, given in files.items():
            paths[role] = checkpoint_files(given, [role])[role] if Path(given).is_dir() else Path(given)
        sources = {}
        for role, module in components.items():
            path = paths.get(role)
            if path is None:  # a pipeline without a checkpoint folder runs with fresh weights
                continue
            if role == "encoder" and encoder is not None and role not in files and path.is_file():
                trained_as = read_metadata(path).get("name", entry.encoder)
                if trained_as != encoder:
                    self.check_same_weights(trained_as, encoder, pipeline, path)
            try:
                sources[role] = load_source(module, path, role)
            except CheckpointMissing as exc:
                raise CheckpointError(f"{exc} (pipeline {pipeline!r}); train it with "
                                      f"`scdkit train --pipeline {pipeline}`") from None
            except CheckpointError as exc:
                try:
                    recorded = read_metadata(path).get("name")
                except CheckpointError:
                    raise exc from None
                if recorded and recorded != self.role_names(pipeline, encoder)[role] and role == "encoder":
                    raise CheckpointError(f"{exc} (that file is encoder {recorded!r}: pass --encoder {recorded})") from None
                raise
        return sources

    def dry_build(self, pipeline: str) -> Pipeline:
        """The pipeline on the meta device: every component constructed and checked, no memory, no weights."""
        entry = self.entry(pipeline)
        with torch.device("meta"):
            components = self.build_components(pipeline)
            scheduler = self.build_component("schedulers", entry.scheduler, entry.frame)
            return Pipeline(pipeline, scheduler, entry.frame, assemble(components))

    def check_same_weights(self, trained: str, other: str, pipeline: str | None = None,
                           path: Path | None = None) -> None:
        """Refuse to load encoder ``trained``'s checkpoint (``path``) into encoder ``other`` unless
        [scdkit].same_weights declares them together; the error lists the fields in which they differ and
        says how ``other`` gets weights of its own."""
        if other == trained or any(trained in group and other in group for group in self.settings.same_weights):
            return
        a, b = self.components["encoders"].get(trained), self.components["encoders"][other]
        differences = ", ".join(_entry_differences(a, b)) if a is not None else f"{trained!r} is not in this registry"
        pipeline = pipeline or self.settings.default_pipeline
        directory = self.checkpoint_dir(pipeline) if pipeline in self.pipelines else None
        raise CheckpointError(
            f"{self.path}: encoder {other!r} cannot load the checkpoint trained as {trained!r}"
            f"{f' ({path})' if path else ''}: not declared in [scdkit].same_weights (differing fields: "
            f"{differences or 'none'}); to give it weights of its own, fit it under the trained decoder with "
            f"`scdkit train --pipeline {pipeline} --encoder {other} --init {directory or 'DIR'} --freeze decoder "
            f"--out runs/{other}`, then evaluate it with `scdkit swap-eval --checkpoint {other}=runs/{other}` or "
            f"`scdkit generate --checkpoint runs/{other}`")


class BuildError(ValueError):
    """A component that its registry entry cannot build (its constructor refused the frame or contract)."""

    def __init__(self, role: str, message: str):
        super().__init__(message)
        self.role = role


def validate(registry: Registry) -> list[str]:
    """Dry-build every pipeline on the meta device and check it against its data set and its checkpoint
    folder, the scheduler included (it must sample what the checkpoint was trained to predict). Raises
    RegistryError with every problem (the static ones of a registry loaded with ``collect`` too), each naming
    file, table and key; returns one note per pipeline with a checkpoint folder (trained at which step, or
    not trained yet)."""
    problems, notes = list(registry.problems), []
    for name, entry in registry.pipelines.items():
        if name in registry.unbuildable:
            continue
        where = f"{registry.path}: [pipelines.{name}]"
        try:
            pipeline = registry.dry_build(name)
        except BuildError as exc:
            problems.append(f"{where}.{exc.role}: {exc}")
            continue
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: cannot be built: {exc}")
            continue
        try:
            data = registry.dataset(name)
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}.data: data set {entry.data!r} cannot be built for this pipeline: {exc}")
            continue
        problems += [f"{where}.{key}: {problem}" for key, problem in data.frame_problems()]
        for role, component in pipeline.components.items():
            problems += [f"{where}.data: {role} {entry.roles[role]!r} {problem}"
                         for problem in component.accepts.unmet_by(data.provides)]
        directory = registry.checkpoint_dir(name)
        if directory is not None:
            try:  # a run that fitted some components under frozen ones names their files in its run.json
                files = checkpoint_files(directory, pipeline.components)
            except CheckpointError as exc:
                problems.append(f"{where}.checkpoint: {exc}")
                continue
            found, note = checkpoint_problems(pipeline.components, directory, files)
            problems += [f"{where}.checkpoint: {problem}" for problem in found]
            problems += [f"{where}.scheduler: {problem}"
                         for problem in scheduler_problems(pipeline.components, files, pipeline.scheduler)]
            notes.append(f"pipeline {name}: {note}")
    if problems:
        raise RegistryError(problems)
    return notes


def _entry_differences(a: ComponentEntry, b: ComponentEntry, only_shared: bool = False) -> list[str]:
    """``field (a's value vs b's value)`` for the plugin and every config field that differs. With
    ``only_shared``: weight family and the config fields both have, i.e. what same weights must agree on."""
    x, y = a.config.model_dump(), b.config.model_dump()
    if only_shared:
        fa, fb = getattr(a.cls, "weight_family", ""), getattr(b.cls, "weight_family", "")
        found = [] if fa and fa == fb else [f"weight_family ({fa or 'none'!r} vs {fb or 'none'!r})"]
        keys = x.keys() & y.keys()
    else:
        found = [] if a.plugin == b.plugin else [f"plugin ({a.plugin!r} vs {b.plugin!r})"]
        keys = x.keys() | y.keys()
    return found + [f"{k} ({x.get(k, 'absent')!r} vs {y.get(k, 'absent')!r})" for k in sorted(keys) if x.get(k) != y.get(k)]


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _pydantic_problems(where: str, exc: ValidationError, model: type[BaseModel]) -> list[str]:
    problems = []
    for err in exc.errors():
        key = _format_loc(err["loc"])
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(str(err["loc"][0]), model.model_fields) or f"; expected one of: {', '.join(model.model_fields)}"
            problems.append(f"{where}.{key}: unknown key{hint}")
        elif key:
            problems.append(f"{where}.{key}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})")
        else:
            problems.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return problems


def _resolve_plugin(kind: str, plugin: str, settings: Settings, catalog: Catalog) -> Any:
    if ":" in plugin:
        if not settings.allow_import_paths:
            raise LookupError(f"import path {plugin!r} is not allowed; set allow_import_paths = true in [scdkit] "
                              "to opt in (it executes that code)")
        module_name, _, attr = plugin.partition(":")
        return getattr(importlib.import_module(module_name), attr)
    if plugin in catalog.components[kind]:
        return catalog.get(kind, plugin)
    try:
        catalog.get(kind, plugin)
    except Exception as exc:
        raise LookupError(str(exc)) from None


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError([f"{path}: registry file not found"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError([f"{path}: not valid TOML: {exc}"]) from None
    except OSError as exc:  # a directory, no permission, ...
        raise RegistryError([f"{path}: cannot read the registry file ({exc.strerror or exc})"]) from None


def _with_base(raw: dict, path: Path, seen: frozenset[Path]) -> dict:
    """``raw`` on top of the registry its ``[scdkit].extends`` names: every table of the base, a table or
    setting given here replacing the base's of the same name. The base's relative paths (checkpoints,
    plugin_dirs) stay relative to the base file."""
    settings = raw.get("scdkit", {})
    base_name = settings.get("extends") if isinstance(settings, dict) else None
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise RegistryError([f"{path}: [scdkit].extends: expected the path of a registry file, got {base_name!r}"])
    base_path = (path.parent / base_name).resolve()
    if base_path in seen:
        raise RegistryError([f"{path}: [scdkit].extends: {base_name!r} extends this file again (a cycle)"])
    base = _with_base(_read_toml(base_path), base_path, seen | {base_path})
    for table in base.get("pipelines", {}).values():
        if isinstance(table, dict) and isinstance(table.get("checkpoint"), str):
            table["checkpoint"] = str(base_path.parent / table["checkpoint"])
    base_settings = base.get("scdkit", {})
    if isinstance(base_settings.get("plugin_dirs"), list):
        base_settings["plugin_dirs"] = [str(base_path.parent / d) for d in base_settings["plugin_dirs"]]
    merged = {key: ({**base[key], **raw[key]} if isinstance(base.get(key), dict) and isinstance(raw.get(key), dict)
                    else raw.get(key, base.get(key)))
              for key in [*base, *(k for k in raw if k not in base)]}
    merged["scdkit"] = {k: v for k, v in merged["scdkit"].items() if k != "extends"}
    return merged


def _outside_plugin_dirs(path: Path) -> list[tuple[str, Path]]:
    """The ``plugin_dirs`` in effect for the registry ``path`` that lie outside the folder of the registry file
    that declares them (this one, or the base it extends that last set them), each with that file. Like
    import paths, they execute code from anywhere: they need ``allow_import_paths``."""
    seen = set()
    while path.resolve() not in seen:
        seen.add(path.resolve())
        settings = _read_toml(path).get("scdkit", {})
        settings = settings if isinstance(settings, dict) else {}
        dirs = settings.get("plugin_dirs")
        if isinstance(dirs, list):
            home = path.parent.resolve()
            return [(d, path) for d in dirs if isinstance(d, str) and not (home / d).resolve().is_relative_to(home)]
        if not isinstance(settings.get("extends"), str):
            return []
        path = (path.parent / settings["extends"]).resolve()
    return []


def load_registry(path: str | Path, catalog: Catalog | None = None, collect: bool = False) -> Registry:
    """Parse and validate a registry file; raise RegistryError listing every problem. With ``collect``,
    return the registry with its problems in ``registry.problems`` instead (for :func:`validate`)."""
    path = Path(path)
    raw = _with_base(_read_toml(path), path, frozenset({path.resolve()}))
    problems: list[str] = []
    for key in list(raw):
        if key in TOP_LEVEL and not isinstance(raw[key], dict):
            kind = "an array of tables" if isinstance(raw[key], list) else type(raw[key]).__name__
            problems.append(f"{path}: [{key}]: expected a table ([{key}] or [{key}.NAME]), got {kind}")
            del raw[key]
        elif key not in TOP_LEVEL:
            problems.append(f"{path}: [{key}]: unknown table{did_you_mean(key, TOP_LEVEL)} (expected one of: {', '.join(TOP_LEVEL)})")

    try:
        settings = Settings(**raw.get("scdkit", {}))
    except ValidationError as exc:
        problems += _pydantic_problems(f"{path}: [scdkit]", exc, Settings)
        settings = Settings()
    missing = [d for d in settings.plugin_dirs if not (path.parent / d).is_dir()]
    problems += [f"{path}: [scdkit].plugin_dirs: no folder {d!r} (relative to this file)" for d in missing]
    outside = [] if settings.allow_import_paths else _outside_plugin_dirs(path)
    problems += [f"{path}: [scdkit].plugin_dirs: {d!r} is outside the folder of {declared_in}, and loading it "
                 "executes its .py files; set allow_import_paths = true in [scdkit] to opt in" for d, declared_in in outside]
    if catalog is None:
        refused = {(declared_in.parent / d).resolve() for d, declared_in in outside}
        catalog = load_catalog([path.parent / d for d in settings.plugin_dirs
                                if d not in missing and (path.parent / d).resolve() not in refused])
    registry = Registry(path, settings, catalog, {kind: {} for kind in COMPONENT_KINDS})

    for kind in COMPONENT_KINDS:
        for name, table in raw.get(kind, {}).items():
            where = f"{path}: [{kind}.{name}]"
            if not isinstance(table, dict):
                problems.append(f"{where}: expected a table, got {type(table).__name__}")
                continue
            options = dict(table)
            plugin = options.pop("plugin", None)
            if not isinstance(plugin, str):
                problems.append(f"{where}.plugin: missing (expected a registered {SINGULAR[kind]} name)")
                continue
            try:
                cls = _resolve_plugin(kind, plugin, settings, catalog)
            except Exception as exc:
                problems.append(f"{where}.plugin: {exc}")
                continue
            try:
                config = cls.config_class(**options)
            except ValidationError as exc:
                problems += _pydantic_problems(where, exc, cls.config_class)
                continue
            registry.components[kind][name] = ComponentEntry(kind, name, plugin, cls, config)

    for name, table in raw.get("pipelines", {}).items():
        where = f"{path}: [pipelines.{name}]"
        try:
            entry = PipelineEntry(**table)
            entry.frame  # geometry checks
        except (ValidationError, ValueError, TypeError) as exc:
            if isinstance(exc, ValidationError):
                problems += _pydantic_problems(where, exc, PipelineEntry)
            else:
                problems.append(f"{where}: {exc}")
            continue
        if frozenset(entry.roles) not in ROLE_SETS:
            problems.append(f"{where}: give either encoder and decoder (SCD) or model (monolithic), not both or neither")
            continue
        before = len(problems)
        for key, ref in {"scheduler": entry.scheduler, **entry.roles}.items():
            kind = f"{key}s"
            if ref not in registry.components[kind]:
                declared = raw.get(kind, {})
                if ref in declared:
                    problems.append(f"{where}.{key}: {key} {ref!r} is declared but invalid (see above)")
                else:
                    problems.append(f"{where}.{key}: no [{kind}.{ref}] in this registry{did_you_mean(ref, declared)}")
        if registry.data_problem(entry.data):
            declared = raw.get("datasets", {})
            problems.append(f"{where}.data: data set {entry.data!r} is declared but invalid (see above)"
                            if entry.data in declared else f"{where}.data: {registry.data_problem(entry.data)}")
        registry.pipelines[name] = entry
        if len(problems) > before:
            registry.unbuildable.add(name)

    if not registry.pipelines and not problems:
        problems.append(f"{path}: no [pipelines.*] table: declare at least one pipeline")
    default = settings.default_pipeline
    if default is not None and default not in raw.get("pipelines", {}):
        problems.append(f"{path}: [scdkit].default_pipeline: no pipeline {default!r}{did_you_mean(default, raw.get('pipelines', {}))}")
    for group in settings.same_weights:
        for name in group:
            if name not in raw.get("encoders", {}):
                problems.append(f"{path}: [scdkit].same_weights: no encoder {name!r}{did_you_mean(name, raw.get('encoders', {}))}")
        entries = [registry.components["encoders"][name] for name in group if name in registry.components["encoders"]]
        for other in entries[1:]:
            differences = _entry_differences(entries[0], other, only_shared=True)
            if differences:
                problems.append(f"{path}: [scdkit].same_weights: {entries[0].name!r} and {other.name!r} cannot share "
                                f"weights: {', '.join(differences)}")
    known = known_backends(catalog)
    if settings.attention not in known:
        problems.append(f"{path}: [scdkit].attention: unknown attention backend {settings.attention!r}"
                        f"{did_you_mean(settings.attention, known) or '; known: ' + ', '.join(known)}")
    registry.problems = problems
    if problems and not collect:
        raise RegistryError(problems)
    return registry
