"""An exclusive, process-wide lock on a home, so two pipeline runs never write the same shards.
flock is released by the kernel when a process dies, so a SIGKILLed run never leaves it stuck."""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator


class HomeBusy(RuntimeError):
    pass


@contextlib.contextmanager
def exclusive(path: Path, wait: float = 0.0, what: str = "a pipeline run") -> Iterator[None]:
    """Hold `path` exclusively; wait up to `wait` seconds, then raise HomeBusy naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    raise HomeBusy(f"{path}: {what} is already running on this home (pid {holder}); "
                                   "wait for it or pass --wait SECONDS") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
