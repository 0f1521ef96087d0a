"""A source is a sorted list of parquet files, each with its size and sha256.
Local folders and Hub downloads both end as `SourceFile`s recorded in `source_files`."""
from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, asdict
from pathlib import Path

from storage import catalog
from storage.paths import Home
from storage.shards import file_sha256


COLUMNS = ["file", "position", "path", "size_bytes", "sha256", "status", "error", "dataset", "revision", "url",
           "downloaded_at", "seconds"]


@dataclass(frozen=True)
class SourceFile:
    file: str          # name relative to the source root, e.g. "sample/10BT/000_00000.parquet"
    path: str          # absolute local path
    size_bytes: int
    sha256: str
    position: int      # index in the sorted list: the shard id

    @property
    def shard_id(self) -> int:
        return self.position


def list_local(source_dir: str | Path, pattern: str = "*.parquet") -> list[SourceFile]:
    """Every parquet file under `source_dir`, sorted by relative path, hashed."""
    root = Path(source_dir).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"--source {source_dir}: not a directory")
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"--source {source_dir}: no files matching {pattern}")
    # hashlib drops the GIL: on 28 GB of FineWeb-Edu the hashing is ~16 s serial, ~8 s on two threads
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        shas = list(pool.map(file_sha256, files))
    return [SourceFile(str(p.relative_to(root)), str(p), p.stat().st_size, sha, i)
            for i, (p, sha) in enumerate(zip(files, shas))]


def record(home: Home, files: list[SourceFile], status: str = "verified", *, dataset: str | None = None,
           revision: str | None = None, urls: dict[str, str] | None = None,
           seconds: dict[str, float] | None = None) -> None:
    """Upsert the files' rows in `source_files` (one transaction)."""
    if not files:
        return
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    rows = [dict(asdict(f), status=status, error=None, dataset=dataset, revision=revision,
                 url=(urls or {}).get(f.file), downloaded_at=now if urls and status == "verified" else None,
                 seconds=(seconds or {}).get(f.file)) for f in files]
    # bound parameters, not an Arrow table: pyarrow's first Python-object conversion imports pandas
    # (~0.25 s per process), and a source is a few files
    with catalog.writer(home) as con:
        con.execute("DELETE FROM source_files WHERE list_contains(?, file)", [[f.file for f in files]])
        con.executemany(f"INSERT INTO source_files ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                        [[r[c] for c in COLUMNS] for r in rows])


def mark(home: Home, file: str, status: str, error: str | None = None) -> None:
    with catalog.writer(home) as con:
        con.execute("UPDATE source_files SET status = ?, error = ? WHERE file = ?", [status, error, file])


def from_catalog(home: Home) -> list[SourceFile]:
    """The verified files recorded by an earlier download, in shard order (positions as recorded)."""
    try:
        rows = catalog.query_rows(home, """SELECT file, path, size_bytes, sha256, position FROM source_files
                                           WHERE status = 'verified' AND dataset IS NOT NULL ORDER BY position""")
    except catalog.CatalogMissing:
        return []
    return [SourceFile(*r) for r in rows if Path(r[1]).is_file()]
