"""Measurements of one prepared home for the scale benchmark: process-tree memory, disk per kind of file,
cold-process query and loader timings, and the checks (no-op rerun, one-shard reprocess, each document once).
Every timing runs the project's own code in a fresh subprocess, so caches of this process never flatter it."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")
SQL = "SELECT dump, count(*) FROM documents GROUP BY dump"
# each dashboard page's catalog queries, as the page calls them (dashboards/queries.py)
PAGES = {
    "pipeline": "q.pipeline(h)",
    "token_stats": "q.token_stats(h)",
    "training": "q.training(h, [r['run_id'] for r in q.runs(h).to_pylist()])",
    "checkpoints": "q.checkpoints(h)",
    # the first query with no snapshot of this catalog state yet (it pays the copy), then as the page runs it:
    # the snapshot taken on a thread when the page opens, before the query is typed
    "sql_box": f"q.run_sql(h, {SQL!r})",
    "sql_box_page_open": f"q.run_sql(h, {SQL!r})",
}
SETUP = {"sql_box_page_open": "t = q.warm_sql(h)\nt and t.join()"}


def child_env(prefect_home: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_HOME=str(prefect_home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PREFECT_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_API_URL", None)  # every point starts its own server, as a user's first run does
    return env


# ---------------------------------------------------------------- memory of a process tree

def _tree_rss(root: int) -> tuple[int, int]:
    """Sum of RSS over `root` and all its descendants, from /proc (shared pages count once per process),
    and the part of it that is the temporary Prefect server (uvicorn) the CLI starts."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = set(), [root]
    kids: dict[int, list[int]] = {}
    for pid, pp in parent.items():
        kids.setdefault(pp, []).append(pid)
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += kids.get(p, [])
    total = server = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
            with open(f"/proc/{p}/cmdline", "rb") as f:
                is_server = b"uvicorn" in f.read()
        except (OSError, IndexError, ValueError):
            continue
        total += rss
        server += rss if is_server else 0
    return total, server


def timed(cmd: list[str], env: dict, log: Path | None = None) -> dict:
    """Run `cmd`; wall seconds, exit code, peak RSS of its process tree (sampled every 0.2 s) and of the
    Prefect server within it, output."""
    peak, done = [0, 0], threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while not done.is_set():
            total, server = _tree_rss(proc.pid)
            peak[:] = max(peak[0], total), max(peak[1], server)
            done.wait(0.2)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.communicate()[0]
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if log:
        log.write_text(out)
    return dict(rc=proc.returncode, wall_s=round(wall, 3), peak_rss_mb=round(peak[0] / 2**20, 1),
                peak_server_rss_mb=round(peak[1] / 2**20, 1), out=out)


def cli(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--home", str(home), *args]


# ---------------------------------------------------------------- disk

def _kind(rel: Path) -> str:
    top = rel.parts[0]
    if top == "shards":
        for suffix, kind in ((".bin", "shards_bin"), (".idx", "shards_idx"), (".docs.parquet", "shard_docs"),
                             (".counts.parquet", "shard_counts"), (".json", "shard_sidecars")):
            if rel.name.endswith(suffix):
                return kind
        return "shards_other"
    return "catalog" if top.startswith("catalog.duckdb") else top


def disk(home: Path) -> dict:
    """Bytes on disk (allocated blocks) per kind of file of the home."""
    out: Counter = Counter()
    for p in home.rglob("*"):
        if p.is_file() and not p.is_symlink():
            out[_kind(p.relative_to(home))] += p.stat().st_blocks * 512
    out["total"] = sum(out.values())
    return dict(sorted(out.items()))


def input_bytes(files: list[Path]) -> int:
    return sum(p.stat().st_size for p in files)


# ---------------------------------------------------------------- cold-process timings

def _py(code: str, env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        return dict(error=(r.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(r.stdout.strip().splitlines()[-1])


def page_times(home: Path, env: dict) -> dict:
    """Each dashboard page's queries in a fresh process: seconds for the calls, import excluded."""
    out = {}
    for name, call in PAGES.items():
        code = ("import json, time\nfrom dashboards import queries as q\nfrom storage.paths import Home\n"
                f"h = Home.from_env({str(home)!r})\n{SETUP.get(name, '')}\nt0 = time.perf_counter()\n{call}\n"
                "print(json.dumps(dict(s=round(time.perf_counter() - t0, 4))))")
        r = _py(code, env)
        out[name] = r.get("s", r.get("error"))
    return out


def loader_rate(home: Path, env: dict, seq_len: int = 1024, n_seq: int = 64, min_s: float = 3.0) -> dict:
    """model/data.py's TokenWindows over every train shard: windows gathered per second on the CPU."""
    code = f"""import json, time
from pathlib import Path
from tokenizers import Tokenizer
from model.data import TokenWindows, find_shards
home = Path({str(home)!r})
t0 = time.perf_counter()
w = TokenWindows(find_shards(home / "shards", "train"), {seq_len},
                 Tokenizer.from_file(str(home / "tokenizer" / "tokenizer.json")).get_vocab_size())
open_s = time.perf_counter() - t0
t0, step = time.perf_counter(), 0
while time.perf_counter() - t0 < {min_s} or step < 20:
    w.batch(0, step, 0, {n_seq})
    step += 1
s = time.perf_counter() - t0
print(json.dumps(dict(windows_per_s=round(step * {n_seq} / s), open_s=round(open_s, 3), shards=len(w.maps),
                      train_tokens=int(sum(m.size for m in w.maps)))))"""
    return _py(code, env)


# ---------------------------------------------------------------- checks

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 24):
            h.update(b)
    return h.hexdigest()


def snapshot(home: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file in the shard and index folders."""
    return {f"{d}/{p.name}": (p.stat().st_mtime_ns, file_sha256(p))
            for d in ("shards", "index") for p in sorted((home / d).iterdir())}


def reprocess_check(before: dict, after: dict, shard_id: int) -> dict:
    """Only the named shard's files may have a new mtime, and every file keeps its bytes."""
    mine = f"_{shard_id:06d}"  # shard_000003.* and index_000003.parquet
    touched = sorted(n for n in before if before[n][0] != after.get(n, (None,))[0])
    return dict(touched=touched, others_untouched=all(mine in n for n in touched) and bool(touched),
                same_bytes=all(before[n][1] == after.get(n, (0, ""))[1] for n in before),
                same_files=sorted(before) == sorted(after))


def expected_kept(files: list[Path]):
    """The input's documents the filters (int_score >= 3) and the exact dedup must keep, in file order,
    computed here without the pipeline's code: first id wins, then first text (own hash seed and length)."""
    import polars as pl
    import pyarrow.parquet as pq

    parts = []
    for i, f in enumerate(files):
        for b in pq.ParquetFile(f).iter_batches(batch_size=65_536, columns=["id", "text", "int_score"]):
            d = pl.from_arrow(b)
            parts.append(d.select(pl.lit(i).alias("file"), "id", "int_score",
                                  pl.col("text").hash(seed=97).alias("h"), pl.col("text").str.len_bytes().alias("n")))
    d = pl.concat(parts).filter(pl.col("int_score") >= 3)
    d = d.filter(pl.col("id").is_first_distinct()).filter(pl.struct("h", "n").is_first_distinct())
    return d.select("file", "id")


def exactly_once(home: Path, files: list[Path]) -> dict:
    """The catalog's kept documents are the expected ones, each once, and the shards hold that many."""
    import polars as pl

    from storage import catalog
    from storage.paths import Home

    h = Home.from_env(home)
    want = expected_kept(files)
    got = pl.from_arrow(catalog.query(h, "SELECT doc_id AS id FROM documents WHERE kept"))
    n_docs = int(catalog.query_rows(h, "SELECT sum(n_docs) FROM shards WHERE status = 'done'")[0][0] or 0)
    missing, unexpected = want.join(got, on="id", how="anti").height, got.join(want, on="id", how="anti").height
    distinct = got["id"].n_unique()
    return dict(expected=want.height, kept=got.height, kept_distinct=distinct, shard_docs=n_docs, missing=missing,
                unexpected=unexpected,
                ok=not missing and not unexpected and got.height == distinct == want.height == n_docs)


def decoded_first_shard(home: Path, first: Path, env: dict) -> dict:
    """Shard 0 (train and val) decoded back to text equals the first file's kept texts, as a multiset."""
    code = f"""import hashlib, json
from collections import Counter
from pathlib import Path
import polars as pl, pyarrow.parquet as pq
from storage.shards import open_shard
home = Path({str(home)!r})
from tokenizers import Tokenizer
tok = Tokenizer.from_file(str(home / "tokenizer" / "tokenizer.json"))
digest = lambda t: hashlib.blake2b(t.encode(), digest_size=16).digest()  # memory: 16 B a document
got = Counter()
for p in sorted((home / "shards").glob("shard_000000.*.bin")):
    s = open_shard(p)
    for a in range(0, s.n_docs, 4096):  # decoded in batches on the tokenizer's threads
        docs = [s.doc(k).tolist() for k in range(a, min(a + 4096, s.n_docs))]
        got.update(map(digest, tok.decode_batch(docs, skip_special_tokens=False)))
d = pl.from_arrow(pq.read_table({str(first)!r}, columns=["id", "text", "int_score"])).filter(pl.col("int_score") >= 3)
want = Counter(map(digest, d.filter(pl.col("id").is_first_distinct()).filter(pl.col("text").is_first_distinct())["text"]))
print(json.dumps(dict(docs=sum(got.values()), ok=got == want)))"""
    return _py(code, env)
