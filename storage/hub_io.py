"""The bytes under storage.hub: a response body gathered into the O_DIRECT appender, hashed as it is written.
Pieces come from httpx's public `iter_raw` (no private layer touched), at the price of one copy into aligned buffers."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from storage.direct_io import CHUNK, DirectAppender, read_file


class TooLong(Exception):
    """The server sent more bytes than the listing says the file has."""


class Hasher:
    """sha256 (and the git blob sha1 when the file is kept in git) of a file's bytes, fed in file order.
    A range may be offered again (the appender rewrites a buffer it kept early): what was hashed is skipped.
    It runs on the appender's writer thread, where hashlib drops the GIL beside the caller's socket reads."""

    def __init__(self, size: int, git: bool):
        self.size, self.git, self.at = size, git, 0
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {size}\0".encode()) if git else None

    def update(self, view: memoryview, at: int) -> None:
        if at > self.at:
            raise RuntimeError(f"hash gap: bytes {self.at}-{at} were never offered")
        piece = view[self.at - at:]
        if len(piece):
            self.sha256.update(piece)
            if self.sha1:
                self.sha1.update(piece)
            self.at += len(piece)

    def done(self) -> tuple[str, str | None]:
        return self.sha256.hexdigest(), self.sha1.hexdigest() if self.sha1 else None


class Sink:
    """The part file from `offset` on: pieces go to a DirectAppender that hashes each range as it lands;
    `keep()` after a cut puts what arrived into the file, so the next Range starts after it. The bytes a
    killed process had not written yet (at most a few buffers) are fetched again by the next run."""

    def __init__(self, part: Path, size: int, git: bool, offset: int, on_bytes: Callable[[int], None] | None,
                 hasher: Callable[[int, bool], Hasher] = Hasher):
        self.part, self.size, self.git, self.on_bytes, self.make_hasher = part, size, git, on_bytes, hasher
        self._open(offset)

    def _open(self, offset: int) -> None:
        self.hasher = self.make_hasher(self.size, self.git)
        # hash state cannot outlive a process: a resumed prefix is read back and hashed first
        read_file(self.part, self.hasher.update, limit=offset)
        self.w = DirectAppender(self.part, CHUNK, offset=offset, on_write=self.hasher.update)

    @property
    def offset(self) -> int:
        return self.w.size

    def put(self, piece: bytes) -> None:
        if self.w.size + len(piece) > self.size:
            raise TooLong
        self.w.write(piece)
        if self.on_bytes:
            self.on_bytes(len(piece))

    def keep(self) -> None:
        self.w.keep()

    def restart(self) -> None:
        """Drop every byte and hash: the next body starts at byte 0."""
        self.w.close()
        self._open(0)

    def finish(self) -> tuple[str, str | None]:
        """Everything written and fsynced; (sha256, git sha1 or None) of the whole file."""
        self.w.finish()
        return self.hasher.done()

    def close(self) -> None:
        if self.w.fd is not None:
            self.w.close()
