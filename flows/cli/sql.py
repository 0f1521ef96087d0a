"""CLI for reading the catalog: `langpwt status` (per-shard table) and `langpwt sql` (read-only queries).
Neither takes the pipeline lock; `sql` runs the dashboard's guard (a child process per query, on a snapshot)."""
from __future__ import annotations

import argparse
import json
import sys

FORMATS_HELP = ("output format: table (a text table, values printed literally), csv (a header row, then one "
                "line per row), json (one JSON array of row objects), jsonl (one JSON object per line); "
                "default: table")


def err(msg: str) -> int:
    print(f"langpwt: error: {msg}", file=sys.stderr)
    return 2


def print_shards(home) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from storage import shard_catalog
    from storage.catalog import CatalogMissing

    try:
        tbl = shard_catalog.shard_table(home).to_pylist()
    except CatalogMissing as e:
        print(str(e))
        return
    t = Table(title=Text(f"shards in {home.root}"))
    for c in ("shard", "split", "file", "status", "docs", "tokens", "seconds", "error"):
        # errors wrap rather than being cut: the end of a message is often the part that says why
        t.add_column(c, justify="right" if c in ("docs", "tokens", "seconds") else "left",
                     overflow="fold", ratio=1 if c == "error" else None)
    for r in tbl:
        t.add_row(f"{r['shard_id']:06d}", Text(r["split"] or ""), Text(r["source_file"] or ""),
                  Text(r["status"] or ""), f"{r['n_docs'] or 0:,}", f"{r['n_tokens'] or 0:,}",
                  f"{r['seconds'] or 0:.2f}", Text(r["error"] or ""))
    Console(width=160).print(t)


def cmd_status(args) -> int:
    from storage import sources
    from storage.paths import Home

    home = Home.from_env()
    print_shards(home)
    for file, why in sources.failed(home):  # never read, so they have no shard rows
        print(f"source file {file}: failed: {why}")
    return 0


def print_table(tbl, fmt: str) -> None:
    if fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(tbl, sys.stdout.buffer)
    elif fmt == "json":
        rows = [json.dumps(r, default=str, ensure_ascii=False) for r in tbl.to_pylist()]
        print("[" + ",\n ".join(rows) + "]")
    elif fmt == "jsonl":
        for r in tbl.to_pylist():
            print(json.dumps(r, default=str, ensure_ascii=False))
    else:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        # Text, not str: a value such as 'arr[i]' or '[/b]' is data, never Rich markup
        t = Table()
        for c in tbl.column_names:
            t.add_column(Text(c), overflow="fold")
        for row in tbl.to_pylist():
            t.add_row(*(Text("" if v is None else str(v)) for v in row.values()))
        Console(width=200).print(t)


def cmd_sql(args) -> int:
    import duckdb

    from storage import catalog, user_sql
    from storage.paths import Home

    limits = user_sql.Limits(timeout_s=args.timeout, max_rows=args.max_rows, memory_mb=args.memory_mb)
    try:
        res = user_sql.run(Home.from_env(), args.query, limits)
    except KeyboardInterrupt:  # the guard has killed the query's process by now
        print("langpwt: interrupted; the query was stopped", file=sys.stderr)
        return 130
    except (user_sql.SqlRefused, catalog.CatalogMissing, duckdb.Error) as e:
        hint = {duckdb.InterruptException: "; raise it with --timeout",
                duckdb.OutOfMemoryException: "; raise it with --memory-mb"}.get(type(e), "")
        return err(user_sql.one_line(str(e)) + hint)
    print_table(res.table, args.format)
    if res.truncated:
        print(f"langpwt: only the first {res.table.num_rows:,} rows are shown; raise --max-rows for more",
              file=sys.stderr)
    return 0


def _positive(kind, floor=None):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if v <= 0 or (floor is not None and v < floor):
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {floor or 'above 0'}")
        return v
    return parse


def register(sub) -> None:
    from storage import user_sql_child as user_sql  # its limits only: no DuckDB import for `--help`

    p = sub.add_parser("status", help="per-shard table")
    p.set_defaults(handler=cmd_status)
    p = sub.add_parser("sql", help="run one read-only SQL statement on the catalog (a snapshot of it), with "
                       "the dashboard's limits", description="Run one read-only DuckDB statement on a snapshot "
                       "of the catalog, in a separate process with a time limit, a memory cap and a row cap.")
    p.add_argument("query", help="one SELECT-like statement (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, "
                   "EXPLAIN); no file or network access")
    p.add_argument("--format", choices=["table", "csv", "json", "jsonl"], default="table", help=FORMATS_HELP)
    p.add_argument("--timeout", type=_positive(float), default=user_sql.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"stop the query after this many seconds (default {user_sql.DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--max-rows", type=_positive(int), default=user_sql.DEFAULT_MAX_ROWS, metavar="N",
                   help=f"print at most N rows; stderr says when rows were left out "
                   f"(default {user_sql.DEFAULT_MAX_ROWS:,})")
    p.add_argument("--memory-mb", type=_positive(int, user_sql.MIN_MEMORY_MB), default=user_sql.DEFAULT_MEMORY_MB,
                   metavar="MB", help=f"memory cap of the process that runs the query, in MB "
                   f"(default {user_sql.DEFAULT_MEMORY_MB}, at least {user_sql.MIN_MEMORY_MB})")
    p.set_defaults(handler=cmd_sql)
