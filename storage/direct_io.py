"""Big sequential files written and read back around the page cache (O_DIRECT), for the token shards.
On this VM filling page cache costs ~3 CPU-s per GB (the host backs every fresh page: RESULTS.md), 8x the
O_DIRECT path; the price is that a shard just written is not cached when training first reads it."""
from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading

ALIGN = 4096          # O_DIRECT wants offsets, lengths and addresses aligned to the device's block size
CHUNK = 4 << 20       # bytes gathered per write, in page-aligned buffers that are reused
RING = 3              # buffers: one filling, up to two on their way to the disk
DIRECT_IO = hasattr(os, "O_DIRECT")  # tests switch it off to cover the buffered path


_SPARE: queue.SimpleQueue = queue.SimpleQueue()  # buffers of CHUNK bytes, kept for the next file
SPARE_MAX = 8


def _take(size: int) -> mmap.mmap:
    """A page-aligned buffer; a spare one when it fits: fresh pages cost a fault and zeroing on first touch
    (on this VM, more: the host backs them again), so buffers are kept and reused across files."""
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
    Where O_DIRECT is refused (at open, or EINVAL on the first write) the same bytes go buffered.
    `finish(head)` lays `head` over the file's first bytes (a header only known at the end), then fsyncs."""

    def __init__(self, path, chunk: int | None = None):
        chunk = chunk or CHUNK
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = _open_direct(path, os.O_WRONLY)
        self.bufs = [_take(chunk) for _ in range(RING)]
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for b in self.bufs[1:]:
            self.free.put(b)
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.cur = self.bufs[0]
        self.fill = 0        # bytes waiting in `cur`
        self.offset = 0      # bytes handed to the writer thread
        self.first = b""     # the file's first ALIGN bytes as written, for finish() to patch
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

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
            except BaseException as e:  # raised in the caller's thread at its next hand-off or finish
                self.error = e
            self.free.put(buf)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        if pwrite_direct(self.dfd, view, offset):
            return
        if self.dfd is not None and offset % ALIGN == 0 and len(view) % ALIGN == 0:
            os.close(self.dfd)  # refused though aligned: the device wants coarser, buffered from here on
            self.dfd = None
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def _drain(self) -> None:
        if self.thread.is_alive():
            self.todo.put(None)
            self.thread.join()

    def finish(self, head: bytes) -> None:
        """Write the rest, put `head` over the first bytes, fsync and close. Nothing is renamed here."""
        self._drain()
        if self.error is not None:
            raise self.error
        size = self.offset + self.fill
        with memoryview(self.cur) as view:
            if self.offset == 0:  # the start is still in the buffer: patch it there
                view[:len(head)] = head
            if self.fill:
                padded = -(-self.fill // ALIGN) * ALIGN if self.dfd is not None else self.fill
                view[self.fill:padded] = bytes(padded - self.fill)
                self._pwrite(view[:padded], self.offset)
                if padded != self.fill:
                    os.ftruncate(self.fd, size)
            if self.first:  # the start went to disk with the first buffer: rewrite its first block
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


def sha256_file(path, chunk: int = CHUNK) -> str:
    """sha256 of a file read back with O_DIRECT into one reused aligned buffer (no page cache, no fresh
    memory per read); buffered reads into the same buffer where O_DIRECT is refused."""
    h = hashlib.sha256()
    fd = _open_direct(path, os.O_RDONLY)
    direct = fd is not None
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
    buf = _take(chunk)
    try:
        with memoryview(buf) as view:
            offset = 0
            while True:
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
                h.update(view[:n])
                offset += n
    finally:
        os.close(fd)
        _give(buf)
    return h.hexdigest()
