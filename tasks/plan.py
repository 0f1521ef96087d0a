"""Decide which shards to (re)build: skip those done with the same input and config, mark the rest stale.
The config hash covers everything a shard's bytes depend on, including the files it is deduplicated against."""
from __future__ import annotations

import hashlib
import json

from storage import shard_catalog
from storage.paths import Home
from storage.sources import SourceFile
from tasks.filter import VAL_RULE, FilterConfig
from tasks.tokenize import ShardJob

FORMAT_VERSION = 1


def config_hash(src: SourceFile, earlier: list[SourceFile], fcfg: FilterConfig, tok_sha: str) -> str:
    d = dict(format=FORMAT_VERSION, filter=fcfg.digest(), tokenizer=tok_sha, val=VAL_RULE,
             earlier=[(e.shard_id, e.sha256) for e in earlier] if fcfg.dedup else [])
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def plan_one(home: Home, src: SourceFile, earlier: list[SourceFile], fcfg: FilterConfig, tokenizer_path: str,
             tok_sha: str, states: dict, reprocess: list[int] | None = None, force: bool = False,
             flow_run_id: str | None = None) -> tuple[str, ShardJob | None]:
    """("skip" | "build" | "stale", job) for one usable file; `earlier` are the usable files before it.

    Files are planned one at a time, in order, so a shard can start while later files still download."""
    h = config_hash(src, earlier, fcfg, tok_sha)
    st = states.get(src.shard_id)
    up_to_date = (st is not None and st["status"] == "done" and st["config_hash"] == h
                  and st["source_sha256"] == src.sha256
                  and all(home.shard(src.shard_id, s).exists() for s in ("train", "val")))
    wanted = src.shard_id in reprocess if reprocess else (force or not up_to_date)
    if not wanted:
        return "skip", None
    job = ShardJob(src, fcfg, tokenizer_path, tok_sha, tuple(e.shard_id for e in earlier), h, flow_run_id)
    if st is not None and st["status"] == "done" and not up_to_date:
        shard_catalog.mark_stale(home, [src.shard_id])
        return "stale", job
    return "build", job


def check_reprocess(reprocess: list[int] | None, positions: list[int]) -> None:
    missing = sorted(set(reprocess or []) - set(positions))
    if missing:
        raise ValueError(f"--reprocess {missing}: no source file has that shard id (known: {sorted(positions)})")


def tokenizer_prefix(usable: list[SourceFile], sample_bytes: int) -> bool:
    """Whether the usable files so far hold enough bytes to train the tokenizer on.

    Parquet is compressed, so its size understates the text inside: the prefix is never too short."""
    return sum(f.size_bytes for f in usable) >= sample_bytes


def likely_built(home: Home, src: SourceFile, before: list[SourceFile], fcfg: FilterConfig, tok_sha: str,
                 states: dict, reprocess: list[int] | None = None, force: bool = False) -> bool:
    """Whether `plan_one` will probably build this shard, judged before the earlier files are scanned:
    it decides whether the file's one read also encodes it (tasks/stage.py). Earlier files are taken
    as usable unless the same bytes failed their scan before. A wrong guess costs time, never bytes:
    an encode thrown away, or the file read a second time as before."""
    if reprocess:
        return src.shard_id in reprocess
    if force:
        return True
    earlier = [e for e in before if not _failed_scan(states.get(e.shard_id), e)]
    st = states.get(src.shard_id)
    return not (st is not None and st["status"] == "done" and st["source_sha256"] == src.sha256
                and st["config_hash"] == config_hash(src, earlier, fcfg, tok_sha)
                and all(home.shard(src.shard_id, s).exists() for s in ("train", "val")))


def _failed_scan(st: dict | None, f: SourceFile) -> bool:
    return st is not None and st["status"] == "failed" and st["config_hash"] is None and st["source_sha256"] == f.sha256
