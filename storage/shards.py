"""Token shards in llm.c's `.bin` format plus a uint64 document-offset sidecar (`.idx`).
Streamed to a temp file and renamed when complete, so a 2 GB source never sits in memory."""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.atomic import fsync_dir, tmp_path_for
from storage.direct_io import DirectAppender, sha256_file

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC_U16, VERSION_U16 = 20240520, 1  # llm.c / modded-nanogpt
MAGIC_U32, VERSION_U32 = 20240801, 7  # llm.c, vocabularies over 65,536


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def idx_path(bin_path: Path) -> Path:
    return Path(bin_path).with_suffix(".idx")


def _header(n_tokens: int, dtype: np.dtype) -> bytes:
    h = np.zeros(HEADER_INTS, dtype=np.int32)
    if dtype == np.uint16:
        h[0], h[1] = MAGIC_U16, VERSION_U16
    else:
        h[0], h[1] = MAGIC_U32, VERSION_U32
    h[2] = n_tokens
    return h.tobytes()


class ShardWriter:
    """Append token chunks; `close()` patches the header, fsyncs and renames both files.

    Every document is written as `<|endoftext|>` then its tokens; the `.idx` sidecar holds
    the offset of each document's `<|endoftext|>` and finally the total token count."""

    def __init__(self, path: Path, vocab_size: int):
        self.path = Path(path)
        self.dtype = token_dtype(vocab_size)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = tmp_path_for(self.path)
        self._tmp_idx = tmp_path_for(idx_path(self.path))
        self._f = DirectAppender(self._tmp)  # tokens around the page cache; the small .idx through it
        self._fi = open(self._tmp_idx, "wb")
        self._f.write(_header(0, self.dtype))
        self.n_tokens = 0
        self.n_docs = 0

    def append(self, tokens: np.ndarray, doc_starts: np.ndarray) -> None:
        """`tokens` already holds the `<|endoftext|>` separators; `doc_starts` are local offsets."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        starts = np.asarray(doc_starts, dtype=np.uint64) + np.uint64(self.n_tokens)
        # the digest is taken in close(), over the file as it lies on disk, header first (its token
        # count is only known then), so nothing is hashed here
        self._f.write(memoryview(tokens).cast("B"))
        self._fi.write(memoryview(np.ascontiguousarray(starts)).cast("B"))
        self.n_tokens += int(tokens.size)
        self.n_docs += int(starts.size)

    def close(self) -> str:
        """Finish both files under their final names; returns the `.bin` file's sha256."""
        if self.n_tokens >= 2**31:
            raise ValueError(f"{self.path.name}: {self.n_tokens} tokens overflow llm.c's int32 header")
        self._fi.write(np.array([self.n_tokens], dtype=np.uint64).tobytes())
        self._f.finish(_header(self.n_tokens, self.dtype))
        self._fi.flush()
        os.fsync(self._fi.fileno())
        self._fi.close()
        digest = sha256_file(self._tmp)  # read back from the disk: the bytes as they lie there
        # idx first: a .bin under its final name always has its sidecar
        os.replace(self._tmp_idx, idx_path(self.path))
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return digest

    def abort(self) -> None:
        for f, p in ((self._f, self._tmp), (self._fi, self._tmp_idx)):
            # closing flushes buffered bytes, which fails again on a full disk: the temp goes anyway
            with contextlib.suppress(OSError):
                f.close()
            p.unlink(missing_ok=True)


@dataclass
class Shard:
    path: Path
    tokens: np.memmap
    offsets: np.ndarray  # n_docs + 1 values; doc k is tokens[offsets[k] + 1 : offsets[k + 1]]

    @property
    def n_docs(self) -> int:
        return int(self.offsets.size - 1)

    def doc(self, k: int) -> np.ndarray:
        return self.tokens[int(self.offsets[k]) + 1 : int(self.offsets[k + 1])]


def read_header(path: Path) -> tuple[np.dtype, int]:
    h = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if h.size != HEADER_INTS:
        raise ValueError(f"{path}: too short for an llm.c header")
    if (h[0], h[1]) == (MAGIC_U16, VERSION_U16):
        dtype = np.dtype(np.uint16)
    elif (h[0], h[1]) == (MAGIC_U32, VERSION_U32):
        dtype = np.dtype(np.uint32)
    else:
        raise ValueError(f"{path}: unknown magic/version {h[0]}/{h[1]}")
    n = int(h[2])
    expected = HEADER_BYTES + n * dtype.itemsize
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path}: size {os.path.getsize(path)} != {expected} from its header")
    return dtype, n


def open_tokens(path: str | os.PathLike) -> np.memmap:
    """A read-only memmap over a shard's tokens (no copy)."""
    path = Path(path)
    dtype, n = read_header(path)
    if n == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty maps
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def open_shard(path: str | os.PathLike) -> Shard:
    path = Path(path)
    tokens = open_tokens(path)
    offsets = np.fromfile(idx_path(path), dtype=np.uint64)
    if offsets.size == 0 or int(offsets[-1]) != tokens.size:
        raise ValueError(f"{idx_path(path)}: does not match {path.name}")
    return Shard(path, tokens, offsets)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """Through the page cache (a source read next by the scan stays warm), into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    with open(path, "rb") as f, memoryview(buf) as view:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
