"""Flow `prepare`: get FineWeb-Edu (download from the Hub, or a local `--source`) and tokenize it.
Run: `langpwt prepare --source data/sample` or `python -m flows.prepare data/sample`."""
from __future__ import annotations

import sys

from prefect import flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.tokenize import TokenizeParams, run_tokenize
from storage import shard_catalog, sources
from storage.lock import exclusive
from storage.paths import Home


class PrepareParams(TokenizeParams):
    """`tokenize`'s parameters; without `source`, the download's too."""


@flow(name="prepare", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def prepare(params: PrepareParams) -> dict:
    home = Home.from_env(params.home).ensure()
    started = shard_catalog.utcnow()
    run_id = str(flow_run.id)
    with exclusive(home.lock, params.wait):
        files = sources.list_local(params.source)
        sources.record(home, files, "verified")
        shard_catalog.record_pipeline_run(home, run_id, "prepare", params.model_dump(), "running", started)
        try:
            summary = run_tokenize(params, files)
        except BaseException as e:
            shard_catalog.record_pipeline_run(home, run_id, "prepare", params.model_dump(), "failed", started,
                                              {"error": str(e)})
            raise
        shard_catalog.record_pipeline_run(home, run_id, "prepare", params.model_dump(),
                                          "failed" if summary["failed"] else "completed", started,
                                          {k: v for k, v in summary.items() if k != "table"})
    return summary


if __name__ == "__main__":
    out = prepare(PrepareParams(source=sys.argv[1] if len(sys.argv) > 1 else "data/sample"))
    print({k: v for k, v in out.items() if k != "table"})
    sys.exit(1 if out["failed"] else 0)
