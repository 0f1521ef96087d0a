"""Flow `download`: pin the revision and plan (one task), then one verified download task per file.
Run: `langpwt download --flow --subset sample-10BT --max-files 2` or `python -m flows.download --max-files 2`."""
from __future__ import annotations

import sys

from prefect import flow
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner

from storage.paths import Home
from tasks.download import DownloadError, DownloadParams, failures_message, fetch_file_task, plan_download_task


@flow(name="download", task_runner=ThreadPoolTaskRunner(max_workers=4))
def download_flow(params: DownloadParams, home: str | None = None) -> list[str]:
    """Paths of the verified files, in shard order; fails listing every file that could not be verified."""
    h = Home.from_env(home)
    plan = plan_download_task(h, params)
    futures = [fetch_file_task.submit(h, plan, item, params) for item in plan.todo]
    wait(futures)
    errors = [str(f.state.result(raise_on_failure=False)) for f in futures if not f.state.is_completed()]
    if errors:
        raise DownloadError(failures_message(errors, len(plan.items)))
    done = plan.verified + [f.result() for f in futures]
    return [s.path for s in sorted(done, key=lambda s: s.position)]


def run_download_flow(params: DownloadParams, home: str | None = None) -> list[str]:
    """The flow with `params.workers` concurrent downloads (a task runner is fixed per flow call)."""
    runner = ThreadPoolTaskRunner(max_workers=params.workers)
    return download_flow.with_options(task_runner=runner)(params, home)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["download", "--flow", *sys.argv[1:]]))
