"""Flow `tokenize`: local FineWeb-Edu parquet -> filtered, deduplicated, tokenized shards + catalog.
Run: `langpwt tokenize --source data/sample` or `python -m flows.tokenize data/sample`.
The flow only sequences tasks and passes paths and ids; every step lives in tasks/."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from flows.record import ShardRecorder
from flows.runtime import ScaleOut, tasks_on
from storage import shard_catalog, sources
from storage.atomic import remove_stale_temps
from storage.lock import exclusive
from storage.paths import Home
from storage.sources import SourceFile
from tasks.filter import FilterConfig
from tasks.finish import finish_file
from tasks.plan import check_reprocess, likely_built, plan_one, tokenizer_prefix
from tasks.read import BadInput
from tasks.scan import ScanCounts, scan_file
from tasks.stage import discard, stage_file
from tasks.tokenize import ShardJob, tokenize_file
from tasks.tokenizer import (Encoder, TokenizerConfig, ensure_tokenizer, preload_tokenizer, ready_sha256,
                             tokenizer_ready)


class TokenizeParams(ScaleOut):  # ScaleOut: dask_address / dask_local
    """Parameters of `tokenize` (and the tokenize half of `prepare`)."""
    source: str | None = Field(None, description="folder of parquet files laid out like the Hub subset")
    manifest: str | None = Field(None, description="sha256sum output or JSON listing the files of `source` with their "
                                                   "sha256: a file that differs, is missing or is not listed is "
                                                   "recorded failed and never tokenized")
    home: str | None = Field(None, description="state folder; default $LANGPWT_HOME or ./.langpwt")
    workers: int = Field(2, ge=1, le=256, description="files read and encoded at once (threads of this process; "
                                                      "on Dask, the cluster's workers decide)")
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
    force: bool = Field(False, description="redo every shard and re-read every source file for its sha256")
    wait: float = Field(0.0, ge=0, description="seconds to wait for another run on the same home")

    def filter_config(self) -> FilterConfig:
        return FilterConfig(self.min_int_score, self.min_language_score, self.min_chars, self.max_chars,
                            tuple(self.dumps) if self.dumps else None, self.dedup, self.val_fraction)

    def tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig(vocab_size=self.vocab_size, sample_bytes=self.tokenizer_sample_mb * 2**20)


@task(name="scan", retries=1, task_run_name="scan-{src.shard_id:06d}")
def scan_task(home: Home, src: SourceFile, cfg: FilterConfig, tok: tuple[str, str] | None = None) -> ScanCounts:
    """`tok` (tokenizer path, sha256): also encode the shard in the same read, staged until its dedup."""
    try:
        return stage_file(home, src, cfg, *tok) if tok else scan_file(home, src, cfg)
    except BadInput as e:
        get_run_logger().error(str(e))
        return ScanCounts(src.shard_id, 0, 0, skipped=False, error=str(e))


@task(name="train-tokenizer")
def tokenizer_task(home: Home, usable: list[SourceFile], params: TokenizeParams) -> tuple[str, str, int]:
    origin, sha = ensure_tokenizer(home.tokenizer, usable, params.filter_config(), params.tokenizer_config(),
                                   params.tokenizer, params.retrain_tokenizer)
    vocab = Encoder.cached(home.tokenizer, sha).vocab_size  # the shard tasks of this process reuse it
    get_run_logger().info(f"tokenizer {origin} vocab={vocab} sha256={sha[:12]}")
    return origin, sha, vocab


# retries re-run the whole shard: outputs are keyed by its config hash, so a retry writes the same bytes
@task(name="tokenize-shard", retries=1, task_run_name="shard-{job.source.shard_id:06d}")
def tokenize_task(home: Home, job: ShardJob, staged: bool = False):
    def encoder() -> Encoder:
        return Encoder.cached(job.tokenizer_path, job.tokenizer_sha256)
    res = finish_file(home, job, encoder) if staged else tokenize_file(home, job, encoder())
    log = get_run_logger()
    if res.error:
        log.error(res.error)
    else:
        ntok = sum(res.tokens.values())
        log.info(f"shard {res.shard_id:06d}: {res.kept}/{res.rows_in} docs kept, {ntok:,} tokens, "
                 f"{ntok / max(res.seconds, 1e-9) / 1e6:.1f}M tokens/s")
    return res


@dataclass
class Incoming:
    """A source file still downloading: its name, shard position, the download task's future, and
    `settle(future) -> SourceFile` that records the outcome in this process (raises if it failed)."""
    file: str
    position: int
    future: PrefectFuture
    settle: Callable[[PrefectFuture], SourceFile]
    _done: SourceFile | None = None

    def ready(self) -> bool:
        self.future.wait(0)  # a finished future then knows its final state without asking the API
        return self.future.state.is_completed()

    def result(self) -> SourceFile:
        if self._done is None:
            self._done = self.settle(self.future)
        return self._done


def run_tokenize(params: TokenizeParams, files: list[SourceFile | Incoming], listed: bool = False,
                 refused: dict[str, str] | None = None) -> dict:
    """The body shared by `tokenize` and `prepare`: scan, tokenizer, plan, shards, report.

    `files` are in shard order; a future is a file still downloading: shard i starts as soon as files
    0..i are in and scanned (dedup needs them) and the tokenizer exists. `listed`: `files` come from a
    local listing not yet in `source_files`. `refused`: {file: why} of source files already recorded
    failed (a manifest mismatch): reported, never read. Tasks may run on other machines (Dask); only
    this process writes the catalog."""
    home = Home.from_env(params.home).ensure()
    for folder in (home.shards, home.index, home.tokenizer_dir):
        remove_stale_temps(folder)
    log, t0, fcfg = get_run_logger(), time.time(), params.filter_config()
    try:
        check_reprocess(params.reprocess, [f.position for f in files])
    except ValueError:
        if listed:  # recorded all the same, as before any run
            sources.record(home, files, "verified")
        raise
    scans: dict[int, PrefectFuture] = {}
    tok, sha, states = None, None, {}
    # a given file is loaded from where it is, so scans start before its copy in the home is checked and
    # made; a remote Dask cluster is promised only the home's path, so there the copy comes first
    remote = bool(params.tokenizer and params.dask_address)
    tok_file = params.tokenizer if params.tokenizer and not remote else str(home.tokenizer)

    def scan(src: SourceFile) -> PrefectFuture:
        """With the tokenizer known, a file whose shard will likely be built is encoded in its one read."""
        before = [e if isinstance(e, SourceFile) else e._done for e in files if e.position < src.position]
        known = tok[1] if tok else sha  # trained meanwhile, or resolved before loading
        stage = known is not None and None not in before and likely_built(
            home, src, before, fcfg, known, states, params.reprocess, params.force)
        return scan_task.submit(home, src, fcfg, (tok_file, known) if stage else None)

    ready = _needs_no_training(home, params)  # the flows started loading it then (warm_tokenizer)
    if not ready:  # first, so the catalog work below overlaps them
        for f in files:
            if isinstance(f, SourceFile):
                scans[f.position] = scan(f)
    states = shard_catalog.shard_states(home)
    usable, failed, skipped, queued = [], dict(refused or {}), [], []
    rec = ShardRecorder(home, failed, flow_run.id)
    if ready:  # no sample needed: its sha256 now, so each file is read once (scan + encode)
        sha = ensure_tokenizer(home.tokenizer, [], fcfg, params.tokenizer_config(), params.tokenizer)[1] \
            if remote else ready_sha256(home.tokenizer, params.tokenizer)
        for f in files:
            if isinstance(f, SourceFile) and f.position not in scans:
                scans[f.position] = scan(f)
    if listed:
        sources.record(home, [f for f in files if isinstance(f, SourceFile)], "verified")
    if ready:
        tok = _tokenizer(home, [], params)  # the same file: a staged shard is checked against its job's sha256
    recorded = False

    def submit(srcs: list[SourceFile]) -> None:
        nonlocal recorded
        if srcs and not recorded:  # only once a file is usable, as when it is trained
            origin, sha, vocab = tok
            rec.tokenizer = dict(sha256=sha, path=str(home.tokenizer), vocab_size=vocab, origin=origin,
                                 config=params.tokenizer_config().__dict__)
            recorded = True
        jobs = []
        for src in srcs:
            earlier = usable[:usable.index(src)]
            verdict, job = plan_one(home, src, earlier, fcfg, str(home.tokenizer), tok[1], states,
                                    params.reprocess, params.force, flow_run.id)
            if job is None:
                skipped.append(src.shard_id)
                if scans[src.position].result().staged:
                    discard(home, src.shard_id)  # the guess was wrong: up to date after all
            else:
                jobs.append(job)
        staged = [j for j in jobs if scans[j.source.position].result().staged]
        to_build = [j for j in jobs if j not in staged]
        if to_build:  # a staged shard is finished right here: a `running` row would live a few ms
            shard_catalog.mark_running(home, [(j.source.shard_id, j.source.file, j.source.sha256, j.config_hash)
                                              for j in to_build], flow_run.id)
        for job in staged:
            # finishing is a rename in the usual case: here, at once, rather than queued behind the
            # remaining scans on the workers
            rec.finished(job, tokenize_task(home, job, True))
        for job in to_build:
            rec.submitted(tokenize_task.submit(home, job, False), job)

    def scan_arrived(i: int) -> None:
        for later in files[i + 1:]:  # scan files that finished downloading meanwhile
            if isinstance(later, Incoming) and later.position not in scans and later.ready():
                scans[later.position] = scan(later.result())

    woke: set = set()  # arrivals already seen: scanned, or downloads that failed (settled in their own turn)

    def wait_scanning(i: int, fut: PrefectFuture) -> None:
        """Wait for scan i; a download that lands meanwhile gets its scan at once, not after this one
        (a worker would idle for the rest of scan i)."""
        while True:
            arriving = [f.future for f in files[i + 1:] if isinstance(f, Incoming) and f.position not in scans
                        and f.future not in woke]
            if not arriving:
                return
            done = next(as_completed([fut, *arriving]))
            if done is fut:
                return
            scan_arrived(i)
            woke.add(done)

    for i, f in enumerate(files):
        src = f if isinstance(f, SourceFile) else _arrived(home, f, failed)
        if src is None:
            continue
        scan_arrived(i)
        if src.position not in scans:  # not setdefault: its argument would submit a second scan
            scans[src.position] = scan(src)
        wait_scanning(i, scans[src.position])
        sc = scans[src.position].result()
        if sc.error:
            failed[src.file] = sc.error
            shard_catalog.record_failed(home, src.shard_id, src.file, src.sha256, None, sc.error, None, flow_run.id)
            sources.mark(home, src.file, "failed", sc.error)
        else:
            usable.append(src)
            if tok is None and tokenizer_prefix(usable, params.tokenizer_config().sample_bytes):
                tok = _tokenizer(home, usable, params)
                queued = list(usable)
            elif tok is not None:
                queued.append(src)
        nxt = scans.get(files[i + 1].position) if i + 1 < len(files) else None
        if queued and not (nxt is not None and nxt.state.is_final()):  # plan the files scanned so far at once
            submit(queued)
            queued = []
        rec.flush()
    if not usable:
        raise BadInput(f"{params.source or home.raw}: no usable source file among {len(files) + len(refused or {})}")
    if tok is None:
        tok = _tokenizer(home, usable, params)
        submit(usable)
    log.info(f"{rec.count} shards built, {len(skipped)} up to date")
    rec.flush(block=True)
    summary = summarize(rec.results, skipped, failed, time.time() - t0)
    create_table_artifact(key="tokenize-summary", table=summary["table"] or [{"shard": "none built"}],
                          description=f"{summary['built']} shards built, {len(skipped)} up to date")
    return summary


def warm_tokenizer(home: Home, params: TokenizeParams) -> bool:
    """Whether the run's tokenizer is known before any file is read (given, or reusable from the home);
    if so its load, the longest fixed cost of a run, starts now on a thread. Flows call it first thing."""
    ready = _needs_no_training(home, params)
    if ready:
        preload_tokenizer(home.tokenizer, params.tokenizer)
    return ready


def _needs_no_training(home: Home, params: TokenizeParams) -> bool:
    return tokenizer_ready(home.tokenizer, params.tokenizer_config(), params.tokenizer, params.retrain_tokenizer)


def _arrived(home: Home, inc: Incoming, failed: dict) -> SourceFile | None:
    """A download's result, or None after noting why (source_files already holds the failure)."""
    try:
        return inc.result()
    except Exception as e:
        failed[inc.file] = str(e).splitlines()[0] if str(e) else type(e).__name__
        return None


def _tokenizer(home: Home, usable: list[SourceFile], params: TokenizeParams) -> tuple[str, str, int]:
    """(origin, sha256, vocab size); recorded in the catalog by the first `submit`."""
    return tokenizer_task(home, usable, params)


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
