"""Command-line flags generated from a Pydantic parameter model: one flag per field, help from its description.
Flags default to "not given", so each default is written once, in the model; the price is that argparse's
own `--help` shows the model's default through the help text rather than argparse's `default=`."""
from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

NOT_GIVEN = argparse.SUPPRESS  # absent flags leave no attribute, so the model's default applies


def _plain(tp) -> tuple[Any, bool]:
    """(the field's value type without None, whether it is a list)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _default_text(field) -> str:
    if field.default_factory is not None:
        return ""
    d = field.default
    if d is None:
        return ""
    if isinstance(d, bool):
        return " (default: on)" if d else " (default: off)"
    return f" (default: {d:,})" if isinstance(d, int) else f" (default: {d})"


def flag_name(name: str, flags: dict[str, str] | None = None) -> str:
    return (flags or {}).get(name) or "--" + name.replace("_", "-")


def add_model_args(p: argparse.ArgumentParser | Any, model: type[BaseModel], *, exclude: set[str] = frozenset(),
                   flags: dict[str, str] | None = None, parsers: dict[str, Callable[[str], Any]] | None = None,
                   metavars: dict[str, str] | None = None) -> None:
    """One flag per field of `model` not in `exclude`; `flags` renames, `parsers` reads a value its own way."""
    for name, field in model.model_fields.items():
        if name in exclude or field.exclude:
            continue
        if not field.description:
            raise TypeError(f"{model.__name__}.{name}: a flag needs a description (its help line)")
        tp, many = _plain(field.annotation)
        kw: dict[str, Any] = dict(dest=name, default=NOT_GIVEN, help=field.description + _default_text(field))
        if tp is bool and not many:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = (parsers or {}).get(name, tp)
            kw["metavar"] = (metavars or {}).get(name) or name.upper()
            if many:
                kw["nargs"] = "+"
        p.add_argument(flag_name(name, flags), **kw)


def given(ns: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of `model` that were given on the command line."""
    return {k: v for k, v in vars(ns).items() if k in model.model_fields}


def build(model: type[BaseModel], ns: argparse.Namespace, flags: dict[str, str] | None = None, **extra):
    """`model` from the flags given (plus `extra`); a validation error becomes a ValueError naming the flag."""
    try:
        return model(**{**given(ns, model), **extra})
    except ValidationError as e:
        first = e.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        where = flag_name(name, flags) if name else model.__name__
        raise ValueError(f"{where}: {first['msg']}") from None
