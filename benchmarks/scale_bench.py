"""The pipeline at FineWeb-Edu sample-10BT's real size: generate its 14 files' shape, then prepare 1..N of them
end to end and record time, memory, disk, query and loader speed, and the rerun/reprocess/exactly-once checks.

  python benchmarks/scale_bench.py generate --files 14 --out DIR [--docs-per-file 690000] [--jobs 2]
  python benchmarks/scale_bench.py run --files 1,2,4,14 --src DIR --work DIR [--workers 2] [--dask-local 2]
  python benchmarks/scale_bench.py report            # table and plot again from the saved points
Each point runs in fresh subprocesses with a fresh home, deleted once measured; the generated input is kept."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_corpus as sc  # noqa: E402
import scale_measure as sm  # noqa: E402

ROOT = sc.ROOT
sys.path.insert(0, str(ROOT))  # storage.atomic, imported by the generator's workers
OUT = ROOT / "benchmarks" / "out" / "scale"
POOL = ROOT / "benchmarks" / "out" / "scale_paragraphs.parquet"
EST_FILE_BYTES_PER_DOC = 3_150      # the Hub's files: ~2.15 GB per ~690k documents
SUMMARY = re.compile(r"(\d+) shards built, (\d+) up to date, ([\d,]+) tokens, (\d+)/(\d+) documents kept")


def err(msg: str) -> int:
    print(f"scale_bench: error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- generate

def _gen_one(out: Path, spec: sc.Spec, idx: int) -> dict:
    pool = sc.load_pool(POOL)
    t0, last = time.perf_counter(), [0.0]

    def progress(i: int, rows: int) -> None:
        now = time.perf_counter() - t0
        if now - last[0] >= 10 or rows == spec.docs_per_file:
            last[0] = now
            print(f"  file {i:03d}: {rows:,}/{spec.docs_per_file:,} documents, {now:.1f} s", flush=True)
    path, text_bytes = sc.write_file(out, pool, spec, idx, progress)
    return dict(file=path.name, seconds=round(time.perf_counter() - t0, 2), bytes=path.stat().st_size,
                text_bytes=text_bytes, sha256=sm.file_sha256(path))


def cmd_generate(a) -> int:
    if a.files < 1 or a.docs_per_file < 2 or a.jobs < 1:
        return err("--files, --jobs >= 1 and --docs-per-file >= 2 needed")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = sc.load_pool(POOL)
    print(f"paragraph pool: {len(pool):,} paragraphs ({POOL}, {time.perf_counter() - t0:.1f} s)")
    spec = sc.Spec(docs_per_file=a.docs_per_file)
    record = sc.describe(spec, pool, a.files)
    meta = out / "GENERATED.json"
    done = json.loads(meta.read_text())["per_file"] if sc.same_generation(out, record) else {}
    if not done:
        meta.unlink(missing_ok=True)  # a folder of other arguments: nothing in it is claimed any more
    todo = [i for i in range(a.files) if sc.file_name(i) not in done or not (out / sc.file_name(i)).exists()]
    est = a.docs_per_file * EST_FILE_BYTES_PER_DOC
    free = shutil.disk_usage(out).free
    print(f"disk: {free / 1e9:.1f} GB free, ~{est / 1e9:.2f} GB per file: room for {free // est} files; "
          f"{len(todo)} to write, {a.files - len(todo)} already there")
    if len(todo) * est > free:
        return err(f"--files {a.files}: ~{len(todo) * est / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free in {out}")
    with ProcessPoolExecutor(min(a.jobs, max(1, len(todo)))) as ex:
        for r in ex.map(_gen_one, [out] * len(todo), [spec] * len(todo), todo):
            done[r["file"]] = r
            print(f"{r['file']}: {r['bytes'] / 1e9:.3f} GB ({r['bytes'] / r['text_bytes']:.2f} of its "
                  f"{r['text_bytes'] / 1e9:.3f} GB of text) in {r['seconds']:.1f} s", flush=True)
    from storage.atomic import atomic_write_text
    atomic_write_text(meta, json.dumps(dict(record, per_file=done), indent=1))
    print(f"generated {len(todo)} files in {time.perf_counter() - t0:.1f} s: {a.files} files, "
          f"{record['docs']:,} documents, {record['planted_dups']:,} planted duplicates -> {out}")
    return 0


# ---------------------------------------------------------------- run

def _subset(work: Path, files: list[Path], n: int) -> Path:
    d = work / f"src_{n:02d}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for f in files[:n]:
        (d / f.name).symlink_to(f.resolve())
    return d


def _prepare(home: Path, src: Path, a, dask: int | None, *extra: str) -> list[str]:
    cmd = sm.cli(home, "prepare", "--source", str(src), "--workers", str(a.workers), *extra)
    return cmd + (["--dask-local", str(dask)] if dask else [])


def _built(out: str) -> dict:
    m = SUMMARY.search(out)
    if not m:
        return {}
    return dict(built=int(m[1]), skipped=int(m[2]), tokens=int(m[3].replace(",", "")), kept=int(m[4]),
                docs_in=int(m[5]))


def measure_point(a, files: list[Path], n: int, dask: int | None, reprocess: bool, env: dict) -> dict:
    work = Path(a.work)
    mode = f"dask-local-{dask}" if dask else f"workers-{a.workers}"
    home, src = work / f"home_{n:02d}_{mode}", _subset(work, files, n)
    shutil.rmtree(home, ignore_errors=True)
    print(f"== {n} files, {mode}: prepare ...", flush=True)
    r = sm.timed(_prepare(home, src, a, dask), env, log=work / f"prepare_{n:02d}_{mode}.log")
    p = dict(files=n, mode=mode, input_bytes=sm.input_bytes(files[:n]), rc=r["rc"], wall_s=r["wall_s"],
             peak_rss_mb=r["peak_rss_mb"], peak_server_rss_mb=r["peak_server_rss_mb"], **_built(r["out"]))
    if r["rc"] or "tokens" not in p:
        print(r["out"][-3000:])
        return dict(p, failed=True)
    p["tokens_per_s"] = round(p["tokens"] / p["wall_s"])
    p["disk"] = sm.disk(home)
    p["pages_s"] = sm.page_times(home, env)  # right after prepare: its gigabytes may still be going to disk
    os.sync()  # and once the disk has settled, the SQL box again without a snapshot
    shutil.rmtree(home / "cache" / "catalog-snapshots", ignore_errors=True)
    p["pages_settled_s"] = sm.page_times(home, env)
    p["status_s"] = sm.timed(sm.cli(home, "status"), env)["wall_s"]
    p["sql_s"] = sm.timed(sm.cli(home, "sql", sm.SQL), env)["wall_s"]
    p["loader"] = sm.loader_rate(home, env)
    again = sm.timed(_prepare(home, src, a, dask), env)
    p["rerun"] = dict(wall_s=again["wall_s"], **_built(again["out"]))
    if reprocess:
        shard = n // 2
        before = sm.snapshot(home)
        redo = sm.timed(_prepare(home, src, a, dask, "--reprocess", str(shard)), env)
        p["reprocess"] = dict(shard=shard, wall_s=redo["wall_s"], **_built(redo["out"]),
                              **sm.reprocess_check(before, sm.snapshot(home), shard))
    t0 = time.perf_counter()
    p["exactly_once"] = dict(sm.exactly_once(home, files[:n]), seconds=round(time.perf_counter() - t0, 1))
    t0 = time.perf_counter()
    p["decoded_shard0"] = dict(sm.decoded_first_shard(home, files[0], env), seconds=round(time.perf_counter() - t0, 1))
    shutil.rmtree(home)
    return p


def _plan(files: list[Path], points: list[int], work: Path) -> None:
    free = shutil.disk_usage(work).free
    biggest = sm.input_bytes(files[:max(points)])
    per = sm.input_bytes(files) / len(files)
    # a home holds uint16 tokens (~0.75 x the snappy parquet) plus the catalog, index and sidecars: ~0.85 x
    room = int(free / (0.9 * per))
    print(f"disk: {free / 1e9:.1f} GB free in {work}; input {per / 1e9:.2f} GB per file (kept); the largest point "
          f"needs ~{0.9 * biggest / 1e9:.1f} GB for its home: the disk allows a point of ~{room} files")


def cmd_run(a) -> int:
    try:
        points = sorted({int(x) for x in a.files.split(",")})
    except ValueError:
        return err(f"--files {a.files}: expected numbers such as 1,2,4,14")
    files = sorted(Path(a.src).glob("*.parquet"))
    if not files or points[0] < 1 or points[-1] > len(files):
        return err(f"--files {a.files}: --src {a.src} holds {len(files)} parquet files")
    work, results = Path(a.work), Path(a.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    _plan(files, points, work)
    env = sm.child_env(work / "prefect_home")
    runs = [(n, None, n == points[-1]) for n in points]
    if a.dask_local:
        runs.append((min(4, points[-1]), a.dask_local, False))
    for n, dask, reprocess in runs:
        p = measure_point(a, files, n, dask, reprocess, env)
        (results / f"point_{n:02d}_{p['mode']}.json").write_text(json.dumps(p) + "\n")
        print(json.dumps(p), flush=True)
        if p.get("failed"):
            return 1
    return report(results, Path(a.plot))


# ---------------------------------------------------------------- report

def _slowest_page(times: dict) -> float:
    """The slowest dashboard page of one measurement (the SQL box is reported apart)."""
    return max((v for k, v in times.items() if isinstance(v, float) and not k.startswith("sql_box")),
               default=float("nan"))


def _row(p: dict) -> str:
    d, e = p["disk"], p["exactly_once"]
    ps = p["pages_s"]
    pages = _slowest_page(ps)
    box = "/".join(f"{ps[k]:.2f}" for k in ("sql_box", "sql_box_page_open") if isinstance(ps.get(k), float))
    settled = p.get("pages_settled_s")
    if settled:
        pages = f"{pages:.2f} ({_slowest_page(settled):.2f} settled)"
        box += f" ({settled['sql_box']:.2f}/{settled['sql_box_page_open']:.2f} settled)"
    else:
        pages = f"{pages:.2f}"
    rp = p.get("reprocess")
    rp_txt = (f"{rp['built']} built, {'only its files' if rp['others_untouched'] and rp['same_bytes'] else 'FAIL'}"
              if rp else "")
    return (f"| {p['files']} | {p['mode']} | {p['docs_in']:,} | {p['tokens'] / 1e6:,.0f} M | {p['wall_s']:,.0f} | "
            f"{p['tokens_per_s'] / 1e6:.2f} M | {p['peak_rss_mb'] / 1024:.2f} ({p.get('peak_server_rss_mb', 0) / 1024:.2f}) | {p['input_bytes'] / 1e9:.2f} | "
            f"{d['total'] / 1e9:.2f} | {d.get('catalog', 0) / 1e6:.0f} | {pages} | {box} | {p['status_s']:.1f} | "
            f"{p['sql_s']:.1f} | {p['loader'].get('windows_per_s', '?')} | "
            f"{p['rerun']['wall_s']:.0f} s, {p['rerun'].get('built')} built | {rp_txt} | "
            f"{'yes' if e['ok'] and p['decoded_shard0'].get('ok') else 'NO'} |")


def plot(points: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in sorted({p["mode"] for p in points}):
        ps = sorted((p for p in points if p["mode"] == mode), key=lambda p: p["files"])
        x = [p["files"] for p in ps]
        ax1.plot(x, [1e9 * p["wall_s"] / p["tokens"] for p in ps], "o-", label=mode)
        ax2.plot(x, [p["peak_rss_mb"] / 1024 for p in ps], "o-", label=mode)
    ax1.set(xlabel="source files", ylabel="wall ns per token", title="prepare: time per token")
    ax2.axhline(2e9 / 2**30, color="grey", ls="--", lw=1, label="target: 2 GB")
    ax2.set(xlabel="source files", ylabel="GiB", title="peak RSS of the process tree")
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def report(results: Path, plot_to: Path) -> int:
    points = [json.loads(p.read_text()) for p in sorted(results.glob("point_*.json"))]
    points = [p for p in points if not p.get("failed")]
    if not points:
        return err(f"no measured points in {results}")
    print("| files | mode | documents | tokens | wall s | tokens/s | peak RSS GiB (Prefect server) | input GB | home GB | catalog MB | "
          "slowest page s | SQL box s (first query / page opened) | status s | sql s | loader windows/s | rerun | "
          "reprocess 1 shard | each doc once |")
    print("|" + "---|" * 18)
    for p in sorted(points, key=lambda p: (p["mode"].startswith("dask"), p["files"])):
        print(_row(p))
    plot(points, plot_to)
    print(f"plot -> {plot_to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write sample-10BT-shaped parquet files")
    g.add_argument("--files", type=int, required=True, help="how many files (sample-10BT has 14)")
    g.add_argument("--out", required=True, help="folder for the files (kept between runs)")
    g.add_argument("--docs-per-file", type=int, default=690_000, help="documents per file (default 690,000)")
    g.add_argument("--jobs", type=int, default=2, help="files written at once, one process each (default 2)")
    r = sub.add_parser("run", help="prepare the first N files for each N and measure")
    r.add_argument("--files", required=True, help="comma-separated numbers of files, e.g. 1,2,4,14")
    r.add_argument("--src", required=True, help="folder written by `generate`")
    r.add_argument("--work", required=True, help="folder for the homes (each deleted once measured) and logs")
    r.add_argument("--workers", type=int, default=2, help="prepare's --workers (default 2)")
    r.add_argument("--dask-local", type=int, help="also run the 4-file point (or the largest, if fewer) on a Dask "
                                                  "LocalCluster of this many processes (default: not run)")
    for p in (r, sub.add_parser("report", help="table and plot from the saved points")):
        p.add_argument("--results", default=str(OUT), help=f"folder of the points' JSON (default {OUT})")
        p.add_argument("--plot", default=str(ROOT / "docs" / "scale.png"), help="plot file (default docs/scale.png)")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        return cmd_generate(a)
    if a.cmd == "run":
        return cmd_run(a)
    return report(Path(a.results), Path(a.plot))


if __name__ == "__main__":
    sys.exit(main())
