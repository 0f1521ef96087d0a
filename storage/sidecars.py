"""A shard's documents sidecar written as it is produced, in row groups of whole batches, atomically.
A file's per-document rows never sit in memory whole; the price is that the bytes follow the batching."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import publish, tmp_path_for

COMPRESSION = "zstd"
GROUP_ROWS = 65_536  # batches are gathered up to this many rows a row group: smaller groups compress worse


class DocsWriter:
    """Append Arrow tables of `schema` to a temp file beside `final`; `commit` renames it into place,
    `abort` removes it. The same tables in the same batches always give the same bytes, and writing a
    file's row groups back one by one gives its bytes again."""

    def __init__(self, final: str | os.PathLike, schema: pa.Schema, group_rows: int = GROUP_ROWS):
        self.final = Path(final)
        self.schema, self.group_rows = schema, group_rows
        self.tmp = tmp_path_for(self.final)
        self.rows = 0
        self._w: pq.ParquetWriter | None = None
        self._held: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        self._held.append(table.cast(self.schema))
        self.rows += table.num_rows
        if sum(t.num_rows for t in self._held) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._w is None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._w = pq.ParquetWriter(self.tmp, self.schema, compression=COMPRESSION)
        # one chunk: the writer's pages follow the input's chunks, and a row group read back is one chunk
        group = pa.concat_tables(self._held).combine_chunks() if self._held else self.schema.empty_table()
        self._held = []
        self._w.write_table(group, row_group_size=max(group.num_rows, 1))  # one row group, whatever its size

    def commit(self) -> Path:
        if self._held or self._w is None:  # the last group; with no batch at all, an empty table
            self._flush()
        self._w.close()
        publish(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        if self._w is not None:
            with contextlib.suppress(Exception):
                self._w.close()
        self.tmp.unlink(missing_ok=True)


def row_groups(path: str | os.PathLike):
    """The row groups `DocsWriter` wrote to `path`, in order."""
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i)
