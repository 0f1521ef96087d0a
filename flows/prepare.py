"""Flow `prepare`: get FineWeb-Edu (download from the Hub, or a local `--source`) and tokenize it.
Run: `langpwt prepare --source data/sample` (local) or `langpwt prepare --subset sample-10BT` (Hub);
`python -m flows.prepare data/sample` also works. Downloads and tokenization overlap: shard i starts
as soon as files 0..i are verified."""
from __future__ import annotations

import sys

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.download import plan_download_task, submit_downloads
from flows.runtime import arrow_allocator, tasks_on
from flows.tokenize import local_files, run_tokenize, warm_tokenizer
from storage import shard_catalog
from storage.hub import HubError
from storage.lock import exclusive
from storage.paths import Home
from storage.sources import SourceFile
from tasks.download import record_fetch
from tasks.params import PrepareParams, check_home
from tasks.schedule import Incoming

__all__ = ["PrepareParams", "prepare"]


def _files(home: Home, params: PrepareParams) -> tuple[list, bool, dict[str, str]]:
    """Local files (hashed; recorded by run_tokenize), or the planned Hub files, each a download
    already under way; whether they still need recording; and the files a manifest refused."""
    if params.source:
        return local_files(home, params)
    dparams = params.download_params()
    plan = plan_download_task(home, dparams)
    pending = {item.position: fut for fut, item in submit_downloads(home, plan, dparams).items()}

    def settle(item):
        def record(fut) -> SourceFile:  # in this process: only the flow writes the catalog
            try:
                got = fut.result()
            except HubError as e:
                record_fetch(home, plan, item, None, str(e))
                raise
            record_fetch(home, plan, item, got)
            return got.source
        return record

    return [item.source() if item.done else
            Incoming(item.file.path, item.position, pending[item.position], settle(item))
            for item in plan.items], False, {}


@flow(name="prepare", task_runner=ThreadPoolTaskRunner(max_workers=6), log_prints=True)
def prepare(params: PrepareParams) -> dict:
    """Download (unless `source` is given) and tokenize; returns the tokenize summary."""
    arrow_allocator()
    check_home(params, Home.from_env(params.home))  # before the home is made or locked
    home = Home.from_env(params.home).ensure()
    started = shard_catalog.utcnow()
    run_id = str(flow_run.id)
    with exclusive(home.lock, params.wait):
        warm_tokenizer(home, params)
        shard_catalog.record_pipeline_run(home, run_id, "prepare", params.model_dump(), "running", started)
        try:
            files, listed, refused = _files(home, params)  # downloads stay on this machine's threads
            with tasks_on(params, params.workers):  # scans and shards on --workers threads, or on Dask
                summary = run_tokenize(params, files, listed, refused)
        except BaseException as e:
            shard_catalog.record_pipeline_run(home, run_id, "prepare", params.model_dump(), "failed", started,
                                              {"error": str(e)})
            raise
        shard_catalog.record_pipeline_run(home, run_id, "prepare", params.model_dump(),
                                          "failed" if summary["failed"] else "completed", started,
                                          {k: v for k, v in summary.items() if k != "table"})
    return summary


if __name__ == "__main__":
    out = prepare(PrepareParams(source=sys.argv[1] if len(sys.argv) > 1 else None))
    print({k: v for k, v in out.items() if k != "table"})
    sys.exit(1 if out["failed"] else 0)
