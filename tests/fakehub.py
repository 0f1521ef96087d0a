"""A fake Hugging Face Hub on 127.0.0.1 that speaks the endpoints huggingface_hub 2.4 calls for datasets.
Real sockets and real HTTP/1.1 (http.server), so client code runs unchanged; faults are injected per file."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_SHA = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Fault:
    """Misbehaviour of one repo file. Status faults hit `resolve`; body faults hit the byte-serving GET."""
    statuses: list[int] = field(default_factory=list)   # consumed one per GET, then served normally
    status_headers: dict[str, str] = field(default_factory=dict)
    always_status: int | None = None                      # every GET answers this
    drop_after: int | None = None                         # close the socket after N body bytes ...
    drops: int = 1                                        # ... this many times
    corrupt: bool = False                                 # serve bytes that differ from the listed sha256
    rate: float | None = None                             # bytes/s throttle


@dataclass
class Entry:
    path: str                 # repo path
    disk: Path
    size: int
    sha256: str
    blob_oid: str             # git blob sha1, what the Hub returns as `oid`
    lfs: bool                 # parquet lives in LFS/xet; small text files live in git


@dataclass
class Hit:
    method: str
    url: str
    file: str | None
    range: str | None
    status: int
    bytes_sent: int
    t0: float
    t1: float
    auth: bool
    served: bool = False      # this request carried the file's bytes


def _hashes(p: Path) -> tuple[str, str]:
    size = p.stat().st_size
    s256, s1 = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    with open(p, "rb") as f:
        while b := f.read(1 << 22):
            s256.update(b)
            s1.update(b)
    return s256.hexdigest(), s1.hexdigest()


class FakeHub:
    """`with FakeHub({"sample/10BT/000_00000.parquet": path}) as hub:` then HF_ENDPOINT=hub.endpoint."""

    def __init__(self, files: dict[str, str | os.PathLike], repo: str = "HuggingFaceFW/fineweb-edu",
                 sha: str = DEFAULT_SHA, branches: tuple[str, ...] = ("main",), page_size: int = 1000,
                 redirect: bool = True, lfs: bool = True):
        self.repo, self.sha, self.branches = repo, sha, set(branches)
        self.page_size, self.redirect, self.lfs = page_size, redirect, lfs
        self.entries: dict[str, Entry] = {}
        for path, disk in sorted(files.items()):
            disk = Path(disk)
            s256, s1 = _hashes(disk)
            self.entries[path] = Entry(path, disk, disk.stat().st_size, s256, s1,
                                       lfs and not path.endswith((".md", ".json", ".gitattributes")))
        self.by_sha = {e.sha256: e for e in self.entries.values()}
        self.faults: dict[str, Fault] = {}
        self.log: list[Hit] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._cdn: ThreadingHTTPServer | None = None  # another origin, as the real Hub's LFS/xet storage

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server, self._cdn = (ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2))
        for srv in (self._server, self._cdn):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True, name="fakehub").start()
        return self

    def stop(self) -> None:
        for srv in (self._server, self._cdn):
            if srv:
                srv.shutdown()
                srv.server_close()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server, "FakeHub not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn(self) -> str:
        assert self._cdn, "FakeHub not started"
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    # -- what tests read back ---------------------------------------------------------------
    def hits(self, file: str | None = None, method: str | None = None, body: bool = False) -> list[Hit]:
        """Requests seen; `body=True` keeps only those that served the file's bytes."""
        with self._lock:
            out = list(self.log)
        return [h for h in out if (file is None or h.file == file) and (method is None or h.method == method)
                and (h.served or not body)]

    def bytes_served(self, file: str) -> int:
        return sum(h.bytes_sent for h in self.hits(file, "GET", body=True))

    def record(self, hit: Hit) -> None:
        with self._lock:
            self.log.append(hit)

    def tree_entry(self, e: Entry) -> dict:
        d = {"type": "file", "oid": e.blob_oid, "size": e.size, "path": e.path}
        if e.lfs:
            d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": 134}
        return d


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              file: str | None = None) -> None:
        t0 = time.monotonic()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.fake.record(Hit(self.command, self.path, file, self.headers.get("Range"), status, 0, t0,
                             time.monotonic(), "authorization" in {k.lower() for k in self.headers}))

    def _json(self, obj, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, msg: str, file: str | None = None) -> None:
        h = {"Content-Type": "application/json", "X-Error-Message": msg}
        if code:
            h["X-Error-Code"] = code
        self._send(status, json.dumps({"error": msg}).encode(), h, file)

    def _repo_rest(self, prefix: str) -> tuple[bool, str]:
        """Split '/<prefix><ns>/<name>/<rest>' into (repo matched, rest)."""
        path = unquote(urlsplit(self.path).path)
        want = f"{prefix}{self.fake.repo}/"
        return (path.startswith(want), path[len(want):]) if path.startswith(prefix) else (False, "")

    def _rev_ok(self, rev: str) -> bool:
        return rev == self.fake.sha or rev in self.fake.branches

    # -- routes -----------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path.startswith("/api/datasets/"):
            return self._api()
        if path.startswith("/datasets/"):
            return self._resolve()
        if path.startswith("/cdn/"):
            e = self.fake.by_sha.get(path.rsplit("/", 1)[-1])
            return self._body(e) if e else self._error(404, None, "no such object")
        self._error(404, None, f"unknown route {path}")

    def do_POST(self) -> None:
        ok, rest = self._repo_rest("/api/datasets/")
        if not ok or not rest.startswith("paths-info/"):
            return self._error(404, "RepoNotFound" if not ok else None, "not found")
        if not self._rev_ok(rest.split("/", 1)[1]):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
        want = form.get("paths", [])
        self._json([self.fake.tree_entry(self.fake.entries[p]) for p in want if p in self.fake.entries])

    def _api(self) -> None:
        ok, rest = self._repo_rest("/api/datasets/")
        if not ok:
            # the real Hub answers 401 for a repo that does not exist or that you may not see
            return self._error(401, "RepoNotFound", "Repository not found")
        kind, _, rest = rest.partition("/")
        if kind == "revision":
            if not self._rev_ok(rest):
                return self._error(404, "RevisionNotFound", "Invalid rev id: " + rest)
            return self._json({"_id": "fake", "id": self.fake.repo, "sha": self.fake.sha, "private": False,
                               "gated": False, "disabled": False, "lastModified": "2025-01-01T00:00:00.000Z",
                               "siblings": [{"rfilename": p} for p in self.fake.entries]})
        if kind == "tree":
            rev, _, sub = rest.partition("/")
            if not self._rev_ok(rev):
                return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return self._tree(rev, sub.strip("/"))
        self._error(404, None, "unknown api route")

    def _tree(self, rev: str, sub: str) -> None:
        q = parse_qs(urlsplit(self.path).query)
        recursive = q.get("recursive", ["False"])[0].lower() == "true"
        items: dict[str, dict] = {}
        prefix = sub + "/" if sub else ""
        for p, e in self.fake.entries.items():
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):]
            if recursive or "/" not in rel:
                items[p] = self.fake.tree_entry(e)
            if "/" in rel:  # folders along the way
                parts = rel.split("/")[:-1]
                for i in range(1, (len(parts) if recursive else 1) + 1):
                    d = prefix + "/".join(parts[:i])
                    items.setdefault(d, {"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
        if sub and not items:
            return self._error(404, "EntryNotFound", f"{sub} does not exist on {rev}")
        listing = [items[k] for k in sorted(items)]
        start = int(q.get("cursor", ["0"])[0])
        page = listing[start:start + self.fake.page_size]
        headers = {}
        if start + self.fake.page_size < len(listing):
            nxt = (f"{self.fake.endpoint}/api/datasets/{self.fake.repo}/tree/{quote(rev, safe='')}"
                   f"{'/' + quote(sub, safe='') if sub else ''}?recursive={recursive}&cursor={start + self.fake.page_size}")
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(page, headers)

    def _resolve(self) -> None:
        ok, rest = self._repo_rest("/datasets/")
        if not ok or not rest.startswith("resolve/"):
            return self._error(401, "RepoNotFound", "Repository not found")
        rev, _, file = rest[len("resolve/"):].partition("/")
        if not self._rev_ok(rev):
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
        e = self.fake.entries.get(file)
        if e is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist on {rev}")
        fault = self.fake.faults.get(file)
        if fault and self.command == "GET":
            status = fault.always_status or (fault.statuses.pop(0) if fault.statuses else None)
            if status:
                return self._send(status, b"simulated failure", dict(fault.status_headers), file)
        common = {"X-Repo-Commit": self.fake.sha, "Accept-Ranges": "bytes"}
        if self.fake.redirect and e.lfs:
            # as the real Hub: LFS content lives elsewhere; metadata rides on the redirect itself
            return self._send(302, b"", {**common, "Location": f"{self.fake.cdn}/cdn/{e.sha256}", "ETag": f'"{e.blob_oid}"',
                                         "X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)}, file)
        self._body(e, extra=common)

    def _body(self, e: Entry, extra: dict[str, str] | None = None) -> None:
        t0 = time.monotonic()
        fault = self.fake.faults.get(e.path) or Fault()
        start, end = 0, e.size - 1
        rng = self.headers.get("Range")
        status = 200
        if rng:
            try:
                a, _, b = rng.removeprefix("bytes=").partition("-")
                start, end = int(a), (int(b) if b else e.size - 1)
            except ValueError:
                return self._error(400, None, f"bad range {rng}", e.path)
            if start >= e.size or end < start:
                return self._send(416, b"", {"Content-Range": f"bytes */{e.size}"}, e.path)
            end = min(end, e.size - 1)
            status = 206
        n = end - start + 1
        etag = e.sha256 if e.lfs else e.blob_oid
        self.send_response(status)
        for k, v in {**(extra or {}), "Content-Type": "application/octet-stream", "Content-Length": str(n),
                     "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}.items():
            self.send_header(k, v)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{e.size}")
        self.end_headers()
        sent = 0
        if self.command == "GET":
            sent = self._stream(e, fault, start, n)
        self.fake.record(Hit(self.command, self.path, e.path, rng, status, sent, t0, time.monotonic(),
                             "authorization" in {k.lower() for k in self.headers}, self.command == "GET"))

    def _stream(self, e: Entry, fault: Fault, start: int, n: int) -> int:
        drop = fault.drop_after if (fault.drop_after is not None and fault.drops > 0) else None
        plain = drop is None and not fault.corrupt and not fault.rate
        self.wfile.flush()
        with open(e.disk, "rb") as f:
            if plain:  # sendfile: the server must not be the bottleneck in the benchmark
                try:
                    return self.connection.sendfile(f, start, n)
                except OSError:
                    return 0
            f.seek(start)
            sent, chunk, t0 = 0, 64 * 1024, time.monotonic()
            flip = e.size // 2
            while sent < n:
                want = min(chunk, n - sent)
                if drop is not None:
                    want = min(want, drop - sent)
                if want <= 0:
                    break
                buf = bytearray(f.read(want))
                pos = start + sent
                if fault.corrupt and pos <= flip < pos + len(buf):
                    buf[flip - pos] ^= 0xFF
                try:
                    self.wfile.write(buf)
                except OSError:
                    return sent
                sent += len(buf)
                if fault.rate and sent < n:  # no pause after the last byte: the hit's span ends with it
                    ahead = sent / fault.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
            if drop is not None and sent < n:
                fault.drops -= 1
                self.close_connection = True
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return sent


def build_fineweb_tree(root: Path) -> dict[str, Path]:
    """A small FineWeb-Edu-shaped repo from the bundled real text: sample/10BT (4 small files and one of
    ~4 MB, uncompressed, for the interruption tests), one file each of sample/100BT and a crawl, a README."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import SCHEMA, sample_rows, write_parquet

    rows = sample_rows()
    files: dict[str, Path] = {}
    for i in range(4):
        files[f"sample/10BT/{i:03d}_00000.parquet"] = write_parquet(
            root / f"sample/10BT/{i:03d}_00000.parquet", rows[i * 300:(i + 1) * 300])
    big = root / "sample/10BT/004_00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), big, compression="none")
    files["sample/10BT/004_00000.parquet"] = big
    files["sample/100BT/000_00000.parquet"] = write_parquet(root / "sample/100BT/000_00000.parquet", rows[:50])
    files["data/CC-MAIN-2024-10/000_00000.parquet"] = write_parquet(
        root / "data/CC-MAIN-2024-10/000_00000.parquet", rows[50:100])
    (root / "README.md").write_text("# fake fineweb-edu\n")
    files["README.md"] = root / "README.md"
    return files


if __name__ == "__main__":
    # `python -m tests.fakehub DIR`: serve every file under DIR (its relative path is the repo path)
    import sys

    root = Path(sys.argv[1]).resolve()
    served = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}
    with FakeHub(served) as hub:
        print(hub.endpoint, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
