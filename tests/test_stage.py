"""One read per file (tasks/stage.py, then tasks/finish.py) writes the same bytes as scan + tokenize_file:
with and without cross-file and in-file duplicates (by id and by text), in both splits, and on fallback."""
import hashlib

import pytest

from storage.paths import Home
from storage.sources import list_local
from tasks.filter import FilterConfig
from tasks.finish import finish_file
from tasks.plan import likely_built, plan_one
from tasks.scan import scan_file
from tasks.stage import MARKER, stage_file
from tasks.tokenize import tokenize_file
from tasks.tokenizer import Encoder, TokenizerConfig, file_sha256, train_tokenizer
from tests.conftest import sample_rows, write_parquet


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage")
    rows = [r for r in sample_rows() if r["text"] and (r["int_score"] or 0) >= 3][:900]
    a, b, c = rows[:300], rows[300:600], rows[600:]
    for i in range(0, 40, 4):  # duplicates of earlier files and of earlier rows of the same file
        b[i] = dict(b[i], id=a[i]["id"])
        b[i + 1] = dict(b[i + 1], text=a[i + 1]["text"])
        b[i + 2] = dict(b[i + 2], text=b[i + 50]["text"])
        b[i + 3] = dict(b[i + 3], id=b[i + 60]["id"])
    c[100] = dict(c[100], text=None)  # c: no duplicate at all, finishing is a rename
    for name, part in (("000_00000.parquet", a), ("001_00000.parquet", b), ("002_00000.parquet", c)):
        write_parquet(d / "src" / name, part, row_group_size=64)
    tok = d / "tokenizer.json"
    train_tokenizer(iter(r["text"] for r in rows), tok, TokenizerConfig(vocab_size=1024))
    return d / "src", tok


def _build(root, src_dir, tok, fcfg, one_read: bool, drop_marker: bool = False) -> dict:
    home = Home(root).ensure()
    sha = file_sha256(tok)
    files = list_local(src_dir)
    for i, f in enumerate(files):
        if one_read:
            assert likely_built(home, f, files[:i], fcfg, sha, {})
            assert stage_file(home, f, fcfg, str(tok), sha).staged
            if drop_marker:
                (home.staging(f.shard_id) / MARKER).unlink()
        else:
            scan_file(home, f, fcfg)
        _, job = plan_one(home, f, files[:i], fcfg, str(tok), sha, {})
        enc = Encoder.cached(tok, sha)
        res = finish_file(home, job, lambda: enc) if one_read else tokenize_file(home, job, enc)
        assert res.status == "done", res.error
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("fcfg", [FilterConfig(val_fraction=0.3), FilterConfig(dedup=False, val_fraction=0.0)])
def test_one_read_gives_the_same_bytes(tmp_path, corpus, fcfg):
    src, tok = corpus
    two = _build(tmp_path / "two", src, tok, fcfg, one_read=False)
    one = _build(tmp_path / "one", src, tok, fcfg, one_read=True)
    assert one == two
    assert not [k for k in one if "staged" in k]  # no staging folder left behind
    if fcfg.dedup:
        import polars as pl
        docs = pl.read_parquet(tmp_path / "one" / "shards" / "shard_000001.docs.parquet")
        reasons = docs.filter(pl.col("drop_reason").is_in(["dup_id", "dup_text"]))
        assert reasons.height == 40


def test_incomplete_staging_falls_back_to_reading_again(tmp_path, corpus):
    src, tok = corpus
    fcfg = FilterConfig(val_fraction=0.3)
    assert _build(tmp_path / "one", src, tok, fcfg, one_read=True, drop_marker=True) == \
        _build(tmp_path / "two", src, tok, fcfg, one_read=False)


def test_a_bad_file_fails_its_scan_as_before(tmp_path, corpus):
    src, tok = corpus
    home = Home(tmp_path / "h").ensure()
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (src / "000_00000.parquet").read_bytes()
    (bad / "000_00000.parquet").write_bytes(data[: len(data) // 2])
    f = list_local(bad)[0]
    with pytest.raises(ValueError, match="000_00000.parquet"):
        stage_file(home, f, FilterConfig(), str(tok), file_sha256(tok))
    assert not home.staging(0).exists() and not list(home.index.iterdir())
