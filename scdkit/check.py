"""`scdkit check NAME`: the conformance kit on a component as a registry configures it.

scdkit's tests run the kit on every plugin's tiny ``example_config()``; a registry configures it for real
(a width, a depth, a window). This runs the same checks on that configuration, for the frame of a
pipeline that uses the component and, for a decoder, the contract of the encoder beside it. Weights are
random: the checks are about the contract, not quality. The long-clip checks cover more than twice any
window-like option (:func:`scdkit.testing.long_clip`); the causality check perturbs a spread of
:data:`PERTURBED_FRAMES` frames of that clip rather than every one, so a configured size runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from scdkit import testing
from scdkit.errors import UsageError, did_you_mean
from scdkit.interfaces import FrameSpec
from scdkit.pluginmanager import COMPONENT_KINDS, SINGULAR
from scdkit.registry import ComponentEntry, Registry

#: Frames the long-clip causality check perturbs, evenly spaced from the first to the last.
PERTURBED_FRAMES = 3


class CheckResult(NamedTuple):
    check: str
    passed: bool
    message: str  # why it failed; for the first result ("build"), what was built


def find_component(registry: Registry, name: str) -> ComponentEntry:
    """The registry component ``name``, or ``KIND.NAME`` (e.g. ``decoders.dit-s``) when several kinds
    use the name; a UsageError for an unknown or ambiguous name."""
    kind, _, short = name.partition(".")
    if kind in COMPONENT_KINDS and short in registry.components[kind]:
        return registry.components[kind][short]
    found = [entries[name] for entries in registry.components.values() if name in entries]
    if not found:
        known = [n for entries in registry.components.values() for n in entries]
        raise UsageError(f"{registry.path}: no component {name!r}{did_you_mean(name, known)}")
    if len(found) > 1:
        which = ", ".join(f"{e.kind}.{e.name}" for e in found)
        raise UsageError(f"{registry.path}: {name!r} names {len(found)} components; say which: {which}")
    return found[0]


def pipeline_using(registry: Registry, entry: ComponentEntry) -> str | None:
    """The name of a pipeline with ``entry`` in its role (the default pipeline if it is one), or None."""
    role = "data" if entry.kind == "datasets" else SINGULAR[entry.kind]
    using = [name for name, p in registry.pipelines.items() if getattr(p, role) == entry.name]
    return registry.default_pipeline if registry.default_pipeline in using else next(iter(using), None)


def check_component(registry: Registry, name: str) -> list[CheckResult]:
    """Run the conformance kit on component ``name`` of ``registry`` as configured there (random weights,
    CPU). The first result is the build; each later one is a check of the kit, failed with the broken
    contract in its message. Raises UsageError only for an unknown or ambiguous ``name``."""
    entry = find_component(registry, name)
    pipeline = pipeline_using(registry, entry)
    frame = registry.pipelines[pipeline].frame if pipeline is not None else testing.TINY_FRAME
    built = f"{entry.kind}.{entry.name} ({entry.plugin})"
    if entry.kind != "schedulers":
        built += (f" for pipeline {pipeline!r}" if pipeline is not None else " in no pipeline: the kit's frame") \
            + f", {frame.height}x{frame.width} patch {frame.patch_size}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            checks = _checks(registry, entry, pipeline, frame)
        except Exception as exc:
            return [CheckResult("build", False, f"{built}: {type(exc).__name__}: {exc}")]
        return [CheckResult("build", True, built)] + [_run(check, run) for check, run in checks]


def _checks(registry: Registry, entry: ComponentEntry, pipeline: str | None, frame: FrameSpec) -> testing.Checks:
    match entry.kind:
        case "encoders":
            return testing.encoder_checks(entry.cls, entry.config, frame, perturb=PERTURBED_FRAMES)
        case "decoders":
            cond = None
            encoder = registry.pipelines[pipeline].encoder if pipeline is not None else None
            if encoder is not None:
                cond = registry.build_component("encoders", encoder, frame).contract
            return testing.decoder_checks(entry.cls, entry.config, frame, cond)
        case "schedulers":
            return testing.scheduler_checks(entry.cls, entry.config)
        case "models":
            return testing.model_checks(entry.cls, entry.config, frame, perturb=PERTURBED_FRAMES)
        case "datasets":
            return testing.dataset_checks(entry.cls, entry.config, frame)
    raise ValueError(f"no conformance checks for {entry.kind}")


def _run(name: str, check: Callable[[], None]) -> CheckResult:
    """One check's result, its message on one line; a plugin that crashes fails that check, the others run."""
    try:
        check()
    except AssertionError as exc:
        return CheckResult(name, False, " ".join(str(exc).split()) or "assertion failed")
    except Exception as exc:
        return CheckResult(name, False, " ".join(f"raised {type(exc).__name__}: {exc}".split()))
    return CheckResult(name, True, "")
