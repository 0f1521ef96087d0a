"""Flow `download`: the plan (one task), then one verified download task per file, thin names over tasks.download.
A task per file shows each in the UI and lets `prepare` tokenize files as they land; the price is Prefect's start."""
from __future__ import annotations

import sys
from typing import Iterator

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from storage.hub import HubError
from storage.paths import Home
from storage.sources import SourceFile
from tasks.download import (ByteBar, DownloadError, DownloadParams, Fetched, Item, Plan, failures_message,
                            fetch_file, mark_downloading, plan_download, record_fetch)

_BARS: dict[str, ByteBar] = {}  # plan key -> its progress bar, shared by that plan's file tasks


@task(name="download-plan", cache_policy=NONE)
def plan_download_task(home: Home, params: DownloadParams) -> Plan:
    """Call it directly in the flow (not .submit): it reads and writes the catalog."""
    plan = plan_download(home, params)
    if bar := ByteBar.maybe(plan, params):
        _BARS[plan.key] = bar
    get_run_logger().info(f"{params.dataset}@{plan.revision[:12]}: {len(plan.items)} files, "
                          f"{len(plan.todo)} to fetch ({plan.need_bytes / 1e9:.2f} GB)")
    return plan


@task(name="download-file", cache_policy=NONE, task_run_name="download-{item.position:06d}")
def fetch_file_task(home: Home, plan: Plan, item: Item, params: DownloadParams) -> Fetched:
    bar = _BARS.get(plan.key)
    try:
        got = fetch_file(home, plan, item, params, bar.advance if bar else None)
    except HubError as e:
        get_run_logger().error(str(e))
        raise
    finally:
        if bar and not item.done:
            bar.file_done()
            if bar.left <= 0:
                _BARS.pop(plan.key, None)
    get_run_logger().info(f"verified {got.source.file} ({got.source.size_bytes / 1e6:.1f} MB, {got.seconds:.1f} s)")
    return got


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
