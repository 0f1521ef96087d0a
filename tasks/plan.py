"""Decide which shards to (re)build: skip those done with the same input and config, mark the rest stale.
The config hash covers everything a shard's bytes depend on, including the files it is deduplicated against."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from storage import shard_catalog
from storage.paths import Home
from storage.sources import SourceFile
from tasks.filter import FilterConfig
from tasks.tokenize import ShardJob

FORMAT_VERSION = 1


@dataclass
class Plan:
    jobs: list[ShardJob]
    skipped: list[int]
    stale: list[int]


def config_hash(src: SourceFile, earlier: list[SourceFile], fcfg: FilterConfig, tok_sha: str) -> str:
    d = dict(format=FORMAT_VERSION, filter=fcfg.digest(), tokenizer=tok_sha,
             earlier=[(e.shard_id, e.sha256) for e in earlier] if fcfg.dedup else [])
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def plan_shards(home: Home, scanned: list[SourceFile], fcfg: FilterConfig, tokenizer_path: str,
                tok_sha: str, reprocess: list[int] | None = None, force: bool = False,
                flow_run_id: str | None = None) -> Plan:
    """`scanned`: the usable files in sorted order. `reprocess` limits the work to those shard ids."""
    states = shard_catalog.shard_states(home)
    known = {s.shard_id for s in scanned}
    if reprocess:
        missing = sorted(set(reprocess) - known)
        if missing:
            raise ValueError(f"--reprocess {missing}: no usable source file has that shard id "
                             f"(known: {sorted(known)})")
    jobs, skipped, stale = [], [], []
    for i, src in enumerate(scanned):
        earlier = scanned[:i]
        h = config_hash(src, earlier, fcfg, tok_sha)
        st = states.get(src.shard_id)
        up_to_date = (st is not None and st["status"] == "done" and st["config_hash"] == h
                      and st["source_sha256"] == src.sha256
                      and all(home.shard(src.shard_id, s).exists() for s in ("train", "val")))
        if reprocess is not None and reprocess:
            wanted = src.shard_id in reprocess
        else:
            wanted = force or not up_to_date
        if not wanted:
            skipped.append(src.shard_id)
            continue
        if st is not None and st["status"] == "done" and not up_to_date:
            stale.append(src.shard_id)
        jobs.append(ShardJob(src, fcfg, tokenizer_path, tok_sha, tuple(e.shard_id for e in earlier), h,
                             flow_run_id))
    shard_catalog.mark_stale(home, stale)
    return Plan(jobs, skipped, stale)
