"""CLI for the data side: prepare, tokenize, rebuild-catalog, demo.
Thin argument parsing over the flows; errors become one line on stderr and a non-zero exit code."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
DEMO_VOCAB = 8192  # the sample's 4 M characters cannot fill the full vocabulary


# flags whose name is not the field's, and values read their own way
FLAGS = {"min_free_bytes": "--min-free"}
METAVARS = {"reprocess": "SHARD_ID", "dumps": "DUMP", "dask_address": "tcp://HOST:8786", "dask_local": "N",
            "min_free_bytes": "BYTES", "source": "DIR", "manifest": "FILE", "tokenizer": "FILE"}


def _parsers() -> dict:
    from flows.cli.download import _bytes
    from storage.paths import parse_shard_id

    return {"reprocess": parse_shard_id, "min_free_bytes": _bytes}


def add_tokenize_args(p: argparse.ArgumentParser, download: bool = False, exclude: set[str] = frozenset()) -> None:
    """`tokenize`'s flags (with `download`, `prepare`'s: the Hub download's too), from the parameter models."""
    from flows.cli.params import add_model_args
    from tasks.params import PrepareParams, TokenizeParams

    add_model_args(p, PrepareParams if download else TokenizeParams, exclude={"home", *exclude}, flags=FLAGS,
                   parsers=_parsers(), metavars=METAVARS)


def tokenize_params(args: argparse.Namespace, download: bool = False):
    """The parameters the flags give (--home is the global flag); BadArgument names a flag that is wrong."""
    from flows.cli.params import build
    from tasks.params import BadArgument, PrepareParams, TokenizeParams

    try:
        return build(PrepareParams if download else TokenizeParams, args, FLAGS)
    except ValueError as e:
        raise BadArgument(str(e)) from None


def err(msg: str) -> int:
    print(f"langpwt: error: {msg}", file=sys.stderr)
    return 2


def _report(summary: dict) -> int:
    from flows.cli.sql import print_shards
    from storage.paths import Home

    print_shards(Home.from_env())
    print(f"{summary['built']} shards built, {summary['skipped']} up to date, {summary['tokens']:,} tokens, "
          f"{summary['kept']}/{summary['docs_in']} documents kept, dropped {summary['dropped']}, "
          f"{summary['seconds']} s")
    for file, reason in summary["failed"].items():
        print(f"langpwt: error: {reason}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def run_flow(kind: str, args: argparse.Namespace, **extra) -> int:
    """Check the arguments (exit 2, nothing written), then run the flow `kind` and report."""
    import duckdb

    from storage.paths import Home
    from tasks.params import BadArgument, check_home

    try:
        params = tokenize_params(args, download=kind == "prepare")
        if extra:
            params = params.model_copy(update=extra)
        check_home(params, Home.from_env(params.home))
    except BadArgument as e:
        return err(str(e))
    try:
        if kind == "tokenize":
            from flows.tokenize import tokenize
            return _report(tokenize(params))
        from flows.prepare import prepare
        return _report(prepare(params))
    except (ValueError, OSError, RuntimeError, duckdb.Error) as e:
        return err(str(e).splitlines()[0] if str(e) else type(e).__name__)


def cmd_rebuild(args) -> int:
    from storage import shard_catalog
    from storage.paths import Home

    home = Home.from_env()
    from flows.cli.sql import print_shards

    n = shard_catalog.rebuild(home)
    print(f"catalog rebuilt from {n} shard sidecars in {home.shards}")
    print_shards(home)
    return 0


def cmd_demo(args) -> int:
    """Prepare the bundled sample, train the `tiny` model on it (CPU) and generate from it."""
    from storage.paths import Home
    from tasks.tokenizer import tokenizer_vocab

    extra = dict(source=str(SAMPLE),
                 # the bundled files are verified before use
                 manifest=getattr(args, "manifest", None) or str(SAMPLE / "SHA256SUMS"))
    if getattr(args, "vocab_size", None) is None and tokenizer_vocab(Home.from_env().tokenizer) is None:
        extra["vocab_size"] = DEMO_VOCAB
    rc = run_flow("prepare", args, **extra)
    if rc:
        return rc
    from flows.cli.train import generate
    from flows.train import TrainingFailed, TrainParams, train
    from storage import checkpoints as ckpts

    home = Home.from_env()
    again = ckpts.latest(ckpts.checkpoint_root(home, "demo")) is not None  # a second `make demo` resumes
    try:
        out = train(TrainParams(preset="tiny", home=str(home.root), run_id="demo", resume=again, device="cpu"))
    except (TrainingFailed, FileNotFoundError, ValueError) as e:  # a refused plan (memory, tokenizer) too
        return err(str(e))
    print(f"trained run demo: checkpoint {out['checkpoint']}, report {out['report']}")
    print("generated: ", end="")
    generate(home, "demo", "The Python language", max_new_tokens=60, seed=0, device="cpu")
    print(f"next: `langpwt dashboard` (LANGPWT_HOME={home.root}) to browse it all")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help="download (or take --source) and tokenize into shards")
    add_tokenize_args(p, download=True)
    p.set_defaults(handler=lambda a: run_flow("prepare", a))
    p = sub.add_parser("tokenize", help="tokenize local parquet files into shards")
    add_tokenize_args(p)
    p.set_defaults(handler=lambda a: run_flow("tokenize", a))
    p = sub.add_parser("rebuild-catalog", help="rebuild the catalog's shard rows from the shards' sidecars")
    p.set_defaults(handler=cmd_rebuild)
    p = sub.add_parser("demo", help="the whole job on the bundled sample, offline")
    add_tokenize_args(p, exclude={"source"})  # the bundled sample; a new home's vocabulary is DEMO_VOCAB
    p.set_defaults(handler=cmd_demo)
