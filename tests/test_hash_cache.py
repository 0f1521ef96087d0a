"""Source sha256 remembered by stat: reused for an unchanged file, redone when any stat field moves, never
trusted for a file modified around its hashing, and bypassed by `tokenize --force`."""
import hashlib
import json
import os
import time

from flows.tokenize import TokenizeParams, local_files
from storage.hash_cache import RACY_NS, HashCache
from storage.paths import Home
from storage.shards import file_sha256
from storage.sources import list_local

HOUR_NS = 3600 * 10**9


def _write(p, data: bytes, mtime_ns: int | None = None) -> None:
    p.write_bytes(data)
    if mtime_ns is not None:
        os.utime(p, ns=(mtime_ns, mtime_ns))


def _edit_in_place(p, data: bytes) -> None:
    """Same inode, same size, same mtime: the one change stat cannot see."""
    st = p.stat()
    assert len(data) == st.st_size
    with open(p, "r+b") as f:
        f.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_ino == st.st_ino and p.stat().st_mtime_ns == st.st_mtime_ns


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_unchanged_files_are_not_read_again(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "home" / "cache" / "source_sha256.json"
    src.mkdir()
    old = time.time_ns() - HOUR_NS
    for i in range(3):
        _write(src / f"{i:03d}_00000.parquet", bytes([i]) * 1000, old)
    first = list_local(src, hashes=cache)
    assert [f.sha256 for f in first] == [_sha(bytes([i]) * 1000) for i in range(3)]
    assert sorted(json.loads(cache.read_text())["files"]) == sorted(str(p) for p in src.iterdir())
    written = cache.stat().st_ino  # an atomic rewrite would bring a new inode
    _edit_in_place(src / "001_00000.parquet", b"x" * 1000)
    # the remembered digest comes back: the file was not read (the trade-off the module names)
    assert [f.sha256 for f in list_local(src, hashes=cache)] == [f.sha256 for f in first]
    assert cache.stat().st_ino == written  # nothing new learnt: the cache file is left alone
    (src / "002_00000.parquet").unlink()
    list_local(src, hashes=cache)
    assert str(src / "002_00000.parquet") not in json.loads(cache.read_text())["files"]  # deleted files forgotten
    # without the cache the same call reads the file
    assert list_local(src)[1].sha256 == _sha(b"x" * 1000)


def test_any_stat_change_rehashes(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "c.json"
    src.mkdir()
    f, old = src / "000_00000.parquet", time.time_ns() - HOUR_NS
    _write(f, b"a" * 100, old)
    assert list_local(src, hashes=cache)[0].sha256 == _sha(b"a" * 100)
    _write(f, b"b" * 100, old - 10**9)                       # mtime moved
    assert list_local(src, hashes=cache)[0].sha256 == _sha(b"b" * 100)
    _write(f, b"c" * 101, old - 10**9)                       # size moved
    assert list_local(src, hashes=cache)[0].sha256 == _sha(b"c" * 101)
    tmp = src / ".new"
    _write(tmp, b"d" * 101, old - 10**9)
    os.replace(tmp, f)                                       # same size and mtime, another inode
    assert list_local(src, hashes=cache)[0].sha256 == _sha(b"d" * 101)


def test_a_file_modified_around_its_hashing_is_never_trusted(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "c.json"
    src.mkdir()
    f = src / "000_00000.parquet"
    _write(f, b"a" * 100)                                    # mtime: now, within RACY_NS of the hashing
    assert list_local(src, hashes=cache)[0].sha256 == _sha(b"a" * 100)
    _edit_in_place(f, b"b" * 100)
    assert list_local(src, hashes=cache)[0].sha256 == _sha(b"b" * 100)
    entry = json.loads(cache.read_text())["files"][str(f)]
    assert entry["hashed_at_ns"] - f.stat().st_mtime_ns < RACY_NS


def test_a_file_that_changes_while_hashed_is_not_remembered(tmp_path):
    f = tmp_path / "000_00000.parquet"
    _write(f, b"a" * 100, time.time_ns() - HOUR_NS)
    c = HashCache(tmp_path / "c.json")

    def digest_while_written_to(p):
        sha = file_sha256(p)
        _write(p, b"b" * 100, time.time_ns() - HOUR_NS // 2)  # a writer finishing meanwhile
        return sha

    assert c.hash(f, digest_while_written_to) == _sha(b"a" * 100)
    assert str(f) not in c.entries and c.lookup(f) is None


def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path):
    src, cache = tmp_path / "src", tmp_path / "c.json"
    src.mkdir()
    _write(src / "000_00000.parquet", b"a" * 100, time.time_ns() - HOUR_NS)
    for junk in ("{not json", "[]", json.dumps({"version": 0, "files": {}})):
        cache.write_text(junk)
        assert list_local(src, hashes=cache)[0].sha256 == _sha(b"a" * 100)
        assert json.loads(cache.read_text())["version"] == 1


def test_tokenize_uses_the_homes_cache_and_force_rereads(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "000_00000.parquet"
    _write(f, b"a" * 100, time.time_ns() - HOUR_NS)
    home = Home(tmp_path / "home").ensure()
    params = TokenizeParams(source=str(src), home=str(home.root))
    assert local_files(home, params)[0][0].sha256 == _sha(b"a" * 100)
    assert home.source_hashes.exists()
    _edit_in_place(f, b"b" * 100)
    assert local_files(home, params)[0][0].sha256 == _sha(b"a" * 100)
    assert local_files(home, params.model_copy(update={"force": True}))[0][0].sha256 == _sha(b"b" * 100)
    # the forced run refreshed the entry: the next plain run no longer returns the old digest
    assert local_files(home, params)[0][0].sha256 == _sha(b"b" * 100)
