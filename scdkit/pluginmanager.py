"""Loads plugins through pluggy and keeps the catalog of registered components.

Sources, in order: the built-in modules under ``scdkit.plugins`` (and the built-in attention
backends), extra plugin folders named by a registry, then the ``scdkit`` entry-point group.
Every plugin loads and registers in isolation: one that fails is recorded in
``catalog.broken`` and the others keep working. It becomes fatal only when a pipeline asks
for a name it would have provided.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

import scdkit
from scdkit import hookspecs
from scdkit.errors import PluginError, did_you_mean

ENTRY_POINT_GROUP = "scdkit"


@dataclass(frozen=True)
class Kind:
    """A kind of plugin: ``name`` is its registration hook's suffix (``scdkit_register_<name>``), its
    catalog key and, for configured components, its registry table (``[<name>.NAME]``)."""

    name: str
    singular: str
    builtins: str  # the package (or module) of the built-in plugins
    configured: bool = True  # named and configured in registry tables


#: The one table of plugin kinds.
KIND_TABLE = (
    Kind("encoders", "encoder", "scdkit.plugins.encoders"),
    Kind("decoders", "decoder", "scdkit.plugins.decoders"),
    Kind("schedulers", "scheduler", "scdkit.plugins.schedulers"),
    Kind("models", "model", "scdkit.plugins.models"),
    Kind("datasets", "data set", "scdkit.plugins.datasets"),
    Kind("attention_backends", "attention backend", "scdkit.nn.attention", configured=False),
)
KINDS = tuple(kind.name for kind in KIND_TABLE)
COMPONENT_KINDS = tuple(kind.name for kind in KIND_TABLE if kind.configured)
SINGULAR = {kind.name: kind.singular for kind in KIND_TABLE}


@dataclass(frozen=True)
class Registration:
    name: str
    kind: str
    obj: Any
    provider: str
    version: str


@dataclass(frozen=True)
class BrokenPlugin:
    provider: str
    version: str
    error: str


@dataclass
class Catalog:
    components: dict[str, dict[str, Registration]] = field(default_factory=lambda: {k: {} for k in KINDS})
    broken: list[BrokenPlugin] = field(default_factory=list)
    conflicts: dict[tuple[str, str], str] = field(default_factory=dict)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Any:
        """The registered class (or backend) ``name`` of ``kind``, or a PluginError that helps."""
        if (kind, name) in self.conflicts:
            raise PluginError(self.conflicts[kind, name])
        try:
            return self.components[kind][name].obj
        except KeyError:
            raise PluginError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        message = f"unknown {SINGULAR[kind]} plugin {name!r}"
        message += did_you_mean(name, self.names(kind)) or f"; registered: {', '.join(self.names(kind)) or 'none'}"
        if self.broken:
            message += "; broken plugins that might provide it: " + ", ".join(b.provider for b in self.broken)
        return message


def _make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("scdkit")
    pm.add_hookspecs(hookspecs)
    return pm


def _builtin_modules() -> list[str]:
    names = []
    for kind in KIND_TABLE:
        try:
            module = importlib.import_module(kind.builtins)
        except ModuleNotFoundError:
            continue
        if not hasattr(module, "__path__"):  # a module of built-ins, not a package of them
            names.append(kind.builtins)
            continue
        names += [f"{kind.builtins}.{m.name}" for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")]
    return names


def _load_file(path: Path) -> Any:
    module_name = f"scdkit_local_plugins.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_catalog(plugin_dirs: list[Path] = (), entry_points: bool = True) -> Catalog:
    """Import every plugin, call its registration hooks, and return the catalog."""
    pm = _make_plugin_manager()
    catalog = Catalog()
    sources: list[tuple[str, str, Any]] = []  # (provider, version, loader)

    for name in _builtin_modules():
        sources.append((name, scdkit.__version__, lambda name=name: importlib.import_module(name)))
    for folder in plugin_dirs:
        for path in sorted(Path(folder).glob("*.py")):
            sources.append((str(path), "local", lambda path=path: _load_file(path)))
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else ep.value
            version = ep.dist.version if ep.dist else "?"
            sources.append((f"{dist}:{ep.name}", version, ep.load))

    for provider, version, load in sources:
        try:
            plugin = load()
            pm.register(plugin, name=provider)
        except (Exception, SystemExit) as exc:  # a broken plugin (even one calling sys.exit) must not take the others down
            catalog.broken.append(BrokenPlugin(provider, version, f"{type(exc).__name__}: {exc}"))
            continue
        try:
            _register_from(pm, plugin, provider, version, catalog)
        except (Exception, SystemExit) as exc:
            catalog.broken.append(BrokenPlugin(provider, version, f"{type(exc).__name__}: {exc}"))

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        catalog.broken.append(BrokenPlugin(str(getattr(exc, "plugin", "?")), "?", str(exc)))
    return catalog


def _register_from(pm: pluggy.PluginManager, plugin: Any, provider: str, version: str, catalog: Catalog) -> None:
    """Call this plugin's own registration hooks (not everyone's), so failures stay attributed."""
    for kind in KINDS:
        hook = getattr(pm.hook, f"scdkit_register_{kind}")
        for impl in hook.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            staged: list[Registration] = []

            def register(obj: Any, _kind=kind, _staged=staged) -> None:
                name = getattr(obj, "plugin_name", None) or getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"{provider} registered a {_kind} without a plugin_name")
                obj_version = getattr(obj, "plugin_version", version)
                _staged.append(Registration(name, _kind, obj, provider, obj_version))

            args = {"register": register}
            impl.function(*[args[a] for a in impl.argnames])
            for reg in staged:  # only a plugin that registered without error contributes
                existing = catalog.components[kind].get(reg.name)
                if existing is not None and existing.provider != reg.provider:
                    catalog.conflicts[kind, reg.name] = (
                        f"{SINGULAR[kind]} {reg.name!r} is provided twice: by {existing.provider} and by {reg.provider}"
                    )
                    catalog.broken.append(BrokenPlugin(reg.provider, reg.version, catalog.conflicts[kind, reg.name]))
                    continue
                catalog.components[kind][reg.name] = reg


_default: Catalog | None = None


def default_catalog() -> Catalog:
    """The catalog of built-in and entry-point plugins, loaded once per process."""
    global _default
    if _default is None:
        _default = load_catalog()
    return _default
