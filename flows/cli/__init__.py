"""`langpwt` command line: one subcommand family per module, imported only when used.
Each module listed in COMMANDS exposes `register(subparsers)`; handlers return an exit code."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# module -> subcommands it registers; listed so `langpwt --help` stays fast (no torch import)
COMMANDS = {
    "flows.cli.data": ["prepare", "tokenize", "rebuild-catalog", "demo"],
    "flows.cli.sql": ["status", "sql"],
    "flows.cli.download": ["download"],
    "flows.cli.train": ["train", "generate"],
    "flows.cli.dashboard": ["dashboard"],
    "flows.cli.server": ["server"],
    "flows.cli.evaluate": ["export", "evaluate"],
}


def _defaults_env() -> None:
    # with analytics on, the temporary server prints a harmless "database is locked" traceback per run; its
    # default 20 s start-up limit is too short for a first start on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


# commands that run Prefect flows (or show them): they report to the home's `langpwt server up`
FLOW_COMMANDS = {"prepare", "tokenize", "download", "train", "demo", "dashboard", "evaluate"}


def _use_local_server() -> None:
    """Point PREFECT_API_URL at the server `langpwt server up` keeps for this home, if it runs and none
    is set: the runs then show in its UI, and no temporary server is started for them (7-15 s each)."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from flows.cli.server import healthy, running, state_dir

    d = state_dir(create=False)
    try:
        url = (d / "api_url").read_text().strip()
    except OSError:
        return
    if url and running(d / "server.pid") and healthy(url, timeout=1.0):
        os.environ["PREFECT_API_URL"] = url


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="langpwt", description="FineWeb-Edu -> tokens -> a small GPT")
    p.add_argument("--home", help="state folder (default $LANGPWT_HOME or ./.langpwt)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name, names in COMMANDS.items():
        if only and only not in names:
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                continue  # that area is not installed in this checkout
            raise
        mod.register(sub)
    return p


def _command_word(argv: list[str]) -> str | None:
    """The subcommand: the first word that is not a global flag or --home's value."""
    it = iter(argv)
    for a in it:
        if a == "--home":
            next(it, None)
        elif not a.startswith("-"):
            return a
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _defaults_env()
    first = _command_word(argv)
    # import only the module that owns the command, unless help is asked for
    only = first if first and any(first in v for v in COMMANDS.values()) else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if args.home:
        os.environ["LANGPWT_HOME"] = args.home
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    if args.command in FLOW_COMMANDS:
        _use_local_server()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

