"""CLI for the data side: prepare, tokenize, rebuild-catalog, demo.
Thin argument parsing over the flows; errors become one line on stderr and a non-zero exit code."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def add_tokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="folder of parquet files laid out like the Hub subset")
    p.add_argument("--manifest", help="sha256sum output or JSON (a saved Hub listing works) of --source's files: "
                                      "a file that differs, is missing or is not listed is refused")
    p.add_argument("--workers", type=int, default=2, help="source files read and encoded at once (default 2)")
    p.add_argument("--tokenizer", help="use this tokenizer.json (e.g. GPT-2's) instead of training one")
    p.add_argument("--vocab-size", type=int, default=48_951)
    p.add_argument("--tokenizer-sample-mb", type=int, default=48)
    p.add_argument("--retrain-tokenizer", action="store_true")
    p.add_argument("--min-int-score", type=int, default=3)
    p.add_argument("--min-language-score", type=float)
    p.add_argument("--min-chars", type=int)
    p.add_argument("--max-chars", type=int)
    p.add_argument("--dumps", nargs="+", metavar="DUMP", help="keep only these crawls")
    p.add_argument("--no-dedup", dest="dedup", action="store_false")
    p.add_argument("--val-fraction", type=float, default=0.005)
    p.add_argument("--reprocess", nargs="+", metavar="SHARD_ID", help="redo exactly these shards")
    p.add_argument("--force", action="store_true", help="redo every shard and re-read every source file for its sha256 (keeps the tokenizer)")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for another run on this home")
    d = p.add_mutually_exclusive_group()
    d.add_argument("--dask-address", metavar="tcp://HOST:8786", help="run scans and shards on this Dask cluster")
    d.add_argument("--dask-local", type=int, metavar="N", help="run them on a Dask LocalCluster of N processes")


def tokenize_params(args: argparse.Namespace):
    from flows.tokenize import TokenizeParams
    from storage.paths import parse_shard_id

    return TokenizeParams(
        source=args.source, manifest=args.manifest, home=args.home, workers=args.workers, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, tokenizer_sample_mb=args.tokenizer_sample_mb,
        retrain_tokenizer=args.retrain_tokenizer, min_int_score=args.min_int_score,
        min_language_score=args.min_language_score, min_chars=args.min_chars, max_chars=args.max_chars,
        dumps=args.dumps, dedup=args.dedup, val_fraction=args.val_fraction,
        reprocess=[parse_shard_id(s) for s in args.reprocess] if args.reprocess else None,
        force=args.force, wait=args.wait, dask_address=args.dask_address, dask_local=args.dask_local)


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


def run_flow(kind: str, args: argparse.Namespace) -> int:
    import duckdb
    from pydantic import ValidationError

    try:
        params = tokenize_params(args)
        if kind == "tokenize":
            from flows.tokenize import tokenize
            return _report(tokenize(params))
        from flows.prepare import PrepareParams, prepare
        extra = {}
        if hasattr(args, "subset"):  # `demo` has no download flags
            extra = dict(dataset=args.dataset, subset=args.subset, revision=args.revision, include=args.include,
                         max_files=args.max_files, download_workers=args.download_workers,
                         min_free_bytes=args.min_free, retries=args.retries)
        return _report(prepare(PrepareParams(**params.model_dump(), **extra)))
    except ValidationError as e:
        first = e.errors()[0]
        return err(f"--{'-'.join(str(x) for x in first['loc']).replace('_', '-')}: {first['msg']}")
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
    args.source = str(SAMPLE)
    args.manifest = args.manifest or str(SAMPLE / "SHA256SUMS")  # the bundled files are verified before use
    if args.vocab_size == 48_951:
        args.vocab_size = 8192  # the sample's 4 M characters cannot fill the full vocabulary
    rc = run_flow("prepare", args)
    if rc:
        return rc
    from flows.cli.train import generate
    from flows.train import TrainingFailed, TrainParams, train
    from storage import checkpoints as ckpts
    from storage.paths import Home

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
    add_tokenize_args(p)
    try:
        from flows.cli.download import add_download_args
        add_download_args(p, workers_flag="--download-workers")
    except ImportError:
        pass
    p.set_defaults(handler=lambda a: run_flow("prepare", a))
    p = sub.add_parser("tokenize", help="tokenize local parquet files into shards")
    add_tokenize_args(p)
    p.set_defaults(handler=lambda a: run_flow("tokenize", a))
    p = sub.add_parser("rebuild-catalog", help="rebuild the catalog's shard rows from the shards' sidecars")
    p.set_defaults(handler=cmd_rebuild)
    p = sub.add_parser("demo", help="the whole job on the bundled sample, offline")
    add_tokenize_args(p)
    p.set_defaults(handler=cmd_demo)
