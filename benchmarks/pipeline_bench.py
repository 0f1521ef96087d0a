"""Data pipeline throughput on ≥ 100 MB of real text: ours end to end vs a build-nanogpt-style pool, vs the bare encoder.
Each measurement runs in a fresh subprocess (fastokens warms a per-process cache, so every timed run sees unseen text).

Run: .venv/bin/python benchmarks/pipeline_bench.py [--repeats 3] [--quick] [--no-flow] [--mb 480] [--pairs 8 [--floor]]
Targets (issue 2): ours ≥ 5× baseline tokens/s; ours ≥ 60 % of the bare encoder; peak RSS ≤ 1.5 GB on one
≥ 100 MB source file; `SELECT dump, sum(n_tokens) FROM documents GROUP BY 1` over 10M rows < 1 s."""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline_corpus import (N_FILES, OUT, ROOT, build_big4, build_corpus, parquet_files, tiktoken_from, train_once,
                             verify_ids)

sys.path.insert(0, str(ROOT))  # the project's packages, imported inside the children
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
SQL = "SELECT dump, sum(n_tokens) FROM documents GROUP BY 1"


# ---------------------------------------------------------------- children (each in a fresh process)

def _rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space exec made; ru_maxrss would carry
    over the parent's peak at fork (Linux keeps it across execve), e.g. a tokenizer trained just before."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the pool's workers): on a shared machine,
    tokens per CPU-second moves far less with other people's load than tokens per wall second."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


_ENC = None


def _nano_init(tok_json: str):
    global _ENC
    _ENC = tiktoken_from(Path(tok_json))


def _nano_tokenize(text: str):
    import numpy as np
    tokens = [_ENC.eot_token]
    tokens.extend(_ENC.encode_ordinary(text))
    arr = np.array(tokens)
    assert (0 <= arr).all() and (arr < 2**16).all(), "token dictionary too large for uint16"
    return arr.astype(np.uint16)


def child_baseline(corpus: Path, tok_json: Path, out: Path) -> dict:
    """build-nanogpt's fineweb.py, reading our parquet with pyarrow instead of `datasets`."""
    import multiprocessing as mp

    import numpy as np
    import pyarrow.parquet as pq

    from storage.shards import _header

    shard_size = 10**8  # fineweb.py's: 100M tokens per shard
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def docs():
        for f in parquet_files(corpus):
            for b in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=["text"]):
                yield from b.column(0).to_pylist()

    def write(i: int, toks: np.ndarray):
        with open(out / f"nano_{'val' if i == 0 else 'train'}_{i:06d}.bin", "wb") as fh:
            fh.write(_header(len(toks), np.dtype(np.uint16)))
            fh.write(toks.tobytes())

    t0, c0 = time.perf_counter(), _cpu()
    total = ndocs = 0
    with mp.Pool(os.cpu_count(), initializer=_nano_init, initargs=(str(tok_json),)) as pool:
        shard, buf, count = 0, np.empty((shard_size,), dtype=np.uint16), 0
        for tokens in pool.imap(_nano_tokenize, docs(), chunksize=16):
            ndocs += 1
            total += len(tokens)
            if count + len(tokens) < shard_size:
                buf[count:count + len(tokens)] = tokens
                count += len(tokens)
            else:
                rem = shard_size - count
                buf[count:count + rem] = tokens[:rem]
                write(shard, buf)
                shard += 1
                buf[0:len(tokens) - rem] = tokens[rem:]
                count = len(tokens) - rem
        if count:
            write(shard, buf[:count])
    pool.join()  # reaped, so their CPU time is counted
    return dict(seconds=time.perf_counter() - t0, cpu_s=_cpu() - c0, tokens=total, docs=ndocs, rss_mb=_rss_mb())


def child_ours(corpus: Path, tok_json: Path, home_dir: Path) -> dict:
    """flows/tokenize.py `tokenize` without Prefect: the same scheduler (tasks/schedule.py) with its steps in a
    thread pool of 2, from listing the files to the pipeline_runs row. The tokenizer file is given
    (`--tokenizer`), so no training; copying and loading it (one Encoder per process) is timed, and, as in the
    flow, done before any read: each file is read once (scan + encode), then finished."""
    from concurrent.futures import ThreadPoolExecutor

    from flows.runtime import arrow_allocator
    from storage import shard_catalog, sources
    from storage.paths import Home
    from tasks.finish import build_shard
    from tasks.params import TokenizeParams
    from tasks.schedule import Steps, TokenizeRun
    from tasks.stage import scan_step
    from tasks.tokenizer import home_vocab, preload_tokenizer, resolve_tokenizer

    shutil.rmtree(home_dir, ignore_errors=True)
    arrow_allocator()                                                                    # the flow's start
    home = Home(home_dir.resolve()).ensure()
    params = TokenizeParams(source=str(corpus), tokenizer=str(tok_json), home=str(home.root))
    fcfg = params.filter_config()
    t0, c0 = time.perf_counter(), _cpu()
    started = shard_catalog.utcnow()
    preload_tokenizer(home.tokenizer, str(tok_json))                                     # warm_tokenizer
    files = sources.list_local(corpus)                                                   # local_files
    shard_catalog.record_pipeline_run(home, "bench", "tokenize", {}, "running", started)
    with ThreadPoolExecutor(int(os.environ.get("BENCH_WORKERS", "2"))) as ex:
        steps = Steps(scan=lambda src, tok: ex.submit(scan_step, home, src, fcfg, tok),
                      train_tokenizer=lambda usable: resolve_tokenizer(
                          home.tokenizer, usable, fcfg, params.tokenizer_config(home_vocab(home.tokenizer)),
                          params.tokenizer),
                      build=lambda job: ex.submit(build_shard, home, job, False),
                      finish=lambda job: build_shard(home, job, True))
        summary = TokenizeRun(home, params, files, steps, listed=True).run()
    if summary["failed"]:
        raise SystemExit(f"ours failed: {summary['failed']}")
    shard_catalog.record_pipeline_run(home, "bench", "tokenize", {}, "completed", started, {})
    return dict(seconds=time.perf_counter() - t0, cpu_s=_cpu() - c0, tokens=summary["tokens"],
                docs=summary["kept"], dropped=summary["docs_in"] - summary["kept"], rss_mb=_rss_mb())


def child_bare(corpus: Path, tok_json: Path) -> dict:
    """Encoder.encode_flat alone on the pipeline's own batches of the same texts, already in memory."""
    from tasks.read import iter_batches
    from tasks.tokenize import COLUMNS
    from tasks.tokenizer import Encoder

    batches = [t.column("text").to_pylist() for f in parquet_files(corpus) for t in iter_batches(f, COLUMNS)]
    enc = Encoder(tok_json)
    t0, c0 = time.perf_counter(), _cpu()
    total = 0
    for texts in batches:
        ids, _ = enc.encode_flat(texts)
        total += ids.size + len(texts)  # + one <|endoftext|> per document, as the shards hold
    return dict(seconds=time.perf_counter() - t0, cpu_s=_cpu() - c0, tokens=total, docs=sum(map(len, batches)),
                rss_mb=_rss_mb())


def child_floor(corpus: Path, tok_json: Path) -> dict:
    """The least any pipeline built from these parts does: load the encoder, read each file with the same
    Arrow reader, turn its text into `str`, encode with the `<|endoftext|>` template, two threads over the
    files as ours. No filter, no shards, no hashes, no catalog: ours minus all of that."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from tasks.read import iter_batches
    from tasks.tokenize import COLUMNS
    from tasks.tokenizer import Encoder

    t0, c0 = time.perf_counter(), _cpu()
    enc = Encoder(tok_json)

    def one(f: Path) -> int:
        n = 0
        for t in iter_batches(f, COLUMNS):
            for toks, _ in enc.encode_docs(t.column("text").to_pylist(), np.uint16):
                n += toks.size
        return n

    with ThreadPoolExecutor(int(os.environ.get("BENCH_WORKERS", "2"))) as ex:
        total = sum(ex.map(one, parquet_files(corpus)))
    return dict(seconds=time.perf_counter() - t0, cpu_s=_cpu() - c0, tokens=total, rss_mb=_rss_mb())


def child_sql(home_dir: Path, rows: int, reps: int) -> dict:
    """10M synthetic `documents` rows written through catalog.writer with DuckDB's range(); timed via query()."""
    from storage import catalog
    from storage.paths import Home

    home = Home(home_dir.resolve())
    marker = home_dir / f"rows_{rows}"
    if not marker.exists():
        shutil.rmtree(home_dir, ignore_errors=True)
        home_dir.mkdir(parents=True)
        with catalog.writer(home) as con:
            con.execute(f"""INSERT INTO documents SELECT
                '<urn:uuid:' || i || '>', 'f' || (i // 1000000) || '.parquet', (i // 1000000)::INT,
                CASE WHEN i % 200 = 0 THEN 'val' ELSE 'train' END, 'CC-MAIN-20' || (13 + i % 12) || '-' || (i % 52),
                'https://example' || (i % 5000) || '.org/p/' || i, 'example' || (i % 5000) || '.org',
                3 + i % 3, 0.6 + (i % 400) / 1000.0, 500 + (i * 7919) % 20000, 100 + (i * 104729) % 5000,
                true, NULL FROM range({rows}) t(i)""")
        marker.touch()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        tbl = catalog.query(home, SQL)  # open + query + close, as `langpwt sql` does
        times.append(time.perf_counter() - t0)
    return dict(times=times, groups=tbl.num_rows, rows=rows)


def run_child(role: str, *args, timeout: int = 1200) -> dict:
    cmd = [sys.executable, __file__, "--child", role, *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{role} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_flow(corpus: Path, tok_json: Path, home_dir: Path) -> dict:
    """The real `langpwt tokenize` (Prefect flow, ephemeral API server): wall time includes orchestration."""
    shutil.rmtree(home_dir, ignore_errors=True)
    env = dict(os.environ, PREFECT_HOME=str(OUT / "prefect_home"), PREFECT_LOGGING_LEVEL="WARNING")
    cmd = [str(Path(sys.executable).parent / "langpwt"), "--home", str(home_dir), "tokenize",
           "--source", str(corpus), "--tokenizer", str(tok_json)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"langpwt tokenize failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    last = [ln for ln in p.stdout.splitlines() if "shards built" in ln][-1]
    tokens = int(last.split(" tokens")[0].split(", ")[-1].replace(",", ""))
    return dict(seconds=wall, flow_body_s=float(last.rsplit(", ", 1)[-1].rstrip(" s")), tokens=tokens)


# ---------------------------------------------------------------- main

def med(xs):
    return statistics.median(xs)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="16 MB corpus, 1M SQL rows: a smoke test, not a result")
    ap.add_argument("--mb", type=int, default=None, help="corpus size in MB of text (default 120)")
    ap.add_argument("--no-flow", action="store_true", help="skip the Prefect flow (its server start is slow)")
    ap.add_argument("--verify-docs", type=int, default=3000)
    ap.add_argument("--pairs", type=int, default=0,
                    help="then N back-to-back ours/bare pairs, order alternating: the ratio with drift paired out")
    ap.add_argument("--floor", action="store_true",
                    help="with --pairs: also time read + encode alone (no filter, shards or catalog) in each pair")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return ap.parse_args()


def main() -> None:
    a = _args()
    if a.child:
        role, args = a.child[0], a.child[1:]
        fn = dict(baseline=child_baseline, ours=child_ours, bare=child_bare, floor=child_floor)
        if role == "sql":
            print(json.dumps(child_sql(Path(args[0]), int(args[1]), int(args[2]))))
        else:
            print(json.dumps(fn[role](*map(Path, args))))
        return
    mb = a.mb or (16 if a.quick else 120)
    sql_rows = 1_000_000 if a.quick else 10_000_000
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    corpus, big = build_corpus(mb)
    man = json.loads((corpus / "MANIFEST.json").read_text())
    print(f"corpus: {man['docs']:,} documents, {man['text_bytes'] / 1e6:.1f} MB of text in {N_FILES} files "
          f"({sum(f.stat().st_size for f in parquet_files(corpus)) / 1e6:.1f} MB parquet) [{time.time() - t0:.1f} s]",
          flush=True)
    tok = train_once(corpus)
    print(f"tiktoken ids == Encoder ids on {verify_ids(corpus, tok, a.verify_docs):,} documents", flush=True)

    rows = _repeats(a, corpus, tok)
    pair_ratios, floor_ratios = _pairs(a, corpus, tok)
    _report(rows, pair_ratios, floor_ratios, corpus, big, tok, sql_rows, t0)


ROLES = ["baseline", "ours", "bare"]
HOMES = {"baseline": OUT / "nano_shards", "ours": OUT / "home_ours"}


def _repeats(a, corpus: Path, tok: Path) -> dict[str, list[dict]]:
    roles, homes = ROLES, HOMES
    rows: dict[str, list[dict]] = {k: [] for k in roles + ["flow"]}
    for r in range(a.repeats):
        print(f"repeat {r + 1}/{a.repeats}  load: {os.getloadavg()[0]:.2f}", flush=True)
        # the order rotates so that no method always runs first (or right after another filled the page cache)
        for role in roles[r % len(roles):] + roles[:r % len(roles)]:
            res = run_child(role, corpus, tok, *([homes[role]] if role in homes else []))
            rows[role].append(res)
            print(f"  {role:8s} {res['seconds']:6.2f} s  {res['tokens'] / res['seconds'] / 1e6:6.2f}M tokens/s  "
                  f"CPU {res['cpu_s']:6.2f} s  peak RSS {res['rss_mb'] / 1024:.2f} GB", flush=True)
        if not a.no_flow:
            res = run_flow(corpus, tok, OUT / "home_flow")
            rows["flow"].append(res)
            print(f"  flow     {res['seconds']:6.2f} s wall ({res['flow_body_s']:.2f} s inside the flow)", flush=True)
    return rows


def _pairs(a, corpus: Path, tok: Path) -> tuple[list[float], list[float]]:
    homes = HOMES
    pair_ratios, floor_ratios = [], []
    for i in range(a.pairs):  # this VM drifts over minutes; adjacent runs share its state, so pair them
        order = ("ours", "bare") if i % 2 == 0 else ("bare", "ours")
        order += ("floor",) if a.floor else ()
        got = {role: run_child(role, corpus, tok, *([homes[role]] if role in homes else [])) for role in order}
        pair_ratios.append(got["bare"]["seconds"] / got["ours"]["seconds"] * 100)
        extra = ""
        if a.floor:
            floor_ratios.append(got["bare"]["seconds"] / got["floor"]["seconds"] * 100)
            extra = f"; read + encode alone {got['floor']['seconds']:.2f} s, {floor_ratios[-1]:.0f} % of bare"
        print(f"  pair {i + 1}/{a.pairs}: ours {got['ours']['seconds']:.2f} s, bare {got['bare']['seconds']:.2f} s, "
              f"ours / bare {pair_ratios[-1]:.0f} %{extra}", flush=True)
    return pair_ratios, floor_ratios


def _report(rows: dict, pair_ratios: list, floor_ratios: list, corpus: Path, big: Path, tok: Path, sql_rows: int,
            t0: float) -> None:
    roles = ROLES
    ntok = {k: {v["tokens"] for v in rows[k]} for k in rows if rows[k]}
    same = len(set().union(*ntok.values())) == 1
    print(f"token counts {'identical' if same else 'DIFFER'} across methods: {ntok}")
    rss = run_child("ours", big, tok, OUT / "home_rss")
    rss4 = run_child("ours", build_big4(big), tok, OUT / "home_rss4")
    sql = run_child("sql", OUT / f"sql_home_{sql_rows}", sql_rows, 5)

    tps = {k: [v["tokens"] / v["seconds"] / 1e6 for v in rows[k]] for k in rows if rows[k]}
    tpc = {k: [v["tokens"] / v["cpu_s"] / 1e6 for v in rows[k]] for k in roles}
    ratio = lambda a_, b_, k=1: [x / y * k for x, y in zip(tps[a_], tps[b_])]  # noqa: E731 (same repeat)
    big_mb = json.loads((big / "MANIFEST.json").read_text())["text_bytes"] / 1e6
    out = ["| measure | median | spread (min–max) | target |", "|---|---|---|---|"]
    line = lambda name, xs, fmt, target="": out.append(  # noqa: E731
        f"| {name} | {fmt.format(med(xs))} | {fmt.format(min(xs))} – {fmt.format(max(xs))} | {target} |")
    line("baseline: build-nanogpt pool + tiktoken, M tokens/s", tps["baseline"], "{:.2f}")
    line("ours end to end (the flow's functions in its order), M tokens/s", tps["ours"], "{:.2f}")
    if rows["flow"]:
        line("ours via `langpwt tokenize` (Prefect), wall, M tokens/s", tps["flow"], "{:.2f}")
        line("`langpwt tokenize`: seconds, wall", [v["seconds"] for v in rows["flow"]], "{:.1f}")
        line("`langpwt tokenize`: seconds inside the flow (its own summary)",
             [v["flow_body_s"] for v in rows["flow"]], "{:.1f}")
    line("bare encoder (encode_flat, texts in memory), M tokens/s", tps["bare"], "{:.2f}")
    line("**ours / baseline**", ratio("ours", "baseline"), "{:.2f}×", "≥ 5×")
    line("**ours / bare encoder**", ratio("ours", "bare", 100), "{:.0f} %", "≥ 60 %")
    if pair_ratios:
        line(f"**ours / bare encoder, {len(pair_ratios)} back-to-back pairs**", pair_ratios, "{:.0f} %", "≥ 60 %")
    if floor_ratios:
        line("read + encode alone (no filter, shards, hashes, catalog) / bare, same pairs", floor_ratios, "{:.0f} %")
    for k, name in (("baseline", "baseline"), ("ours", "ours"), ("bare", "bare encoder")):
        line(f"{name}: M tokens per CPU-second (load-robust)", tpc[k], "{:.2f}")
    line("ours / baseline, per CPU-second", [o / b for o, b in zip(tpc["ours"], tpc["baseline"])], "{:.2f}×")
    line(f"**peak RSS, ours on one {big_mb:.0f} MB source file**, GB", [rss["rss_mb"] / 1024], "{:.2f}", "≤ 1.5 GB")
    line("ours on that one file, M tokens/s", [rss["tokens"] / rss["seconds"] / 1e6], "{:.2f}")
    line(f"**peak RSS, ours on one file of 4 × {big_mb:.0f} MB**, GB", [rss4["rss_mb"] / 1024], "{:.2f}", "≤ 1.5 GB")
    line("peak RSS, ours on the 4 files (2 threads), GB", [v["rss_mb"] / 1024 for v in rows["ours"]], "{:.2f}")
    line(f"**`{SQL}`, {sql['rows'] / 1e6:.0f}M rows**, open+query+close, ms",
         [x * 1000 for x in sql["times"]], "{:.0f}", "< 1 s")
    print("\n" + "\n".join(out))
    print(f"\n{sql['groups']} groups; first SQL call {sql['times'][0] * 1000:.0f} ms; tokens per run "
          f"{rows['ours'][0]['tokens']:,}; docs {rows['ours'][0]['docs']:,} kept, {rows['ours'][0]['dropped']} dropped; "
          f"load now {os.getloadavg()[0]:.2f}; total {time.time() - t0:.0f} s")

if __name__ == "__main__":
    main()
