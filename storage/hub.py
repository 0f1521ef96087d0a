"""All Hugging Face Hub HTTP access: pin a revision, list files with size and sha256, fetch one file verified.
huggingface_hub builds URLs, headers and session; we own the Range resume of `.part`, as its downloader restarts at 0."""
from __future__ import annotations

import email.utils
import fcntl
import fnmatch
import os
import posixpath
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx2
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, parse_ratelimit_headers

from storage.atomic import fsync_dir
from storage.hub_io import Sink, TooLong
from storage.hub_io import Hasher as _Hasher  # a module name the benchmark swaps for its hashing-off variant

SUBSETS = {f"sample-{n}BT": f"sample/{n}BT/*.parquet" for n in (10, 100, 350)}
CRAWL = re.compile(r"CC-MAIN-\d{4}-\d{2}")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
TRANSIENT = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
MAX_WAIT_S = 900.0         # a rate-limit reset further away than this is reported, not slept through


class HubError(RuntimeError):
    """One-line, user-facing: names the file or parameter and the reason."""


class VerifyError(HubError):
    pass


class DiskSpaceError(HubError):
    pass


def subset_pattern(subset: str) -> str:
    """Exact Hub path pattern of a subset; never a recursive glob (that silently pulls 70+ GB)."""
    if subset in SUBSETS:
        return SUBSETS[subset]
    if CRAWL.fullmatch(subset):
        return f"data/{subset}/*"
    raise ValueError(f"--subset {subset}: expected one of {', '.join(SUBSETS)} or a crawl like CC-MAIN-2024-10")


def part_path(dest: Path) -> Path:
    # a stable name (no pid): a killed run's bytes are found and resumed by the next run
    return dest.with_name(f".{dest.name}.part")


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def check_space(folder: Path, need: int, reserve: int) -> int:
    """Raise before any byte is fetched if `need` bytes plus `reserve` do not fit; returns free bytes."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = os.statvfs(probe).f_bavail * os.statvfs(probe).f_frsize
    if need + reserve > free:
        raise DiskSpaceError(f"{folder}: not enough disk space: {human(need)} to download + {human(reserve)} "
                             f"reserve (--min-free) > {human(free)} free")
    return free


@dataclass(frozen=True)
class HubFile:
    path: str              # repo path, e.g. sample/10BT/000_00000.parquet
    size: int
    sha256: str | None     # LFS oid; None for a small file kept in git
    blob_oid: str          # git blob sha1, what verifies a non-LFS file


def _wait_s(status: int, headers, attempt: int, backoff: float) -> float:
    if status == 429:
        rl = parse_ratelimit_headers(headers)
        if rl is not None and rl.remaining == 0:
            return rl.reset_in_seconds + 0.05
        ra = (headers.get("Retry-After") or "").strip()
        if ra.isdigit():
            return int(ra) + 0.05
        try:
            return max(0.0, email.utils.parsedate_to_datetime(ra).timestamp() - time.time()) + 0.05
        except (TypeError, ValueError):
            pass  # absent or unreadable: our own backoff
    # full jitter keeps concurrent workers from retrying in lock-step
    return min(backoff * 2 ** attempt, 60.0) * (0.5 + random.random() / 2)


def _short(e: Exception) -> str:
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        r = e.response
        hint = "; set HF_TOKEN if the repo is gated or private" if r.status_code in (401, 403) else ""
        return f"HTTP {r.status_code} {r.reason_phrase} ({r.headers.get('X-Error-Message') or r.request.url}{hint})"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")


@dataclass
class Hub:
    dataset: str
    endpoint: str
    token: str | None = None       # None: huggingface_hub reads HF_TOKEN or the stored login
    timeout_s: float = 30.0
    retries: int = 8
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        self.endpoint = self.endpoint.rstrip("/")
        self.api = HfApi(endpoint=self.endpoint, token=self.token, library_name="langpwt")

    # -- metadata ---------------------------------------------------------------------------
    def _retrying(self, what: str, fn: Callable):
        attempt = 0
        while True:
            try:
                return fn()
            except OfflineModeIsEnabled:
                raise HubError(f"{what}: offline mode (HF_HUB_OFFLINE=1) and nothing verified locally")
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else 0
                wait = _wait_s(status, e.response.headers, attempt, self.backoff_s) if status else 0.0
                if status not in RETRY_STATUS or attempt >= self.retries or wait > MAX_WAIT_S:
                    raise HubError(f"{what}: {_short(e)}") from e
                time.sleep(wait)
            except TRANSIENT as e:
                if attempt >= self.retries:
                    raise HubError(f"{what}: {_short(e)} (Hub at {self.endpoint})") from e
                time.sleep(_wait_s(0, {}, attempt, self.backoff_s))
            attempt += 1

    def resolve(self, revision: str) -> str:
        """The commit sha a branch, tag or sha points at now: every file is then pinned to it."""
        info = self._retrying(f"--dataset {self.dataset} --revision {revision}",
                              lambda: self.api.dataset_info(self.dataset, revision=revision, timeout=self.timeout_s))
        if not info.sha:
            raise HubError(f"--revision {revision}: the Hub returned no commit sha")
        return info.sha

    def list_files(self, sha: str, pattern: str) -> list[HubFile]:
        """Files matching `pattern` (one folder level, as the subset patterns are), sorted by path."""
        folder = posixpath.dirname(pattern)
        entries = self._retrying(f"{self.dataset}/{folder}@{sha[:12]}", lambda: list(
            self.api.list_repo_tree(self.dataset, folder or None, revision=sha, repo_type="dataset")))
        out = [HubFile(e.path, e.size, e.lfs.sha256 if e.lfs else None, e.blob_id)
               for e in entries if hasattr(e, "blob_id") and fnmatch.fnmatchcase(e.path, pattern)]
        return sorted(out, key=lambda f: f.path)

    def url(self, sha: str, path: str) -> str:
        return hf_hub_url(self.dataset, path, repo_type="dataset", revision=sha, endpoint=self.endpoint)

    def check_head(self, sha: str, f: HubFile) -> None:
        """HEAD on resolve/: the pinned commit serves this file at the listed size (and auth works)."""
        meta = self._retrying(f.path, lambda: get_hf_file_metadata(
            self.url(sha, f.path), token=self.token, timeout=self.timeout_s, endpoint=self.endpoint))
        if meta.commit_hash not in (None, sha) or (meta.size is not None and meta.size != f.size):
            raise HubError(f"{f.path}: the Hub's HEAD (commit {meta.commit_hash}, {meta.size} bytes) disagrees "
                           f"with its listing (commit {sha}, {f.size} bytes)")

    # -- bytes ------------------------------------------------------------------------------
    def fetch(self, sha: str, f: HubFile, dest: Path, on_bytes: Callable[[int], None] | None = None) -> str:
        """Download `f` to `dest` via `.part` with Range resume; verify size and hash; rename. Returns sha256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = part_path(dest)
        with open(part, "a+b") as fh:  # a+b: create if missing, never truncate what a killed run left
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise HubError(f"{f.path}: another process is downloading it ({part})") from None
            try:
                digest = self._fill(sha, f, part, on_bytes, resumed=os.fstat(fh.fileno()).st_size > 0)
            except HubError:
                if part.exists() and part.stat().st_size == 0:
                    part.unlink()  # nothing to resume: leave no litter
                raise
            os.replace(part, dest)  # the appender fsynced the bytes before this
        fsync_dir(dest.parent)
        return digest

    def _fill(self, sha, f, part: Path, on_bytes, resumed: bool) -> str:
        offset = part.stat().st_size
        sink = Sink(part, f.size, f.sha256 is None, offset if offset <= f.size else 0, on_bytes, _Hasher)
        try:
            self._get_all(sha, f, sink)
            got256, got1 = sink.finish()
        except TooLong:
            self._reject(part)
            raise VerifyError(f"{f.path}: the Hub sent more than the listed {f.size} bytes; download deleted") \
                from None
        finally:
            sink.close()
        want, got = (f.sha256, got256) if f.sha256 else (f.blob_oid, got1)
        if got == want:
            return got256
        if resumed:  # the prefix left by an earlier run may be what is wrong: one clean retry from 0
            os.truncate(part, 0)
            return self._fill(sha, f, part, on_bytes, resumed=False)
        self._reject(part)
        kind = "sha256" if f.sha256 else "git sha1"
        raise VerifyError(f"{f.path}: {kind} {got[:16]}… of the {f.size} bytes received does not match the "
                          f"Hub's {want[:16]}…; download deleted")

    @staticmethod
    def _reject(part: Path) -> None:
        os.truncate(part, 0)
        part.unlink()

    def _body(self, r, sink: Sink) -> Exception | None:
        """Stream the response body into `sink` until it ends; returns the transient error that cut it short,
        or None. What arrived is in the part file either way: the retry's Range starts after it."""
        try:
            for piece in r.iter_raw():
                sink.put(piece)
            return None
        except TRANSIENT as e:
            return e
        finally:
            if sink.offset < sink.size:
                sink.keep()

    def _get_once(self, url: str, f: HubFile, sink: Sink, attempt: int) -> tuple[str, float]:
        """One GET from `sink.offset` on; (what went wrong, seconds to wait) when the file is still short."""
        offset = sink.offset
        headers = build_hf_headers(token=self.token, library_name="langpwt")
        headers["Accept-Encoding"] = "identity"  # the bytes must be the file's, to hash them
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = httpx2.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
        with get_session().stream("GET", url, headers=headers, timeout=timeout) as r:
            if r.status_code in RETRY_STATUS:
                return f"HTTP {r.status_code}", _wait_s(r.status_code, r.headers, attempt, self.backoff_s)
            if r.status_code == 416:  # our part is longer or other than the file: start over
                sink.restart()
                return "HTTP 416", 0.0
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            if offset and r.status_code == 200:  # Range ignored: the body starts at byte 0
                sink.restart()
            elif offset and not (r.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"):
                raise HubError(f"{f.path}: asked for bytes {offset}- and got "
                               f"Content-Range {r.headers.get('Content-Range')!r}")
            cut = self._body(r, sink)
            return _short(cut) if cut else "body ended early", _wait_s(0, {}, attempt, self.backoff_s)

    def _get_all(self, sha, f, sink: Sink) -> int:
        """GET with Range from what is on disk until the listed size is there; retries what is transient."""
        url, attempt = self.url(sha, f.path), 0
        while sink.offset < f.size:
            before = sink.offset
            try:
                last, wait = self._get_once(url, f, sink, attempt)
            except HfHubHTTPError as e:
                raise HubError(f"{f.path}: {_short(e)}") from e
            except TRANSIENT as e:
                last, wait = _short(e), _wait_s(0, {}, attempt, self.backoff_s)
            if sink.offset >= f.size:
                break
            if sink.offset > before:
                attempt = 0  # progress resets the retry budget
            if attempt >= self.retries or wait > MAX_WAIT_S:
                raise HubError(f"{f.path}: {last} from {self.endpoint}; gave up after {attempt + 1} attempts "
                               f"({sink.offset} of {f.size} bytes kept for the next run)")
            time.sleep(wait)
            attempt += 1
        return sink.offset
