"""Bad input, SIGKILL mid-shard, a reader process during a writer, two runs on one home: real processes."""
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from storage import catalog
from storage.paths import Home
from storage.shards import open_shard
from tests.conftest import ROOT, run_cli, sample_rows, write_parquet

pytestmark = pytest.mark.slow


def big_source(dirpath, n_files=3, copies=6):
    """Real text, made larger: each copy gets its own ids and a distinct first line (so none dedups)."""
    rows = [r for r in sample_rows() if r["int_score"] >= 3]
    for f in range(n_files):
        out = []
        for c in range(copies):
            out += [dict(r, id=f"{r['id'][:-1]}-{f}-{c}>", text=f"Part {f}.{c}: {r['text']}") for r in rows]
        write_parquet(dirpath / f"{f:03d}_00000.parquet", out, row_group_size=500)
    return dirpath


def test_bad_inputs_fail_alone_and_good_files_complete(prefect_api, home, tmp_path):
    src = tmp_path / "src"
    rows = sample_rows()[:400]
    good = write_parquet(src / "000_00000.parquet", rows)
    data = good.read_bytes()
    (src / "001_00000.parquet").write_bytes(data[: len(data) // 2])                 # truncated
    (src / "002_00000.parquet").write_text("id,text\n1,hello\n")                    # not parquet
    (src / "003_00000.parquet").write_bytes(b"")                                     # empty
    import pyarrow as pa
    pq.write_table(pa.table({"body": ["x"], "id": ["a"]}), src / "004_00000.parquet")  # no text column
    pq.write_table(pa.table({"text": [1, 2], "id": ["a", "b"]}), src / "005_00000.parquet")  # text not str
    write_parquet(src / "006_00000.parquet", sample_rows()[400:800])
    p = run_cli("tokenize", "--source", str(src), "--vocab-size", "1024", env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 1, p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("langpwt: error:")]
    expect = {"001": "not a readable parquet", "002": "not a readable parquet", "003": "empty file",
              "004": "no `text` column", "005": "not a string"}
    for prefix, reason in expect.items():
        assert any(f"{prefix}_00000.parquet" in l and reason in l for l in errors), (prefix, errors)
    st = dict(catalog.query_rows(home, "SELECT shard_id, any_value(status) FROM shards GROUP BY 1"))
    assert st == {0: "done", 1: "failed", 2: "failed", 3: "failed", 4: "failed", 5: "failed", 6: "done"}
    assert sorted(p.name for p in home.shards.glob("*.bin")) == [
        "shard_000000.train.bin", "shard_000000.val.bin", "shard_000006.train.bin", "shard_000006.val.bin"]
    failed_docs = catalog.query_rows(home, "SELECT count(*) FROM documents WHERE shard_id BETWEEN 1 AND 5")[0][0]
    assert failed_docs == 0


def _wait_for(pred, timeout=120.0, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return False


def test_sigkill_mid_shard_then_rerun_is_byte_identical(prefect_api, tmp_path):
    src = big_source(tmp_path / "src")
    env = {"PREFECT_API_URL": prefect_api}
    clean = tmp_path / "clean"
    run_cli("--home", str(clean), "tokenize", "--source", str(src), "--vocab-size", "2048", env=env, check=True)
    tok = clean / "tokenizer" / "tokenizer.json"
    victim = tmp_path / "victim"
    cmd = [sys.executable, "-m", "flows.cli", "--home", str(victim), "tokenize", "--source", str(src),
           "--tokenizer", str(tok), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    shards = victim / "shards"
    # kill while a shard is half written: its temp file exists and has grown past the header
    assert _wait_for(lambda: any(p.name.endswith(".tmp") and p.stat().st_size > 4096
                                 for p in shards.glob(".*.tmp")) if shards.exists() else False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for p in shards.glob("*.bin"):  # whatever is under a final name is complete
        open_shard(p)
    done = catalog.query_rows(Home.from_env(victim), "SELECT shard_id, split FROM shards WHERE status='done'") \
        if (victim / "catalog.duckdb").exists() else []
    for sid, split in done:
        assert (shards / f"shard_{sid:06d}.{split}.bin").exists()
    run_cli("--home", str(victim), "tokenize", "--source", str(src), "--tokenizer", str(tok), env=env, check=True)
    want = {p.name: p.read_bytes() for p in (clean / "shards").iterdir()}
    got = {p.name: p.read_bytes() for p in shards.iterdir() if not p.name.startswith(".")}
    assert got == want


def test_reader_process_during_writer(prefect_api, tmp_path):
    src = big_source(tmp_path / "src", n_files=4, copies=4)
    h = tmp_path / "h"
    env = dict(os.environ, PREFECT_API_URL=prefect_api, LANGPWT_HOME=str(h))
    writer = subprocess.Popen([sys.executable, "-m", "flows.cli", "tokenize", "--source", str(src),
                               "--vocab-size", "2048"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    reader_code = (
        "import sys, time, json\n"
        "from storage import catalog\nfrom storage.paths import Home\n"
        "h = Home.from_env(); ok = fail = 0; seen = set()\n"
        "while True:\n"
        "    if open(sys.argv[1]).read().strip() == 'stop': break\n"
        "    try:\n"
        "        seen.add(catalog.query_rows(h, \"SELECT count(*) FROM shards WHERE status='done'\")[0][0]); ok += 1\n"
        "    except catalog.CatalogMissing: time.sleep(0.05)\n"
        "    except Exception as e: fail += 1; print(repr(e), file=sys.stderr)\n"
        "print(json.dumps(dict(ok=ok, fail=fail, seen=sorted(seen))))\n")
    flag = tmp_path / "flag"
    flag.write_text("go")
    reader = subprocess.Popen([sys.executable, "-c", reader_code, str(flag)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = writer.communicate(timeout=600)
    flag.write_text("stop")
    rout, rerr = reader.communicate(timeout=120)
    assert writer.returncode == 0, err
    stats = json.loads(rout.strip().splitlines()[-1])
    assert stats["fail"] == 0, rerr
    assert stats["ok"] > 10 and len(stats["seen"]) >= 2  # it read while shards were landing


def test_two_runs_on_one_home_refuse(prefect_api, tmp_path):
    src = big_source(tmp_path / "src", n_files=2, copies=4)
    h = tmp_path / "h"
    env = dict(os.environ, PREFECT_API_URL=prefect_api, LANGPWT_HOME=str(h))
    first = subprocess.Popen([sys.executable, "-m", "flows.cli", "tokenize", "--source", str(src),
                              "--vocab-size", "2048"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert _wait_for(lambda: (h / "pipeline.lock").exists() and (h / "pipeline.lock").read_text().strip())
    second = run_cli("tokenize", "--source", str(src), "--vocab-size", "2048", env={"LANGPWT_HOME": str(h),
                     "PREFECT_API_URL": prefect_api})
    first.communicate(timeout=600)
    assert first.returncode == 0
    assert second.returncode != 0 and "already running" in second.stderr
    assert catalog.query_rows(Home.from_env(h), "SELECT count(*), count(DISTINCT (shard_id, split)) FROM shards")[0] == (4, 4)


def test_a_first_catalog_write_that_fails_leaves_no_half_made_schema(tmp_path):
    """The schema is created in the write's own transaction: a first writer that dies before committing
    (a SIGKILL in the fault suite, an exception here) leaves no tables, so readers report no catalog
    instead of failing on a missing `shards` table; the next write creates it whole."""
    h = Home.from_env(tmp_path / "h")
    with pytest.raises(RuntimeError, match="dies here"):
        with catalog.writer(h):
            raise RuntimeError("dies here")
    with pytest.raises(catalog.CatalogMissing):
        catalog.query_rows(h, "SELECT count(*) FROM shards")
    with catalog.writer(h) as con:
        con.execute("INSERT INTO tokenizers VALUES ('s', 'p', 1, 'o', '{}', now())")
    assert catalog.query_rows(h, "SELECT count(*) FROM shards") == [(0,)]
    assert catalog.query_rows(h, "SELECT count(*) FROM tokenizers") == [(1,)]
