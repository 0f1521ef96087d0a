"""Flow `tokenize`: local FineWeb-Edu parquet -> filtered, deduplicated, tokenized shards + catalog.
Run: `langpwt tokenize --source data/sample` or `python -m flows.tokenize data/sample`.
The flow only sequences tasks and passes paths and ids; every step lives in tasks/."""
from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runtime import arrow_allocator, tasks_on
from storage import shard_catalog, sources
from storage.lock import exclusive
from storage.paths import Home
from storage.sources import SourceFile
from tasks.filter import FilterConfig
from tasks.finish import build_shard
from tasks.params import TokenizeParams, check_home
from tasks.record import Futures
from tasks.scan import ScanCounts
from tasks.schedule import Incoming, Steps, TokenizeRun
from tasks.stage import scan_step
from tasks.tokenize import ShardCounts, ShardJob
from tasks.tokenizer import home_vocab, preload_tokenizer, resolve_tokenizer, tokenizer_ready

__all__ = ["Incoming", "TokenizeParams", "local_files", "run_tokenize", "tokenize", "warm_tokenizer"]


@task(name="scan", retries=1, task_run_name="scan-{src.shard_id:06d}")
def scan_task(home: Home, src: SourceFile, cfg: FilterConfig, tok: tuple[str, str] | None = None) -> ScanCounts:
    """`tok` (tokenizer path, sha256): also encode the shard in the same read, staged until its dedup."""
    arrow_allocator()  # a Dask worker process starts here
    res = scan_step(home, src, cfg, tok)
    if res.error:
        get_run_logger().error(res.error)
    return res


@task(name="train-tokenizer")
def tokenizer_task(home: Home, usable: list[SourceFile], params: TokenizeParams) -> tuple[str, str, int]:
    origin, sha, vocab = resolve_tokenizer(home.tokenizer, usable, params.filter_config(),
                                           params.tokenizer_config(home_vocab(home.tokenizer)), params.tokenizer,
                                           params.retrain_tokenizer)
    get_run_logger().info(f"tokenizer {origin} vocab={vocab} sha256={sha[:12]}")
    return origin, sha, vocab


# retries re-run the whole shard: outputs are keyed by its config hash, so a retry writes the same bytes
@task(name="tokenize-shard", retries=1, task_run_name="shard-{job.source.shard_id:06d}")
def tokenize_task(home: Home, job: ShardJob, staged: bool = False) -> ShardCounts:
    arrow_allocator()
    res = build_shard(home, job, staged)
    log = get_run_logger()
    if res.error:
        log.error(res.error)
    else:
        ntok = sum(res.tokens.values())
        log.info(f"shard {res.shard_id:06d}: {res.kept}/{res.rows_in} docs kept, {ntok:,} tokens, "
                 f"{ntok / max(res.seconds, 1e-9) / 1e6:.1f}M tokens/s")
    return res


def prefect_steps(home: Home, params: TokenizeParams) -> Steps:
    """The run's steps as Prefect tasks on the flow's current task runner."""
    return Steps(scan=lambda src, tok: scan_task.submit(home, src, params.filter_config(), tok),
                 train_tokenizer=lambda usable: tokenizer_task(home, usable, params),
                 build=lambda job: tokenize_task.submit(home, job, False),
                 finish=lambda job: tokenize_task(home, job, True),
                 futures=PREFECT)


def _ok(fut: PrefectFuture) -> bool:
    fut.wait(0)  # a finished future then knows its final state without asking the API
    return fut.state.is_completed()


PREFECT = Futures(done=lambda f: f.state.is_final(), ok=_ok, first=lambda fs: next(as_completed(fs)))


def run_tokenize(params: TokenizeParams, files: list[SourceFile | Incoming], listed: bool = False,
                 refused: dict[str, str] | None = None) -> dict:
    """The body shared by `tokenize` and `prepare` (tasks/schedule.py), its steps as tasks; then the report."""
    home = Home.from_env(params.home).ensure()
    summary = TokenizeRun(home, params, files, prefect_steps(home, params), listed, dict(refused or {}),
                          str(flow_run.id), get_run_logger()).run()
    create_table_artifact(key="tokenize-summary", table=summary["table"] or [{"shard": "none built"}],
                          description=f"{summary['built']} shards built, {summary['skipped']} up to date")
    return summary


def warm_tokenizer(home: Home, params: TokenizeParams) -> bool:
    """Whether the run's tokenizer is known before any file is read (given, or reused from the home);
    if so its load, the longest fixed cost of a run, starts now on a thread. Flows call it first thing."""
    ready = tokenizer_ready(home.tokenizer, params.tokenizer, params.retrain_tokenizer)
    if ready:
        preload_tokenizer(home.tokenizer, params.tokenizer)
    return ready


def local_files(home: Home, params: TokenizeParams) -> tuple[list[SourceFile], bool, dict[str, str]]:
    """`--source` (checked against `--manifest` if given), else the files this home downloaded, else the
    source (and manifest) of its last run; whether they were listed here (run_tokenize records them in
    `source_files` once their scans are under way); and {file: why} of those the manifest refused,
    recorded `failed` here."""
    if params.source and params.manifest:
        good, bad = sources.list_verified(params.source, params.manifest)
        refused = {f.file: why for f, why in bad}
        for why in refused.values():
            get_run_logger().error(why)
        sources.record(home, [f for f, _ in bad], "failed", errors=refused)
        return good, True, refused
    if params.source:
        # --force also re-reads every file for its sha256 instead of trusting what stat says
        return sources.list_local(params.source, hashes=home.source_hashes, rehash=params.force), True, {}
    if files := sources.from_catalog(home):
        if params.manifest:
            raise ValueError(f"--manifest {params.manifest}: checks a local --source; this home's files came from "
                             "the Hub and were verified against its listing")
        return files, False, {}
    if last := shard_catalog.last_source(home):
        source, manifest = last
        return local_files(home, params.model_copy(update={"source": source,
                                                           "manifest": params.manifest or manifest}))
    raise ValueError("--source: not given, and this home has neither downloads nor an earlier run")


@flow(name="tokenize", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def tokenize(params: TokenizeParams) -> dict:
    """Tokenize the parquet files of `params.source` into shards recorded in the catalog."""
    arrow_allocator()
    check_home(params, Home.from_env(params.home))  # before the home is made or locked
    home = Home.from_env(params.home).ensure()
    started = shard_catalog.utcnow()
    with exclusive(home.lock, params.wait):
        warm_tokenizer(home, params)
        files, listed, refused = local_files(home, params)
        shard_catalog.record_pipeline_run(home, str(flow_run.id), "tokenize", params.model_dump(), "running", started)
        try:
            with tasks_on(params, params.workers):  # per-file tasks on --workers threads, or on Dask
                summary = run_tokenize(params, files, listed, refused)
        except BaseException as e:
            shard_catalog.record_pipeline_run(home, str(flow_run.id), "tokenize", params.model_dump(),
                                              "failed", started, {"error": str(e)})
            raise
        status = "failed" if summary["failed"] else "completed"
        shard_catalog.record_pipeline_run(home, str(flow_run.id), "tokenize", params.model_dump(), status,
                                          started, {k: v for k, v in summary.items() if k != "table"})
    return summary


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else "data/sample"
    out = tokenize(TokenizeParams(source=src))
    print({k: v for k, v in out.items() if k != "table"})
    sys.exit(1 if out["failed"] else 0)
