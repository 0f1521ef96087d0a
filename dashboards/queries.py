"""Every catalog query the dashboard runs, as plain functions over a Home (no Streamlit: tested alone).
Fixed queries: one short read-only connection per page (small aggregates); user SQL: storage.user_sql's guard."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from storage import catalog, user_sql
from storage.paths import Home
from storage.user_sql import SqlRefused, SqlResult, check_read_only  # noqa: F401  (the SQL box's API)

Views = dict[str, pa.Table]
SQL_MAX_ROWS = user_sql.DEFAULT_MAX_ROWS
SQL_TIMEOUT_S = user_sql.DEFAULT_TIMEOUT_S
SQL_MEMORY_MB = user_sql.DEFAULT_MEMORY_MB


@dataclass(frozen=True)
class HomeState:
    catalog: bool
    shards: int = 0
    documents: int = 0
    runs: int = 0
    checkpoints: int = 0
    tokenizer: bool = False


def catalog_version(home: Home) -> tuple[int, int]:
    """Changes whenever a writer commits (DuckDB touches the file or its WAL): a cache key."""
    out = []
    for p in (home.catalog, Path(f"{home.catalog}.wal")):
        try:
            out.append(p.stat().st_mtime_ns)
        except FileNotFoundError:
            out.append(0)
    return out[0], out[1]


def catalog_idle_s(home: Home) -> float:
    """Seconds since the catalog last changed (inf when there is none)."""
    newest = max(catalog_version(home))
    return (time.time_ns() - newest) / 1e9 if newest else float("inf")


def home_state(home: Home) -> HomeState:
    try:
        with catalog.reader(home) as con:
            row = con.execute("""SELECT (SELECT count(DISTINCT shard_id) FROM shards),
                                        (SELECT count(*) FROM documents), (SELECT count(*) FROM runs),
                                        (SELECT count(*) FROM checkpoints)""").fetchone()
    except catalog.CatalogMissing:  # no file, or one whose first transaction has not committed
        return HomeState(catalog=False, tokenizer=home.tokenizer.exists())
    return HomeState(True, *row, tokenizer=home.tokenizer.exists())


def _tables(home: Home, queries: dict[str, str | tuple[str, list]]) -> Views:
    """Run the queries in order on one connection. Each result is visible to the later ones under
    its name, so one scan of `documents` into a small `_grouped` table feeds several views; names
    starting with `_` are such intermediates and are not returned."""
    with catalog.reader(home) as con:
        out = {}
        for name, q in queries.items():
            sql, params = q if isinstance(q, tuple) else (q, None)
            out[name] = con.sql(sql, params=params).to_arrow_table()
            con.register(name, out[name])
        return {k: v for k, v in out.items() if not k.startswith("_")}


def pipeline_alive(home: Home) -> bool:
    """Whether some process holds the home's pipeline lock right now.
    Looks the flock up in /proc/locks rather than probing it: a probe could make a starting run
    fail. Where /proc/locks is missing, falls back to "the pid written in the lock file exists"."""
    try:
        st = home.lock.stat()
    except FileNotFoundError:
        return False
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _pid_alive(home)
    for line in table.splitlines():
        f = line.split()
        if len(f) > 5 and f[1] == "FLOCK" and f[3] == "WRITE":
            maj, mnr, ino = f[5].split(":")
            if (int(ino), int(maj, 16), int(mnr, 16)) == (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)):
                return True
    return False


def _pid_alive(home: Home) -> bool:
    try:
        pid = int(home.lock.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- Pipeline page -------------------------------------------------------------------------------

SHARDS_SQL = """
WITH s AS (
    SELECT shard_id, any_value(source_file) AS source_file,
           CASE WHEN min(status) = max(status) THEN min(status) ELSE 'partial' END AS status,
           sum(n_docs)::BIGINT AS docs_kept, sum(n_tokens)::BIGINT AS tokens,
           sum(n_tokens) FILTER (WHERE split = 'train')::BIGINT AS train_tokens,
           sum(n_tokens) FILTER (WHERE split = 'val')::BIGINT AS val_tokens,
           max(seconds) AS seconds, min(started_at) AS started_at, max(finished_at) AS finished_at,
           any_value(error) FILTER (WHERE error IS NOT NULL) AS error
    FROM shards GROUP BY shard_id),
d AS (SELECT shard_id, count(*) AS docs_in, sum((NOT kept)::INT)::BIGINT AS docs_dropped
      FROM documents GROUP BY shard_id)
SELECT s.shard_id, s.source_file, s.status, d.docs_in, s.docs_kept, d.docs_dropped, s.tokens,
       s.train_tokens, s.val_tokens, round(s.seconds, 3) AS seconds,
       round(s.tokens / nullif(s.seconds, 0)) AS tokens_per_s, s.started_at, s.finished_at, s.error
FROM s LEFT JOIN d USING (shard_id) ORDER BY s.shard_id"""

FILES_SQL = """
SELECT f.position AS shard_id, f.file, f.status, f.size_bytes, f.sha256, f.dataset, f.revision,
       f.downloaded_at, round(f.seconds, 2) AS download_seconds, f.error
FROM source_files f ORDER BY f.position, f.file"""

# The pipeline sets drop_reason exactly when it drops a document, so grouping on that one column
# gives kept and dropped by reason; one key per scan: single-key GROUP BYs and sum(bool::INT) beat
# composite keys and FILTER clauses on large catalogs (benchmarks/RESULTS.md)
OUTCOMES_SQL = """
SELECT coalesce(drop_reason, 'kept') AS outcome, count(*) AS documents, sum(n_chars)::BIGINT AS chars
FROM documents GROUP BY drop_reason ORDER BY drop_reason IS NULL DESC, documents DESC"""

# runs on one home never overlap (its pipeline lock), so a `running` row older than the newest run
# is one that died without updating it
RUNS_SQL = """
SELECT run_id, flow,
       CASE WHEN status = 'running' AND started_at < max(started_at) OVER () THEN 'interrupted'
            ELSE status END AS status, started_at, finished_at,
       round(epoch(coalesce(finished_at, now()::TIMESTAMP) - started_at), 1) AS seconds,
       TRY_CAST(json_extract(counts, '$.tokens') AS BIGINT) AS tokens,
       TRY_CAST(json_extract(counts, '$.built') AS BIGINT) AS built,
       TRY_CAST(json_extract(counts, '$.skipped') AS BIGINT) AS skipped,
       json_extract(counts, '$.failed')::VARCHAR AS failed,
       json_extract_string(counts, '$.error') AS error,
       json_extract_string(params, '$.source') AS source
FROM pipeline_runs ORDER BY started_at DESC LIMIT 50"""


def pipeline(home: Home) -> Views:
    """Tables `shards`, `files`, `outcomes`, `runs` and a one-row `totals`."""
    v = _tables(home, {"shards": SHARDS_SQL, "files": FILES_SQL, "outcomes": OUTCOMES_SQL, "runs": RUNS_SQL})
    sh = v["shards"].to_pylist()
    done = [r for r in sh if r["status"] == "done"]
    tokens = sum(r["tokens"] or 0 for r in done)
    secs = sum(r["seconds"] or 0 for r in done)
    v["totals"] = pa.Table.from_pylist([dict(
        shards=len(sh), done=len(done), failed=sum(r["status"] == "failed" for r in sh),
        stale=sum(r["status"] == "stale" for r in sh), running=sum(r["status"] == "running" for r in sh),
        tokens=tokens, docs_kept=sum(r["docs_kept"] or 0 for r in done),
        docs_dropped=sum(r["docs_dropped"] or 0 for r in sh), shard_seconds=round(secs, 2),
        tokens_per_s=round(tokens / secs) if secs else None)])
    return v


def is_running(views: Views) -> bool:
    return views["totals"]["running"][0].as_py() > 0 or "running" in views["runs"]["status"].to_pylist()


# ---- Token stats page ----------------------------------------------------------------------------

# the exact length distribution (a few thousand distinct lengths) is fetched once; the histogram's
# bin width (from its 99th percentile) and bins are computed from it, not from 10M rows again
LENGTHS_SQL = """
SELECT n_tokens, count(*) AS n FROM documents WHERE kept AND n_tokens IS NOT NULL GROUP BY n_tokens"""

HIST_SQL = """
WITH c AS (SELECT n_tokens, n, sum(n) OVER (ORDER BY n_tokens) AS cum, sum(n) OVER () AS total FROM _lengths),
b AS (SELECT greatest(1, ceil(min(n_tokens) / ?))::BIGINT AS width FROM c WHERE cum >= 0.99 * total)
SELECT least(n_tokens // width, ?) * width AS lo,
       CASE WHEN n_tokens // width >= ? THEN NULL ELSE (n_tokens // width + 1) * width END AS hi,
       sum(n)::BIGINT AS documents
FROM _lengths, b GROUP BY ALL ORDER BY lo"""


def token_stats(home: Home, top_n: int = 40, bins: int = 40) -> Views:
    """Tokens by dump and by int_score, a document-length histogram (last bin: the top 1 %),
    and the most frequent token ids with their share of all tokens."""
    return _tables(home, {
        "_lengths": LENGTHS_SQL,
        "by_dump": """SELECT dump, count(*) AS documents, sum(n_tokens)::BIGINT AS tokens FROM documents
                      WHERE kept GROUP BY dump ORDER BY dump""",
        # n_tokens is set only for kept documents, so sum(n_tokens) needs no CASE (a CASE per row costs a scan)
        "by_int_score": """SELECT int_score, kept AS documents_kept, documents - kept AS documents_dropped, tokens
                           FROM (SELECT int_score, count(*) AS documents, sum(kept::INT)::BIGINT AS kept,
                                        coalesce(sum(n_tokens), 0)::BIGINT AS tokens
                                 FROM documents GROUP BY int_score) ORDER BY int_score""",
        "length_hist": (HIST_SQL, [bins, bins, bins]),
        "top_tokens": ("""WITH t AS (SELECT token_id, sum(count)::BIGINT AS count FROM token_counts GROUP BY token_id)
                          SELECT token_id, count, count / sum(count) OVER () AS share
                          FROM t ORDER BY count DESC, token_id LIMIT ?""", [top_n]),
    })


def decode_tokens(tokenizer, ids: list[int]) -> list[tuple[str, str]]:
    """(vocabulary piece, decoded text) per id, whitespace made visible; `tokenizer` is a
    tokenizers.Tokenizer or the path of a tokenizer.json."""
    if isinstance(tokenizer, (str, Path)):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer))
    tok, out = tokenizer, []
    for i in ids:
        text = tok.decode([i], skip_special_tokens=False)
        out.append((tok.id_to_token(i) or "", text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥")))
    return out


# ---- SQL box -------------------------------------------------------------------------------------

def run_sql(home: Home, sql: str, max_rows: int = SQL_MAX_ROWS, timeout_s: float = SQL_TIMEOUT_S) -> SqlResult:
    """A user's query through the guard `langpwt sql` uses: its own process, on a catalog snapshot,
    at most `max_rows` rows, `timeout_s` and the default memory cap. Raises SqlRefused,
    catalog.CatalogMissing or duckdb.Error (whose message is shown as is)."""
    return user_sql.run(home, sql, user_sql.Limits(timeout_s=timeout_s, max_rows=max_rows))


def warm_sql(home: Home) -> threading.Thread | None:
    """Take the SQL box's catalog snapshot on a thread when the catalog's current state has none, while the
    user is still typing: the first query after a commit then pays no copy. None when there is nothing to do."""
    if not home.catalog.exists() or catalog.snapshot_ready(home):
        return None
    t = threading.Thread(target=_warm, args=(home,), name="langpwt-sql-snapshot", daemon=True)
    t.start()
    return t


def _warm(home: Home) -> None:
    # a failure here is the query's to report, when it is run
    with contextlib.suppress(catalog.CatalogMissing, duckdb.Error, OSError):
        catalog.snapshot(home)


# ---- Training, checkpoints, samples --------------------------------------------------------------

RUN_SUMMARY_SQL = """
WITH m AS (SELECT run_id, max(step) AS last_step, arg_max(train_loss, step) AS train_loss,
                  min(val_loss) AS best_val_loss, max(tokens) AS tokens, median(tokens_per_s) AS tokens_per_s,
                  median(mfu) AS mfu, max(elapsed_s) AS elapsed_s
           FROM metrics GROUP BY run_id)
SELECT r.run_id, r.preset, r.status, r.device, m.last_step, m.train_loss, m.best_val_loss, m.tokens,
       round(m.tokens_per_s) AS tokens_per_s, m.mfu, round(m.elapsed_s, 1) AS elapsed_s,
       r.started_at, r.finished_at, r.flow_run_id, r.error
FROM runs r LEFT JOIN m USING (run_id) ORDER BY r.started_at DESC NULLS LAST, r.run_id"""

# train-side series are averaged in buckets so a 100k-step run still sends ~max_points rows
CURVE_SQL = """
WITH m AS (SELECT * FROM metrics WHERE list_contains(?, run_id)),
n AS (SELECT run_id, greatest(1, ceil(max(step) / ?))::BIGINT AS k FROM m GROUP BY run_id)
SELECT run_id, max(step) AS step, avg(train_loss) AS train_loss, avg(lr) AS lr,
       avg(tokens_per_s) AS tokens_per_s, avg(mfu) AS mfu, max(tokens) AS tokens
FROM m JOIN n USING (run_id) GROUP BY run_id, step // k ORDER BY run_id, step"""


def runs(home: Home) -> pa.Table:
    return _tables(home, {"runs": RUN_SUMMARY_SQL})["runs"]


def training(home: Home, run_ids: list[str], max_points: int = 1000) -> Views:
    """`curves` (bucketed train loss, lr, tokens/s, MFU), `val` (every periodic evaluation: loss and the bpb of its
    sampled windows), `whole` (val bpb over the whole split, with the split's identity), `samples`."""
    return _tables(home, {
        "curves": (CURVE_SQL, [run_ids, max_points]),
        "val": ("""SELECT run_id, step, val_loss, val_bpb FROM metrics WHERE list_contains(?, run_id)
                   AND val_loss IS NOT NULL ORDER BY run_id, step""", [run_ids]),
        "whole": ("""SELECT run_id, step, value AS val_bpb, split_id, split_size FROM evals
                     WHERE list_contains(?, run_id) AND task = 'bpb' AND metric = 'val_bpb'
                     QUALIFY row_number() OVER (PARTITION BY run_id, step, split_id ORDER BY created_at DESC) = 1
                     ORDER BY run_id, step""", [run_ids]),
        "samples": ("""SELECT run_id, step, prompt, text FROM samples WHERE list_contains(?, run_id)
                       ORDER BY run_id, step DESC""", [run_ids]),
    })


def comparable(whole: pa.Table) -> bool:
    """Whether the runs' whole-split bpb values were measured on one val split (same token count and sha256):
    numbers of different splits are not compared."""
    return len(set(whole.column("split_id").to_pylist())) <= 1


def evaluations(home: Home, run_id: str, step: int) -> pa.Table:
    """Every evaluation recorded for one checkpoint, newest first within a task and metric."""
    return _tables(home, {"evals": ("""
        SELECT task, metric, value, stderr, n, split_id, split_size, device, seconds, created_at FROM evals
        WHERE run_id = ? AND step = ? ORDER BY task, metric, created_at DESC""", [run_id, step])})["evals"]


def checkpoints(home: Home) -> pa.Table:
    return _tables(home, {"ckpt": """
        SELECT c.run_id, c.step, c.val_loss, c.size_bytes, c.sha256, c.created_at, c.path,
               coalesce(c.flow_run_id, r.flow_run_id) AS flow_run_id, r.preset, r.status AS run_status
        FROM checkpoints c LEFT JOIN runs r USING (run_id)
        ORDER BY c.created_at DESC NULLS LAST, c.run_id, c.step DESC"""})["ckpt"]
