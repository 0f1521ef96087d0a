"""The DuckDB catalog: schema, and short-lived connections that retry on DuckDB's file lock.
One process may hold the file read-write and that shuts out every other process, so no
connection here outlives one unit of work: readers and the writer take turns in milliseconds."""
from __future__ import annotations

import contextlib
import datetime as dt
import random
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import pyarrow as pa

from storage.paths import Home

LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")
WRITE_TIMEOUT_S = 300.0  # the writer must never fail because a reader was in the way
READ_TIMEOUT_S = 30.0


def utcnow() -> dt.datetime:
    """Catalog timestamps: UTC, naive (DuckDB TIMESTAMP)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)

SCHEMA = """
CREATE TABLE IF NOT EXISTS source_files (
    file VARCHAR, position INTEGER, path VARCHAR, size_bytes BIGINT, sha256 VARCHAR,
    status VARCHAR, error VARCHAR, dataset VARCHAR, revision VARCHAR, url VARCHAR,
    downloaded_at TIMESTAMP, seconds DOUBLE);
CREATE TABLE IF NOT EXISTS shards (
    shard_id INTEGER, split VARCHAR, source_file VARCHAR, path VARCHAR,
    n_docs BIGINT, n_tokens BIGINT, sha256 VARCHAR, source_sha256 VARCHAR,
    tokenizer_sha256 VARCHAR, config_hash VARCHAR, status VARCHAR, error VARCHAR,
    started_at TIMESTAMP, finished_at TIMESTAMP, seconds DOUBLE, flow_run_id VARCHAR);
CREATE TABLE IF NOT EXISTS documents (
    doc_id VARCHAR, source_file VARCHAR, shard_id INTEGER, split VARCHAR, dump VARCHAR,
    url VARCHAR, domain VARCHAR, int_score BIGINT, language_score DOUBLE, n_chars BIGINT,
    n_tokens BIGINT, kept BOOLEAN, drop_reason VARCHAR);
CREATE TABLE IF NOT EXISTS token_counts (
    shard_id INTEGER, split VARCHAR, token_id INTEGER, count BIGINT);
CREATE TABLE IF NOT EXISTS tokenizers (
    sha256 VARCHAR, path VARCHAR, vocab_size INTEGER, origin VARCHAR, config VARCHAR,
    created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS pipeline_runs (
    run_id VARCHAR, flow VARCHAR, params VARCHAR, status VARCHAR, started_at TIMESTAMP,
    finished_at TIMESTAMP, counts VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR, preset VARCHAR, config VARCHAR, status VARCHAR, started_at TIMESTAMP,
    finished_at TIMESTAMP, flow_run_id VARCHAR, device VARCHAR, error VARCHAR);
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR, step INTEGER, train_loss DOUBLE, val_loss DOUBLE, lr DOUBLE,
    grad_norm DOUBLE, tokens_per_s DOUBLE, mfu DOUBLE, memory_gb DOUBLE, tokens BIGINT,
    elapsed_s DOUBLE);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id VARCHAR, step INTEGER, path VARCHAR, val_loss DOUBLE, sha256 VARCHAR,
    size_bytes BIGINT, created_at TIMESTAMP, flow_run_id VARCHAR);
CREATE TABLE IF NOT EXISTS samples (
    run_id VARCHAR, step INTEGER, prompt VARCHAR, text VARCHAR);
CREATE TABLE IF NOT EXISTS evals (
    run_id VARCHAR, step INTEGER, task VARCHAR, metric VARCHAR, value DOUBLE, stderr DOUBLE, n BIGINT,
    split_id VARCHAR, split_size BIGINT, checkpoint VARCHAR, device VARCHAR, seconds DOUBLE,
    created_at TIMESTAMP);
"""


# DuckDB refuses a read-only and a read-write handle on one file in one process at the same time,
# so threads of this process take turns; each turn lasts one short unit of work.
_PROCESS_LOCK = threading.RLock()
_SCHEMA_DONE: set[Path] = set()


class CatalogMissing(FileNotFoundError):
    pass


def _is_lock_error(e: Exception) -> bool:
    return any(m in str(e) for m in LOCK_MARKERS)


def _open(path: Path, read_only: bool, timeout: float, config: dict | None) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config or {})
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            if not _is_lock_error(e) or time.monotonic() > deadline:
                raise
        # jitter keeps two waiting processes from retrying in lock-step
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.2)


@contextlib.contextmanager
def writer(home: Home, timeout: float = WRITE_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """One transaction on the catalog; commits on success, rolls back on error."""
    home.root.mkdir(parents=True, exist_ok=True)
    with _PROCESS_LOCK:
        fresh = not home.catalog.exists()
        con = _open(home.catalog, False, timeout, None)
        try:
            # the schema is part of the transaction: a writer killed while creating it leaves no tables
            # rather than some of them, which readers took for a catalog missing its `shards`
            con.execute("BEGIN TRANSACTION")
            try:
                schema = fresh or home.catalog not in _SCHEMA_DONE  # 10 CREATE IF NOT EXISTS per write add up
                if schema:
                    con.execute(SCHEMA)
                yield con
                con.execute("COMMIT")
                if schema:
                    _SCHEMA_DONE.add(home.catalog)
            except BaseException:
                # after a failed COMMIT (a full disk, say) there is nothing to roll back: keep the cause
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
        finally:
            con.close()


@contextlib.contextmanager
def reader(home: Home, timeout: float = READ_TIMEOUT_S, sandboxed: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection held only for the block; `sandboxed` also blocks file access. A catalog file
    with no tables yet (a writer killed while creating it, or one that has not committed its first
    transaction) reads as no catalog: CatalogMissing, which every reader already waits on or reports."""
    if not home.catalog.exists():
        raise CatalogMissing(f"{home.catalog}: no catalog yet; run `langpwt prepare` first")
    config = {"enable_external_access": "false"} if sandboxed else None
    with _PROCESS_LOCK:
        con = _open(home.catalog, True, timeout, config)
        try:
            yield con
        except duckdb.CatalogException:
            if con.execute("SELECT count(*) FROM duckdb_tables()").fetchone()[0] == 0:
                raise CatalogMissing(f"{home.catalog}: empty catalog; run `langpwt prepare` first") from None
            raise
        finally:
            con.close()


def query(home: Home, sql: str, params: Sequence | None = None, sandboxed: bool = False) -> pa.Table:
    """Run one read-only query and return the whole result as an Arrow table."""
    with reader(home, sandboxed=sandboxed) as con:
        return con.sql(sql, params=list(params) if params else None).to_arrow_table()


def query_rows(home: Home, sql: str, params: Sequence | None = None) -> list[tuple]:
    with reader(home) as con:
        return con.execute(sql, params or []).fetchall()


def init(home: Home) -> None:
    with writer(home):
        pass
