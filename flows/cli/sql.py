"""CLI for reading the catalog: `langpwt status` (per-shard table) and `langpwt sql` (read-only queries).
Both only read, so they never take the home's pipeline lock; the catalog's own file lock is held per query."""
from __future__ import annotations

import json
import sys


def err(msg: str) -> int:
    print(f"langpwt: error: {msg}", file=sys.stderr)
    return 2


def print_shards(home) -> None:
    from rich.console import Console
    from rich.table import Table

    from storage import shard_catalog
    from storage.catalog import CatalogMissing

    try:
        tbl = shard_catalog.shard_table(home).to_pylist()
    except CatalogMissing as e:
        print(str(e))
        return
    t = Table(title=f"shards in {home.root}")
    for c in ("shard", "split", "file", "status", "docs", "tokens", "seconds", "error"):
        t.add_column(c, justify="right" if c in ("docs", "tokens", "seconds") else "left")
    for r in tbl:
        t.add_row(f"{r['shard_id']:06d}", r["split"], r["source_file"], r["status"],
                  f"{r['n_docs'] or 0:,}", f"{r['n_tokens'] or 0:,}", f"{r['seconds'] or 0:.2f}",
                  (r["error"] or "")[:60])
    Console(width=160).print(t)


def cmd_status(args) -> int:
    from storage import sources
    from storage.paths import Home

    home = Home.from_env()
    print_shards(home)
    for file, why in sources.failed(home):  # never read, so they have no shard rows
        print(f"source file {file}: failed: {why}")
    return 0


def cmd_sql(args) -> int:
    import duckdb

    from storage import catalog
    from storage.paths import Home

    try:
        tbl = catalog.query(Home.from_env(), args.query, sandboxed=True)
    except catalog.CatalogMissing as e:
        return err(str(e))
    except duckdb.Error as e:
        return err(str(e).splitlines()[0])
    if args.format == "csv":
        import pyarrow.csv as pcsv
        pcsv.write_csv(tbl, sys.stdout.buffer)
    elif args.format == "json":
        for row in tbl.to_pylist():
            print(json.dumps(row, default=str))
    else:
        from rich.console import Console
        from rich.table import Table
        t = Table()
        for c in tbl.column_names:
            t.add_column(c)
        for row in tbl.to_pylist():
            t.add_row(*("" if v is None else str(v) for v in row.values()))
        Console(width=200).print(t)
    return 0


def register(sub) -> None:
    p = sub.add_parser("status", help="per-shard table")
    p.set_defaults(handler=cmd_status)
    p = sub.add_parser("sql", help="run a read-only SQL query on the catalog")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(handler=cmd_sql)
