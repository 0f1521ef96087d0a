"""Per-shard tasks are idempotent under Prefect retries and reruns: a shard task that fails mid-write
is retried by Prefect and leaves the same bytes and one catalog row per split as a clean run.
The fault is the process running out of memory (an error the task does not turn into a failed shard,
so Prefect retries it) at the two dangerous moments: half a shard written; shard files final but no
`.json` marker yet. Everything else, Prefect's retry included, runs for real. (Disk errors are not
retried: they fail the shard with a one-line reason, tests/test_pipeline_faults.py.)"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import tasks.tokenize as tok_mod
from storage import catalog, shard_catalog
from storage.paths import Home
from storage.shards import ShardWriter
from tests.conftest import SAMPLE

pytestmark = pytest.mark.slow

ROWS = "SELECT shard_id, split, count(*), any_value(sha256), any_value(status) FROM shards GROUP BY 1, 2 ORDER BY 1, 2"
DOCS = "SELECT shard_id, count(*), sum(n_tokens) FROM documents GROUP BY 1 ORDER BY 1"


def outputs(home: Home) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(home.shards.iterdir())}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("retry") / "source"
    shutil.copytree(SAMPLE, d, ignore=shutil.ignore_patterns("*.md"))
    return d


@pytest.fixture(scope="module")
def reference(prefect_api, source, tmp_path_factory) -> Home:
    from flows.tokenize import TokenizeParams, tokenize

    h = Home.from_env(tmp_path_factory.mktemp("retry_ref") / "home")
    out = tokenize(TokenizeParams(source=str(source), home=str(h.root), vocab_size=1024))
    assert out["built"] == 2 and not out["failed"], out
    return h


def shard_task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["shard-000001"])))


@pytest.mark.parametrize("moment", ["mid-bin", "before-marker"])
def test_retry_after_crash_mid_write(moment, reference, source, tmp_path, monkeypatch):
    from flows.tokenize import TokenizeParams, tokenize

    home = Home.from_env(tmp_path / "home")
    seen: list = []
    if moment == "mid-bin":
        from storage import direct_io

        monkeypatch.setattr(direct_io, "CHUNK", 4096)  # buffers this small: the shard's start reaches the disk
        append = ShardWriter.append

        def failing_append(self, tokens, starts):
            append(self, tokens, starts)
            if self.path.name == "shard_000001.train.bin" and not seen and self._f.written():
                seen.append(self._tmp.stat().st_size)  # half a shard lies in its temp file
                raise MemoryError("injected: out of memory mid-write")
        monkeypatch.setattr(ShardWriter, "append", failing_append)
    else:
        write_text = tok_mod.atomic_write_text

        def failing_marker(path, text):
            if Path(path).name == "shard_000001.json" and not seen:
                seen.append(sorted(p.name for p in home.shards.glob("shard_000001.*")))  # final, unmarked
                raise MemoryError("injected: out of memory before the marker")
            return write_text(path, text)
        monkeypatch.setattr(tok_mod, "atomic_write_text", failing_marker)

    state = tokenize(TokenizeParams(source=str(source), home=str(home.root), vocab_size=1024), return_state=True)
    out = state.result()
    assert seen, "the fault never fired"
    if moment == "mid-bin":
        assert seen[0] > 1024  # header plus tokens were on disk when it failed
    else:
        assert "shard_000001.train.bin" in seen[0] and "shard_000001.json" not in seen[0]
    assert out["built"] == 2 and not out["failed"], out
    # Prefect retried the failed attempt inside the same task run
    runs = shard_task_runs(state.state_details.flow_run_id)
    assert len(runs) == 1 and runs[0].run_count == 2 and runs[0].state.is_completed()
    assert outputs(home) == outputs(reference)
    assert not list(home.shards.glob(".*.tmp"))
    rows = catalog.query_rows(home, ROWS)
    assert rows == catalog.query_rows(reference, ROWS) and all(r[2] == 1 for r in rows)
    assert catalog.query_rows(home, DOCS) == catalog.query_rows(reference, DOCS)


def test_rerun_and_reingest_keep_one_row(reference, source, tmp_path):
    """A rerun of a done shard (`--reprocess`) and a second ingest of its sidecars change nothing."""
    from flows.tokenize import TokenizeParams, tokenize

    home = Home.from_env(tmp_path / "home")
    shutil.copytree(reference.root, home.root)
    with catalog.writer(home) as con:
        con.execute("UPDATE shards SET path = replace(path, ?, ?)", [str(reference.root), str(home.root)])
    out = tokenize(TokenizeParams(source=str(source), home=str(home.root), vocab_size=1024, reprocess=[1]))
    assert out["built"] == 1 and out["skipped"] == 1, out
    shard_catalog.record_shard(home, 1)  # the flow process ingesting the same sidecars again
    assert outputs(home) == outputs(reference)
    assert catalog.query_rows(home, ROWS) == catalog.query_rows(reference, ROWS)
    assert catalog.query_rows(home, DOCS) == catalog.query_rows(reference, DOCS)
