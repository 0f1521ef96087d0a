"""Tokenize one source file into its train and val shards plus sidecars the catalog is built from.
Shards stream to temp files and are renamed only when complete, the `.json` sidecar last; workers
never touch the catalog (they may be other machines), the flow's process records the sidecars."""
from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

from storage.catalog import utcnow
from storage.atomic import atomic_write_bytes, atomic_write_text
from storage.paths import SPLITS, Home
from storage.shards import ShardWriter, idx_path
from storage.sidecars import DocsWriter
from storage.sources import SourceFile
from tasks.filter import REASONS, VAL_MAX_TOKENS, VAL_RULE, FilterConfig, dedup_reasons, val_candidates
from tasks.read import BadInput, iter_batches
from tasks.scan import earlier_keys
from tasks.tokenizer import Encoder

COLUMNS = ["id", "text", "dump", "url", "int_score", "language_score"]
DOC_SCHEMA = {"doc_id": pl.String, "source_file": pl.String, "shard_id": pl.Int32, "split": pl.String,
              "dump": pl.String, "url": pl.String, "domain": pl.String, "int_score": pl.Int64,
              "language_score": pl.Float64, "n_chars": pl.Int64, "n_tokens": pl.Int64, "kept": pl.Boolean,
              "drop_reason": pl.String}
DOC_ARROW = pl.DataFrame(schema=DOC_SCHEMA).to_arrow().schema


@dataclass(frozen=True)
class ShardJob:
    """Everything one shard depends on; its digest is the shard's config_hash."""
    source: SourceFile
    filter: FilterConfig
    tokenizer_path: str
    tokenizer_sha256: str
    earlier: tuple[int, ...]          # shard ids whose documents this file is deduplicated against
    config_hash: str
    flow_run_id: str | None = None


@dataclass
class ShardCounts:
    shard_id: int
    source_file: str
    status: str
    rows_in: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)
    docs: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    tokens: dict = field(default_factory=lambda: {s: 0 for s in SPLITS})
    seconds: float = 0.0
    error: str | None = None
    timing: dict = field(default_factory=dict)  # kept out of the sidecars so they stay byte-identical


@dataclass
class DocTally:
    """Rows in, kept and dropped by reason, summed batch by batch as the documents sidecar streams out."""
    rows: int = 0
    kept: int = 0
    dropped: dict = field(default_factory=dict)

    def add(self, docs: pl.DataFrame) -> pl.DataFrame:
        self.rows += docs.height
        self.kept += int(docs["kept"].sum())
        for reason, n in docs.filter(~pl.col("kept"))["drop_reason"].value_counts().iter_rows():
            if reason in REASONS:
                self.dropped[reason] = self.dropped.get(reason, 0) + int(n)
        return docs


def _bincount(ids: np.ndarray, minlength: int, chunk: int = 1 << 20) -> np.ndarray:
    """np.bincount in slices: it first casts its input to int64, which for a whole batch is a copy
    twice the ids' size; a slice of a million ids stays in cache."""
    out = np.zeros(minlength, dtype=np.int64)
    for i in range(0, ids.size, chunk):
        out += np.bincount(ids[i:i + chunk], minlength=minlength)
    return out


def _reasons(home: Home, job: ShardJob) -> pl.Series:
    idx = pl.read_parquet(home.index_file(job.source.shard_id))
    if job.filter.dedup:
        dup = dedup_reasons(idx, earlier_keys(home, list(job.earlier)))
        return idx["rule_reason"].fill_null(dup)
    return idx["rule_reason"]


def tokenize_file(home: Home, job: ShardJob, encoder: Encoder) -> ShardCounts:
    """Write shard_NNNNNN.{train,val}.bin (+ .idx, + .json) and their catalog rows."""
    src, sid = job.source, job.source.shard_id
    t0 = time.perf_counter()
    started = utcnow()
    writers = {s: ShardWriter(home.shard(sid, s), encoder.vocab_size) for s in SPLITS}
    counts = {s: np.zeros(encoder.vocab_size, dtype=np.int64) for s in SPLITS}
    res = ShardCounts(sid, src.file, "running")
    docs, tally = DocsWriter(home.shard_docs(sid), DOC_ARROW), DocTally()
    try:
        reasons = _reasons(home, job)
        row = 0
        for t in iter_batches(src.path, COLUMNS):
            df = pl.from_arrow(t).with_columns(reasons.slice(row, t.num_rows).alias("drop_reason"))
            if df.height != t.num_rows or row + t.num_rows > reasons.len():
                raise BadInput(f"{src.path}: changed since it was scanned")
            row += t.num_rows
            docs.write(tally.add(encode_batch(df, job.filter, writers, counts, encoder, src)).to_arrow())
        if row != reasons.len():
            raise BadInput(f"{src.path}: changed since it was scanned")
        shas = {s: w.close() for s, w in writers.items()}
    except BaseException as e:
        for w in writers.values():
            w.abort()
        docs.abort()
        if isinstance(e, (BadInput, ValueError, OSError)):
            return _failed(home, res, e, t0)
        raise
    res.seconds = time.perf_counter() - t0
    try:
        sizes = {s: (w.n_docs, w.n_tokens) for s, w in writers.items()}
        finish(home, job, res, shas, sizes, counts, tally, started, docs)
    except OSError as e:  # e.g. the disk filled up while writing the sidecars
        return _failed(home, res, e, t0)
    finally:
        docs.abort()  # its temp file, whatever went wrong; nothing once committed
    return res


def _failed(home: Home, res: ShardCounts, e: Exception, t0: float) -> ShardCounts:
    """A shard that could not be built: nothing of it stays under a final name."""
    msg = str(e) if not isinstance(e, OSError) or isinstance(e, BadInput) else \
        f"{home.shards}: {e.strerror or e} while writing shard {res.shard_id:06d}"
    res.status, res.error, res.seconds = "failed", msg, time.perf_counter() - t0
    remove_outputs(home, res.shard_id)
    return res


def encode_batch(df: pl.DataFrame, fcfg: FilterConfig, writers: dict, counts: dict, encoder: Encoder,
                 src: SourceFile) -> pl.DataFrame:
    """Encode the rows of `df` whose `drop_reason` is null into the split writers; their catalog rows.
    Shared by the two-read path (here) and the one-read staged path (tasks/stage.py): same bytes.
    Val takes the candidates (tasks/filter.py's rule) while its writer has room, in row order."""
    df = df.with_columns(val_candidates(pl.col("id"), fcfg.val_fraction, src.position).alias("_val"))
    kept = df.filter(pl.col("drop_reason").is_null())
    ntok = np.zeros(kept.height, dtype=np.int64)
    is_val = kept["_val"].to_numpy().copy()
    if is_val.any():
        is_val = _write_val(kept, is_val, writers["val"], counts["val"], encoder, ntok)
    texts = kept.filter(pl.Series(~is_val))["text"].to_list()
    if texts:
        lens = []
        for toks, starts in encoder.encode_docs(texts, writers["train"].dtype):
            writers["train"].append(toks, starts)
            counts["train"] += _bincount(toks, encoder.vocab_size)
            lens.append(np.diff(starts, append=toks.size) - 1)  # minus the EOT
        ntok[~is_val] = np.concatenate(lens)
    full = np.zeros(df.height, dtype=bool)
    full[np.flatnonzero(df["drop_reason"].is_null().to_numpy())] = is_val
    return _document_rows(df.with_columns(pl.Series("_val", full)), kept, ntok, src, src.shard_id)


def _write_val(kept: pl.DataFrame, cand: np.ndarray, writer, count: np.ndarray, encoder: Encoder,
               ntok: np.ndarray) -> np.ndarray:
    """Write the val candidates that fit in VAL_MAX_TOKENS, in order, stopping at the first that does not;
    returns the val mask (the candidates after it go to train)."""
    idx = np.flatnonzero(cand)
    room, taken = VAL_MAX_TOKENS - writer.n_tokens, 0
    if room > 0:
        for toks, starts in encoder.encode_docs(kept["text"].gather(idx).to_list(), writer.dtype):
            sizes = np.diff(starts, append=toks.size)  # with the EOT
            fit = int(np.searchsorted(np.cumsum(sizes), room, side="right"))
            end = toks.size if fit == sizes.size else int(starts[fit])
            if fit:
                writer.append(toks[:end], starts[:fit])
                count += _bincount(toks[:end], count.size)
                ntok[idx[taken:taken + fit]] = sizes[:fit] - 1
            taken, room = taken + fit, room - end
            if fit < sizes.size:
                break
    out = np.zeros_like(cand)
    out[idx[:taken]] = True
    return out


def _document_rows(df: pl.DataFrame, kept: pl.DataFrame, ntok: np.ndarray, src: SourceFile, sid: int) -> pl.DataFrame:
    """One catalog row per input document, kept or not (positional: ids may repeat in a file)."""
    is_kept = df["drop_reason"].is_null().to_numpy()
    full = np.zeros(df.height, dtype=np.int64)
    full[np.flatnonzero(is_kept)] = ntok
    return df.with_columns(pl.Series("_ntok", full)).select(
        pl.col("id").alias("doc_id"), pl.lit(src.file).alias("source_file"),
        pl.lit(sid, dtype=pl.Int32).alias("shard_id"),
        pl.when(pl.col("drop_reason").is_null())
          .then(pl.when(pl.col("_val")).then(pl.lit("val")).otherwise(pl.lit("train"))).alias("split"),
        "dump", "url", pl.col("url").str.extract(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/:?#]+)", 1).alias("domain"),
        pl.col("int_score").cast(pl.Int64), pl.col("language_score").cast(pl.Float64),
        pl.col("text").str.len_chars().cast(pl.Int64).alias("n_chars"),
        pl.when(pl.col("drop_reason").is_null()).then(pl.col("_ntok")).alias("n_tokens"),
        pl.col("drop_reason").is_null().alias("kept"), "drop_reason")


def remove_outputs(home: Home, sid: int) -> None:
    for s in SPLITS:
        for p in (home.shard(sid, s), idx_path(home.shard(sid, s))):
            p.unlink(missing_ok=True)
    for p in (home.shard_meta(sid), home.shard_docs(sid), home.shard_counts(sid)):
        p.unlink(missing_ok=True)


def finish(home: Home, job: ShardJob, res: ShardCounts, shas: dict, sizes: dict, counts: dict | None,
           tally: DocTally, started, docs: DocsWriter | None = None) -> None:
    """Sidecars: the documents (committed from `docs`) and token counts as parquet, then the `.json` that
    marks the shard complete. `sizes`: split -> (n_docs, n_tokens); without `docs` and `counts` the parquet
    sidecars are already in place."""
    src, sid = job.source, job.source.shard_id
    finished = utcnow()
    res.rows_in, res.kept, res.dropped = tally.rows, tally.kept, dict(sorted(tally.dropped.items()))
    res.docs = {s: n for s, (n, _) in sizes.items()}
    res.tokens = {s: t for s, (_, t) in sizes.items()}
    res.status = "done"
    rows = [dict(shard_id=sid, split=s, source_file=src.file, path=home.shard(sid, s).name,
                 n_docs=sizes[s][0], n_tokens=sizes[s][1], sha256=shas[s],
                 source_sha256=src.sha256, tokenizer_sha256=job.tokenizer_sha256,
                 config_hash=job.config_hash, status="done") for s in SPLITS]
    res.timing = dict(started_at=started, finished_at=finished, seconds=res.seconds, flow_run_id=job.flow_run_id)
    if docs is not None:
        docs.commit()
    if counts is not None:
        write_parquet(token_counts_frame(counts, sid), home.shard_counts(sid))
    meta = dict(shard_id=sid, source=asdict(src), filter=job.filter.as_dict(), val=VAL_RULE,
                tokenizer_sha256=job.tokenizer_sha256, config_hash=job.config_hash,
                earlier=list(job.earlier), rows=rows, rows_in=res.rows_in, kept=res.kept, dropped=res.dropped)
    atomic_write_text(home.shard_meta(sid), json.dumps(meta, indent=2, sort_keys=True))


def token_counts_frame(counts: dict, sid: int) -> pl.DataFrame:
    return pl.concat([
        pl.DataFrame({"shard_id": np.full(nz.size, sid, np.int32), "split": [s] * nz.size,
                      "token_id": nz.astype(np.int32), "count": c[nz]},
                     schema={"shard_id": pl.Int32, "split": pl.String, "token_id": pl.Int32, "count": pl.Int64})
        for s, c in counts.items() for nz in [np.flatnonzero(c)]])


def write_parquet(df: pl.DataFrame, path) -> None:
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())
