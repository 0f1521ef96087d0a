"""Where a flow's work runs: the prefect.yaml pull step that puts a deployment's run in this checkout,
and the per-run choice of task runner (the flow's own threads, or a Dask cluster on one or many machines).
Trade-off: Prefect fixes a task runner per flow object, so the Dask one is swapped into the running
flow's context for the duration of the work; one flow then serves local, LocalCluster and remote runs."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from tasks.params import ScaleOut

ROOT = Path(__file__).resolve().parents[1]


def project_dir() -> dict[str, str]:
    """prefect.yaml pull step: run the flow in the checkout whose venv the worker runs from.

    `prefect deploy`'s default pull step bakes in the absolute directory it ran from, which breaks on a
    GPU box whose checkout lives elsewhere; `pull: []` runs in a temp dir where nothing is found. The
    worker's Python imports this module from its own (editable) install, so ROOT is right on every machine."""
    if not (ROOT / "prefect.yaml").is_file():
        raise RuntimeError(f"{ROOT}: not a LangPWT checkout (no prefect.yaml); install the project with "
                           f"`pip install -e .` and start the worker from that venv")
    os.chdir(ROOT)
    return {"directory": str(ROOT)}


def arrow_allocator() -> None:
    """Arrow's memory pool for a pipeline process: jemalloc, unless ARROW_DEFAULT_MEMORY_POOL names one.

    Arrow's default pool is mimalloc, whose arenas are committed eagerly on Linux as transparent huge pages:
    every 2 MB region it touches is zeroed whole, a large share of a tokenize run's CPU (benchmarks/RESULTS.md).
    jemalloc commits on demand and measured the same as mimalloc told to; unlike mimalloc's setting, which
    is read once when libarrow loads, the pool can be chosen here, where a flow or a worker's task starts."""
    import pyarrow as pa

    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without it keeps its default
        return
    if pa.default_memory_pool().backend_name != pool.backend_name:
        pa.set_memory_pool(pool)


def dask_runner(opts: ScaleOut):
    """A prefect-dask DaskTaskRunner for `opts`, or None for the flow's own runner."""
    if not (opts.dask_address or opts.dask_local):
        return None
    from prefect_dask import DaskTaskRunner

    if opts.dask_address:
        return DaskTaskRunner(address=opts.dask_address)
    # one thread per worker process: tokenizing holds the GIL between batches, processes scale, threads don't
    return DaskTaskRunner(cluster_kwargs=dict(n_workers=opts.dask_local, threads_per_worker=1, processes=True,
                                              dashboard_address=":0"))


@contextlib.contextmanager
def tasks_on(opts: ScaleOut, threads: int | None = None) -> Iterator[None]:
    """Inside a running flow: `task.submit` goes to the Dask cluster `opts` names until the block ends,
    or, without one, to a pool of `threads` threads of this process (None: the flow's own runner).

    Every future must be resolved inside the block (the cluster closes at its end). Tasks on Dask write
    only files under the home; the flow's process stays the only catalog writer."""
    dask = dask_runner(opts)
    if dask is None and threads is None:
        yield
        return
    from prefect import get_run_logger
    from prefect.context import FlowRunContext
    from prefect.task_runners import ThreadPoolTaskRunner

    ctx = FlowRunContext.get()
    if ctx is None:
        raise RuntimeError("tasks_on() needs a running flow")
    runner = dask or ThreadPoolTaskRunner(max_workers=threads)
    with runner:
        if dask is not None:
            client = runner.client  # connect now: a wrong address fails here, before any work is planned
            workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
            get_run_logger().info(f"tasks run on Dask at {client.scheduler.address} ({workers} workers)")
        # Prefect's ContextModel.model_copy drops the entered token, so the copy can be entered
        with ctx.model_copy(update={"task_runner": runner}):
            yield
