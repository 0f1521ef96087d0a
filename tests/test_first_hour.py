"""A new user's first hour, replayed: `langpwt demo`, then the README's everyday commands on that home.
Each test is one thing a user broke once; they share one demo home (built once), so their order matters."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE, run_cli, write_parquet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(prefect_api, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("first_hour")
    env = {"LANGPWT_HOME": str(root / "demo"), "PREFECT_API_URL": prefect_api}
    run_cli("demo", env=env, check=True, timeout=900)
    return {"env": env, "home": root / "demo", "root": root}


def cli(demo: dict, *args: str, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**demo["env"], **env}, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess, code: int = 2) -> str:
    assert p.returncode == code, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


def sql_rows(demo: dict, query: str) -> list:
    p = cli(demo, "sql", query, "--format", "json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def sha256(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- arguments refused before anything exists

@pytest.mark.parametrize("args", [["train", "--max-steps", "-5"], ["train", "--lr", "nan"],
                                  ["train", "--device", "gpu"], ["prepare", "--source", "/missing"],
                                  ["tokenize", "--source", "/missing"]])
def test_typos_fail_fast_and_create_nothing(demo, tmp_path, args):
    fresh = tmp_path / "fresh-home"
    # an API on a closed port: a command that reached Prefect before validating would fail differently
    p = run_cli(*args, env={"LANGPWT_HOME": str(fresh), "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    one_line_error(p)
    assert not fresh.exists(), f"{args} created {sorted(fresh.rglob('*'))}"


@pytest.mark.parametrize("args", [["--top-k", "-2"], ["--top-p", "5"], ["--max-new-tokens", "-3"]])
def test_generate_refuses_bad_sampling_values(demo, args):
    one_line_error(cli(demo, "generate", "--checkpoint", "demo", *args))


def test_generate_greedy_is_deterministic(demo):
    a = cli(demo, "generate", "--checkpoint", "demo", "--prompt", "The", "--temperature", "0", "--max-new-tokens", "12")
    b = cli(demo, "generate", "--checkpoint", "demo", "--prompt", "The", "--temperature", "0", "--max-new-tokens", "12",
            "--seed", "7")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("The")


def test_seed_model_on_cpu_is_refused_for_memory(demo):
    runs = sorted(p.name for p in (demo["home"] / "runs").iterdir())
    line = one_line_error(cli(demo, "train", "--device", "cpu"))
    assert "--preset tiny" in line or "--micro-batch" in line
    assert sorted(p.name for p in (demo["home"] / "runs").iterdir()) == runs


def test_failed_resume_leaves_the_run_alone(demo):
    before = sql_rows(demo, "SELECT run_id, status FROM runs ORDER BY run_id")
    p = cli(demo, "train", "--preset", "tiny", "--device", "cpu", "--resume", "--run-id", "no-such-run")
    one_line_error(p)
    assert sql_rows(demo, "SELECT run_id, status FROM runs ORDER BY run_id") == before


# ---------------------------------------------------------------- SQL: isolated, bounded, printed literally

def test_sql_prints_values_literally(demo):
    p = cli(demo, "sql", "SELECT 'arr[i]' AS a, 'a[/b]' AS b")
    assert p.returncode == 0, p.stderr
    assert "arr[i]" in p.stdout and "a[/b]" in p.stdout
    p = cli(demo, "sql", "SELECT * FROM duckdb_databases()")
    assert p.returncode == 0, p.stderr


def test_sql_json_is_one_array(demo):
    rows = sql_rows(demo, "SELECT shard_id, split FROM shards ORDER BY shard_id, split")
    assert isinstance(rows, list) and rows and set(rows[0]) == {"shard_id", "split"}


@pytest.mark.parametrize("query", ["CALL enable_logging(storage_path='/tmp/langpwt-x')",
                                   "SELECT * FROM enable_logging(storage_path='/tmp/langpwt-x')"])
def test_sql_that_aborts_duckdb_is_one_line(demo, query):
    line = one_line_error(cli(demo, "sql", query))  # it once ended the process with a C++ abort (exit 134)
    assert line.startswith("langpwt: error: ")
    assert not Path("/tmp/langpwt-x").exists()
    assert cli(demo, "sql", "SELECT 1 AS one").returncode == 0


def test_sql_runaway_is_stopped_by_its_limits(demo):
    t0 = time.monotonic()
    p = cli(demo, "sql", "SELECT repeat('x', 2000000000) AS big", timeout=120)
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    one_line_error(p, p.returncode)


def test_sql_stops_on_ctrl_c(demo):
    q = "SELECT count(*) FROM range(100000000000) a"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "sql", q, "--timeout", "300"], cwd=ROOT,
                            env={**os.environ, **demo["env"]}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, (proc.returncode, err)


# ---------------------------------------------------------------- the tokenizer is the home's identity

def test_reprocess_keeps_the_tokenizer(demo):
    tok = demo["home"] / "tokenizer" / "tokenizer.json"
    before = sha256(tok)
    shard1 = sorted((demo["home"] / "shards").glob("shard_000001.*.bin"))
    shard1_sums = {p.name: sha256(p) for p in shard1}
    p = cli(demo, "tokenize", "--reprocess", "0", "--source", str(SAMPLE))
    assert p.returncode == 0, p.stderr
    assert sha256(tok) == before
    assert {p.name: sha256(p) for p in shard1} == shard1_sums
    st = sql_rows(demo, "SELECT DISTINCT status, tokenizer_sha256 FROM shards")
    assert st == [{"status": "done", "tokenizer_sha256": before}]


def test_vocab_size_that_disagrees_is_refused(demo):
    tok = demo["home"] / "tokenizer" / "tokenizer.json"
    before = sha256(tok)
    one_line_error(cli(demo, "tokenize", "--reprocess", "0", "--source", str(SAMPLE), "--vocab-size", "48951"))
    assert sha256(tok) == before


def test_training_after_reprocess_uses_every_shard_and_generates(demo):
    p = cli(demo, "train", "--preset", "tiny", "--device", "cpu", "--max-steps", "4", "--run-id", "after-reprocess")
    assert p.returncode == 0, p.stderr[-2000:]
    p = cli(demo, "generate", "--checkpoint", "latest", "--max-new-tokens", "8", "--seed", "0")
    assert p.returncode == 0, p.stderr


def test_rebuild_catalog_keeps_seconds(demo):
    p = cli(demo, "rebuild-catalog")
    assert p.returncode == 0, p.stderr
    secs = [r["seconds"] for r in sql_rows(demo, "SELECT seconds FROM shards")]
    assert secs and all(s and s > 0 for s in secs)


def test_source_with_nothing_left_fails(demo, tmp_path):
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted(SAMPLE.glob("*.parquet"))[0]).to_pylist()[:50]
    for r in rows:
        r["int_score"] = 1  # below the default minimum of 3: every document is dropped
    write_parquet(tmp_path / "src" / "000_00000.parquet", rows)
    fresh = tmp_path / "home"
    p = run_cli("tokenize", "--source", str(tmp_path / "src"),
                env={"LANGPWT_HOME": str(fresh), "PREFECT_API_URL": demo["env"]["PREFECT_API_URL"]})
    assert p.returncode != 0
    assert "000_00000.parquet" in p.stderr or "no document" in p.stderr
    assert not (fresh / "tokenizer" / "tokenizer.json").exists()


def test_readme_says_how_to_get_langpwt_on_path_and_where_the_demo_lives():
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    assert ".langpwt/demo" in readme
