"""docs/plugins.md against the code: every hook has a heading and its exact signature, and every option the
guide shows for an `scdkit` command exists."""

from __future__ import annotations

import argparse
import functools
import inspect
import re
from pathlib import Path

import pytest

from scdkit import hookspecs

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def hooks() -> dict[str, object]:
    """The functions of ``scdkit.hookspecs`` marked as hookspecs, by name."""
    marker = f"{hookspecs.hookspec.project_name}_spec"
    return {name: fn for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, marker)}


class _Source:
    """An annotation rendered as written in the source (they are strings under ``from __future__ import
    annotations``), not quoted."""

    def __init__(self, annotation):
        self.text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)

    def __repr__(self) -> str:
        return self.text


def signature(fn) -> str:
    """``def NAME(PARAMETERS) -> RETURN:``, the hookspec's def line, from ``inspect.signature``."""
    sig = inspect.signature(fn)

    def source(annotation):
        return annotation if annotation is inspect.Signature.empty else _Source(annotation)

    sig = sig.replace(parameters=[p.replace(annotation=source(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=source(sig.return_annotation))
    return f"def {fn.__name__}{sig}:"


@functools.cache
def guide() -> str:
    return GUIDE.read_text(encoding="utf-8")


@functools.cache
def sections() -> dict[str, str]:
    """Each heading of the guide (without #s and backticks) and the text under it, up to the next heading.
    Lines inside fenced code blocks are never headings."""
    found: dict[str, str] = {}
    heading, lines, fenced = None, [], False
    for line in guide().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            if heading is not None:
                found[heading] = "\n".join(lines)
            heading, lines = line.lstrip("#").strip().strip("`"), []
            continue
        lines.append(line)
    if heading is not None:
        found[heading] = "\n".join(lines)
    return found


def test_hooks_are_found():
    assert hooks(), "no hookspecs found in scdkit.hookspecs"


@pytest.mark.parametrize("name", sorted(hooks()))
def test_every_hook_has_a_heading_and_its_exact_signature(name):
    assert name in sections(), f"docs/plugins.md has no heading '### {name}'"
    code = [line.strip() for block in FENCE.findall(sections()[name]) for line in block.splitlines()]
    expected = signature(hooks()[name])
    assert expected in code, (f"the section '{name}' of docs/plugins.md does not show the hook's exact "
                              f"signature in a code block: {expected}")


def test_no_heading_for_a_hook_that_does_not_exist():
    documented = {heading for heading in sections() if re.fullmatch(r"scdkit_\w+", heading)}
    assert documented <= hooks().keys(), f"documented but not in scdkit/hookspecs.py: {sorted(documented - hooks().keys())}"


# -- commands -----------------------------------------------------------------------------------

def code_spans(text: str) -> list[str]:
    """The fenced code blocks of ``text`` and the inline code outside them."""
    blocks = FENCE.findall(text)
    prose = FENCE.sub("", text)
    return blocks + re.findall(r"`([^`\n]+)`", prose)


def commands(text: str) -> list[tuple[str, list[str]]]:
    """Every ``scdkit COMMAND ...`` in the guide's code: (COMMAND, the --options given to it)."""
    found = []
    for code in code_spans(text):
        for segment in re.split(r"\n|&&|\|\||;|\|", code.replace("\\\n", " ")):
            match = re.search(r"(?:^|\s)scdkit(?:\s+--threads\s+\S+)?\s+([a-z][\w-]*)(.*)", segment)
            if match:
                found.append((match[1], re.findall(r"(?<!\S)(--[a-z][\w-]*)", match[2])))
    return found


@functools.cache
def subcommands() -> dict[str, argparse.ArgumentParser]:
    from scdkit.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def unknown_options(command: str) -> list[str]:
    parser = subcommands()[command]
    return sorted({option for name, options in commands(guide()) if name == command
                   for option in options if option not in parser._option_string_actions})


def test_train_options_in_the_guide_exist():
    train = [options for name, options in commands(guide()) if name == "train"]
    assert train, "docs/plugins.md shows no `scdkit train` command"
    assert not unknown_options("train"), f"docs/plugins.md shows `scdkit train` options that do not exist: {unknown_options('train')}"


def test_every_command_and_option_in_the_guide_exists():
    shown = {name for name, _ in commands(guide())}
    assert not shown - subcommands().keys(), f"docs/plugins.md shows unknown commands: {sorted(shown - subcommands().keys())}"
    wrong = {name: unknown_options(name) for name in sorted(shown) if unknown_options(name)}
    assert not wrong, f"docs/plugins.md shows options that do not exist: {wrong}"
