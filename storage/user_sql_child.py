"""The process that runs one user query for storage.user_sql: a catalog snapshot, OS memory cap, own deadline.
Trade-off: it answers on stdout (a JSON line, then an Arrow IPC stream), so nothing else may print there."""
from __future__ import annotations

import json
import os
import resource
import sys
import threading

# the limits every user query gets unless its caller raises them (stdlib-only here: `langpwt --help` reads them)
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ROWS = 10_000
DEFAULT_MEMORY_MB = 2048
MIN_MEMORY_MB = 256  # below this the child cannot even load DuckDB
DEADLINE_RC = 124  # exit status when the query ignored the interrupt and the child ended itself
THREAD_MB = 128  # one DuckDB thread per this much of the cap: each thread's stack and buffers count in it


def cap_memory(memory_mb: int) -> None:
    """RLIMIT_DATA counts what the process can write (heap, anonymous maps, thread stacks), not reserved
    address space, so the cap is close to the memory actually used; DuckDB's own accounting misses
    allocations such as one huge string, which this cap stops as a failed allocation."""
    cap = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def run(req: dict):
    """(Arrow table of at most max_rows rows, truncated) or a raised duckdb.Error."""
    import duckdb
    import pyarrow as pa

    from storage.catalog import SANDBOX

    mb, max_rows = req["memory_mb"], req["max_rows"]
    threads = max(1, min(os.cpu_count() or 1, mb // THREAD_MB))
    config = dict(SANDBOX, memory_limit=f"{mb // 2}MB", threads=str(threads))
    con = duckdb.connect(req["db"], read_only=True, config=config)
    con.execute("SET enable_progress_bar = false")  # it would write to the terminal
    con.execute("SET lock_configuration = true")  # no query may raise its own limits
    timer = threading.Timer(req["timeout_s"], con.interrupt)
    timer.start()
    # a query that never checks for the interrupt (one long allocation) still ends here
    threading.Timer(req["timeout_s"] + 1.0, os._exit, (DEADLINE_RC,)).start()
    try:
        rel, batches, n = con.sql(req["sql"]), [], 0
        if rel is None:
            return pa.table({}), False
        # stop reading once past the cap: a million-row SELECT costs no more than the cap
        for batch in rel.to_arrow_reader(min(max_rows + 1, 100_000)):
            batches.append(batch)
            n += batch.num_rows
            if n > max_rows:
                break
        tbl = pa.Table.from_batches(batches) if batches else rel.to_arrow_table()
    finally:
        timer.cancel()
    return tbl.slice(0, max_rows), tbl.num_rows > max_rows


def answer(out, head: dict, tbl=None) -> None:
    out.write(json.dumps(head).encode() + b"\n")
    if tbl is not None:
        import pyarrow as pa

        with pa.ipc.new_stream(out, tbl.schema) as w:
            w.write_table(tbl)
    out.flush()


def main() -> int:
    req = json.loads(sys.stdin.buffer.read())
    cap_memory(req["memory_mb"])
    import duckdb

    out = sys.stdout.buffer
    try:
        tbl, truncated = run(req)
        answer(out, {"truncated": truncated}, tbl)
    except duckdb.Error as e:
        answer(out, {"error": type(e).__name__, "message": str(e)})
    except MemoryError as e:  # Python or Arrow past the cap while holding the result
        answer(out, {"error": "OutOfMemoryException", "message": f"{type(e).__name__}: {e}"})
    # daemon-less timers would keep the process alive until the deadline: leave now
    os._exit(0)


if __name__ == "__main__":
    main()
