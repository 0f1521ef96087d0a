"""CLI for `langpwt download`: flags generated from DownloadParams over tasks.download (or the flow with --flow).
The default path skips Prefect's server start because a download needs no orchestration of its own."""
from __future__ import annotations

import argparse
import sys

from flows.cli.params import add_model_args, build

FLAGS = {"min_free_bytes": "--min-free"}
# set through the environment or only by tests and benchmarks: endpoint (HF_ENDPOINT), token (HF_TOKEN)
NOT_FLAGS = {"endpoint", "token", "backoff_s", "timeout_s"}


def _bytes(text: str) -> int:
    from tasks.params import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Prefixed:
    """Adds arguments to `p` under dests that start with `prefix`, so another command's flags of the same
    name (`prepare`'s --workers) keep their own."""

    def __init__(self, p, prefix: str):
        self.p, self.prefix = p, prefix

    def add_argument(self, *flags, dest: str, **kw):
        return self.p.add_argument(*flags, dest=self.prefix + dest, **kw)


def add_download_args(p: argparse.ArgumentParser, workers_flag: str = "--workers", dest_prefix: str = "") -> None:
    """The download flags, reusable by `prepare`, which names the worker flag --download-workers and keeps
    the values apart with `dest_prefix` (read them back with `download_fields`)."""
    from tasks.download import DownloadParams

    add_model_args(_Prefixed(p, dest_prefix), DownloadParams, exclude=NOT_FLAGS,
                   flags={**FLAGS, "workers": workers_flag}, parsers={"min_free_bytes": _bytes},
                   metavars={"min_free_bytes": "BYTES", "include": "GLOB", "max_files": "N", "workers": "N"})


def download_fields(args: argparse.Namespace, dest_prefix: str = "") -> dict:
    """The DownloadParams fields given on the command line, by field name."""
    from tasks.download import DownloadParams

    return {k: v for k, v in ((k.removeprefix(dest_prefix), v) for k, v in vars(args).items()
                              if k.startswith(dest_prefix)) if k in DownloadParams.model_fields}


def register(sub) -> None:
    p = sub.add_parser("download", help="fetch FineWeb-Edu parquet files from the Hub, verified and resumable",
                       description="Download a FineWeb-Edu subset into $LANGPWT_HOME/raw. Honours HF_ENDPOINT, "
                                   "HF_TOKEN and HF_HUB_OFFLINE.")
    add_download_args(p)
    p.add_argument("--flow", action="store_true", help="run as the Prefect flow `download` (default: off)")
    p.set_defaults(handler=run)


def _err(msg: str, code: int) -> int:
    print(f"langpwt download: error: {msg}", file=sys.stderr)
    return code


def _params(args: argparse.Namespace):
    from tasks.download import DownloadParams

    ns = argparse.Namespace(**download_fields(args))
    try:
        return build(DownloadParams, ns, FLAGS), None
    except ValueError as e:
        flag, _, why = str(e).partition(": ")
        why = why.removeprefix("Value error, ")
        return None, why if why.startswith(flag) else f"{flag}: {why}"  # the model's message names the flag


def run(args: argparse.Namespace) -> int:
    from storage.hub import HubError
    from storage.paths import Home

    params, bad = _params(args)
    if bad:
        return _err(bad, 2)
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
