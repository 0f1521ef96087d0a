"""Flow `tokenize`: local FineWeb-Edu parquet -> filtered, deduplicated, tokenized shards + catalog.
Run: `langpwt tokenize --source data/sample` or `python -m flows.tokenize data/sample`.
The flow only sequences tasks and passes paths and ids; every step lives in tasks/."""
from __future__ import annotations

import sys
import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from storage import shard_catalog, sources
from storage.lock import exclusive
from storage.paths import Home
from storage.sources import SourceFile
from tasks.filter import FilterConfig
from tasks.plan import plan_shards
from tasks.read import BadInput
from tasks.scan import ScanCounts, scan_file
from tasks.tokenize import ShardJob, tokenize_file
from tasks.tokenizer import Encoder, TokenizerConfig, ensure_tokenizer


class TokenizeParams(BaseModel):
    """Parameters of `tokenize` (and the tokenize half of `prepare`)."""
    source: str | None = Field(None, description="folder of parquet files laid out like the Hub subset")
    home: str | None = Field(None, description="state folder; default $LANGPWT_HOME or ./.langpwt")
    workers: int = Field(2, ge=1, le=256)
    tokenizer: str | None = Field(None, description="use this tokenizer.json instead of training one")
    vocab_size: int = Field(48_951, ge=258, le=2**31 - 1)
    tokenizer_sample_mb: int = Field(48, ge=1)
    retrain_tokenizer: bool = False
    min_int_score: int | None = 3
    min_language_score: float | None = None
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    dumps: list[str] | None = None
    dedup: bool = True
    val_fraction: float = Field(0.005, ge=0.0, lt=1.0)
    reprocess: list[int] | None = None
    force: bool = False
    wait: float = Field(0.0, ge=0, description="seconds to wait for another run on the same home")

    def filter_config(self) -> FilterConfig:
        return FilterConfig(self.min_int_score, self.min_language_score, self.min_chars, self.max_chars,
                            tuple(self.dumps) if self.dumps else None, self.dedup, self.val_fraction)

    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig(vocab_size=self.vocab_size, sample_bytes=self.tokenizer_sample_mb * 2**20)


@task(name="scan", retries=1, task_run_name="scan-{src.shard_id:06d}")
def scan_task(home: Home, src: SourceFile, cfg: FilterConfig) -> ScanCounts:
    try:
        return scan_file(home, src, cfg)
    except BadInput as e:
        get_run_logger().error(str(e))
        return ScanCounts(src.shard_id, 0, 0, skipped=False, error=str(e))


@task(name="train-tokenizer")
def tokenizer_task(home: Home, usable: list[SourceFile], params: TokenizeParams) -> tuple[str, str, int]:
    origin, sha = ensure_tokenizer(home.tokenizer, usable, params.filter_config(), params.tokenizer_config(),
                                   params.tokenizer, params.retrain_tokenizer)
    vocab = Encoder(home.tokenizer).vocab_size
    get_run_logger().info(f"tokenizer {origin} vocab={vocab} sha256={sha[:12]}")
    return origin, sha, vocab


# retries re-run the whole shard: outputs are keyed by its config hash, so a retry writes the same bytes
@task(name="tokenize-shard", retries=1, task_run_name="shard-{job.source.shard_id:06d}")
def tokenize_task(home: Home, job: ShardJob):
    res = tokenize_file(home, job, Encoder(job.tokenizer_path))
    log = get_run_logger()
    if res.error:
        log.error(res.error)
    else:
        ntok = sum(res.tokens.values())
        log.info(f"shard {res.shard_id:06d}: {res.kept}/{res.rows_in} docs kept, {ntok:,} tokens, "
                 f"{ntok / max(res.seconds, 1e-9) / 1e6:.1f}M tokens/s")
    return res


def run_tokenize(params: TokenizeParams, files: list[SourceFile]) -> dict:
    """The body shared by `tokenize` and `prepare`: scan, tokenizer, plan, shards, report.

    Tasks may run on other machines (Dask); only this process writes the catalog."""
    home = Home.from_env(params.home).ensure()
    log = get_run_logger()
    t0 = time.time()
    fcfg = params.filter_config()
    scans = [s.result() for s in [scan_task.submit(home, f, fcfg) for f in files]]
    failed = {}
    for f, sc in zip(files, scans):
        if sc.error:
            failed[f.file] = sc.error
            shard_catalog.record_failed(home, f.shard_id, f.file, f.sha256, None, sc.error, None, flow_run.id)
            sources.mark(home, f.file, "failed", sc.error)
    usable = [f for f, sc in zip(files, scans) if sc.error is None]
    if not usable:
        raise BadInput(f"{params.source or home.raw}: no usable source file among {len(files)}")
    origin, tok_sha, vocab = tokenizer_task(home, usable, params)
    shard_catalog.record_tokenizer(home, tok_sha, str(home.tokenizer), vocab, origin,
                                   params.tokenizer_config().__dict__)
    plan = plan_shards(home, usable, fcfg, str(home.tokenizer), tok_sha, params.reprocess, params.force,
                       flow_run.id)
    log.info(f"{len(plan.jobs)} shards to build, {len(plan.skipped)} up to date, {len(plan.stale)} stale")
    for job in plan.jobs:
        shard_catalog.mark_running(home, job.source.shard_id, job.source.file, job.source.sha256,
                                   job.config_hash, job.flow_run_id)
    futures = [tokenize_task.submit(home, job) for job in plan.jobs]
    results = []
    for fut in as_completed(futures):  # record each shard as it lands, so viewers see progress
        res = fut.result()
        results.append(res)
        if res.error:
            failed[res.source_file] = res.error
            job = next(j for j in plan.jobs if j.source.shard_id == res.shard_id)
            shard_catalog.record_failed(home, res.shard_id, res.source_file, job.source.sha256,
                                        job.config_hash, res.error, None, flow_run.id)
            sources.mark(home, res.source_file, "failed", res.error)
        else:
            shard_catalog.record_shard(home, res.shard_id, res.timing)
    summary = summarize(results, plan.skipped, failed, time.time() - t0)
    create_table_artifact(key="tokenize-summary", table=summary["table"],
                          description=f"{len(plan.jobs)} shards built, {len(plan.skipped)} skipped")
    return summary


def summarize(results: list, skipped: list[int], failed: dict, seconds: float) -> dict:
    rows, reasons = [], {}
    for r in sorted(results, key=lambda r: r.shard_id):
        rows.append(dict(shard=f"{r.shard_id:06d}", file=r.source_file, status=r.status,
                         docs_in=r.rows_in, kept=r.kept, tokens_train=r.tokens["train"],
                         tokens_val=r.tokens["val"], seconds=round(r.seconds, 2), error=r.error or ""))
        for k, v in r.dropped.items():
            reasons[k] = reasons.get(k, 0) + v
    tokens = sum(sum(r.tokens.values()) for r in results)
    return dict(table=rows, built=len(results) - sum(1 for r in results if r.error), skipped=len(skipped),
                failed=failed, tokens=tokens, dropped=reasons, seconds=round(seconds, 2),
                docs_in=sum(r.rows_in for r in results), kept=sum(r.kept for r in results))


@flow(name="tokenize", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def tokenize(params: TokenizeParams) -> dict:
    """Tokenize the parquet files of `params.source` into shards recorded in the catalog."""
    home = Home.from_env(params.home).ensure()
    started = shard_catalog.utcnow()
    with exclusive(home.lock, params.wait):
        if params.source is None:
            params = params.model_copy(update={"source": shard_catalog.last_source(home)})
            if params.source is None:
                raise ValueError("--source: not given and no earlier run on this home to take it from")
        files = sources.list_local(params.source)
        sources.record(home, files, "verified")
        shard_catalog.record_pipeline_run(home, str(flow_run.id), "tokenize", params.model_dump(), "running", started)
        try:
            summary = run_tokenize(params, files)
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
