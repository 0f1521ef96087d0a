"""The byte paths under Hub.fetch: iter_raw pieces gathered into aligned buffers written with O_DIRECT, and the
same with buffered writes (where O_DIRECT is refused); each must resume, verify and reject alike."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path

import pytest

from storage import direct_io, hub_io
from storage.hub import Hub, VerifyError, part_path
from tests.fakehub import Fault, FakeHub

BIG = "sample/10BT/004_00000.parquet"


@pytest.fixture
def fake(tree, hf_isolated):
    with FakeHub(tree) as h:
        yield h


@pytest.fixture(params=["direct", "buffered"])
def path(request, monkeypatch) -> str:
    if request.param == "buffered":
        monkeypatch.setattr(direct_io, "DIRECT_IO", False)
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


def test_whole_buffers_go_around_the_page_cache(fake, tmp_path, monkeypatch):
    """Guards the O_DIRECT path: a change that silently sends every byte through the page cache fails here."""
    direct, real = [], direct_io.pwrite_direct
    monkeypatch.setattr(direct_io, "pwrite_direct", lambda fd, v, off: direct.append(real(fd, v, off)) or direct[-1])
    fetch(fake, tmp_path / "out" / "big.parquet")
    assert sum(direct) >= 1  # a whole 4 MiB buffer of the ~4.5 MB file went around the page cache


def test_a_device_refusing_the_alignment_falls_back_to_buffered(fake, tree, tmp_path, monkeypatch):
    refused, real = [], os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    dest = tmp_path / "out" / "big.parquet"
    fetch(fake, dest)
    assert refused == [0]  # refused once, then buffered for the rest
    assert dest.read_bytes() == tree[BIG].read_bytes()


@pytest.mark.parametrize("start", [0, 1000, hub_io.CHUNK])
def test_sink_resumes_keeps_a_cut_and_refuses_more_than_the_listed_size(tmp_path, start):
    """A resumed part (misaligned or not), a cut kept mid-buffer, then the rest: the file and its digest are
    those of the whole data, each byte hashed once; one byte past the listed size is refused unwritten."""
    data = os.urandom(2 * hub_io.CHUNK + 12345)
    part = tmp_path / "x.part"
    part.write_bytes(data[:start])
    sink = hub_io.Sink(part, len(data), False, start, None)
    cut = start + hub_io.CHUNK // 2 + 7
    for i in range(start, cut, 65536):
        sink.put(data[i:min(i + 65536, cut)])
    sink.keep()  # a dropped connection: what arrived is in the file now
    assert part.read_bytes() == data[:cut] and sink.offset == cut
    for i in range(cut, len(data), 65536):
        sink.put(data[i:i + 65536])
    with pytest.raises(hub_io.TooLong):
        sink.put(b"x")
    assert sink.finish() == (hashlib.sha256(data).hexdigest(), None)
    sink.close()
    assert part.read_bytes() == data


def test_sink_git_blob_sha1(tmp_path):
    data = b"small text kept in git\n" * 100
    part = tmp_path / "x.part"
    part.touch()
    sink = hub_io.Sink(part, len(data), True, 0, None)
    sink.put(data)
    _, sha1 = sink.finish()
    assert sha1 == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
