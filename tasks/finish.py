"""Finish a staged shard (tasks/stage.py): drop the cross-file duplicates now that the earlier indexes exist.
Renames when none turned up (the usual case); otherwise copies the shard without them, a rewrite but no re-encode."""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
import polars as pl

from storage.atomic import fsync_dir
from storage.paths import SPLITS, Home, shard_name
from storage.shards import ShardWriter, idx_path, open_shard
from storage.sidecars import DocsWriter, row_groups
from tasks.filter import dedup_reasons
from tasks.scan import earlier_keys
from tasks.stage import MARKER, discard, staged_meta
from tasks.tokenize import (DOC_ARROW, DocTally, ShardCounts, ShardJob, _bincount, _failed, finish, tokenize_file,
                            utcnow)
from tasks.tokenizer import Encoder

COPY_TOKENS = 1 << 24  # tokens per copied piece: a 2 GB shard is never read into memory whole


def build_shard(home: Home, job: ShardJob, staged: bool = False) -> ShardCounts:
    """A shard from its staging folder (`staged`) or from its source file, with the job's encoder."""
    def encoder() -> Encoder:
        return Encoder.cached(job.tokenizer_path, job.tokenizer_sha256)
    return finish_file(home, job, encoder) if staged else tokenize_file(home, job, encoder())


def finish_file(home: Home, job: ShardJob, encoder: Callable[[], Encoder]) -> ShardCounts:
    """The shard `tokenize_file` would write for `job`, from its staging folder when that is complete
    and matches the job; else (a retry after a half-finished attempt, say) from the source file."""
    src, sid = job.source, job.source.shard_id
    meta = staged_meta(home, src, job.filter, job.tokenizer_sha256)
    if meta is None:
        discard(home, sid)
        return tokenize_file(home, job, encoder())
    stage = home.staging(sid)
    (stage / MARKER).unlink()  # from here on a retry rebuilds from the source
    t0, started = time.perf_counter(), utcnow()
    res = ShardCounts(sid, src.file, "running")
    try:
        dup = _duplicates(home, job)
        if dup is None:
            shas = meta["shas"]
            sizes = {s: tuple(meta["sizes"][s]) for s in SPLITS}
            for s in SPLITS:
                _promote(stage / shard_name(sid, s), home.shard(sid, s))
            tally = DocTally(**meta["tally"])
            os.replace(stage / "docs.parquet", home.shard_docs(sid))
            os.replace(stage / "counts.parquet", home.shard_counts(sid))
            fsync_dir(home.shards)
            res.seconds = time.perf_counter() - t0
            finish(home, job, res, shas, sizes, None, tally, started)
        else:
            shas, sizes, counts = _rewrite(home, job, meta, dup)
            docs, tally = _rewrite_docs(home, job, dup)
            res.seconds = time.perf_counter() - t0
            try:
                finish(home, job, res, shas, sizes, counts, tally, started, docs)
            finally:
                docs.abort()  # nothing left once committed
    except (ValueError, OSError) as e:  # e.g. the disk filled up: as tokenize_file reports it
        discard(home, sid)
        return _failed(home, res, e, t0)
    discard(home, sid)
    return res


def _duplicates(home: Home, job: ShardJob) -> pl.Series | None:
    """`dup_id`/`dup_text`/null per row (dedup_reasons, first occurrence wins), or None if there are none."""
    if not job.filter.dedup:
        return None
    idx = pl.read_parquet(home.index_file(job.source.shard_id))
    dup = dedup_reasons(idx, earlier_keys(home, list(job.earlier)))
    return None if dup.null_count() == dup.len() else dup


def _promote(staged, final) -> None:
    os.replace(idx_path(staged), idx_path(final))  # idx first, as ShardWriter: a final .bin has its sidecar
    os.replace(staged, final)


def _rewrite(home: Home, job: ShardJob, meta: dict, dup: pl.Series):
    """Copy each split's shard without the duplicates' documents and subtract their tokens from the counts."""
    sid, stage = job.source.shard_id, home.staging(job.source.shard_id)
    docs = pl.read_parquet(stage / "docs.parquet", columns=["kept", "split"])
    counts_df = pl.read_parquet(stage / "counts.parquet")
    vocab = meta["vocab_size"]
    counts = {s: np.zeros(vocab, dtype=np.int64) for s in SPLITS}
    for s in SPLITS:
        part = counts_df.filter(pl.col("split") == s)
        counts[s][part["token_id"].to_numpy()] = part["count"].to_numpy()
    is_dup = dup.is_not_null()
    shas, sizes = {}, {}
    for s in SPLITS:
        in_split = (docs["kept"] & (docs["split"] == s)).fill_null(False)
        drop = is_dup.filter(in_split).to_numpy()  # per document of this split's shard, in order
        staged = stage / shard_name(sid, s)
        if not drop.any():
            shas[s], sizes[s] = meta["shas"][s], tuple(meta["sizes"][s])
            _promote(staged, home.shard(sid, s))
            continue
        shard = open_shard(staged)
        w = ShardWriter(home.shard(sid, s), vocab)
        try:
            for k in np.flatnonzero(drop):
                counts[s] -= _bincount(shard.tokens[int(shard.offsets[k]):int(shard.offsets[k + 1])], vocab)
            _copy_kept(shard, ~drop, w)
            shas[s], sizes[s] = w.close(), (w.n_docs, w.n_tokens)
        except BaseException:
            w.abort()
            raise
    fsync_dir(home.shards)
    return shas, sizes, counts


def _rewrite_docs(home: Home, job: ShardJob, dup: pl.Series) -> tuple[DocsWriter, DocTally]:
    """The documents sidecar with the duplicates marked dropped, streamed batch by batch (the staged
    file's row groups), so it has the bytes tokenize_file would have written; committed by `finish`."""
    sid = job.source.shard_id
    docs, tally, row = DocsWriter(home.shard_docs(sid), DOC_ARROW), DocTally(), 0
    try:
        for t in row_groups(home.staging(sid) / "docs.parquet"):
            part, reason = pl.from_arrow(t), dup.slice(row, t.num_rows)
            row += t.num_rows
            is_dup = reason.is_not_null()
            part = part.with_columns(
                pl.when(is_dup).then(reason).otherwise(pl.col("drop_reason")).alias("drop_reason"),
                pl.when(is_dup).then(None).otherwise(pl.col("split")).alias("split"),
                pl.when(is_dup).then(None).otherwise(pl.col("n_tokens")).alias("n_tokens"),
                (pl.col("kept") & ~is_dup).alias("kept"))
            docs.write(tally.add(part).to_arrow())
    except BaseException:
        docs.abort()
        raise
    return docs, tally


def _copy_kept(shard, keep: np.ndarray, w: ShardWriter) -> None:
    """Append the kept documents' tokens (each with its <|endoftext|>) in runs, COPY_TOKENS at most."""
    off = shard.offsets
    edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
    for a, b in edges.reshape(-1, 2):
        while a < b:
            e = int(np.searchsorted(off, off[a] + np.uint64(COPY_TOKENS), side="right")) - 1
            e = min(max(e, a + 1), b)
            lo, hi = int(off[a]), int(off[e])
            w.append(np.asarray(shard.tokens[lo:hi]), off[a:e] - off[a])
            a = e
