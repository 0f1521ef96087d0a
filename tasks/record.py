"""Finished shards into the catalog from the flow's process: batched, one transaction at a time.
Each DuckDB write takes a core the encoders want, so while a run goes on rows are written at most every
`every_s` seconds (everything at the end); viewers see progress that much later."""
from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass
from typing import Any, Callable

from storage import shard_catalog, sources
from storage.paths import Home
from tasks.tokenize import ShardCounts, ShardJob

RECORD_EVERY_S = 2.0


@dataclass(frozen=True)
class Futures:
    """How to wait on the futures a run's steps return, whatever made them (Prefect, concurrent.futures):
    `done(f)`: finished, either way; `ok(f)`: finished and succeeded; `first(fs)`: block until one of
    `fs` is done and return it."""
    done: Callable[[Any], bool]
    ok: Callable[[Any], bool]
    first: Callable[[list], Any]


PLAIN = Futures(done=lambda f: f.done(), ok=lambda f: f.done() and f.exception() is None,
                first=lambda fs: next(cf.as_completed(fs)))


class ShardRecorder:
    def __init__(self, home: Home, failed: dict, flow_run_id, every_s: float = RECORD_EVERY_S,
                 futures: Futures = PLAIN):
        self.home, self.failed, self.flow_run_id, self.every_s = home, failed, flow_run_id, every_s
        self.futures = futures
        self.building: dict[Any, ShardJob] = {}
        self.done: list[tuple[ShardJob, ShardCounts]] = []  # finished, not recorded yet
        self.results: list[ShardCounts] = []
        self.tokenizer: dict | None = None  # its `tokenizers` row goes in with the next shards
        self.last = time.monotonic()

    def submitted(self, fut, job: ShardJob) -> None:
        self.building[fut] = job

    def finished(self, job: ShardJob, res: ShardCounts) -> None:
        """A shard built in this thread (a staged one, finished by a rename)."""
        self.done.append((job, res))

    @property
    def count(self) -> int:
        return len(self.building) + len(self.done) + len(self.results)

    def flush(self, block: bool = False) -> None:
        """Record what has finished if `every_s` has passed; with `block`, wait for every shard and
        record as they finish (at the same pace), then all that is left."""
        while True:
            for fut in [f for f in self.building if self.futures.done(f)]:
                self.done.append((self.building.pop(fut), fut.result()))
            due = time.monotonic() - self.last >= self.every_s
            if (due or (block and not self.building)) and (self.done or self.tokenizer):
                self._write()
            if not (block and self.building):
                return
            self.futures.first(list(self.building))  # wait for one, then take all that are done

    def _write(self) -> None:
        ok = []
        for job, res in self.done:
            self.results.append(res)
            if res.error:
                self.failed[res.source_file] = res.error
                shard_catalog.record_failed(self.home, res.shard_id, res.source_file, job.source.sha256,
                                            job.config_hash, res.error, None, self.flow_run_id)
                sources.mark(self.home, res.source_file, "failed", res.error)
            else:
                ok.append((res.shard_id, res.timing))
        self.done = []
        shard_catalog.record_shards(self.home, ok, tokenizer=self.tokenizer)
        self.tokenizer = None
        self.last = time.monotonic()
