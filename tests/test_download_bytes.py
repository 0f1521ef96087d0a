"""The byte paths under Hub.fetch: socket reads into the ring with O_DIRECT writes (the fast path), the same with
buffered writes, and httpx's iter_raw (the fallback); each must resume, verify and reject alike."""
from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

import storage.hub as hub_mod
from storage import hub_io
from storage.hub import Hub, VerifyError, part_path
from tests.fakehub import Fault, FakeHub

BIG = "sample/10BT/004_00000.parquet"


@pytest.fixture
def fake(tree, hf_isolated):
    with FakeHub(tree) as h:
        yield h


@pytest.fixture(params=["socket+direct", "socket+buffered", "iter_raw"])
def path(request, monkeypatch) -> str:
    if request.param == "socket+buffered":
        monkeypatch.setattr(hub_io, "DIRECT_IO", False)
    if request.param == "iter_raw":
        monkeypatch.setattr(hub_mod, "socket_body", lambda r: None)
    return request.param


def fetch(fake: FakeHub, dest: Path, path_: str = BIG) -> str:
    hub = Hub("HuggingFaceFW/fineweb-edu", fake.endpoint, backoff_s=0.01, retries=3)
    sha = hub.resolve("main")
    f = next(x for x in hub.list_files(sha, "sample/10BT/*.parquet") if x.path == path_)
    return hub.fetch(sha, f, dest)


def test_clean_fetch(path, fake, tree, tmp_path):
    dest = tmp_path / "out" / "big.parquet"
    assert fetch(fake, dest) == fake.entries[BIG].sha256
    assert dest.read_bytes() == tree[BIG].read_bytes() and not part_path(dest).exists()


@pytest.mark.parametrize("at", [1_000_000, 2 << 20, 3 * (1 << 20) + 1])  # misaligned, aligned, one past a buffer
def test_drop_resumes_without_refetching(path, fake, tree, tmp_path, at):
    fake.faults[BIG] = Fault(drop_after=at)
    dest = tmp_path / "out" / "big.parquet"
    fetch(fake, dest)
    size = tree[BIG].stat().st_size
    assert dest.read_bytes() == tree[BIG].read_bytes()
    assert [(h.range, h.bytes_sent) for h in fake.hits(BIG, "GET", body=True)] == [(None, at), (f"bytes={at}-", size - at)]


def test_corrupt_bytes_are_rejected(path, fake, tmp_path):
    fake.faults[BIG] = Fault(corrupt=True)
    dest = tmp_path / "out" / "big.parquet"
    with pytest.raises(VerifyError, match="does not match"):
        fetch(fake, dest)
    assert not dest.exists() and not part_path(dest).exists()


def test_the_fast_path_is_the_one_taken(fake, tmp_path, monkeypatch):
    """Guards the speed: a huggingface_hub/httpx upgrade that hides the socket falls back silently otherwise."""
    seen, direct = [], []
    real_body, real_direct = hub_mod.socket_body, hub_io.Sink._direct
    monkeypatch.setattr(hub_mod, "socket_body", lambda r: seen.append(real_body(r)) or seen[-1])
    monkeypatch.setattr(hub_io.Sink, "_direct", lambda self, v: direct.append(real_direct(self, v)) or direct[-1])
    fetch(fake, tmp_path / "out" / "big.parquet")
    assert seen and all(s is not None for s in seen)
    assert sum(direct) >= 1  # a whole 4 MiB buffer of the ~4.5 MB file went around the page cache


def test_a_device_refusing_the_alignment_falls_back_to_buffered(fake, tree, tmp_path, monkeypatch):
    def einval(fd, data, offset):
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(os, "pwrite", einval)
    dest = tmp_path / "out" / "big.parquet"
    fetch(fake, dest)
    assert dest.read_bytes() == tree[BIG].read_bytes()


def test_sink_aligns_and_refuses_more_than_the_listed_size(tmp_path):
    data = os.urandom(3 * hub_io.CHUNK)
    hasher = hub_io.Hasher(len(data), git=False)
    part = tmp_path / "x.part"
    with open(part, "a+b") as fh:
        fh.write(data[:1000])
        fh.flush()
        sink = hub_io.Sink(fh, len(data), hasher, 1000, None)
        assert sink.want() == (hub_io.ALIGN - 1000 if sink.direct is not None else hub_io.CHUNK)
        off = 1000
        while off < len(data):
            buf = hasher.take()
            n = min(sink.want(), len(data) - off)
            buf[:n] = data[off:off + n]
            sink.put(buf, n)
            off += n
        buf = hasher.take()
        with pytest.raises(hub_io.TooLong):
            sink.put(buf, 1)
        sink.close()
    hasher.done()
    assert part.read_bytes() == data
    assert isinstance(hasher.take(), mmap.mmap)  # the refused buffer went back to the ring
