"""User SQL (`langpwt sql`, the dashboard's SQL box): one read-only statement on a catalog snapshot, in a child process.
Each query pays a process start (and, after a commit, a catalog copy); a DuckDB abort or runaway ends only the child."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from storage import catalog
from storage.paths import Home
from storage.user_sql_child import DEADLINE_RC, DEFAULT_MAX_ROWS, DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S

ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
GRACE_S = 5.0  # the child's start-up, before its own time limit begins
ROOT = Path(__file__).resolve().parents[1]


class SqlRefused(ValueError):
    """A statement that would write, or more than one statement."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_rows: int = DEFAULT_MAX_ROWS
    memory_mb: int = DEFAULT_MEMORY_MB


@dataclass
class SqlResult:
    table: pa.Table
    truncated: bool
    seconds: float


def check_read_only(sql: str) -> None:
    """Refuse anything but one SELECT-like statement (the connection is read-only besides)."""
    try:
        stmts = duckdb.extract_statements(sql)
    except duckdb.Error:
        return  # a syntax error: let the query itself report DuckDB's message
    if not stmts:
        raise SqlRefused("empty query")
    if len(stmts) > 1:
        raise SqlRefused(f"one statement at a time (got {len(stmts)})")
    if stmts[0].type not in ALLOWED:
        kind = str(stmts[0].type).rsplit(".", 1)[-1]
        raise SqlRefused(f"refused: {kind} would change the catalog or the files; only read-only "
                         "queries (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) run here")


def one_line(text: str) -> str:
    """A multi-line DuckDB message (a caret under the query, a list of hints) as one line, nothing cut."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _time_limit(limits: Limits) -> duckdb.InterruptException:
    return duckdb.InterruptException(f"Interrupted: the query ran past its time limit ({limits.timeout_s:g} s)")


def _out_of_memory(limits: Limits, message: str) -> duckdb.OutOfMemoryException:
    first = message.splitlines()[0] if message else "allocation failed"
    return duckdb.OutOfMemoryException(f"{first} (the query's memory cap is {limits.memory_mb:,} MB)")


def _reported(head: dict, limits: Limits) -> duckdb.Error:
    """The child's DuckDB error, raised here as the same DuckDB exception type."""
    name, message = head["error"], head["message"]
    if name == "InterruptException":
        return _time_limit(limits)
    if name == "OutOfMemoryException":
        return _out_of_memory(limits, message)
    cls = getattr(duckdb, name, None)
    if not (isinstance(cls, type) and issubclass(cls, duckdb.Error)):
        cls = duckdb.Error
    return cls(message)


def _crash(rc: int, stderr: bytes, limits: Limits) -> duckdb.Error:
    """Why the child died, from its exit status and the last words on its stderr."""
    text = stderr.decode(errors="replace")
    # an uncaught C++ exception prints `what():  {"exception_type": ..., "exception_message": ...}`
    m = re.search(r'"exception_message"\s*:\s*"((?:[^"\\]|\\.)*)"', text)
    last = json.loads(f'"{m.group(1)}"') if m else (text.strip().splitlines() or [""])[-1]
    if rc == DEADLINE_RC:
        return _time_limit(limits)
    if "bad_alloc" in text or "MemoryError" in text:
        return _out_of_memory(limits, last)
    how = f"signal {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit status {rc}"
    return duckdb.FatalException(f"Fatal Error: the query crashed DuckDB ({how}){': ' if last else ''}{last}")


def _child_env() -> dict:
    # the child imports storage.* from this checkout whether or not it is pip-installed
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def _spawn(request: bytes, limits: Limits) -> tuple[int, bytes, bytes]:
    """Run the child; kill it at the deadline, or when this process is interrupted (Ctrl-C)."""
    # its own session: a Ctrl-C at the terminal reaches this process only, which then ends the child
    proc = subprocess.Popen([sys.executable, "-m", "storage.user_sql_child"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_child_env(),
                            start_new_session=True)
    try:
        out, err = proc.communicate(request, timeout=limits.timeout_s + GRACE_S)
    except subprocess.TimeoutExpired:
        raise _time_limit(limits) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def run(home: Home, sql: str, limits: Limits = Limits()) -> SqlResult:
    """Run a user's query. Raises SqlRefused, catalog.CatalogMissing or a duckdb.Error whose message
    is shown as is (InterruptException at the time limit, OutOfMemoryException past the memory cap,
    FatalException when DuckDB crashed the child)."""
    check_read_only(sql)
    t0 = time.perf_counter()
    snap = catalog.snapshot(home)
    request = json.dumps(dict(db=str(snap), sql=sql, **asdict(limits))).encode()
    rc, out, err = _spawn(request, limits)
    head_line, _, body = out.partition(b"\n")
    try:
        head = json.loads(head_line) if rc == 0 else None
    except ValueError:
        head = None
    if head is None:
        raise _crash(rc, err, limits)
    if "error" in head:
        raise _reported(head, limits)
    tbl = pa.ipc.open_stream(body).read_all()
    return SqlResult(tbl, head["truncated"], time.perf_counter() - t0)
