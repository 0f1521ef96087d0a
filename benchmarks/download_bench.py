"""Download throughput from the fake Hub on loopback: our downloader vs plain `curl`, side by side, and what
verification costs (the same transfer with hashing switched off; hashing after the download instead of during).

Run: .venv/bin/python benchmarks/download_bench.py [--files 4] [--mb 256] [--repeats 3] [--workers 1 4]
The fake Hub serves with sendfile from its own process, so no client shares a GIL with the server. Kinds:
  curl          `curl -sSfL` (with --parallel for workers > 1) of the same resolve URLs, redirect followed
  curl_fsync    the same, then fsync of each file: the durability our downloader gives before its rename
  fetch         storage.hub.Hub.fetch per file: Range GET into .part (httpx iter_raw pieces gathered into
                aligned buffers, whole ones written with O_DIRECT), sha256 on the writer thread, fsync, rename
  fetch_nohash  the same with hashing switched off (verification then passes)
  download      tasks.download.download() end to end in a fresh home: + revision, listing, HEAD, catalog
  hash_after    sha256 of curl's files read back: what verifying after the download would add
Targets: fetch and download >= 80 % of curl's throughput; verification adds <= 10 %."""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import storage.hub as hub_mod  # noqa: E402

REPO = "HuggingFaceFW/fineweb-edu"


def make_files(root: Path, n: int, mb: int) -> None:
    block = os.urandom(1 << 20)  # incompressible, like parquet pages
    for i in range(n):
        p = root / "sample" / "10BT" / f"{i:03d}_00000.parquet"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            for j in range(mb):
                f.write(i.to_bytes(4, "little") + j.to_bytes(4, "little") + block[8:])  # distinct per MiB


class _NoHash(hub_mod._Hasher):
    """The transfer alone, no hashing: so `verify_overhead` counts all that verification adds."""

    def update(self, view, at: int) -> None:
        pass

    def done(self):
        return _Unchecked("unchecked"), None


class _Unchecked(str):
    """The hashing-off variant's digest: equal to any digest, so the transfer completes as usual."""
    def __eq__(self, other) -> bool:
        return True

    __hash__ = str.__hash__


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _machine() -> float:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq): the server, kernel threads and
    other people's jobs too; with no other job running, what one kind costs the whole machine."""
    try:
        v = [int(x) for x in open("/proc/stat").readline().split()[1:8]]
    except OSError:
        return 0.0
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / os.sysconf("SC_CLK_TCK")


def timed(fn, child: bool = False) -> tuple[float, float, float]:
    who = resource.RUSAGE_CHILDREN if child else resource.RUSAGE_SELF
    c0, m0, t0 = _cpu(who), _machine(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu(who) - c0, _machine() - m0


def run_curl(urls: list[str], out: Path, workers: int) -> None:
    args = ["curl", "-sSfL"] + (["--parallel", "--parallel-max", str(workers)] if workers > 1 else [])
    for i, u in enumerate(urls):
        args += ["-o", str(out / f"{i:03d}.parquet"), u]
    subprocess.run(args, check=True)


def run_curl_fsync(urls: list[str], out: Path, workers: int) -> None:
    run_curl(urls, out, workers)
    for p in sorted(out.iterdir()):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_fetch(hub, sha: str, files, out: Path, workers: int, verify: bool) -> None:
    hub_mod._Hasher = hub_mod._RealHasher if verify else _NoHash
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda f: hub.fetch(sha, f, out / f.path), files))
    finally:
        hub_mod._Hasher = hub_mod._RealHasher


def run_download(endpoint: str, out: Path, workers: int) -> None:
    from storage.paths import Home
    from tasks.download import DownloadParams, download

    download(Home.from_env(out), DownloadParams(endpoint=endpoint, workers=workers, progress=False,
                                                min_free_bytes=0))


def hash_after(out: Path) -> None:
    for p in sorted(out.rglob("*.parquet")):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while b := f.read(1 << 24):
                h.update(b)


def versions() -> dict:
    import httpx2
    import huggingface_hub

    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return dict(date=dt.datetime.now().isoformat(timespec="minutes"), cpu=cpu, cores=os.cpu_count(),
                python=platform.python_version(), huggingface_hub=huggingface_hub.__version__,
                httpx2=httpx2.__version__, curl=" ".join(curl.split()[:2]), load_avg_start=os.getloadavg()[0])


def measure(kinds: list[str], runs: dict, scratch: Path, w: int, repeats: int) -> dict[str, list[tuple]]:
    """(wall, own CPU, machine CPU) of every kind, `repeats` times, after one warm-up run of each."""
    for kind in kinds:  # warm-up: imports, connections, the page cache of the served files
        out = scratch / "warm"
        out.mkdir(exist_ok=True)
        runs[kind](out, w)
        shutil.rmtree(out)
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds + ["hash_after"]}
    for r in range(repeats):
        for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:  # rotate: no kind always goes first
            out = scratch / f"out_{kind}"
            out.mkdir()
            times[kind].append(timed(lambda: runs[kind](out, w), child=kind.startswith("curl")))
            if kind == "curl":
                times["hash_after"].append(timed(lambda: hash_after(out)))
            shutil.rmtree(out)
    return times


def summarize(times: dict[str, list[tuple]], kinds: list[str], total: int, w: int) -> dict:
    """Medians per kind: MB/s, CPU-s per GB (own and whole machine), and the ratios the targets name."""
    med = {k: statistics.median(t for t, _, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c, _ in v) for k, v in times.items()}
    machine = {k: statistics.median(m for _, _, m in v) for k, v in times.items()}
    row = dict(workers=w, **{f"{k}_MBps": round(total / med[k] / 1e6) for k in kinds},
               **{f"{k}_cpu_s_per_GB": round(cpu[k] / total * 1e9, 2) for k in kinds + ["hash_after"]},
               **{f"{k}_machine_cpu_s_per_GB": round(machine[k] / total * 1e9, 2) for k in kinds},
               fetch_vs_curl=round(med["curl"] / med["fetch"], 3),
               fetch_vs_curl_fsync=round(med["curl_fsync"] / med["fetch"], 3),
               verify_overhead_pct=round(100 * (med["fetch"] / med["fetch_nohash"] - 1), 1),
               hash_after_pct=round(100 * med["hash_after"] / med["curl"], 1),
               wall_s={k: [round(t, 3) for t, _, _ in v] for k, v in times.items()})
    if "download" in kinds:
        row["download_vs_curl"] = round(med["curl"] / med["download"], 3)
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| workers | curl MB/s | curl+fsync MB/s | fetch MB/s (vs curl / vs curl+fsync) | download MB/s "
          "(vs curl) | fetch, no hash MB/s | verify overhead | hash after instead |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in rows:
        dl = f"{r['download_MBps']} ({r['download_vs_curl']:.0%})" if "download_MBps" in r else "n/a"
        print(f"| {r['workers']} | {r['curl_MBps']} | {r['curl_fsync_MBps']} | {r['fetch_MBps']} "
              f"({r['fetch_vs_curl']:.0%} / {r['fetch_vs_curl_fsync']:.0%}) | {dl} | {r['fetch_nohash_MBps']} | "
              f"{r['verify_overhead_pct']:+.1f} % | +{r['hash_after_pct']} % |")


def available_kinds() -> list[str]:
    try:
        import duckdb, prefect  # noqa: F401,E401
        return ["curl", "curl_fsync", "fetch", "fetch_nohash", "download"]
    except ImportError:
        print("download_bench: prefect/duckdb missing: measuring storage.hub only (no `download` kind)")
        return ["curl", "curl_fsync", "fetch", "fetch_nohash"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--mb", type=int, default=256, help="MiB per file")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dir", help="scratch folder (default: a temp dir beside this script, on the repo's disk)")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args()
    if not shutil.which("curl"):
        print("download_bench: skipped: `curl` is not installed (apt-get install -y curl)")
        return 0
    kinds = available_kinds()
    hub_mod._RealHasher = hub_mod._Hasher
    scratch = Path(tempfile.mkdtemp(prefix="dlbench_", dir=a.dir or Path(__file__).parent))
    os.environ["HF_HOME"] = str(scratch / "hf_home")  # no stored login goes to the fake Hub
    proc = None
    try:
        make_files(scratch / "hub", a.files, a.mb)
        total = a.files * a.mb * 2**20
        proc = subprocess.Popen([sys.executable, "-m", "tests.fakehub", str(scratch / "hub")], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        endpoint = proc.stdout.readline().strip()
        hub = hub_mod.Hub(REPO, endpoint)
        sha = hub.resolve("main")
        files = hub.list_files(sha, "sample/10BT/*.parquet")
        urls = [hub.url(sha, f.path) for f in files]
        runs = {
            "curl": lambda out, w: run_curl(urls, out, w),
            "curl_fsync": lambda out, w: run_curl_fsync(urls, out, w),
            "fetch": lambda out, w: run_fetch(hub, sha, files, out, w, True),
            "fetch_nohash": lambda out, w: run_fetch(hub, sha, files, out, w, False),
            "download": lambda out, w: run_download(endpoint, out, w),
        }
        rows = [summarize(measure(kinds, runs, scratch, w, a.repeats), kinds, total, w) for w in a.workers]
        report = dict(versions(), files=a.files, mib_per_file=a.mb, repeats=a.repeats,
                      load_avg_end=os.getloadavg()[0], rows=rows)
        print(json.dumps(report, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        print_table(rows)
        return 0
    finally:
        if proc:
            proc.terminate()
            proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
