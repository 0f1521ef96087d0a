"""Local source files' sha256 remembered by what `stat` says (size, mtime, inode, device), as git and DVC do: reruns skip the read.
Trade-off: an in-place edit keeping size and mtime to the nanosecond goes unseen; racy entries are never trusted, --force re-reads."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from storage.atomic import atomic_write_text

# a file modified this close to (or after) its hashing may change again within the same mtime tick (file
# timestamps come from a coarse clock: a few ms on Linux, 2 s on FAT), so its entry is written but not trusted
RACY_NS = 2_000_000_000
VERSION = 1


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


class HashCache:
    """{absolute path: (stat key, sha256, when hashed)} in one JSON file; a missing or unreadable file is empty.
    `path=None` remembers nothing: every lookup misses and `save` writes nothing. `trust=False` (a forced
    rerun) misses every lookup but still records what it hashes, so the entries are fresh afterwards."""

    def __init__(self, path: Path | None, trust: bool = True):
        self.path, self.trust = path, trust
        self.entries: dict[str, dict] = {}
        self.changed = False  # an unchanged cache is not rewritten: a no-op rerun writes nothing
        if path is not None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == VERSION and isinstance(data.get("files"), dict):
                    self.entries = data["files"]
            except (OSError, ValueError, AttributeError):
                pass  # a lost cache only costs the hashing it would have saved

    def lookup(self, p: Path) -> str | None:
        """The remembered sha256 of `p` if the file is unchanged by every `stat` field that says so."""
        if self.path is None or not self.trust:
            return None
        e = self.entries.get(str(p))
        try:
            st = p.stat()
        except OSError:
            return None
        if not e or e.get("stat") != _stat_key(st) or e.get("hashed_at_ns", 0) - st.st_mtime_ns < RACY_NS:
            return None
        return e["sha256"]

    def hash(self, p: Path, digest) -> str:
        """`digest(p)`, remembered unless the file changed while it was read."""
        before, started = p.stat(), time.time_ns()
        sha = digest(p)
        after = p.stat()
        if self.path is not None and _stat_key(before) == _stat_key(after):
            self.entries[str(p)] = {"stat": _stat_key(after), "sha256": sha, "hashed_at_ns": started}
            self.changed = True
        return sha

    def save(self) -> None:
        live = {k: v for k, v in self.entries.items() if os.path.exists(k)}  # forget deleted files
        if self.path is None or not (self.changed or len(live) < len(self.entries)):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"version": VERSION, "files": live}, indent=1, sort_keys=True))
