"""Command-line options derived from pydantic models.

Each default and bound lives once, in the model's ``Field``: ``add_model_options`` shows it in ``--help`` and
``model_from_args`` lets pydantic enforce it. Options default to ``None`` so "not given" falls back to the field's
own default instead of a copy of it that could drift.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from scdkit.errors import UsageError

M = TypeVar("M", bound=BaseModel)
_SCALARS = (int, float, str)


def _unwrap(annotation: Any) -> tuple[Any, list, bool]:
    """``(type, extra metadata, optional)``: strips ``X | None`` and ``Annotated`` (e.g. ``PositiveInt | None``)."""
    metadata, optional = [], False
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = get_args(annotation)
            metadata += extra
        elif origin in (Union, types.UnionType) and type(None) in get_args(annotation):
            rest = [a for a in get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation, metadata, True
            annotation, optional = rest[0], True
        else:
            return annotation, metadata, optional


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _show(value: Any) -> str:
    """A value as it would be typed on the command line."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _range(metadata: list) -> str:
    """``"0 <= value < 1"``, ``"value >= 1"`` or ``""`` from the field's ge/gt/le/lt constraints."""
    bounds = {name: getattr(m, name) for m in metadata for name in ("ge", "gt", "le", "lt")
              if getattr(m, name, None) is not None}
    low = next((f"{bounds[k]} {op}" for k, op in (("ge", "<="), ("gt", "<")) if k in bounds), "")
    high = next((f"{op} {bounds[k]}" for k, op in (("le", "<="), ("lt", "<")) if k in bounds), "")
    if low and not high:  # "value >= 1" reads better than "1 <= value"
        number, op = low.split(" ")
        return f"value {op.replace('<', '>')} {number}"
    return " ".join(filter(None, [low, "value", high])) if low or high else ""


def _help(field: FieldInfo, metadata: list) -> str:
    """The description plus ``(default: 0.999, 0 <= value < 1)``, so the help formatter adds nothing."""
    value = None if field.is_required() else field.get_default(call_default_factory=True)
    default = "required" if field.is_required() else "" if value is None else f"default: {_show(value)}"
    notes = ", ".join(filter(None, [default, _range(metadata)]))
    text = f"{field.description or ''} ({notes})" if notes else field.description or ""
    return text.strip().replace("%", "%%")  # argparse %-formats help strings


def add_model_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[BaseModel], *,
                      exclude: Iterable[str] = ()) -> None:
    """Add one ``--option`` per field of ``model``: ``noise_draws`` becomes ``--noise-draws``. Nested-model
    fields are skipped: call this again for the nested model."""
    exclude = set(exclude)
    for name, field in model.model_fields.items():
        annotation, extra, optional = _unwrap(field.annotation)
        if name in exclude or _is_model(annotation):
            continue
        kwargs: dict[str, Any] = {"dest": name, "default": None,
                                  "help": _help(field, [*field.metadata, *extra])}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction  # --flag / --no-flag
        elif get_origin(annotation) is Literal:
            choices = list(get_args(annotation))
            kwargs.update(choices=choices, type=type(choices[0]) if type(choices[0]) in _SCALARS else str)
        elif get_origin(annotation) is list:
            item = (get_args(annotation) or (str,))[0]
            kwargs.update(nargs="+", type=item if item in _SCALARS else str)
        else:  # anything else arrives as a string and pydantic validates it
            kwargs["type"] = annotation if annotation in _SCALARS else str
            if optional and annotation in (int, float):
                kwargs["metavar"] = "N" if annotation is int else "X"
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def model_from_args(model: type[M], args: argparse.Namespace, **overrides: Any) -> M:
    """Build ``model`` from the options given (``None`` = not given: the field's default) plus ``overrides``
    (e.g. a nested model instance). Invalid values raise one-line ``UsageError``s naming the option as typed."""
    given = {name: value for name in model.model_fields if (value := getattr(args, name, None)) is not None}
    try:
        return model(**{**given, **overrides})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            loc = error["loc"]
            name = loc[0] if loc else None
            if name in model.model_fields and name not in overrides:  # name the option as typed
                value = f" {_show(error['input'])}" if name in given else ""  # missing: no value to show
                problems.append(f"--{str(name).replace('_', '-')}{value}: {message}")
            elif loc:  # inside an override: no option to name
                problems.append(f"{'.'.join(map(str, loc))}: {message}")
            else:  # a model validator: its message names the fields
                problems.append(message)
        raise UsageError("; ".join(problems)) from None
