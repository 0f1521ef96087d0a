"""Command-line flags for the trainer, generated from the config dataclasses so none is forgotten.
Every flag defaults to None: only values given explicitly override a preset or a checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import typing

from model.config import GPTConfig, TrainConfig, parse_grad_floor

SKIP = {"model", "preset"}
PARSERS = {"grad_floor": parse_grad_floor}  # flags whose values are not of one type


def _flag_type(tp):
    tp = typing.get_type_hints(TrainConfig).get(tp, tp) if isinstance(tp, str) else tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_config_args(p: argparse.ArgumentParser) -> None:
    hints = {**typing.get_type_hints(TrainConfig), **typing.get_type_hints(GPTConfig)}
    p.add_argument("--preset", default=None, help="seed | tiny (default: seed, or the checkpoint's)")
    for cls in (TrainConfig, GPTConfig):
        for f in dataclasses.fields(cls):
            if f.name in SKIP:
                continue
            flag = "--" + f.name.replace("_", "-")
            tp = _flag_type(hints[f.name])
            if f.name in PARSERS:
                p.add_argument(flag, dest=f.name, type=PARSERS[f.name], default=None, metavar="VALUE")
            elif tp is bool:
                p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            else:
                p.add_argument(flag, dest=f.name, type=tp, default=None, metavar=tp.__name__.upper())


def overrides(ns: argparse.Namespace) -> dict:
    """The config values given on the command line (flat; model keys included)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(GPTConfig)}
    return {k: v for k, v in vars(ns).items() if k in names - SKIP and v is not None}


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
