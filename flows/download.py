"""Flow `download`: pin the revision and plan (one task), then one verified download task per file.
Run: `langpwt download --flow --subset sample-10BT --max-files 2` or `python -m flows.download --max-files 2`."""
from __future__ import annotations

import sys
from typing import Iterator

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from storage.hub import HubError
from storage.paths import Home
from storage.sources import SourceFile
from tasks.download import (DownloadError, DownloadParams, Item, Plan, failures_message, fetch_file_task,
                            mark_downloading, plan_download_task, record_fetch)


def submit_downloads(home: Home, plan: Plan, params: DownloadParams) -> dict[PrefectFuture, Item]:
    """One task per missing file; the rows say `downloading` from here (queued behind --workers included)."""
    if plan.todo:
        mark_downloading(home, plan, plan.todo)
    return {fetch_file_task.submit(home, plan, item, params): item for item in plan.todo}


def verified_as_completed(home: Home, plan: Plan, futures: dict[PrefectFuture, Item],
                          errors: list[str]) -> Iterator[SourceFile]:
    """Each file as soon as it is verified (tokenize can start on it), its row recorded by this process;
    failures are recorded too and their one-line reasons appended to `errors`."""
    for fut in as_completed(list(futures)):
        item = futures[fut]
        try:
            got = fut.result()
        except HubError as e:
            record_fetch(home, plan, item, None, str(e))
            errors.append(str(e))
            continue
        record_fetch(home, plan, item, got)
        yield got.source


@flow(name="download", task_runner=ThreadPoolTaskRunner(max_workers=4))
def download_flow(params: DownloadParams, home: str | None = None) -> list[str]:
    """Paths of the verified files, in shard order; fails listing every file that could not be verified."""
    h = Home.from_env(home)
    plan = plan_download_task(h, params)
    errors: list[str] = []
    done = plan.verified + list(verified_as_completed(h, plan, submit_downloads(h, plan, params), errors))
    if errors:
        raise DownloadError(failures_message(errors, len(plan.items)))
    return [s.path for s in sorted(done, key=lambda s: s.position)]


def run_download_flow(params: DownloadParams, home: str | None = None) -> list[str]:
    """The flow with `params.workers` concurrent downloads (a task runner is fixed per flow call)."""
    runner = ThreadPoolTaskRunner(max_workers=params.workers)
    return download_flow.with_options(task_runner=runner)(params, home)


if __name__ == "__main__":
    from flows.cli import main

    sys.exit(main(["download", "--flow", *sys.argv[1:]]))
