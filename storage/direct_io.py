"""Big sequential files written and read back around the page cache (O_DIRECT): token shards and downloads.
Filling page cache nobody rereads soon costs CPU; the price: a new file is not cached, a killed writer loses its buffers."""
from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import queue
import sys
import threading
from typing import Callable

ALIGN = 4096          # O_DIRECT wants offsets, lengths and addresses aligned to the device's block size
CHUNK = 4 << 20       # bytes gathered per write, in page-aligned buffers that are reused
RING = 3              # buffers: one filling, up to two on their way to the disk
WRITEBACK = 32 << 20  # buffered path: start writing to disk every this many bytes, so the final fsync
                      # waits for the last few MiB, not for GBs of dirty page cache
DIRECT_IO = hasattr(os, "O_DIRECT")  # tests switch it off to cover the buffered path

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


_SPARE: queue.SimpleQueue = queue.SimpleQueue()  # buffers of CHUNK bytes, kept for the next file
SPARE_MAX = 8


def _take(size: int) -> mmap.mmap:
    """A page-aligned buffer; a spare one when it fits: fresh pages cost a fault and zeroing on first touch
    (on a VM, the host backs them again too), so buffers are kept and reused across files."""
    try:
        buf = _SPARE.get_nowait()
        if len(buf) == size:
            return buf
        buf.close()  # kept when CHUNK was another size
    except queue.Empty:
        pass
    # anonymous mmap: page-aligned, as O_DIRECT needs; private, so a forked worker copies the kept
    # buffers on write instead of sharing them with this process
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def _give(buf: mmap.mmap) -> None:
    if len(buf) == CHUNK and _SPARE.qsize() < SPARE_MAX:
        _SPARE.put(buf)
    else:
        buf.close()


def writeback(fd: int, start: int, end: int) -> None:
    """Ask the kernel to write [start, end) to disk now, without waiting (sync_file_range, Linux)."""
    if _LIBC is not None:
        _LIBC.sync_file_range(fd, ctypes.c_int64(start), ctypes.c_int64(end - start), 2)


def pwrite_direct(fd: int | None, view: memoryview, offset: int) -> bool:
    """Write `view` at `offset` through the O_DIRECT descriptor `fd`; False (nothing written) when there is
    none, the piece is not aligned, or the device refuses our alignment (EINVAL on the first byte): the
    caller then writes it buffered, and should drop `fd`."""
    if fd is None or offset % ALIGN or len(view) % ALIGN:
        return False
    done = 0
    try:
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    except OSError as e:
        if e.errno != errno.EINVAL or done:
            raise
        return False
    return True


def _open_direct(path, flags: int) -> int | None:
    if not DIRECT_IO:
        return None
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError:  # tmpfs before Linux 6.6, some FUSE and network filesystems
        return None


class DirectAppender:
    """Append-only writer: bytes gather in page-aligned buffers that a thread of its own writes out, a
    whole buffer at a time, through O_DIRECT (so the caller never waits on the disk unless all RING
    buffers are in flight); the tail goes as one padded block and the file is cut back to its true size.
    Where O_DIRECT is refused (at open, or EINVAL on the first write) the same bytes go buffered, with
    writeback started as they go. `offset`: keep the file's first `offset` bytes and append after them.
    `on_write(view, at)`: called in file order with each range as it reaches the file; a range kept early
    by `keep()` comes again when its buffer is later written whole, so the callee skips what it saw.
    `finish(head)` lays `head` over the file's first bytes (a header only known at the end), then fsyncs."""

    def __init__(self, path, chunk: int | None = None, offset: int = 0,
                 on_write: Callable[[memoryview, int], None] | None = None):
        chunk = chunk or CHUNK
        self.path, self.on_write = path, on_write
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if offset else os.O_TRUNC), 0o644)
        self.dfd = _open_direct(path, os.O_WRONLY)
        self.bufs = [_take(chunk) for _ in range(RING)]
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for b in self.bufs[1:]:
            self.free.put(b)
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.cur = self.bufs[0]
        self.offset = offset - offset % ALIGN  # where `cur` goes in the file: aligned, as O_DIRECT needs
        self.fill = offset - self.offset       # bytes waiting in `cur`: from a resumed file's last block
        if offset:
            os.ftruncate(self.fd, offset)  # what lies past it is not ours to keep
        if self.fill:
            self._reload(offset)
        self.kicked = self.offset  # buffered path: where writeback was last started
        self.first = b""     # the file's first ALIGN bytes as written, for finish() to patch
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _reload(self, offset: int) -> None:
        """The kept file's last partial block back into `cur`, so every later write stays aligned."""
        rfd = os.open(self.path, os.O_RDONLY)
        try:
            with memoryview(self.cur) as view:
                if os.preadv(rfd, [view[:self.fill]], self.offset) != self.fill:
                    raise OSError(f"{self.path}: shorter than the {offset} bytes to keep")
        finally:
            os.close(rfd)

    @property
    def size(self) -> int:
        """Bytes given so far, the kept ones included."""
        return self.offset + self.fill

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        size = len(self.cur)
        while data:
            n = min(len(data), size - self.fill)
            self.cur[self.fill:self.fill + n] = data[:n]
            self.fill += n
            data = data[n:]
            if self.fill == size:
                self._hand_off()

    def _hand_off(self) -> None:
        if self.error is not None:
            raise self.error
        if self.offset == 0:
            self.first = self.cur[:ALIGN]
        self.todo.put((self.cur, self.offset))
        self.offset += self.fill
        self.fill = 0
        self.cur = self.free.get()

    def written(self) -> int:
        """Wait until the buffers handed off so far are in the file; how many bytes that is (the bytes
        still gathering in the current buffer are not)."""
        landed = threading.Event()
        self.todo.put(landed)
        landed.wait()
        if self.error is not None:
            raise self.error
        return self.offset

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            buf, offset = item
            try:
                if self.error is None:
                    with memoryview(buf) as view:
                        self._pwrite(view, offset)
                        if self.on_write:
                            self.on_write(view, offset)
            except BaseException as e:  # raised in the caller's thread at its next hand-off or finish
                self.error = e
            self.free.put(buf)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        if pwrite_direct(self.dfd, view, offset):
            return
        if self.dfd is not None and offset % ALIGN == 0 and len(view) % ALIGN == 0:
            os.close(self.dfd)  # refused though aligned: the device wants coarser, buffered from here on
            self.dfd = None
        end = offset + len(view)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        if end - self.kicked >= WRITEBACK:
            writeback(self.fd, self.kicked, end)
            self.kicked = end

    def _drain(self) -> None:
        if self.thread.is_alive():
            self.todo.put(None)
            self.thread.join()

    def _write_tail(self, view: memoryview) -> None:
        """`cur`'s bytes into the file at its offset (padded to a block for O_DIRECT, then cut back)."""
        if not self.fill:
            return
        padded = -(-self.fill // ALIGN) * ALIGN if self.dfd is not None else self.fill
        view[self.fill:padded] = bytes(padded - self.fill)
        self._pwrite(view[:padded], self.offset)
        if padded != self.fill:
            os.ftruncate(self.fd, self.size)
        if self.on_write:
            self.on_write(view[:self.fill], self.offset)

    def keep(self) -> int:
        """Put every byte given so far into the file now (not fsynced), and go on appending after them:
        what a cut connection delivered survives for the next attempt. Returns the file's size."""
        self.written()
        with memoryview(self.cur) as view:
            self._write_tail(view)
        return self.size

    def finish(self, head: bytes = b"") -> None:
        """Write the rest, put `head` over the first bytes, fsync and close. Nothing is renamed here."""
        self._drain()
        if self.error is not None:
            raise self.error
        with memoryview(self.cur) as view:
            if self.offset == 0 and head:  # the start is still in the buffer: patch it there
                view[:len(head)] = head
            self._write_tail(view)
            if self.first and head:  # the start went to disk with the first buffer: rewrite its first block
                view[:ALIGN] = self.first
                view[:len(head)] = head
                self._pwrite(view[:ALIGN], 0)
        os.fsync(self.fd)
        self.close()

    def close(self) -> None:
        self._drain()
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dfd = None
        for b in self.bufs:
            _give(b)
        self.bufs = []


def read_file(path, fn: Callable[[memoryview, int], None], limit: int | None = None, chunk: int = CHUNK) -> int:
    """Call `fn(view, at)` on the file's bytes (its first `limit` only, if given), read back with O_DIRECT into
    one reused aligned buffer (no page cache, no fresh memory per read); buffered reads into the same buffer
    where O_DIRECT is refused. Returns the bytes read."""
    fd = _open_direct(path, os.O_RDONLY)
    direct = fd is not None
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    buf = _take(chunk)
    offset = 0
    try:
        with memoryview(buf) as view:
            while limit is None or offset < limit:
                try:
                    n = os.preadv(fd, [buf], offset)
                except OSError as e:
                    if not (direct and e.errno == errno.EINVAL and offset == 0):
                        raise
                    os.close(fd)  # a coarser alignment than ours: buffered reads instead
                    fd, direct = os.open(path, os.O_RDONLY), False
                    continue
                if n == 0:
                    break
                n = n if limit is None else min(n, limit - offset)
                fn(view[:n], offset)
                offset += n
    finally:
        os.close(fd)
        _give(buf)
    return offset


def sha256_file(path, chunk: int = CHUNK) -> str:
    """sha256 of a file as it lies on disk, read around the page cache."""
    h = hashlib.sha256()
    read_file(path, lambda view, _: h.update(view), chunk=chunk)
    return h.hexdigest()
