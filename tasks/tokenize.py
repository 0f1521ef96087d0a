"""Tokenize one source file into its train and val shards and record them in the catalog.
Shards stream to temp files and are renamed only when complete; the catalog is written last,
so a kill at any moment leaves the previous state, and a rerun produces identical bytes."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from storage import shard_catalog
from storage.atomic import atomic_write_text
from storage.paths import SPLITS, Home
from storage.shards import ShardWriter, idx_path
from storage.sources import SourceFile
from tasks.filter import REASONS, FilterConfig, dedup_reasons, val_mask
from tasks.read import BadInput, iter_batches
from tasks.scan import earlier_keys
from tasks.tokenizer import Encoder

COLUMNS = ["id", "text", "dump", "url", "int_score", "language_score"]


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


def _interleave(ids: np.ndarray, offs: np.ndarray, eot: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens with `<|endoftext|>` before every document, and each document's EOT offset."""
    n = offs.size - 1
    starts = (offs[:-1] + np.arange(n, dtype=np.uint64)).astype(np.int64)
    out = np.empty(ids.size + n, dtype=np.uint32)
    is_tok = np.ones(out.size, dtype=bool)
    is_tok[starts] = False
    out[is_tok] = ids
    out[starts] = eot
    return out, starts


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
    started = shard_catalog.mark_running(home, sid, src.file, src.sha256, job.config_hash, job.flow_run_id)
    writers = {s: ShardWriter(home.shard(sid, s), encoder.vocab_size) for s in SPLITS}
    counts = {s: np.zeros(encoder.vocab_size, dtype=np.int64) for s in SPLITS}
    res = ShardCounts(sid, src.file, "running")
    docs: list[pl.DataFrame] = []
    try:
        reasons = _reasons(home, job)
        row = 0
        for t in iter_batches(src.path, COLUMNS):
            df = pl.from_arrow(t).with_columns(
                reasons.slice(row, t.num_rows).alias("drop_reason"),
                val_mask(pl.col("id"), job.filter.val_fraction).alias("_val"))
            if df.height != t.num_rows or row + t.num_rows > reasons.len():
                raise BadInput(f"{src.path}: changed since it was scanned")
            row += t.num_rows
            kept = df.filter(pl.col("drop_reason").is_null())
            ntok = np.zeros(kept.height, dtype=np.int64)
            for split, sel in (("train", ~kept["_val"]), ("val", kept["_val"])):
                texts = kept.filter(sel)["text"].to_list()
                if not texts:
                    continue
                ids, offs = encoder.encode_flat(texts)
                toks, starts = _interleave(ids, offs, encoder.eot)
                writers[split].append(toks, starts)
                counts[split] += np.bincount(toks, minlength=encoder.vocab_size)
                ntok[sel.to_numpy()] = np.diff(offs.astype(np.int64))
            docs.append(_document_rows(df, kept, ntok, src, sid))
        if row != reasons.len():
            raise BadInput(f"{src.path}: changed since it was scanned")
        shas = {s: w.close() for s, w in writers.items()}
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if isinstance(e, (BadInput, ValueError)):
            res.status, res.error = "failed", str(e)
            _remove_outputs(home, sid)
            shard_catalog.record_failed(home, sid, src.file, src.sha256, job.config_hash, str(e), started,
                                        job.flow_run_id)
            return res
        raise
    res.seconds = time.perf_counter() - t0
    documents = pl.concat(docs) if docs else None
    _finish(home, job, res, shas, writers, counts, documents, started)
    return res


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


def _remove_outputs(home: Home, sid: int) -> None:
    for s in SPLITS:
        for p in (home.shard(sid, s), idx_path(home.shard(sid, s))):
            p.unlink(missing_ok=True)
    home.shard_meta(sid).unlink(missing_ok=True)


def _finish(home: Home, job: ShardJob, res: ShardCounts, shas: dict, writers: dict, counts: dict,
            documents: pl.DataFrame | None, started) -> None:
    """Sidecar metadata (enough to rebuild the catalog), then the catalog rows in one transaction."""
    src, sid = job.source, job.source.shard_id
    finished = shard_catalog.utcnow()
    if documents is None:
        documents = pl.DataFrame()
    res.rows_in = documents.height
    if documents.height:
        res.kept = int(documents["kept"].sum())
        vc = documents.filter(~pl.col("kept"))["drop_reason"].value_counts()
        res.dropped = {r: int(n) for r, n in vc.iter_rows() if r in REASONS}
    res.docs = {s: w.n_docs for s, w in writers.items()}
    res.tokens = {s: w.n_tokens for s, w in writers.items()}
    res.status = "done"
    rows = [dict(shard_id=sid, split=s, source_file=src.file, path=str(home.shard(sid, s)),
                 n_docs=writers[s].n_docs, n_tokens=writers[s].n_tokens, sha256=shas[s],
                 source_sha256=src.sha256, tokenizer_sha256=job.tokenizer_sha256,
                 config_hash=job.config_hash, status="done", started_at=started, finished_at=finished,
                 seconds=res.seconds, flow_run_id=job.flow_run_id) for s in SPLITS]
    meta = dict(shard_id=sid, source=src.__dict__, filter=job.filter.as_dict(),
                tokenizer_sha256=job.tokenizer_sha256, config_hash=job.config_hash,
                earlier=list(job.earlier), splits={r["split"]: {k: r[k] for k in ("n_docs", "n_tokens", "sha256")}
                                                   for r in rows},
                rows_in=res.rows_in, kept=res.kept, dropped=res.dropped)
    atomic_write_text(home.shard_meta(sid), json.dumps(meta, indent=2, sort_keys=True))
    token_counts = pa.concat_tables([
        pa.table({"shard_id": pa.array(np.full(nz.size, sid), pa.int32()), "split": pa.array([s] * nz.size, pa.string()),
                  "token_id": pa.array(nz.astype(np.int32)), "count": pa.array(c[nz])})
        for s, c in counts.items() for nz in [np.flatnonzero(c)]])
    docs_arrow = documents.to_arrow() if documents.height else None
    if docs_arrow is None:
        docs_arrow = pa.table({"doc_id": pa.array([], pa.string())})
    shard_catalog.record_done(home, sid, rows, docs_arrow, token_counts)
