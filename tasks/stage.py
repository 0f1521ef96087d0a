"""Read a source file once: write its scan index AND encode every document that passes the rules.
Saves the second read and decode of the text; the price is encoding the rare cross-file duplicates too."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import polars as pl

from storage.atomic import atomic_write_text
from storage.paths import SPLITS, Home, shard_name
from storage.shards import ShardWriter
from storage.sources import SourceFile
from tasks.filter import FilterConfig
from tasks.read import BadInput, iter_batches
from tasks.scan import ScanCounts, index_key, index_rows, scan_file, write_index
from storage.sidecars import DocsWriter
from tasks.tokenize import COLUMNS, DOC_ARROW, DocTally, encode_batch, token_counts_frame, write_parquet
from tasks.tokenizer import Encoder

MARKER = "staged.json"  # written last: a staging folder without it is incomplete and never used


def scan_step(home: Home, src: SourceFile, cfg: FilterConfig, tok: tuple[str, str] | None = None) -> ScanCounts:
    """A file's scan; with `tok` (tokenizer path, sha256) also its shard, staged until its dedup. An
    unusable file comes back as its error, so the run records it and goes on with the others."""
    try:
        return stage_file(home, src, cfg, *tok) if tok else scan_file(home, src, cfg)
    except BadInput as e:
        return ScanCounts(src.shard_id, 0, 0, skipped=False, error=str(e))


def stage_file(home: Home, src: SourceFile, cfg: FilterConfig, tokenizer_path: str, tok_sha: str) -> ScanCounts:
    """`scan_file`, plus the shard of every rule-passing document in `home.staging(shard_id)`,
    waiting for tasks/finish.py to drop the cross-file duplicates once the earlier indexes exist.

    Anything going wrong falls back to the plain scan, so a bad file fails exactly as it did with
    two reads (the scan reads fewer columns: a corrupt `url` page fails the shard, not the scan)."""
    stage = home.staging(src.shard_id)
    try:
        return _stage(home, src, cfg, tokenizer_path, tok_sha, stage)
    except Exception:
        shutil.rmtree(stage, ignore_errors=True)
        return scan_file(home, src, cfg)


def _stage(home: Home, src: SourceFile, cfg: FilterConfig, tokenizer_path: str, tok_sha: str, stage) -> ScanCounts:
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    sid = src.shard_id
    encoder, writers, counts = None, {}, {}

    def start() -> Encoder:
        # only once the first batch is read and indexed: the flow may still be loading the tokenizer
        enc = Encoder.cached(tokenizer_path, tok_sha)
        writers.update({s: ShardWriter(stage / shard_name(sid, s), enc.vocab_size) for s in SPLITS})
        counts.update({s: np.zeros(enc.vocab_size, dtype=np.int64) for s in SPLITS})
        return enc

    parts, docs, tally = [], DocsWriter(stage / "docs.parquet", DOC_ARROW), DocTally()
    try:
        for t in iter_batches(src.path, COLUMNS):
            df = pl.from_arrow(t)
            idx = index_rows(df, cfg)
            parts.append(idx)
            if encoder is None:
                encoder = start()
            df = df.with_columns(idx["rule_reason"].alias("drop_reason"))
            docs.write(tally.add(encode_batch(df, cfg, writers, counts, encoder, src)).to_arrow())
        if encoder is None:  # a file without rows still gets its (empty) shards
            encoder = start()
        shas = {s: w.close() for s, w in writers.items()}
        docs.commit()  # final bytes already: with no duplicate found, finishing is a rename
    except BaseException:
        for w in writers.values():
            w.abort()
        docs.abort()
        raise
    write_parquet(token_counts_frame(counts, sid), stage / "counts.parquet")
    sc = write_index(home, src, cfg, parts)
    meta = dict(key=index_key(src, cfg), tokenizer_sha256=tok_sha, vocab_size=encoder.vocab_size, shas=shas,
                sizes={s: [w.n_docs, w.n_tokens] for s, w in writers.items()},
                tally=dataclasses.asdict(tally))  # finishing without a duplicate reads no sidecar back
    atomic_write_text(stage / MARKER, json.dumps(meta))
    sc.staged = True
    return sc


def staged_meta(home: Home, src: SourceFile, cfg: FilterConfig, tok_sha: str) -> dict | None:
    """The staging record of this shard if it is complete and was made from these bytes, this filter
    and this tokenizer; else None (the shard is then built from the source as before)."""
    try:
        meta = json.loads((home.staging(src.shard_id) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    ok = meta.get("key") == index_key(src, cfg) and meta.get("tokenizer_sha256") == tok_sha and "tally" in meta
    return meta if ok else None


def discard(home: Home, shard_id: int) -> None:
    shutil.rmtree(home.staging(shard_id), ignore_errors=True)
