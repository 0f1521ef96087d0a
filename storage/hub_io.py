"""The bytes under storage.hub: a body read from its socket into reused buffers, written O_DIRECT where it can, hashed on a thread.
Lean per byte (client CPU ~ sha256 alone), at the price of reaching into httpcore's internals, with iter_raw as the fallback."""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import queue
import socket
import sys
import threading
from typing import Callable

from storage.direct_io import ALIGN, pwrite_direct

CHUNK = 4 << 20            # bytes per ring buffer, filled by recvs, emptied by one write: 4 MiB costs
                           # ~0.15 CPU-s per GB less than 1 MiB; a killed run refetches at most this much
RING = 4                   # buffers in flight between the socket and the hasher
WRITEBACK = 32 << 20       # buffered path: start writing every 32 MiB to disk as it arrives
DIRECT_IO = hasattr(os, "O_DIRECT")  # tests switch it off to cover the buffered path

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def writeback(fd: int, start: int, end: int) -> None:
    """Ask the kernel to write [start, end) to disk now, without waiting (sync_file_range, Linux): the
    fsync before the rename then waits for the last MiBs, not for GBs of dirty page cache."""
    if _LIBC is not None:
        _LIBC.sync_file_range(fd, ctypes.c_int64(start), ctypes.c_int64(end - start), 2)


class Hasher:
    """sha256 (and the git blob sha1 when needed) on a thread of its own: hashlib drops the GIL, so hashing
    overlaps the socket reads and file writes. Bytes travel in a ring of RING page-aligned buffers: the socket
    reads into one (`take`), the file is written from it, `feed` hands it over, the hasher gives it back. No
    piece is copied or allocated on the way; the reader waits only when the hasher is RING pieces behind."""

    def __init__(self, size: int, git: bool):
        self.size, self.git = size, git
        self.sha256 = hashlib.sha256()
        self.sha1 = hashlib.sha1(f"blob {size}\0".encode()) if git else None
        self.full: queue.SimpleQueue = queue.SimpleQueue()   # C-level queues: a handoff costs ~1 µs
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(RING):
            self.free.put(mmap.mmap(-1, CHUNK))  # anonymous mmap: page-aligned, as O_DIRECT needs
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while (item := self.full.get()) is not None:
            buf, n, ours = item
            with memoryview(buf) as view:
                self.sha256.update(view[:n])
                if self.sha1:
                    self.sha1.update(view[:n])
            if ours:
                self.free.put(buf)

    def take(self):
        """A free ring buffer to read into; blocks while the hasher is RING pieces behind."""
        return self.free.get()

    def feed(self, buf, n: int, ours: bool = True) -> None:
        """Hash buf[:n] after what came before; `ours`: buf came from `take` and goes back to the ring."""
        self.full.put((buf, n, ours))

    def give_back(self, buf) -> None:
        self.free.put(buf)

    def done(self) -> tuple[str, str | None]:
        self.full.put(None)
        self.t.join()
        return self.sha256.hexdigest(), self.sha1.hexdigest() if self.sha1 else None

    def reset(self) -> None:
        self.done()
        self.__init__(self.size, self.git)


def socket_body(r) -> tuple[socket.socket, bytes, int] | None:
    """(socket, body bytes httpcore already buffered, body bytes still to come) of a plain HTTP/1.1 response
    framed by Content-Length; None for any other stack (HTTP/2, a TLS-in-TLS proxy, chunked, another httpx
    version), which then streams through `iter_raw`. Reading the socket ourselves skips h11's three copies of
    every piece (~0.25 CPU-s per GB). The connection is not reused afterwards: h11 never saw the body, so
    closing the response closes the connection, and each file's GET opens one new connection."""
    try:
        conn = r.stream._stream._httpcore_stream._stream._connection
        sock, h11c = conn._network_stream._sock, conn._h11_state
        reader, buffered = h11c._reader, bytes(h11c._receive_buffer)
    except AttributeError:
        return None
    if (type(reader).__name__ != "ContentLengthReader" or not isinstance(sock, socket.socket)
            or r.headers.get("Content-Encoding", "identity") != "identity" or len(buffered) > reader._remaining):
        return None
    return sock, buffered, reader._remaining - len(buffered)


class TooLong(Exception):
    """The server sent more bytes than the listing says the file has."""


class Sink:
    """Appends pieces to the part file and hands them to the hasher. Whole aligned ring buffers go through
    an O_DIRECT descriptor: on this VM, filling page cache costs 0.3-1.5 CPU-s per GB (the host backs each
    fresh page on first touch) and is the largest client cost after sha256; the rest (a resumed head up to
    the next 4 KiB, the tail, a piece cut short by a drop, every piece where O_DIRECT is refused) appends
    through the ordinary descriptor with writeback kicked every 32 MiB. The fsync before the rename covers both."""

    def __init__(self, fh, size: int, hasher, offset: int, on_bytes: Callable[[int], None] | None):
        self.fd, self.size, self.hasher, self.offset, self.on_bytes = fh.fileno(), size, hasher, offset, on_bytes
        self.kicked = offset
        self.direct: int | None = None
        if DIRECT_IO:
            try:
                self.direct = os.open(fh.name, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # tmpfs before Linux 6.6, some FUSE and network filesystems
                self.direct = None

    def close(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None

    def want(self) -> int:
        """How many bytes the next piece should hold: up to the next aligned offset while misaligned."""
        if self.direct is not None and self.offset % ALIGN:
            return ALIGN - self.offset % ALIGN
        return CHUNK

    def restart(self, offset: int) -> None:
        self.offset = self.kicked = offset

    def put(self, buf, n: int, ours: bool = True) -> None:
        """Write buf[:n] at the end of the part file, then hash it; each piece is on disk before the next read."""
        if self.offset + n > self.size:
            if ours:
                self.hasher.give_back(buf)
            raise TooLong
        with memoryview(buf) as view:
            if not (ours and self._direct(view[:n])):
                part = view[:n]
                while part:
                    part = part[os.write(self.fd, part):]  # the part file is O_APPEND: offset == its size
                if self.offset + n - self.kicked >= WRITEBACK:
                    writeback(self.fd, self.kicked, self.offset + n)
                    self.kicked = self.offset + n
        self.hasher.feed(buf, n, ours)
        self.offset += n
        if self.on_bytes:
            self.on_bytes(n)

    def _direct(self, view: memoryview) -> bool:
        if pwrite_direct(self.direct, view, self.offset):
            return True
        if self.direct is not None and self.offset % ALIGN == 0 and len(view) % ALIGN == 0:
            self.close()  # refused though aligned: the device wants coarser, buffered from here on
        return False
