"""The data side's first hour, on homes built from data/sample: the run's scheduler without Prefect, the home's
tokenizer as its identity, arguments checked before anything exists, real seconds after rebuild-catalog, a source
with no document left, and the pinned validation split."""
import hashlib
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import polars as pl
import pytest

from storage import catalog, shard_catalog, training_catalog
from storage.paths import Home
from storage.shards import open_shard
from storage.sources import list_local
from tasks.filter import val_mask
from tasks.finish import build_shard
from tasks.params import TokenizeParams
from tasks.schedule import Incoming, Steps, TokenizeRun
from tasks.stage import scan_step
from tasks.tokenizer import Encoder, home_vocab, resolve_tokenizer
from tests.conftest import ROOT, sample_rows, write_parquet


def _steps(ex: ThreadPoolExecutor, home: Home, params: TokenizeParams) -> Steps:
    fcfg = params.filter_config()
    return Steps(scan=lambda src, tok: ex.submit(scan_step, home, src, fcfg, tok),
                 train_tokenizer=lambda usable: resolve_tokenizer(
                     home.tokenizer, usable, fcfg, params.tokenizer_config(home_vocab(home.tokenizer)),
                     params.tokenizer, params.retrain_tokenizer),
                 build=lambda job: ex.submit(build_shard, home, job, False),
                 finish=lambda job: build_shard(home, job, True))


def _run(home: Home, params: TokenizeParams, files=None) -> dict:
    files = files if files is not None else list_local(params.source)
    with ThreadPoolExecutor(2) as ex:
        return TokenizeRun(home, params, files, _steps(ex, home, params), listed=True).run()


def _rows(home: Home):
    return catalog.query_rows(home, "SELECT shard_id, split, status, sha256, tokenizer_sha256 FROM shards "
                                    "ORDER BY 1, 2")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_scheduler_runs_on_plain_functions_and_late_downloads(tmp_path, sample_source):
    params = TokenizeParams(source=str(sample_source), vocab_size=1024)
    files = list_local(sample_source)
    a = Home(tmp_path / "a").ensure()
    out = _run(a, params, files)
    assert out["built"] == 2 and not out["failed"] and out["tokens"] > 0
    assert {r[2] for r in _rows(a)} == {"done"}

    # the same files arriving as downloads (the tokenizer known: each read once, staged), one download failing
    b = Home(tmp_path / "b").ensure()
    b.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    b.tokenizer.write_bytes(a.tokenizer.read_bytes())
    b.tokenizer.with_suffix(".config.json").write_bytes(a.tokenizer.with_suffix(".config.json").read_bytes())

    def fail():
        time.sleep(0.2)
        raise OSError("connection reset")

    with ThreadPoolExecutor(2) as dl:
        late = [Incoming(f.file, f.position, dl.submit(lambda f=f, i=i: (time.sleep(0.1 * i), f)[1]),
                         lambda fut: fut.result()) for i, f in enumerate(files)]
        late.append(Incoming("002_00000.parquet", 2, dl.submit(fail), lambda fut: fut.result()))
        got = _run(b, params, late)
    assert got["built"] == 2 and got["failed"] == {"002_00000.parquet": "connection reset"}
    assert _rows(b) == _rows(a)  # the same shard bytes, the same tokenizer
    assert _run(a, params, files)["skipped"] == 2

    # rebuild-catalog keeps each shard's real seconds
    before = catalog.query_rows(a, "SELECT shard_id, split, seconds, started_at FROM shards ORDER BY 1, 2")
    assert all(r[2] > 0 for r in before)
    a.catalog.unlink()
    assert shard_catalog.rebuild(a) == 2
    assert catalog.query_rows(a, "SELECT shard_id, split, seconds, started_at FROM shards ORDER BY 1, 2") == before


def test_the_data_steps_import_no_prefect():
    code = ("import sys\nimport tasks.schedule, tasks.params, tasks.record, tasks.stage, tasks.finish, tasks.plan, "
            "tasks.tokenizer, tasks.tokenize, tasks.scan, tasks.read, tasks.filter, storage\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _cli(*args: str) -> int:
    from flows.cli import main
    return main(list(args))


def test_the_homes_tokenizer_is_its_identity(prefect_api, home, sample_source, capsys):
    assert _cli("prepare", "--source", str(sample_source), "--vocab-size", "1024") == 0
    tok0 = home.tokenizer.read_bytes()
    sha0 = hashlib.sha256(tok0).hexdigest()
    rows0 = _rows(home)
    assert {(r[2], r[4]) for r in rows0} == {("done", sha0)}

    # a rerun without --vocab-size, --reprocess and --force all keep the tokenizer: every shard stays its own
    assert _cli("tokenize", "--reprocess", "0") == 0
    assert _cli("tokenize", "--force") == 0
    assert home.tokenizer.read_bytes() == tok0 and _rows(home) == rows0

    # an explicit vocabulary that disagrees: one line, exit 2, nothing changed
    capsys.readouterr()
    assert _cli("tokenize", "--vocab-size", "2048", "--reprocess", "0") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--vocab-size 2,048" in err and "1,024" in err
    assert home.tokenizer.read_bytes() == tok0 and _rows(home) == rows0

    # retrained: the old one archived by sha256, the shards built with it stale, training refuses the mix
    assert _cli("tokenize", "--retrain-tokenizer", "--vocab-size", "2048", "--reprocess", "0") == 0
    assert (home.tokenizer_dir / "archive" / f"{sha0}.json").read_bytes() == tok0
    sha1 = _sha(home.tokenizer)
    assert sha1 != sha0 and home_vocab(home.tokenizer) == 2048
    assert {(r[0], r[2], r[4]) for r in _rows(home)} == {(0, "done", sha1), (1, "stale", sha0)}
    with pytest.raises(ValueError, match=r"1 shard\(s\) \(000001\) were built with another tokenizer"):
        training_catalog.train_shards(home, sha1)
    assert _cli("tokenize") == 0  # rebuilds the stale shard with the home's tokenizer
    assert {(r[2], r[4]) for r in _rows(home)} == {("done", sha1)}
    assert len(training_catalog.train_shards(home, sha1)["train"]) == 2


@pytest.mark.parametrize("flags", [["prepare", "--source", "/missing/src"],
                                   ["tokenize", "--source", "DATA", "--manifest", "/missing/SUMS"],
                                   ["tokenize", "--source", "DATA", "--tokenizer", "/missing/tok.json"]])
def test_bad_paths_are_refused_before_anything_exists(tmp_path, flags):
    """A fresh process, as users run it: one line, exit 2, no home made, and Prefect never loaded."""
    new = tmp_path / "new_home"
    args = [str(ROOT / "data" / "sample") if a == "DATA" else a for a in flags]
    code = ("import sys\nfrom flows.cli import main\n"
            f"rc = main({['--home', str(new), *args]!r})\n"
            "print(rc, any(m.split('.')[0] == 'prefect' for m in sys.modules))\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    took = time.monotonic() - t0
    assert out.stdout.split() == ["2", "False"], out.stderr
    bad = next(a for a in args if a.startswith("/missing"))
    assert out.stderr.count("\n") == 1 and bad in out.stderr
    assert not new.exists()
    assert took < 10  # no flow, no server: an interpreter start and the flag check (loaded machines vary)


def test_a_source_with_no_document_left_fails_naming_it(prefect_api, home, sample_source, capsys):
    assert _cli("tokenize", "--source", str(sample_source), "--min-int-score", "6") != 0  # int_score tops out at 5
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("langpwt: error:")]
    # (Prefect logs the flow's failure too; the command's own message is one line)
    assert len(err) == 1 and str(sample_source) in err[0] and "no document left after the filters" in err[0]
    assert not home.tokenizer.exists()
    assert catalog.query_rows(home, "SELECT count(*) FROM shards WHERE status = 'done'") == [(0,)]
    assert not list(home.shards.glob("shard_*")) and not list(home.shards.glob(".shard_*"))


def _val_source(root, n_files: int):
    rows, ids, texts = [], set(), set()
    for r in sample_rows():  # documents every filter keeps: what is held out is then exactly countable
        if (r["int_score"] or 0) >= 3 and r["text"] and r["id"] not in ids and r["text"] not in texts:
            rows.append(r)
            ids.add(r["id"])
            texts.add(r["text"])
    per = len(rows) // 3
    for i in range(n_files):
        write_parquet(root / f"{i:03d}_00000.parquet", rows[i * per:(i + 1) * per], row_group_size=64)
    return root, rows[:per]


def _val_docs(home: Home) -> list[str]:
    enc = Encoder(home.tokenizer)
    out = []
    for p in sorted(home.shards.glob("shard_*.val.bin")):
        s = open_shard(p)
        out += [enc.decode(s.doc(k)) for k in range(s.n_docs)]
    return out


def test_val_is_the_first_files_hash_selected_documents_whatever_the_file_count(tmp_path):
    src3, first = _val_source(tmp_path / "three", 3)
    src2, _ = _val_source(tmp_path / "two", 2)
    params = dict(vocab_size=1024, val_fraction=0.3)
    h3, h2 = Home(tmp_path / "h3").ensure(), Home(tmp_path / "h2").ensure()
    assert _run(h3, TokenizeParams(source=str(src3), **params))["built"] == 3
    h2.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    h2.tokenizer.write_bytes(h3.tokenizer.read_bytes())
    assert _run(h2, TokenizeParams(source=str(src2), tokenizer=str(h3.tokenizer), **params))["built"] == 2

    ids = pl.Series([r["id"] for r in first])
    chosen = pl.select(val_mask(pl.lit(ids), 0.3)).to_series().to_list()
    want = [r["text"] for r, c in zip(first, chosen) if c]
    assert len(want) > 50
    assert _val_docs(h3) == want  # exactly file 0's hash-selected documents, in file order
    split = catalog.query_rows(h3, "SELECT shard_id, count(*) FILTER (WHERE split = 'val') FROM documents "
                                   "GROUP BY 1 ORDER BY 1")
    assert split == [(0, len(want)), (1, 0), (2, 0)]  # every other file all train
    assert _sha(h2.shard(0, "val")) == _sha(h3.shard(0, "val"))  # two files or three: the same val set
    meta = (h3.shard_meta(0)).read_text()
    assert '"val": {' in meta and '"max_tokens": 10000000' in meta


def test_val_stops_at_its_token_cap_and_the_rest_goes_to_train(tmp_path, monkeypatch):
    import tasks.tokenize

    src, first = _val_source(tmp_path / "src", 1)
    free = Home(tmp_path / "free").ensure()
    _run(free, TokenizeParams(source=str(src), vocab_size=1024, val_fraction=0.3))
    full = _val_docs(free)
    cap = open_shard(free.shard(0, "val")).tokens.size // 2
    monkeypatch.setattr(tasks.tokenize, "VAL_MAX_TOKENS", cap)
    capped = Home(tmp_path / "capped").ensure()
    _run(capped, TokenizeParams(source=str(src), tokenizer=str(free.tokenizer), vocab_size=1024, val_fraction=0.3))
    got = _val_docs(capped)
    assert 0 < len(got) < len(full) and got == full[:len(got)]  # a prefix, in file order
    assert open_shard(capped.shard(0, "val")).tokens.size <= cap
    n = {s: open_shard(capped.shard(0, s)).n_docs for s in ("train", "val")}
    assert n["train"] + n["val"] == open_shard(free.shard(0, "train")).n_docs + len(full)  # none lost
