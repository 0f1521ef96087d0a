"""Catalog rows for the data pipeline: shards, documents, token counts, tokenizers, flow runs.
A shard's rows change in one transaction, so a reader sees a shard fully or not at all."""
from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa

from storage import catalog
from storage.catalog import utcnow
from storage.paths import Home

SHARD_COLUMNS = ["shard_id", "split", "source_file", "path", "n_docs", "n_tokens", "sha256",
                 "source_sha256", "tokenizer_sha256", "config_hash", "status", "error",
                 "started_at", "finished_at", "seconds", "flow_run_id"]



def _replace_shard_rows(con, shard_id: int, rows: list[dict]) -> None:
    con.execute("DELETE FROM shards WHERE shard_id = ?", [shard_id])
    # bound parameters, not an Arrow table: pyarrow's first Python-object conversion imports
    # pandas, and these are two rows
    con.executemany(f"INSERT INTO shards ({', '.join(SHARD_COLUMNS)}) VALUES ({', '.join('?' * len(SHARD_COLUMNS))})",
                    [[r.get(c) for c in SHARD_COLUMNS] for r in rows])


def mark_running(home: Home, jobs: list[tuple[int, str, str, str]], flow_run_id: str | None) -> dt.datetime:
    """A `running` row per split of each (shard_id, source_file, source_sha256, config_hash), in one
    transaction: visible progress, never mistaken for finished work."""
    started = utcnow()
    if not jobs:
        return started
    with catalog.writer(home) as con:
        for shard_id, source_file, source_sha256, config_hash in jobs:
            rows = [dict(shard_id=shard_id, split=s, source_file=source_file, source_sha256=source_sha256,
                         config_hash=config_hash, status="running", started_at=started, flow_run_id=flow_run_id)
                    for s in ("train", "val")]
            _replace_shard_rows(con, shard_id, rows)
    return started


def record_shard(home: Home, shard_id: int, timing: dict | None = None) -> dict:
    """Ingest a finished shard's sidecars (written by a worker, maybe on another machine).

    Also how the catalog is rebuilt from the shards alone (then without timings); returns the metadata."""
    return record_shards(home, [(shard_id, timing)])[0]


def save_timing(home: Home, shard_id: int, config_hash: str, timing: dict) -> None:
    """The shard's timing (started_at, finished_at, seconds, flow_run_id) for a later `rebuild`."""
    from storage.atomic import atomic_write_text

    atomic_write_text(home.shard_timing(shard_id), json.dumps(dict(timing, config_hash=config_hash), default=str))


def load_timing(home: Home, shard_id: int, config_hash: str) -> dict | None:
    """The timing saved for this build of the shard (same config_hash), else None."""
    try:
        t = json.loads(home.shard_timing(shard_id).read_text())
    except (OSError, ValueError):
        return None
    if t.pop("config_hash", None) != config_hash:
        return None
    for k in ("started_at", "finished_at"):
        if t.get(k):
            t[k] = dt.datetime.fromisoformat(t[k])
    return t


def record_shards(home: Home, finished: list[tuple[int, dict | None]], tokenizer: dict | None = None) -> list[dict]:
    """`record_shard` for several (shard_id, timing) in one transaction: each DuckDB open and the
    checkpoint on close take a core the encoders want, and shards often finish together. Still one short unit of
    work, so readers get their turn between two calls. `tokenizer`: `record_tokenizer`'s arguments,
    its row written in the same transaction."""
    loaded = []
    for shard_id, timing in finished:
        meta = json.loads(home.shard_meta(shard_id).read_text())
        # sidecars name files relative to the shards folder, so a home can move and two homes compare equal
        rows = [dict(r, path=str(home.shards / r["path"]), **(timing or {})) for r in meta["rows"]]
        if timing:
            save_timing(home, shard_id, meta["config_hash"], timing)
        loaded.append((shard_id, meta, rows))
    if loaded or tokenizer:
        with catalog.writer(home) as con:
            if tokenizer:
                _insert_tokenizer(con, **tokenizer)
            for shard_id, _, rows in loaded:
                _insert_done(con, home, shard_id, rows)
    return [m for _, m, _ in loaded]


def _insert_done(con, home: Home, shard_id: int, rows: list[dict]) -> None:
    # DuckDB reads the sidecars itself, a row group at a time: a shard's documents (~700k rows) loaded as
    # Arrow first would add their size twice to the process's peak, for every shard recorded together
    _replace_shard_rows(con, shard_id, rows)
    con.execute("DELETE FROM documents WHERE shard_id = ?", [shard_id])
    con.execute("INSERT INTO documents BY NAME SELECT * FROM read_parquet(?)", [str(home.shard_docs(shard_id))])
    con.execute("DELETE FROM token_counts WHERE shard_id = ?", [shard_id])
    con.execute("INSERT INTO token_counts BY NAME SELECT * FROM read_parquet(?)", [str(home.shard_counts(shard_id))])


def record_failed(home: Home, shard_id: int, source_file: str, source_sha256: str | None,
                  config_hash: str | None, error: str, started: dt.datetime | None,
                  flow_run_id: str | None) -> None:
    now = utcnow()
    rows = [dict(shard_id=shard_id, split=s, source_file=source_file, source_sha256=source_sha256,
                 config_hash=config_hash, status="failed", error=error, started_at=started or now,
                 finished_at=now, seconds=(now - (started or now)).total_seconds(), flow_run_id=flow_run_id)
            for s in ("train", "val")]
    with catalog.writer(home) as con:
        _replace_shard_rows(con, shard_id, rows)
        con.execute("DELETE FROM documents WHERE shard_id = ?", [shard_id])
        con.execute("DELETE FROM token_counts WHERE shard_id = ?", [shard_id])


def shard_states(home: Home) -> dict[int, dict]:
    """shard_id -> {status, source_sha256, config_hash, tokenizer_sha256} (a shard is done only if both
    splits are)."""
    try:
        rows = catalog.query_rows(home, """
            SELECT shard_id, min(status), max(status), any_value(source_sha256), any_value(config_hash),
                   any_value(tokenizer_sha256)
            FROM shards GROUP BY shard_id""")
    except catalog.CatalogMissing:
        return {}
    return {r[0]: dict(status=r[1] if r[1] == r[2] else "partial", source_sha256=r[3], config_hash=r[4],
                       tokenizer_sha256=r[5]) for r in rows}


def mark_stale(home: Home, shard_ids: list[int]) -> None:
    if shard_ids:
        with catalog.writer(home) as con:
            con.execute("UPDATE shards SET status = 'stale' WHERE status = 'done' AND list_contains(?, shard_id)",
                        [shard_ids])


def record_tokenizer(home: Home, sha256: str, path: str, vocab_size: int, origin: str, config: dict) -> None:
    with catalog.writer(home) as con:
        _insert_tokenizer(con, sha256, path, vocab_size, origin, config)


def _insert_tokenizer(con, sha256: str, path: str, vocab_size: int, origin: str, config: dict) -> None:
    con.execute("DELETE FROM tokenizers WHERE sha256 = ?", [sha256])
    con.execute("INSERT INTO tokenizers VALUES (?, ?, ?, ?, ?, ?)",
                [sha256, path, vocab_size, origin, json.dumps(config, sort_keys=True), utcnow()])


def record_pipeline_run(home: Home, run_id: str, flow: str, params: dict, status: str,
                        started_at: dt.datetime, counts: dict | None = None) -> None:
    with catalog.writer(home) as con:
        con.execute("DELETE FROM pipeline_runs WHERE run_id = ?", [run_id])
        con.execute("INSERT INTO pipeline_runs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [run_id, flow, json.dumps(params, sort_keys=True, default=str), status, started_at,
                     utcnow() if status != "running" else None, json.dumps(counts or {}, default=str)])


def shard_table(home: Home) -> pa.Table:
    return catalog.query(home, """
        SELECT shard_id, split, source_file, status, n_docs, n_tokens, round(seconds, 2) AS seconds,
               error FROM shards ORDER BY shard_id, split""")


def last_source(home: Home) -> tuple[str, str | None] | None:
    """The `--source` and `--manifest` of the newest pipeline run on this home that had a source, so
    `tokenize --reprocess 3` needs no repeat (and a file the manifest refused stays refused)."""
    try:
        rows = catalog.query_rows(home, """SELECT json_extract_string(params, '$.source'),
                                                  json_extract_string(params, '$.manifest') FROM pipeline_runs
                                           WHERE json_extract_string(params, '$.source') IS NOT NULL
                                           ORDER BY started_at DESC LIMIT 1""")
    except catalog.CatalogMissing:
        return None
    return (rows[0][0], rows[0][1]) if rows else None


def rebuild(home: Home) -> int:
    """Rebuild the pipeline's catalog rows from the shards' own sidecars (and their saved timings);
    returns the shards recorded.

    A catalog that no longer opens is moved aside (`catalog.duckdb.broken`), never deleted."""
    import duckdb

    from storage.sources import SourceFile, record

    if home.catalog.exists():
        try:
            catalog.query_rows(home, "SELECT count(*) FROM shards")
        except (duckdb.Error, catalog.CatalogMissing):
            home.catalog.replace(home.catalog.with_name("catalog.duckdb.broken"))
            home.catalog.with_name("catalog.duckdb.wal").unlink(missing_ok=True)
    n = 0
    for meta_path in sorted(home.shards.glob("shard_*.json")):
        sid = int(meta_path.name.split("_")[1].split(".")[0])
        meta = json.loads(meta_path.read_text())
        meta = record_shard(home, sid, load_timing(home, sid, meta["config_hash"]))
        record(home, [SourceFile(**meta["source"])], "verified")
        n += 1
    return n
