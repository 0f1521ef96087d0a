"""The DuckDB catalog: schema, and short-lived connections that retry on DuckDB's file lock.
One process may hold the file read-write and that shuts out every other process, so no
connection here outlives one unit of work: readers and the writer take turns in milliseconds."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import pyarrow as pa

from storage.atomic import publish, tmp_path_for
from storage.paths import Home

LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")
WRITE_TIMEOUT_S = 300.0  # the writer must never fail because a reader was in the way
READ_TIMEOUT_S = 30.0
SANDBOX = {"enable_external_access": "false"}  # no file, network or extension access from SQL
SNAPSHOT_GRACE_S = 60.0  # an unused snapshot is kept this long: a query may have just picked it
UNFINISHED_GRACE_S = 3600.0  # a copy in progress (a dot folder) is left alone this long


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
-- val_bpb: of the periodic eval's sampled windows (the whole split's is in evals); added after the table
ALTER TABLE metrics ADD COLUMN IF NOT EXISTS val_bpb DOUBLE;
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
    config = SANDBOX if sandboxed else None
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


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:12]
    except OSError:
        return None


BOOT = _boot_id()
_SNAPSHOTTING = threading.Lock()  # one copy at a time in a process: a second caller then finds it made


def _stat_key(home: Home) -> str:
    """Changes with every commit: DuckDB rewrites the file or its WAL. With the boot's id in front where
    the system has one: a snapshot left unsynced by a crash of the machine is then never picked again."""
    parts = [BOOT] if BOOT else []
    for p in (home.catalog, Path(f"{home.catalog}.wal")):
        try:
            st = p.stat()
            parts += [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            parts += [0, 0]
    return "-".join(map(str, parts))


def _copy(src, dst: Path) -> None:
    """Copy an open file to `dst`; copy_file_range lets the filesystem share blocks where it can."""
    with open(dst, "wb") as out:
        size, off = os.fstat(src.fileno()).st_size, 0
        try:
            while off < size:
                n = os.copy_file_range(src.fileno(), out.fileno(), size - off, off)
                if n == 0:
                    break
                off += n
        except OSError:  # a filesystem or kernel without it
            src.seek(off)
            out.seek(off)
            shutil.copyfileobj(src, out)


def _copy_locked(home: Home, tmp: Path) -> str:
    """Copy the catalog (and its WAL) to `tmp` under a read lock; returns the state's key."""
    wal = Path(f"{home.catalog}.wal")
    # DuckDB's file lock is a POSIX record lock, which this process drops when it closes *any* descriptor
    # of the file: `src` is opened before the reader and closed after it, so the lock covers the whole copy
    with open(home.catalog, "rb") as src:
        with reader(home) as con:
            if con.execute("SELECT count(*) FROM duckdb_tables()").fetchone()[0] == 0:
                raise CatalogMissing(f"{home.catalog}: empty catalog; run `langpwt prepare` first")
            key = _stat_key(home)
            _copy(src, tmp)
            if wal.exists():
                with open(wal, "rb") as w:
                    _copy(w, Path(f"{tmp}.wal"))
    return key


def _prune(folder: Path, keep: Path) -> None:
    now = time.time()
    for p in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):
            grace = UNFINISHED_GRACE_S if p.name.startswith(".") else SNAPSHOT_GRACE_S
            if p != keep and now - p.stat().st_mtime > grace:
                shutil.rmtree(p)


def snapshot(home: Home) -> Path:
    """A private copy of the catalog for long reads (user SQL), taken under a read lock held only for the
    copy and reused while the catalog is unchanged: a query that runs for minutes never makes a writer
    wait. One folder per catalog state in HOME/cache/catalog-snapshots, published by an atomic rename;
    the file keeps the name catalog.duckdb, so queries name the database as on the catalog itself."""
    with _SNAPSHOTTING:
        return _snapshot(home)


def snapshot_ready(home: Home) -> bool:
    """Whether the catalog's current state has its snapshot already (a query then pays no copy)."""
    return (home.root / "cache" / "catalog-snapshots" / _stat_key(home)).exists()


def _snapshot(home: Home) -> Path:
    if not home.catalog.exists():
        raise CatalogMissing(f"{home.catalog}: no catalog yet; run `langpwt prepare` first")
    folder = home.root / "cache" / "catalog-snapshots"
    final = folder / _stat_key(home)
    if final.exists():
        os.utime(final)  # in use: not pruned for a while
        return final / "catalog.duckdb"
    tmp = tmp_path_for(final)
    tmp.mkdir(parents=True)
    try:
        final = folder / _copy_locked(home, tmp / "catalog.duckdb")
        if (tmp / "catalog.duckdb.wal").exists():  # fold the WAL in: read-only opens then replay nothing
            duckdb.connect(str(tmp / "catalog.duckdb")).execute("CHECKPOINT").close()
        # durable only without a boot id (with one, a crash of the machine changes the key); after the lock,
        # so the writer never waits on the disk
        try:
            publish(tmp, final, sync=tmp / "catalog.duckdb", durable=not BOOT)
        except OSError:
            if not final.exists():  # else another process published this state first: theirs serves
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(folder, final)
    return final / "catalog.duckdb"


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
