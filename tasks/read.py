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
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise BadInput(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    schema = pf.schema_arrow
    for col in REQUIRED:
        if col not in schema.names:
            raise BadInput(f"{path}: no `{col}` column")
        if not _is_string(schema.field(col).type):
            raise BadInput(f"{path}: column `{col}` is {schema.field(col).type}, not a string")
    return pf


def iter_batches(path: str | Path, columns: list[str], batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Yield tables of at most `batch_rows` rows with exactly `columns` (absent optional ones null).

    Corruption inside a data page only shows while decoding; it surfaces as BadInput here."""
    pf = open_checked(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=present, use_threads=True):
            t = pa.Table.from_batches([batch])
            for c in columns:
                if c not in present:
                    t = t.append_column(c, pa.nulls(t.num_rows, _default_type(c)))
            yield t.select(columns)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError) as e:
        raise BadInput(f"{path}: corrupt data ({str(e).splitlines()[0]})") from None


def _default_type(col: str) -> pa.DataType:
    return {"int_score": pa.int64(), "language_score": pa.float64()}.get(col, pa.string())


def count_rows(path: str | Path) -> int:
    return open_checked(path).metadata.num_rows
