"""Finished shards into the catalog from the flow's process: batched, one transaction at a time.
Each DuckDB write costs 50-100 ms of a core the encoders want, so while a run goes on rows are written
at most every `every_s` seconds (everything at the end); viewers see progress that much later."""
from __future__ import annotations

import time

from prefect.futures import PrefectFuture, as_completed

from storage import shard_catalog, sources
from storage.paths import Home
from tasks.tokenize import ShardCounts, ShardJob

RECORD_EVERY_S = 2.0


class ShardRecorder:
    def __init__(self, home: Home, failed: dict, flow_run_id, every_s: float = RECORD_EVERY_S):
        self.home, self.failed, self.flow_run_id, self.every_s = home, failed, flow_run_id, every_s
        self.building: dict[PrefectFuture, ShardJob] = {}
        self.done: list[tuple[ShardJob, ShardCounts]] = []  # finished, not recorded yet
        self.results: list[ShardCounts] = []
        self.tokenizer: dict | None = None  # its `tokenizers` row goes in with the next shards
        self.last = time.monotonic()

    def submitted(self, fut: PrefectFuture, job: ShardJob) -> None:
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
            for fut in [f for f in self.building if f.state.is_final()]:
                self.done.append((self.building.pop(fut), fut.result()))
            due = time.monotonic() - self.last >= self.every_s
            if (due or (block and not self.building)) and (self.done or self.tokenizer):
                self._write()
            if not (block and self.building):
                return
            next(iter(as_completed(list(self.building))))  # wait for one, then take all that are done

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
