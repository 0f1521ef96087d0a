"""Dashboard benchmark: N synthetic `documents` rows (default 10M), each page's queries and render timed.
Rows are generated inside DuckDB in seconds; shape like sample-10BT (14 files, 4 dumps, long-tailed lengths)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboards import queries  # noqa: E402
from storage import catalog  # noqa: E402
from storage.paths import Home  # noqa: E402

N_SHARDS, VOCAB, STEPS = 14, 48_951, 5000


def build(home: Home, rows: int) -> float:
    t0 = time.perf_counter()
    per = -(-rows // N_SHARDS)
    with catalog.writer(home) as con:
        con.execute("SET preserve_insertion_order = false")
        con.execute(f"""
        INSERT INTO documents
        SELECT format('<urn:uuid:{{:012x}}>', i), format('{{:03d}}_00000.parquet', i // {per}),
               (i // {per})::INTEGER, CASE WHEN h % 200 = 0 THEN 'val' ELSE 'train' END,
               ['CC-MAIN-2023-50', 'CC-MAIN-2024-10', 'CC-MAIN-2024-18', 'CC-MAIN-2024-22'][1 + h7 % 4],
               format('https://site{{}}.example/{{}}', h % 50000, i), format('site{{}}.example', h % 50000),
               score, 0.6 + (h7 % 400) / 1000.0, n_chars, CASE WHEN kept THEN n_chars // 4 END, kept,
               CASE WHEN kept THEN NULL WHEN score < 3 THEN 'low_int_score'
                    WHEN h % 2 = 0 THEN 'dup_text' ELSE 'dup_id' END
        FROM (SELECT *, h3 % 6 >= 3 AND h7 % 50 <> 0 AS kept,
                     (200 + exp((h11 % 1000) / 160.0) * 30)::BIGINT AS n_chars, h3 % 6 AS score
              FROM (SELECT i, (hash(i) % 1000000)::BIGINT AS h, (hash(i * 7) % 1000000)::BIGINT AS h7,
                           (hash(i * 3) % 1000000)::BIGINT AS h3, (hash(i * 11) % 1000000)::BIGINT AS h11
                    FROM range({rows}) t(i)))""")
        con.execute(f"""
        INSERT INTO shards SELECT s, split, format('{{:03d}}_00000.parquet', s),
               format('/shards/shard_{{:06d}}.{{}}.bin', s, split),
               count(*), sum(n_tokens) + count(*), 'x', 'y', 'z', 'c', 'done', NULL, now(), now(), 60.0, 'flow'
        FROM documents d, (SELECT range AS s FROM range({N_SHARDS})) WHERE d.shard_id = s AND kept
        GROUP BY s, split""")
        con.execute(f"""INSERT INTO source_files SELECT format('{{:03d}}_00000.parquet', s), s, '/raw', 2000000000,
                       'sha', 'verified', NULL, 'HuggingFaceFW/fineweb-edu', 'main', NULL, now(), 30.0
                       FROM range({N_SHARDS}) t(s)""")
        con.execute(f"""INSERT INTO token_counts SELECT s, split, t, (1e7 / (t + 10))::BIGINT
                       FROM range({N_SHARDS}) a(s), (VALUES ('train'), ('val')) b(split), range({VOCAB}) c(t)""")
        con.execute("""INSERT INTO pipeline_runs VALUES ('r1', 'prepare', '{"source": "x"}', 'completed',
                       now() - INTERVAL 1 HOUR, now(), '{"tokens": 1, "built": 14, "skipped": 0, "failed": {}}')""")
        for run in ("seed-a", "seed-b"):
            con.execute("INSERT INTO runs VALUES (?, 'seed', '{}', 'completed', now(), now(), 'f', 'cuda', NULL)",
                        [run])
            con.execute(f"""INSERT INTO metrics SELECT ?, s, 10 * exp(-s / 800.0) + 3, CASE WHEN s % 1000 = 0
                           THEN 10 * exp(-s / 800.0) + 3.1 END, 1e-3, 1.0, 1.5e6, 0.45, 20.0, s * 65536, s * 0.05
                           FROM range(1, {STEPS + 1}) t(s)""", [run])
            con.execute("""INSERT INTO checkpoints SELECT ?, s, '/ckpt', 3.2, 'sha', 150000000, now(), 'f'
                           FROM (VALUES (2500), (5000)) t(s)""", [run])
    return time.perf_counter() - t0


def train_tokenizer(home: Home) -> None:
    """A small byte-level BPE from the bundled sample, so the Token stats page decodes its top tokens."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [t for p in sorted((ROOT / "data" / "sample").glob("*.parquet"))
             for t in pq.read_table(p, columns=["text"])["text"].to_pylist()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    home.tokenizer_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(home.tokenizer))


def locked_copy(home: Home) -> None:
    with tempfile.TemporaryDirectory(dir=home.root) as d:
        catalog._copy_locked(home, Path(d) / "catalog.duckdb")


PAGES = {
    "Pipeline": lambda h: queries.pipeline(h),
    "Token stats": lambda h: queries.token_stats(h),
    "Token stats: SQL box (GROUP BY dump)": lambda h: queries.run_sql(
        h, "SELECT dump, sum(n_tokens) AS tokens FROM documents WHERE kept GROUP BY dump"),
    # the catalog's mtime changes as a commit would: the guard copies it once, under a read lock
    "SQL box, first query after a commit (catalog copy)": lambda h: (os.utime(h.catalog), queries.run_sql(
        h, "SELECT dump, sum(n_tokens) AS tokens FROM documents WHERE kept GROUP BY dump")),
    "Catalog copy under the read lock (the most a writer waits on user SQL)": lambda h: locked_copy(h),
    "Training": lambda h: (queries.runs(h), queries.training(h, ["seed-a", "seed-b"])),
    "Checkpoints": lambda h: queries.checkpoints(h),
    "Playground (checkpoint list)": lambda h: queries.checkpoints(h),
}
PAGE_FILES = {"Pipeline": "page_pipeline.py", "Token stats": "page_token_stats.py",
              "Training": "page_training.py", "Checkpoints": "page_checkpoints.py",
              "Playground": "page_playground.py"}


def time_queries(home: Home, repeat: int) -> dict[str, list[float]]:
    out = {}
    for name, fn in PAGES.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(home)
            times.append(time.perf_counter() - t0)
        out[name] = times
    return out


def time_pages(home: Home) -> dict[str, tuple[float, float]]:
    """(first render with an empty cache, second render) per page, via AppTest in this process."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    os.environ["LANGPWT_HOME"] = str(home.root)
    out = {}
    for name, page in PAGE_FILES.items():
        at = AppTest.from_file(str(ROOT / "dashboards" / "streamlit_app.py"), default_timeout=60)
        at.run()
        st.cache_data.clear()
        at.switch_page(page)
        t0 = time.perf_counter()
        at.run()
        cold = time.perf_counter() - t0
        assert not at.exception, [e.value for e in at.exception]
        t0 = time.perf_counter()
        at.run()
        out[name] = (cold, time.perf_counter() - t0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description="python benchmarks/dashboard_bench.py [--rows N] [--home DIR]: "
                                "time the dashboard's pages over a synthetic catalog")
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--home", help="reuse or create the synthetic home here (default: a temp dir)")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    tmp = None if a.home else tempfile.TemporaryDirectory(prefix="dashbench-")
    home = Home.from_env(a.home or tmp.name)
    if home.catalog.exists():
        print(f"reusing {home.catalog}")
    else:
        print(f"building {a.rows:,} documents in {home.catalog} …", flush=True)
        print(f"built in {build(home, a.rows):.1f} s, {home.catalog.stat().st_size / 2**20:.0f} MiB")
    if not home.tokenizer.exists():
        train_tokenizer(home)
    n = catalog.query_rows(home, "SELECT count(*) FROM documents")[0][0]
    print(f"\n{n:,} documents, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    print("| page | queries, cold connection: median (min–max) of %d |" % a.repeat)
    print("|---|---|")
    for name, ts in time_queries(home, a.repeat).items():
        print(f"| {name} | {statistics.median(ts) * 1000:.0f} ms ({min(ts) * 1000:.0f}–{max(ts) * 1000:.0f}) |")
    print("\n| page | AppTest render, empty cache | cached |")
    print("|---|---|---|")
    for name, (cold, warm) in time_pages(home).items():
        print(f"| {name} | {cold * 1000:.0f} ms | {warm * 1000:.0f} ms |")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
