"""Download a FineWeb-Edu subset from the Hub into $LANGPWT_HOME/raw: plan, fetch each file verified, record.
Plain functions that run without Prefect; flows/download.py wraps them as tasks for the flows."""
from __future__ import annotations

import fnmatch
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import constants
from pydantic import ConfigDict, Field, SecretStr
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from storage import catalog, sources
from storage.hub import Hub, HubError, HubFile, check_space, part_path, subset_pattern
from storage.paths import Home
from storage.shards import file_sha256
from storage.sources import SourceFile
from tasks.params import HubSubset

_CATALOG = threading.Lock()  # DuckDB allows one writer: threads of one process take turns here


class DownloadError(HubError):
    """Some files failed; the message lists each with its reason."""


class DownloadParams(HubSubset):
    """Parameters of `langpwt download`; the subset's fields are shared with `prepare` (tasks.params.HubSubset)."""
    model_config = ConfigDict(extra="forbid")
    workers: int = Field(4, ge=1, le=64, description="files downloaded concurrently")
    endpoint: str = Field(default_factory=lambda: os.environ.get("HF_ENDPOINT") or constants.ENDPOINT,
                          description="Hub URL; from HF_ENDPOINT, else huggingface.co")
    token: SecretStr | None = Field(None, exclude=True, description="Hub token; default: HF_TOKEN or the stored "
                                                                     "login")
    backoff_s: float = Field(1.0, ge=0, description="first wait between attempts, doubled each time (jittered)")
    timeout_s: float = Field(30.0, gt=0, description="seconds without a byte before an attempt is cut")
    progress: bool = Field(True, description="a live progress bar on a terminal")

    def hub(self) -> Hub:
        return Hub(self.dataset, self.endpoint, self.token.get_secret_value() if self.token else None,
                   self.timeout_s, self.retries, self.backoff_s)


@dataclass(frozen=True)
class Item:
    file: HubFile
    position: int      # index in the subset's full sorted listing: the shard id, whatever --include picks
    dest: str
    url: str
    done: bool         # verified earlier: nothing to fetch

    def source(self, sha256: str | None = None) -> SourceFile:
        return SourceFile(self.file.path, self.dest, self.file.size, sha256 or self.file.sha256 or "", self.position)


@dataclass(frozen=True)
class Plan:
    dataset: str
    revision: str      # the commit sha every file is pinned to
    items: list[Item]
    need_bytes: int
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def todo(self) -> list[Item]:
        return [i for i in self.items if not i.done]

    @property
    def verified(self) -> list[SourceFile]:
        return [i.source() for i in self.items if i.done]


class ByteBar:
    """One bar over the bytes still missing, with bytes/s and ETA; closes itself after the last file."""

    @classmethod
    def maybe(cls, plan: "Plan", params: DownloadParams) -> "ByteBar | None":
        console = Console(stderr=True)
        # on a pipe or in a log file a live bar is noise: the one-line summary and errors say it all
        return cls(plan.need_bytes, len(plan.todo), console) if params.progress and plan.todo and \
            console.is_terminal else None

    def __init__(self, total: int, files: int, console: Console):
        self.left = files
        self.lock = threading.Lock()
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeRemainingColumn(), console=console)
        self.task = self.p.add_task(f"download 0/{files} files", total=total)
        self.files = files
        self.p.start()

    def advance(self, n: int) -> None:
        self.p.advance(self.task, n)

    def file_done(self) -> None:
        with self.lock:
            self.left -= 1
            self.p.update(self.task, description=f"download {self.files - self.left}/{self.files} files")
            if self.left <= 0:
                self.p.stop()


def _verified_rows(home: Home, dataset: str) -> dict[str, tuple]:
    """file -> (sha256, revision, position) of the rows already verified."""
    if not home.catalog.exists():
        return {}
    rows = catalog.query_rows(home, "SELECT file, sha256, revision, position FROM source_files "
                                    "WHERE status = 'verified' AND dataset = ?", [dataset])
    return {r[0]: r[1:] for r in rows}


def _select(params: DownloadParams, paths: list[str]) -> list[str]:
    chosen = [p for p in paths if not params.include or fnmatch.fnmatchcase(p, params.include)]
    if params.include and not chosen:
        raise HubError(f"--include {params.include}: matches none of the {len(paths)} files of "
                       f"--subset {params.subset} ({subset_pattern(params.subset)})")
    return chosen[:params.max_files]


def plan_download(home: Home, params: DownloadParams) -> Plan:
    """Pin the revision, list files with size and sha256, check disk space, record `pending` rows."""
    pattern = subset_pattern(params.subset)
    home.raw.mkdir(parents=True, exist_ok=True)
    if constants.is_offline_mode():
        return _offline_plan(home, params, pattern)
    hub = params.hub()
    sha = hub.resolve(params.revision)
    files = hub.list_files(sha, pattern)
    if not files:
        raise HubError(f"--subset {params.subset}: no file matches {pattern} in {params.dataset}@{sha[:12]}")
    position = {f.path: i for i, f in enumerate(files)}
    by_path = {f.path: f for f in files}
    known = _verified_rows(home, params.dataset)
    items = []
    for path in _select(params, list(by_path)):
        f, dest = by_path[path], home.raw / path
        row = known.get(path)
        done = (row is not None and dest.is_file() and dest.stat().st_size == f.size
                and (row[0] == f.sha256 if f.sha256 else row[1] == sha))
        items.append(Item(f, position[path], str(dest), hub.url(sha, path), done))
    todo = [i for i in items if not i.done]
    need = sum(i.file.size - (part_path(Path(i.dest)).stat().st_size if part_path(Path(i.dest)).exists() else 0)
               for i in todo)
    check_space(home.raw, need, params.min_free_bytes)  # before any byte is fetched
    if todo:
        with _CATALOG:
            sources.record(home, [i.source() for i in todo], "pending", dataset=params.dataset, revision=sha,
                           urls={i.file.path: i.url for i in todo})
    return Plan(params.dataset, sha, items, need)


def _offline_plan(home: Home, params: DownloadParams, pattern: str) -> Plan:
    """HF_HUB_OFFLINE=1: what was verified before is all there is; nothing is fetched."""
    known = _verified_rows(home, params.dataset)
    paths = sorted(p for p in known if fnmatch.fnmatchcase(p, pattern) and (home.raw / p).is_file())
    if not paths:
        raise HubError(f"--subset {params.subset}: offline mode (HF_HUB_OFFLINE=1) and no verified file of "
                       f"{params.dataset} matching {pattern} in {home.catalog}")
    items = [Item(HubFile(p, (home.raw / p).stat().st_size, known[p][0], ""), known[p][2], str(home.raw / p), "",
                  True) for p in _select(params, paths)]
    return Plan(params.dataset, known[paths[0]][1], items, 0)


@dataclass(frozen=True)
class Fetched:
    source: SourceFile
    seconds: float


def fetch_file(home: Home, plan: Plan, item: Item, params: DownloadParams, on_bytes=None) -> Fetched:
    """Fetch and verify one planned file under home.raw, or raise HubError. Writes no catalog row, so it
    can run on any worker that sees home.raw; the caller records the outcome with `record_fetch`."""
    if item.done:
        return Fetched(item.source(), 0.0)
    f, dest = item.file, Path(item.dest)
    t0 = time.monotonic()
    if dest.exists():  # a file nobody recorded as verified (e.g. killed between rename and record)
        if f.sha256 and dest.stat().st_size == f.size and file_sha256(dest) == f.sha256:
            return Fetched(item.source(f.sha256), time.monotonic() - t0)
        dest.unlink()
    hub = params.hub()
    hub.check_head(plan.revision, f)
    digest = hub.fetch(plan.revision, f, dest, on_bytes)
    return Fetched(item.source(digest), time.monotonic() - t0)


def mark_downloading(home: Home, plan: Plan, items: list[Item]) -> None:
    with _CATALOG:
        sources.record(home, [i.source() for i in items], "downloading", dataset=plan.dataset,
                       revision=plan.revision, urls={i.file.path: i.url for i in items})


def record_fetch(home: Home, plan: Plan, item: Item, fetched: Fetched | None, error: str | None = None) -> None:
    """One finished download's row: `verified` with its seconds, or `failed` with the reason."""
    with _CATALOG:
        if fetched is not None:
            sources.record(home, [fetched.source], "verified", dataset=plan.dataset, revision=plan.revision,
                           urls={item.file.path: item.url}, seconds={item.file.path: round(fetched.seconds, 3)})
        else:
            sources.mark(home, item.file.path, "failed", error)


def failures_message(errors: list[str], total: int) -> str:
    return errors[0] if len(errors) == 1 else f"{len(errors)} of {total} files failed: " + "; ".join(errors)


def download(home: Home, params: DownloadParams) -> list[SourceFile]:
    """Every selected file verified under home.raw, sorted by position; DownloadError if any is not."""
    plan = plan_download(home, params)
    bar = ByteBar.maybe(plan, params)

    # one catalog writer, first in first out: a file's rows keep their order (downloading, then verified or
    # failed), and each DuckDB transaction runs beside the next bytes, not between them
    recorder, writes = ThreadPoolExecutor(1, thread_name_prefix="catalog"), []

    def one(item: Item) -> SourceFile:
        writes.append(recorder.submit(mark_downloading, home, plan, [item]))
        try:
            got = fetch_file(home, plan, item, params, bar.advance if bar else None)
        except HubError as e:
            writes.append(recorder.submit(record_fetch, home, plan, item, None, str(e)))
            raise
        finally:
            if bar:
                bar.file_done()
        writes.append(recorder.submit(record_fetch, home, plan, item, got))
        return got.source

    with recorder:  # leaving it waits for every row: download() returns with the catalog up to date
        with ThreadPoolExecutor(params.workers, thread_name_prefix="download") as pool:
            futures = [pool.submit(one, i) for i in plan.todo]
    for w in writes:
        w.result()  # a catalog write that failed raises here
    got, errors = list(plan.verified), []
    for fut in futures:
        try:
            got.append(fut.result())
        except HubError as e:
            errors.append(str(e))
    if errors:
        raise DownloadError(failures_message(errors, len(plan.items)))
    return sorted(got, key=lambda s: s.position)
