"""User SQL through `langpwt sql` and storage.user_sql: isolation, limits, Ctrl-C, writers never waiting, output.
The home holds the bundled sample's documents and a failed shard whose error is long and full of brackets."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from storage import catalog, shard_catalog, user_sql
from storage.paths import Home
from tests.conftest import ROOT, SAMPLE, run_cli, sample_rows

CROSS = "SELECT count(*) FROM documents a, documents b, documents c"  # runs for hours: only limits end it
LONG_ERROR = ("not a readable parquet file [/tmp/source/002_00000.parquet]: Parquet magic bytes not found in "
              "footer. Either the file is corrupted or this is not a parquet file. [bold]" + "x" * 80 + " end")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Home:
    h = Home.from_env(tmp_path_factory.mktemp("usersql") / "home")
    with catalog.writer(h) as con:
        con.execute(f"""INSERT INTO documents (doc_id, source_file, shard_id, split, dump, url, int_score,
                        language_score, n_chars, kept)
                        SELECT id, parse_filename(filename), 0, 'train', dump, url, int_score, language_score,
                               length(text), int_score >= 3
                        FROM read_parquet('{SAMPLE}/*.parquet', filename = true)""")
    shard_catalog.record_failed(h, 2, "002_00000.parquet", None, None, LONG_ERROR, None, None)
    return h


def sql(home: Home, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("--home", str(home.root), "sql", *args, timeout=timeout)


def children(pid: int) -> list[int]:
    """Pids of the processes `pid` started (the query's child)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def wait_for_child(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [k for k in children(pid) if "storage.user_sql_child" in Path(f"/proc/{k}/cmdline").read_text()]
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError("the query's child process never started")


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_a_query_that_kills_duckdb_is_a_one_line_error(home):
    # the logging switch aborted the whole process (an uncaught C++ exception): refused or a plain error now
    for q in ("CALL enable_logging(storage_path='/tmp/x')", "SELECT * FROM enable_logging(storage_path='/tmp/x')"):
        p = sql(home, q)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "langpwt: error:" in p.stderr, p.stderr
    assert not Path("/tmp/x").exists() or not any(Path("/tmp/x").iterdir())
    # a child that DuckDB aborts (SIGABRT, as on that path) is reported; the caller goes on
    res: dict = {}
    t = threading.Thread(target=lambda: res.setdefault("e", _catch(home, CROSS, user_sql.Limits(timeout_s=60))))
    t.start()
    os.kill(wait_for_child(os.getpid()), signal.SIGABRT)
    t.join(30)
    e = res["e"]
    assert isinstance(e, duckdb.FatalException) and "SIGABRT" in str(e) and "\n" not in str(e), e
    # past the memory cap: an allocation fails in the child, quickly, not gigabytes later
    t0 = time.perf_counter()
    p = sql(home, "SELECT length(repeat('x', 2000000000))", "--memory-mb", "512")
    assert p.returncode == 2 and "Out of Memory" in p.stderr and "512 MB" in p.stderr and "--memory-mb" in p.stderr
    assert p.stderr.count("\n") == 1 and time.perf_counter() - t0 < 60
    assert sql(home, "SELECT count(*) AS n FROM documents", "--format", "csv").stdout.split() == \
        ['"n"', str(len(sample_rows()))]


def _catch(home: Home, q: str, limits: user_sql.Limits):
    try:
        return user_sql.run(home, q, limits)
    except Exception as e:  # the test looks at which one
        return e


def test_limits_flags_and_ctrl_c(home):
    p = sql(home, CROSS, "--timeout", "1")
    assert p.returncode == 2 and "time limit (1 s)" in p.stderr and "--timeout" in p.stderr, p.stderr
    p = sql(home, "SELECT doc_id FROM documents ORDER BY doc_id", "--max-rows", "3", "--format", "jsonl")
    assert [json.loads(x)["doc_id"] for x in p.stdout.splitlines()] == sorted(r["id"] for r in sample_rows())[:3]
    assert "first 3 rows" in p.stderr and "--max-rows" in p.stderr
    for bad in (["--timeout", "0"], ["--max-rows", "-1"], ["--memory-mb", "10"], ["--timeout", "x"]):
        p = sql(home, "SELECT 1", *bad)
        assert p.returncode == 2 and bad[0] in p.stderr, (bad, p.stderr)
    helptext = run_cli("sql", "--help").stdout
    for flag in ("--timeout", "--max-rows", "--memory-mb", "jsonl", "json (one JSON array", "csv"):
        assert flag in helptext
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home.root), "sql", CROSS,
                            "--timeout", "300"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = wait_for_child(cli.pid)
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=30)
    assert cli.returncode == 130 and err.strip().splitlines() == ["langpwt: interrupted; the query was stopped"], err
    assert gone(child)


def test_a_long_query_never_makes_a_writer_wait(home, tmp_path):
    h = Home.from_env(tmp_path / "h")
    shutil.copytree(home.root, h.root)
    cli = subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(h.root), "sql", CROSS,
                            "--timeout", "30"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_child(cli.pid)
        waits = []
        for i in range(5):  # commits while the query runs, as a pipeline's would
            t0 = time.perf_counter()
            with catalog.writer(h) as con:
                con.execute("INSERT INTO runs (run_id, status) VALUES (?, 'running')", [f"r{i}"])
            waits.append(time.perf_counter() - t0)
            time.sleep(0.2)
        assert cli.poll() is None, "the query is still running"
        assert max(waits) < 1.0, waits
    finally:
        cli.send_signal(signal.SIGINT)
        cli.communicate(timeout=30)
    assert catalog.query_rows(h, "SELECT count(*) FROM runs")[0][0] == 5
    # the next query sees the commits, on a new snapshot; an unchanged catalog reuses it
    assert sql(h, "SELECT count(*) FROM runs", "--format", "csv").stdout.split()[-1] == "5"
    sql(h, "SELECT 1")
    snaps = [p.name for p in (h.root / "cache" / "catalog-snapshots").iterdir()]
    assert len(snaps) == 2 and not any(s.startswith(".") for s in snaps), snaps  # the old one, kept a while


def test_values_print_literally_in_every_format(home):
    p = sql(home, "SELECT 'arr[i]' AS a, 'a[/b]' AS \"[b]\", '[red]x' AS c")
    assert p.returncode == 0 and "arr[i]" in p.stdout and "a[/b]" in p.stdout and "[red]x" in p.stdout, p.stderr
    p = sql(home, "SELECT database_name FROM duckdb_databases() ORDER BY 1")
    assert p.returncode == 0 and "catalog" in p.stdout, p.stderr
    q = "SELECT dump, count(*) AS n FROM documents GROUP BY dump ORDER BY dump"
    expected = {}
    for r in sample_rows():
        expected[r["dump"]] = expected.get(r["dump"], 0) + 1
    rows = json.loads(sql(home, q, "--format", "json").stdout)
    assert rows == [{"dump": k, "n": v} for k, v in sorted(expected.items())]
    assert [json.loads(x) for x in sql(home, q, "--format", "jsonl").stdout.splitlines()] == rows
    assert sql(home, q, "--format", "csv").stdout.splitlines()[1:] == [f'"{k}",{v}' for k, v in sorted(expected.items())]
    # errors: one line, whole
    p = sql(home, "SELEC 1")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "LINE 1: SELEC 1" in p.stderr
    # the status table wraps a long error rather than cutting it
    st = run_cli("--home", str(home.root), "status")
    flat = re.sub(r"[\s│]", "", st.stdout)
    assert re.sub(r"\s", "", LONG_ERROR) in flat, st.stdout


def test_make_lint_checks_tracked_files_only(tmp_path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "ruff").exists() or not shutil.which("make") or not shutil.which("git"):
        pytest.skip("needs make, git and ruff beside this interpreter")

    def lint(d: Path) -> int:
        return subprocess.run(["make", "-C", str(d), "-o", ".venv/.installed", "lint", f"BIN={bin_dir}"],
                              capture_output=True, text=True).returncode

    d = tmp_path / "clone"
    d.mkdir()
    for f in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / f, d / f)
    (d / "good.py").write_text("import os\n\nprint(os.sep)\n")
    subprocess.run(["git", "init", "-q", str(d)], check=True)
    subprocess.run(["git", "-C", str(d), "add", "good.py"], check=True)
    (d / "scratch.py").write_text("import os\n")  # untracked, and lint would fail it
    assert lint(d) == 0
    subprocess.run(["git", "-C", str(d), "add", "scratch.py"], check=True)
    assert lint(d) != 0  # tracked, it fails
    shutil.rmtree(d / ".git")
    assert lint(d) != 0  # no git checkout (an unpacked tarball): every file
