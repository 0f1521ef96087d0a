"""A shard's documents sidecar written as it is produced, one parquet row group per batch, atomically.
A file's per-document rows never sit in memory whole; the price is that the bytes follow the batching."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import fsync_dir, tmp_path_for

COMPRESSION = "zstd"


class DocsWriter:
    """Append Arrow tables of `schema` to a temp file beside `final`; `commit` renames it into place,
    `abort` removes it. The same tables in the same batches always give the same bytes."""

    def __init__(self, final: str | os.PathLike, schema: pa.Schema):
        self.final = Path(final)
        self.schema = schema
        self.tmp = tmp_path_for(self.final)
        self.rows = 0
        self._w: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._w is None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._w = pq.ParquetWriter(self.tmp, self.schema, compression=COMPRESSION)
        # one row group per call: a batch's rows stay together whatever their number
        self._w.write_table(table.cast(self.schema), row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows

    def commit(self) -> Path:
        if self._w is None:  # no batch at all: an empty table of the schema
            self.write(self.schema.empty_table())
        self._w.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self.final

    def abort(self) -> None:
        if self._w is not None:
            with contextlib.suppress(Exception):
                self._w.close()
        self.tmp.unlink(missing_ok=True)


def row_groups(path: str | os.PathLike):
    """The tables `DocsWriter` wrote to `path`, one per batch, in order."""
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i)
