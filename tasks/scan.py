"""Scan one source file: per-document rule verdicts and dedup hashes, saved as a small index.
A second read of the file later is the price of deduplicating across files without their text."""
from __future__ import annotations

import io
from dataclasses import dataclass

import polars as pl
import pyarrow.parquet as pq

from storage.atomic import atomic_write_bytes
from storage.paths import Home
from storage.sources import SourceFile
from tasks.filter import FilterConfig, hash_columns, rule_reason
from tasks.read import iter_batches

COLUMNS = ["id", "text", "int_score", "language_score", "dump"]
KEY = b"langpwt.index_key"


@dataclass
class ScanCounts:
    shard_id: int
    rows: int
    passed_rules: int
    skipped: bool
    error: str | None = None
    staged: bool = False  # its shard was also encoded in the same read (tasks/stage.py)


def index_key(src: SourceFile, cfg: FilterConfig) -> str:
    return f"{src.sha256}:{cfg.digest()}"


def read_key(path) -> str | None:
    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, ValueError):
        return None
    return md.get(KEY, b"").decode() or None


def scan_file(home: Home, src: SourceFile, cfg: FilterConfig) -> ScanCounts:
    """Write `index_NNNNNN.parquet` (rule_reason, id_hash, text_hash, text_len per row) unless an
    index for the same bytes and filter already exists. Raises BadInput for unusable files."""
    out = home.index_file(src.shard_id)
    key = index_key(src, cfg)
    if out.exists() and read_key(out) == key:
        n = pq.read_metadata(out).num_rows
        passed = pl.scan_parquet(out).filter(pl.col("rule_reason").is_null()).select(pl.len()).collect().item()
        return ScanCounts(src.shard_id, n, passed, skipped=True)
    parts = [index_rows(pl.from_arrow(t), cfg) for t in iter_batches(src.path, COLUMNS)]
    return write_index(home, src, cfg, parts)


def index_rows(df: pl.DataFrame, cfg: FilterConfig) -> pl.DataFrame:
    return df.select(rule_reason(cfg).alias("rule_reason"), *hash_columns())


def write_index(home: Home, src: SourceFile, cfg: FilterConfig, parts: list[pl.DataFrame]) -> ScanCounts:
    """Save the index atomically (pyarrow's writer: the bytes do not depend on how `parts` are cut)."""
    key = index_key(src, cfg)
    idx = pl.concat(parts) if parts else pl.DataFrame(schema={
        "rule_reason": pl.String, "id_hash": pl.UInt64, "text_hash": pl.UInt64, "text_len": pl.UInt64})
    table = idx.to_arrow().replace_schema_metadata({KEY: key.encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(home.index_file(src.shard_id), buf.getvalue())
    return ScanCounts(src.shard_id, idx.height, idx["rule_reason"].null_count(), skipped=False)


def earlier_keys(home: Home, shard_ids: list[int]) -> pl.LazyFrame | None:
    """Dedup keys of the rows that passed the rules in the given (earlier) files, in order."""
    files = [home.index_file(i) for i in sorted(shard_ids)]
    if not files:
        return None
    frames = [pl.scan_parquet(f).filter(pl.col("rule_reason").is_null())
              .select("id_hash", "text_hash", "text_len") for f in files]
    return pl.concat(frames, how="vertical")
