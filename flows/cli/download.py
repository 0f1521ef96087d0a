"""CLI for `langpwt download`: thin argument parsing over tasks.download (or the Prefect flow with --flow).
The default path skips Prefect's server start (7-16 s) because a download needs no orchestration of its own."""
from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes such as 0, 500M or 20G")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def add_download_args(p: argparse.ArgumentParser, workers_flag: str = "--workers") -> None:
    """The download flags, reusable by `prepare` (which may name the worker flag otherwise)."""
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hub dataset repo")
    p.add_argument("--subset", default="sample-10BT",
                   help="sample-10BT (default), sample-100BT, sample-350BT or a crawl like CC-MAIN-2024-10")
    p.add_argument("--revision", default="main", help="branch, tag or commit; pinned to one commit")
    p.add_argument("--include", metavar="GLOB", help="only repo paths matching GLOB, within the subset")
    p.add_argument("--max-files", type=int, metavar="N", help="the first N files of the subset")
    p.add_argument(workers_flag, dest="download_workers", type=int, default=4, metavar="N",
                   help="files downloaded concurrently (default 4)")
    p.add_argument("--min-free", type=_bytes, default=_bytes("1G"), metavar="BYTES",
                   help="disk space to leave free after the download (default 1G)")
    p.add_argument("--retries", type=int, default=8, help="attempts per file without progress (default 8)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def download_params(args: argparse.Namespace):
    from tasks.download import DownloadParams

    return DownloadParams(dataset=args.dataset, subset=args.subset, revision=args.revision, include=args.include,
                          max_files=args.max_files, workers=args.download_workers, min_free_bytes=args.min_free,
                          retries=args.retries, progress=args.progress)


def register(sub) -> None:
    p = sub.add_parser("download", help="fetch FineWeb-Edu parquet files from the Hub, verified and resumable",
                       description="Download a FineWeb-Edu subset into $LANGPWT_HOME/raw. Honours HF_ENDPOINT, "
                                   "HF_TOKEN and HF_HUB_OFFLINE.")
    add_download_args(p)
    p.add_argument("--flow", action="store_true", help="run as the Prefect flow `download`")
    p.set_defaults(handler=run)


def _err(msg: str, code: int) -> int:
    print(f"langpwt download: error: {msg}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from storage.hub import HubError
    from storage.paths import Home

    try:
        params = download_params(args)
    except ValidationError as e:
        first = e.errors()[0]
        msg = str(first.get("ctx", {}).get("error") or first["msg"]).removeprefix("Value error, ")
        return _err(msg if msg.startswith("--") else f"--{str(first['loc'][0]).replace('_', '-')}: {msg}", 2)
    home = Home.from_env()
    try:
        if args.flow:
            from flows.download import run_download_flow
            paths = run_download_flow(params, str(home.root))
            n, size = len(paths), None
        else:
            from tasks.download import download
            files = download(home, params)
            n, size = len(files), sum(f.size_bytes for f in files)
    except HubError as e:
        return _err(str(e), 1)
    except (OSError, ValueError) as e:
        return _err(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)
    extra = f" ({size / 1e9:.3f} GB)" if size is not None else ""
    print(f"{n} files verified{extra} under {home.raw}")
    return 0
