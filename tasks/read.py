"""Read FineWeb-Edu parquet row group by row group, after checking the file is usable.
Streaming bounds memory by the batch, not the file; the cost is a second pass where we need one."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED = {"text": "string", "id": "string"}
# optional metadata; missing columns read as nulls so odd-but-valid exports still work
OPTIONAL = ("dump", "url", "int_score", "language_score")
BATCH_ROWS = 8192
# Batches are also capped by bytes: 8192 rows of 50 KB documents would be 400 MB of text, and the
# encoder's working set is several times its input. Decoding 1024 rows at a time is also faster.
BATCH_BYTES = 32 << 20
READ_ROWS = 1024


class BadInput(ValueError):
    """A source file that cannot be used; the message names the file and the reason."""


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def open_checked(path: str | Path) -> pq.ParquetFile:
    """Open `path` as parquet and check its schema, or raise BadInput with a one-line reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise BadInput(f"{path}: empty file")
    try:
        # page CRCs, where the writer stored them, catch bytes flipped inside a data page. No
        # pre-buffering: with it pyarrow keeps every row group it has read, so memory grows with the file
        pf = pq.ParquetFile(path, page_checksum_verification=True, pre_buffer=False)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise BadInput(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    for col in REQUIRED:
        if col not in schema.names:
            raise BadInput(f"{path}: no `{col}` column")
        if not _is_string(schema.field(col).type):
            raise BadInput(f"{path}: column `{col}` is {schema.field(col).type}, not a string")
    return pf


def iter_batches(path: str | Path, columns: list[str], batch_rows: int = BATCH_ROWS,
                 batch_bytes: int = BATCH_BYTES) -> Iterator[pa.Table]:
    """Yield tables of at most `batch_rows` rows and about `batch_bytes` bytes, in file order, with
    exactly `columns` (absent optional ones null). Batch boundaries carry no meaning downstream.

    Corruption inside a data page only shows while decoding; it surfaces as BadInput here."""
    pf = open_checked(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    step = min(READ_ROWS, batch_rows)
    acc: list[pa.RecordBatch] = []
    rows = size = 0
    try:
        for batch in pf.iter_batches(batch_size=step, columns=present, use_threads=True):
            for part in _split(batch, batch_bytes):
                if acc and (rows + part.num_rows > batch_rows or size + part.nbytes > batch_bytes):
                    yield _table(acc, columns, present)
                    acc, rows, size = [], 0, 0
                acc.append(part)
                rows += part.num_rows
                size += part.nbytes
        if acc:
            yield _table(acc, columns, present)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError) as e:
        raise BadInput(f"{path}: corrupt data ({str(e).splitlines()[0]})") from None


def _split(batch: pa.RecordBatch, max_bytes: int) -> list[pa.RecordBatch]:
    """Zero-copy row slices of about `max_bytes` each (a batch of very long documents)."""
    k = -(-batch.nbytes // max_bytes) if batch.num_rows > 1 else 1
    if k <= 1:
        return [batch]
    per = -(-batch.num_rows // k)
    return [batch.slice(i, per) for i in range(0, batch.num_rows, per)]


def _table(batches: list[pa.RecordBatch], columns: list[str], present: list[str]) -> pa.Table:
    t = pa.Table.from_batches(batches)
    for c in columns:
        if c not in present:
            t = t.append_column(c, pa.nulls(t.num_rows, _default_type(c)))
    return t.select(columns)


def _default_type(col: str) -> pa.DataType:
    return {"int_score": pa.int64(), "language_score": pa.float64()}.get(col, pa.string())


def count_rows(path: str | Path) -> int:
    return open_checked(path).metadata.num_rows
