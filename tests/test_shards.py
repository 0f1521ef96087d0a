"""The shard format: llm.c headers, uint16/uint32 by vocab, offsets sidecar, atomic completion."""
import numpy as np
import pytest

from storage.shards import (HEADER_BYTES, MAGIC_U16, MAGIC_U32, ShardWriter, idx_path, open_shard,
                            open_tokens, read_header)


def llmc_load(path):
    """The loader of llm.c / modded-nanogpt (`_load_data_shard`), restated: header then uint16."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520 and header[1] == 1
    n = int(header[2])
    with open(path, "rb") as f:
        f.seek(256 * 4)
        tokens = np.frombuffer(f.read(), dtype=np.uint16)
    assert tokens.size == n
    return tokens


@pytest.mark.parametrize("vocab,magic,dtype", [(50_257, MAGIC_U16, np.uint16), (100_000, MAGIC_U32, np.uint32)])
def test_roundtrip_and_header(tmp_path, vocab, magic, dtype):
    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path / "shard_000000.train.bin", vocab)
    docs = [rng.integers(1, vocab, size=n) for n in (5, 0, 17, 3)]
    for d in docs:
        w.append(np.concatenate([[0], d]), np.array([0]))
    sha = w.close()
    path = tmp_path / "shard_000000.train.bin"
    assert np.fromfile(path, np.int32, 1)[0] == magic
    assert read_header(path) == (np.dtype(dtype), sum(d.size + 1 for d in docs))
    s = open_shard(path)
    assert isinstance(s.tokens, np.memmap) and s.n_docs == len(docs)
    for k, d in enumerate(docs):
        assert s.doc(k).tolist() == d.tolist()
    import hashlib
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    if dtype == np.uint16:
        assert llmc_load(path).tolist() == s.tokens.tolist()
    assert not list(tmp_path.glob(".*tmp"))


def test_abort_leaves_nothing(tmp_path):
    path = tmp_path / "shard_000001.val.bin"
    w = ShardWriter(path, 1000)
    w.append(np.array([0, 5, 6]), np.array([0]))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_is_rejected(tmp_path):
    path = tmp_path / "s.bin"
    w = ShardWriter(path, 1000)
    w.append(np.arange(10), np.array([0]))
    w.close()
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="size"):
        open_tokens(path)
    assert idx_path(path).exists() and HEADER_BYTES == 1024


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [100, 4096, 5000, 8192, 3 * 8192, 3 * 8192 + 4097])
def test_direct_appender_writes_the_same_bytes_with_its_head_patched(tmp_path, monkeypatch, direct, size):
    """Whole buffers through O_DIRECT, the tail as a padded block cut back, the head laid over the start
    last (in the buffer when nothing went out yet, as a rewritten first block after): the same file a
    plain write gives, and sha256_file reads it back to the same digest. Also with O_DIRECT off."""
    import hashlib

    from storage import direct_io

    monkeypatch.setattr(direct_io, "DIRECT_IO", direct)
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    head = b"HEAD" * 8
    path = tmp_path / "f.bin"
    w = direct_io.DirectAppender(path, chunk=8192)
    assert (w.dfd is not None) == direct  # this disk (ext4) takes O_DIRECT: the test covers that path
    for i in range(0, size, 1000):  # ragged pieces, straddling the buffer's edges
        w.write(data[i:i + 1000])
    w.finish(head)
    want = (head + data[len(head):]) if size >= len(head) else head[:size]
    assert path.read_bytes() == want
    assert direct_io.sha256_file(path, chunk=8192) == hashlib.sha256(want).hexdigest()


def test_kept_buffers_are_not_shared_with_a_forked_worker():
    """The writer keeps its aligned buffers for the next file; a worker forked from this process (a process
    pool, a Dask nanny) inherits them and must get its own copy on write, not this process's pages."""
    import os

    from storage import direct_io

    kept = []  # earlier tests' writers left buffers in the pool: set them aside, so ours is the one taken
    while not direct_io._SPARE.empty():
        kept.append(direct_io._SPARE.get())
    buf = direct_io._take(direct_io.CHUNK)
    buf[:6] = b"parent"
    direct_io._give(buf)
    pid = os.fork()
    if pid == 0:  # the child takes the kept buffer and writes into it, as its own shard writer would
        mine = direct_io._take(direct_io.CHUNK)
        mine[:6] = b"child!" if mine is buf else b"other!"
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert buf[:6] == b"parent"
    for b in kept:
        direct_io._give(b)


def test_direct_appender_falls_back_when_the_device_refuses_the_alignment(tmp_path, monkeypatch):
    """O_DIRECT opened fine but the first aligned write gets EINVAL (a device wanting coarser blocks): the
    descriptor is dropped and the same bytes go buffered, header patch included."""
    import errno
    import os

    from storage import direct_io

    path = tmp_path / "f.bin"
    w = direct_io.DirectAppender(path, chunk=8192)
    assert w.dfd is not None
    refused, real = [], os.pwrite

    def pwrite(fd, data, offset):
        if fd == w.dfd:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", pwrite)
    data = bytes(range(256)) * 100  # 25,600 bytes: three whole buffers and a tail
    w.write(data)
    w.finish(b"HEAD")
    assert refused == [0]  # refused once, then buffered for the rest
    assert path.read_bytes() == b"HEAD" + data[4:]
