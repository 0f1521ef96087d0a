"""The body shared by `tokenize` and `prepare`: scans, tokenizer, plan, shards, report, as one scheduler object.
It hands work out through the step callables it is given (Prefect tasks in the flows, plain functions in tests
and benchmarks), so the order of a run lives here once; the price is one indirection per step."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from storage import shard_catalog, sources
from storage.atomic import remove_stale_temps
from storage.paths import Home
from storage.sources import SourceFile
from tasks.params import TokenizeParams
from tasks.plan import check_reprocess, likely_built, plan_one, tokenizer_prefix
from tasks.read import BadInput
from tasks.record import PLAIN, Futures, ShardRecorder
from tasks.stage import discard
from tasks.tokenize import ShardCounts, ShardJob
from tasks.tokenizer import ensure_tokenizer, home_vocab, ready_sha256, tokenizer_ready


@dataclass
class Incoming:
    """A source file still downloading: its name, shard position, the download's future, and
    `settle(future) -> SourceFile` that records the outcome in this process (raises if it failed)."""
    file: str
    position: int
    future: Any
    settle: Callable[[Any], SourceFile]
    _done: SourceFile | None = None

    def result(self) -> SourceFile:
        if self._done is None:
            self._done = self.settle(self.future)
        return self._done


@dataclass
class Steps:
    """The work a run hands out. `scan(src, tok)` and `build(job)` return futures (`tok`: (tokenizer path,
    sha256) to also encode the shard in the scan's read); `train_tokenizer(usable)` returns (origin, sha256,
    vocab size); `finish(job)` finishes a staged shard in the calling thread."""
    scan: Callable[[SourceFile, tuple[str, str] | None], Any]
    train_tokenizer: Callable[[list[SourceFile]], tuple[str, str, int]]
    build: Callable[[ShardJob], Any]
    finish: Callable[[ShardJob], ShardCounts]
    futures: Futures = PLAIN


@dataclass
class TokenizeRun:
    """One run over `files` (in shard order; an Incoming is a file still downloading): shard i starts as
    soon as files 0..i are in and scanned (dedup needs them) and the tokenizer exists. `listed`: `files`
    come from a local listing not yet in `source_files`. `refused`: {file: why} of source files already
    recorded failed (a manifest mismatch): reported, never read. Steps may run on other machines (Dask);
    only this object's process writes the catalog."""
    home: Home
    params: TokenizeParams
    files: list[SourceFile | Incoming]
    steps: Steps
    listed: bool = False
    refused: dict[str, str] = field(default_factory=dict)
    flow_run_id: str | None = None
    log: Any = field(default_factory=lambda: logging.getLogger("langpwt.tokenize"))
    # state of the run
    scans: dict[int, Any] = field(default_factory=dict)
    tok: tuple[str, str, int] | None = None   # (origin, sha256, vocab) once resolved
    sha: str | None = None                    # the tokenizer's sha256 when known before it is loaded
    states: dict = field(default_factory=dict)
    usable: list[SourceFile] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    queued: list[SourceFile] = field(default_factory=list)
    woke: set = field(default_factory=set)    # arrivals already seen: scanned, or failed downloads
    recorded: bool = False
    rows_read: int = 0
    any_kept: bool = False  # a document passed the filters: nothing is trained or planned before one does

    def __post_init__(self):
        self.fcfg = self.params.filter_config()
        self.tcfg = self.params.tokenizer_config(home_vocab(self.home.tokenizer))
        self.failed: dict[str, str] = dict(self.refused)
        self.rec = ShardRecorder(self.home, self.failed, self.flow_run_id, futures=self.steps.futures)
        # a given file is loaded from where it is, so scans start before its copy in the home is checked
        # and made; a remote Dask cluster is promised only the home's path, so there the copy comes first
        self.remote = bool(self.params.tokenizer and self.params.dask_address)
        self.tok_file = self.params.tokenizer if self.params.tokenizer and not self.remote else str(self.home.tokenizer)

    def run(self) -> dict:
        t0 = time.time()
        self._start()
        for i, f in enumerate(self.files):
            src = f if isinstance(f, SourceFile) else self._arrived(f)
            if src is not None:
                self._take(i, src)
            self.rec.flush()
        where = self.params.source or self.home.raw
        if not self.usable:
            raise BadInput(f"{where}: no usable source file among {len(self.files) + len(self.refused)}")
        if not self.any_kept:
            for src in self.usable:  # encoded in their scans' read, never to be finished
                discard(self.home, src.shard_id)
            raise BadInput(f"{where}: no document left after the filters ({self.rows_read:,} read, every one "
                           f"dropped by the rules)")
        if self.tok is None:
            self._resolve_tokenizer(self.usable)
            self._submit(self.usable)
        self.log.info(f"{self.rec.count} shards built, {len(self.skipped)} up to date")
        self.rec.flush(block=True)
        return summarize(self.rec.results, self.skipped, self.failed, time.time() - t0)

    def _start(self) -> None:
        for folder in (self.home.shards, self.home.index, self.home.tokenizer_dir):
            remove_stale_temps(folder)
        try:
            check_reprocess(self.params.reprocess, [f.position for f in self.files])
        except ValueError:
            if self.listed:  # recorded all the same, as before any run
                sources.record(self.home, self.files, "verified")
            raise
        ready = tokenizer_ready(self.home.tokenizer, self.params.tokenizer, self.params.retrain_tokenizer)
        if not ready:  # first, so the catalog work below overlaps them
            self._scan_present()
        self.states = shard_catalog.shard_states(self.home)
        if ready:  # no sample needed: its sha256 now, so each file is read once (scan + encode)
            self.sha = ensure_tokenizer(self.home.tokenizer, [], self.fcfg, self.tcfg, self.params.tokenizer)[1] \
                if self.remote else ready_sha256(self.home.tokenizer, self.params.tokenizer)
            self._scan_present()
        if self.listed:
            sources.record(self.home, [f for f in self.files if isinstance(f, SourceFile)], "verified")
        if ready:  # the same file: a staged shard is checked against its job's sha256
            self._resolve_tokenizer([])

    def _scan_present(self) -> None:
        for f in self.files:
            if isinstance(f, SourceFile) and f.position not in self.scans:
                self.scans[f.position] = self._scan(f)

    def _scan(self, src: SourceFile):
        """With the tokenizer known, a file whose shard will likely be built is encoded in its one read."""
        before = [e if isinstance(e, SourceFile) else e._done for e in self.files if e.position < src.position]
        known = self.tok[1] if self.tok else self.sha  # trained meanwhile, or resolved before loading
        stage = known is not None and None not in before and likely_built(
            self.home, src, before, self.fcfg, known, self.states, self.params.reprocess, self.params.force)
        return self.steps.scan(src, (self.tok_file, known) if stage else None)

    def _resolve_tokenizer(self, usable: list[SourceFile]) -> None:
        """The run's tokenizer (trained on `usable` if needed); shards built with another one turn stale."""
        self.tok = self.steps.train_tokenizer(usable)
        sha = self.tok[1]
        old = [sid for sid, st in self.states.items() if st["status"] == "done"
               and st.get("tokenizer_sha256") not in (None, sha)]
        if old:
            shard_catalog.mark_stale(self.home, old)
            for sid in old:
                self.states[sid] = dict(self.states[sid], status="stale")

    def _take(self, i: int, src: SourceFile) -> None:
        """File i has arrived: wait for its scan, then plan what is ready."""
        self._scan_arrived(i)
        if src.position not in self.scans:  # not setdefault: its argument would submit a second scan
            self.scans[src.position] = self._scan(src)
        self._wait_scanning(i, self.scans[src.position])
        sc = self.scans[src.position].result()
        if sc.error:
            self.failed[src.file] = sc.error
            shard_catalog.record_failed(self.home, src.shard_id, src.file, src.sha256, None, sc.error, None,
                                        self.flow_run_id)
            sources.mark(self.home, src.file, "failed", sc.error)
        else:
            self.usable.append(src)
            self.rows_read += sc.rows
            self.any_kept = self.any_kept or sc.passed_rules > 0
            if self.tok is None and self.any_kept and tokenizer_prefix(self.usable, self.tcfg.sample_bytes):
                self._resolve_tokenizer(self.usable)
                self.queued = list(self.usable)
            elif self.tok is not None:
                self.queued.append(src)
        nxt = self.scans.get(self.files[i + 1].position) if i + 1 < len(self.files) else None
        if self.queued and self.any_kept and not (nxt is not None and self.steps.futures.done(nxt)):
            # plan the files scanned so far at once
            self._submit(self.queued)
            self.queued = []

    def _scan_arrived(self, i: int) -> None:
        for later in self.files[i + 1:]:  # scan files that finished downloading meanwhile
            if isinstance(later, Incoming) and later.position not in self.scans \
                    and self.steps.futures.ok(later.future):
                self.scans[later.position] = self._scan(later.result())

    def _wait_scanning(self, i: int, fut) -> None:
        """Wait for scan i; a download that lands meanwhile gets its scan at once, not after this one
        (a worker would idle for the rest of scan i)."""
        while True:
            arriving = [f.future for f in self.files[i + 1:] if isinstance(f, Incoming)
                        and f.position not in self.scans and f.future not in self.woke]
            if not arriving:
                return
            done = self.steps.futures.first([fut, *arriving])
            if done is fut:
                return
            self._scan_arrived(i)
            self.woke.add(done)

    def _submit(self, srcs: list[SourceFile]) -> None:
        if srcs and not self.recorded:  # only once a file is usable, as when it is trained
            origin, sha, vocab = self.tok
            self.rec.tokenizer = dict(sha256=sha, path=str(self.home.tokenizer), vocab_size=vocab, origin=origin,
                                      config=self.tcfg.__dict__)
            self.recorded = True
        jobs = []
        for src in srcs:
            earlier = self.usable[:self.usable.index(src)]
            _, job = plan_one(self.home, src, earlier, self.fcfg, str(self.home.tokenizer), self.tok[1],
                              self.states, self.params.reprocess, self.params.force, self.flow_run_id)
            if job is None:
                self.skipped.append(src.shard_id)
                if self.scans[src.position].result().staged:
                    discard(self.home, src.shard_id)  # the guess was wrong: up to date after all
            else:
                jobs.append(job)
        staged = [j for j in jobs if self.scans[j.source.position].result().staged]
        to_build = [j for j in jobs if j not in staged]
        if to_build:  # a staged shard is finished right here: a `running` row would live a moment only
            shard_catalog.mark_running(self.home, [(j.source.shard_id, j.source.file, j.source.sha256,
                                                    j.config_hash) for j in to_build], self.flow_run_id)
        for job in staged:
            # finishing is a rename in the usual case: here, at once, rather than queued behind the
            # remaining scans on the workers
            self.rec.finished(job, self.steps.finish(job))
        for job in to_build:
            self.rec.submitted(self.steps.build(job), job)

    def _arrived(self, inc: Incoming) -> SourceFile | None:
        """A download's result, or None after noting why (source_files already holds the failure)."""
        try:
            return inc.result()
        except Exception as e:
            self.failed[inc.file] = str(e).splitlines()[0] if str(e) else type(e).__name__
            return None


def summarize(results: list, skipped: list[int], failed: dict, seconds: float) -> dict:
    rows, reasons = [], {}
    for r in sorted(results, key=lambda r: r.shard_id):
        rows.append(dict(shard=f"{r.shard_id:06d}", file=r.source_file, status=r.status,
                         docs_in=r.rows_in, kept=r.kept, tokens_train=r.tokens["train"],
                         tokens_val=r.tokens["val"], seconds=round(r.seconds, 2), error=r.error or ""))
        for k, v in r.dropped.items():
            reasons[k] = reasons.get(k, 0) + v
    tokens = sum(sum(r.tokens.values()) for r in results)
    return dict(table=rows, built=len(results) - sum(1 for r in results if r.error), skipped=len(skipped),
                failed=failed, tokens=tokens, dropped=reasons, seconds=round(seconds, 2),
                docs_in=sum(r.rows_in for r in results), kept=sum(r.kept for r in results))
