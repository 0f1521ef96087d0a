"""Atomic, durable writes: temp file in the same folder, fsync, rename, fsync the folder.
A crash leaves either the old file or the new one under the final name, never a partial one."""
from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path
from typing import IO, Iterator

TMP_SUFFIX = ".tmp"


def fsync_file(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file


def publish(tmp: Path, final: Path, sync: Path | None = None, durable: bool = True) -> None:
    """Rename `tmp`, a closed file or a folder, to `final`. `durable`: fsync `sync` (default `tmp`) before
    the rename and the folder after it, so the new name never points at data still in flight to the disk."""
    if durable:
        fsync_file(sync or tmp)
    os.replace(tmp, final)
    if durable:
        fsync_dir(final.parent)


def tmp_path_for(final: Path) -> Path:
    # pid and thread in the name: two writers never share a temp file, and a stale one is recognisable
    return final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `final`; on clean exit fsync and rename it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    f = open(tmp, mode)
    try:
        yield f
        f.close()
        publish(tmp, final)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_open(final, "wb") as f:
        f.write(data)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully written and fsynced temp directory under its final name."""
    for p in tmp_dir.rglob("*"):
        if p.is_file():
            fsync_file(p)
    fsync_dir(tmp_dir)
    if final.exists():
        old = final.with_name(f".{final.name}.old{TMP_SUFFIX}")
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)
    fsync_dir(final.parent)


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files left by killed processes; returns how many were removed."""
    n = 0
    if not folder.exists():
        return 0
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            n += 1
    return n
