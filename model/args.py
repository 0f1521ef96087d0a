"""The trainer's command-line flags, generated from the config fields' metadata (torch-free), so none is forgotten.
Every flag defaults to None so only values given override a preset or a checkpoint; the help shows the seed's."""
from __future__ import annotations

import argparse
import dataclasses
import typing

from model.config import GPTConfig, TrainConfig, parse_grad_floor

PARSERS = {"grad_floor": parse_grad_floor}  # flags whose values are not of one type
PRESET_HELP = ("seed | tiny | gpt2 (12 layers x 768, context 1024, 524,288 tokens a step): the defaults the other "
               "flags override (default: seed, or the checkpoint's)")


def _value_type(name: str, hint) -> type:
    """The type a flag's value has on the command line: Optional unwrapped; str for flags with their own parser."""
    if name in PARSERS:
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _cli_fields() -> list[tuple[dataclasses.Field, type]]:
    out = []
    for cls in (TrainConfig, GPTConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                out.append((f, _value_type(f.name, hints[f.name])))
    return out


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else None


def flag_fields() -> list[tuple[str, type, str]]:
    """(field name, value type, help line with its default) for every flag of TrainConfig + GPTConfig (--preset,
    which picks the defaults rather than overriding one, is not a field flag). `--grad-floor` is typed str: its
    value is auto, off or a number, parsed by model.config.parse_grad_floor."""
    return [(f.name, tp, help_line(f)) for f, tp in _cli_fields()]


def help_line(f: dataclasses.Field) -> str:
    default = _default(f)
    shown = "unset" if default is None else ("on" if default is True else "off" if default is False else default)
    return f"{f.metadata['help']} (default: {shown})"


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help=PRESET_HELP)
    for f, tp in _cli_fields():
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=None, help=help_line(f).replace("%", "%%"))  # argparse %-formats help
        if f.name in PARSERS:
            p.add_argument(flag, type=PARSERS[f.name], metavar="VALUE", **kw)
        elif tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=tp, metavar=tp.__name__.upper(), **kw)


def overrides(ns: argparse.Namespace) -> dict:
    """The config values given on the command line (flat; model keys included). A caller in Python may also set
    a non-flag field on the namespace (tests: `dropout_rng`); it is passed on the same way."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(GPTConfig)}
    return {k: v for k, v in vars(ns).items() if k in names - {"model", "preset"} and v is not None}


def to_argv(values: dict) -> list[str]:
    """The inverse of `overrides`: flags for a child process."""
    out = []
    for k, v in values.items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out
