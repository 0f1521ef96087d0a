"""Dashboard queries (no Streamlit) and every page through AppTest, against the pipeline-made home.
Expected numbers come from the shard files and the sample parquet, never from the catalog itself."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from streamlit.testing.v1 import AppTest

from dashboards import queries
from storage import catalog
from storage.paths import Home
from storage.shards import open_shard
from tests.conftest import ROOT, SAMPLE, sample_rows
from tests.test_dashboard_home import BAD_FILE, TRAIN_STEPS, dash_home, training_available  # noqa: F401

APP = str(ROOT / "dashboards" / "streamlit_app.py")
PAGES = ["pipeline", "token_stats", "training", "checkpoints", "playground"]
needs_training = pytest.mark.skipif(not training_available(), reason="training code not in this checkout")


def page(home: Home, name: str, monkeypatch, timeout: float = 60) -> AppTest:
    monkeypatch.setenv("LANGPWT_HOME", str(home.root))
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.run()
    at.switch_page(f"page_{name}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def shard_files(home: Home) -> dict[int, list]:
    out: dict[int, list] = {}
    for p in sorted(home.shards.glob("shard_*.bin")):
        out.setdefault(int(p.name[6:12]), []).append(open_shard(p))
    return out


def kept_sample_rows() -> pl.DataFrame:
    """What the filter and dedup keep from the two good files, computed independently."""
    rows = pl.DataFrame(sample_rows()).filter(pl.col("int_score") >= 3)
    return rows.filter(pl.col("id").is_first_distinct()).filter(pl.col("text").is_first_distinct())


# ---- queries.py, no Streamlit --------------------------------------------------------------------

def test_pipeline_view_matches_shards_on_disk(dash_home):
    v = queries.pipeline(dash_home)
    shards = {r["shard_id"]: r for r in v["shards"].to_pylist()}
    assert {k: r["status"] for k, r in shards.items()} == {0: "done", 1: "stale", 2: "failed"}
    files = shard_files(dash_home)
    for sid in (0, 1):
        assert shards[sid]["tokens"] == sum(len(s.tokens) for s in files[sid])
        assert shards[sid]["docs_kept"] == sum(s.n_docs for s in files[sid])
        n_rows = pl.read_parquet(SAMPLE / f"{sid:03d}_00000.parquet").height
        assert shards[sid]["docs_in"] == n_rows == shards[sid]["docs_kept"] + shards[sid]["docs_dropped"]
        assert shards[sid]["tokens_per_s"] == pytest.approx(shards[sid]["tokens"] / shards[sid]["seconds"], rel=1e-2)
    assert BAD_FILE in shards[2]["source_file"] and "parquet" in shards[2]["error"]
    t = v["totals"].to_pylist()[0]
    assert (t["shards"], t["done"], t["stale"], t["failed"], t["running"]) == (3, 1, 1, 1, 0)
    outcomes = dict(zip(v["outcomes"]["outcome"].to_pylist(), v["outcomes"]["documents"].to_pylist()))
    rows = pl.DataFrame(sample_rows())
    assert outcomes["kept"] == kept_sample_rows().height
    assert outcomes["low_int_score"] == int((rows["int_score"] < 3).sum())
    assert sum(outcomes.values()) == rows.height
    assert v["runs"]["status"].to_pylist()[-1] == "failed"  # one bad file fails the prepare run
    assert not queries.is_running(v) and not queries.pipeline_alive(dash_home)


def test_token_stats_match_shard_tokens(dash_home):
    v = queries.token_stats(dash_home, top_n=25, bins=20)
    files = [s for ss in shard_files(dash_home).values() for s in ss]
    all_tokens = np.concatenate([np.asarray(s.tokens) for s in files])
    n_docs = sum(s.n_docs for s in files)
    assert sum(v["by_dump"]["tokens"].to_pylist()) == len(all_tokens) - n_docs  # minus one <|endoftext|> each
    kept = kept_sample_rows()
    assert dict(zip(*v["by_dump"].select(["dump", "documents"]).to_pydict().values())) == \
        dict(kept.group_by("dump").len().iter_rows())
    assert sum(v["by_int_score"]["tokens"].to_pylist()) == len(all_tokens) - n_docs
    hist = v["length_hist"].to_pylist()
    assert sum(r["documents"] for r in hist) == n_docs and hist[-1]["hi"] is None
    assert all(a["hi"] == b["lo"] for a, b in zip(hist[:-2], hist[1:-1]))
    counts = np.bincount(all_tokens.astype(np.int64))
    top = v["top_tokens"].to_pylist()
    assert [r["count"] for r in top] == sorted(counts, reverse=True)[:25]
    assert all(counts[r["token_id"]] == r["count"] for r in top)
    decoded = queries.decode_tokens(dash_home.tokenizer, [r["token_id"] for r in top])
    assert "·the" in [text for _, text in decoded]


def test_sql_box_reads_refuses_writes_and_reports_errors(dash_home):
    res = queries.run_sql(dash_home, "SELECT dump, count(*) AS n FROM documents WHERE kept GROUP BY 1 ORDER BY 1")
    assert dict(zip(*res.table.to_pydict().values())) == dict(kept_sample_rows().group_by("dump").len().iter_rows())
    before = (dash_home.catalog.stat().st_mtime_ns, catalog.query_rows(dash_home, "SELECT count(*) FROM documents"))
    for stmt in ["INSERT INTO documents SELECT * FROM documents", "DELETE FROM documents",
                 "UPDATE shards SET status = 'done'", "DROP TABLE documents", "CREATE TABLE x AS SELECT 1",
                 f"COPY documents TO '{dash_home.root}/leak.csv'", "ATTACH ':memory:' AS m",
                 "SELECT 1; DELETE FROM runs"]:
        with pytest.raises(queries.SqlRefused):
            queries.run_sql(dash_home, stmt)
    assert (dash_home.catalog.stat().st_mtime_ns,
            catalog.query_rows(dash_home, "SELECT count(*) FROM documents")) == before
    assert not (dash_home.root / "leak.csv").exists()
    with pytest.raises(duckdb.PermissionException):  # file access is off for user SQL
        queries.run_sql(dash_home, f"SELECT * FROM read_parquet('{SAMPLE}/000_00000.parquet')")
    with pytest.raises(duckdb.ParserException, match="syntax error"):
        queries.run_sql(dash_home, "SELEC 1")
    with pytest.raises(duckdb.CatalogException, match="nope"):
        queries.run_sql(dash_home, "SELECT * FROM nope")
    capped = queries.run_sql(dash_home, "SELECT * FROM documents", max_rows=7)
    assert capped.table.num_rows == 7 and capped.truncated
    t0 = time.perf_counter()
    with pytest.raises(duckdb.InterruptException):
        queries.run_sql(dash_home, "SELECT count(*) FROM documents a, documents b, documents c", timeout_s=0.3)
    assert time.perf_counter() - t0 < 10


def test_sql_snapshot_is_taken_before_the_first_query(dash_home, tmp_path):
    h = Home(tmp_path / "h")
    shutil.copytree(dash_home.root, h.root, ignore=shutil.ignore_patterns("cache"))
    snaps = h.root / "cache" / "catalog-snapshots"
    t = queries.warm_sql(h)  # what the Token stats page does when it opens
    assert t is not None
    t.join(60)
    assert catalog.snapshot_ready(h) and queries.warm_sql(h) is None
    made = sorted(p.name for p in snaps.iterdir())
    assert len(made) == 1 and (not catalog.BOOT or made[0].startswith(catalog.BOOT))
    assert queries.run_sql(h, "SELECT count(*) FROM documents").table.column(0)[0].as_py() == len(sample_rows())
    assert sorted(p.name for p in snaps.iterdir()) == made  # the query used it: no second copy
    with catalog.writer(h) as con:
        con.execute("INSERT INTO runs (run_id, status) VALUES ('warm', 'running')")
    assert not catalog.snapshot_ready(h)
    queries.warm_sql(h).join(60)
    assert queries.run_sql(h, "SELECT count(*) FROM runs WHERE run_id = 'warm'").table.column(0)[0].as_py() == 1
    assert len(list(snaps.iterdir())) == 2  # the new state's, and the old one kept a while


def test_empty_and_missing_home_states(tmp_path):
    missing = Home.from_env(tmp_path / "nothing")
    assert queries.home_state(missing) == queries.HomeState(catalog=False)
    catalog.init(Home.from_env(tmp_path / "empty"))
    assert queries.home_state(Home.from_env(tmp_path / "empty")) == queries.HomeState(catalog=True)
    # a catalog file before its first commit has no tables (a clean-clone CI run caught a dashboard reader
    # there while `tokenize` started): every reader takes it for no catalog yet, which they wait on
    bare = Home.from_env(tmp_path / "bare")
    bare.root.mkdir()
    duckdb.connect(str(bare.catalog)).close()
    assert queries.home_state(bare) == queries.HomeState(catalog=False)
    for read in (queries.pipeline, queries.token_stats, lambda h: queries.run_sql(h, "SELECT * FROM shards")):
        with pytest.raises(catalog.CatalogMissing, match="empty catalog"):
            read(bare)
    with pytest.raises(catalog.CatalogMissing):
        catalog.query_rows(bare, "SELECT count(*) FROM documents")


# ---- pages through AppTest -----------------------------------------------------------------------

@pytest.mark.parametrize("name", PAGES)
def test_pages_on_missing_and_empty_home_say_what_to_run(name, tmp_path, monkeypatch):
    for h in (Home.from_env(tmp_path / "missing"), Home.from_env(tmp_path / "empty")):
        if h.root.name == "empty":
            catalog.init(h)
        at = page(h, name, monkeypatch)
        hints = [c.value for c in at.code]
        assert any("langpwt prepare" in c or "langpwt train" in c for c in hints), hints
        assert at.info, "an empty home must say what to run first"
    assert not (tmp_path / "missing").exists()  # viewing never creates a home


def test_pipeline_page(dash_home, monkeypatch):
    at = page(dash_home, "pipeline", monkeypatch)
    m = {x.label: x.value for x in at.metric}
    assert (m["Shards done"], m["Failed"], m["Stale"]) == ("1/3", "1", "1")
    status = at.dataframe[0].value["status"].tolist()
    assert status == ["done", "stale", "failed"]
    assert any(BAD_FILE in e.value for e in at.error)
    assert not any("refreshes" in i.value for i in at.info)  # nothing is running: no timer


def test_token_stats_page_and_sql_box(dash_home, monkeypatch):
    at = page(dash_home, "token_stats", monkeypatch)
    charts = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    assert [c["encoding"]["x"]["field"] for c in charts] == ["dump", "int_score", "bin"]
    top = at.dataframe[0].value
    assert "·the" in top["text"].tolist()
    at.text_area(key="sql_text").input("SELECT int_score, count(*) AS docs FROM documents GROUP BY 1 ORDER BY 1")
    at.button[0].click().run()
    assert not at.error and not at.exception
    result = at.dataframe[1].value
    assert result["docs"].sum() == len(sample_rows())
    assert len(at.get("vega_lite_chart")) == 4  # the two-column result is charted
    assert at.get("download_button")
    at.text_area(key="sql_text").input("SELECT nosuchcolumn FROM documents")
    at.button[0].click().run()
    assert any("nosuchcolumn" in e.value and "Binder Error" in e.value for e in at.error)
    at.text_area(key="sql_text").input("DELETE FROM documents")
    at.button[0].click().run()
    assert any("refused" in e.value for e in at.error) and not at.exception


def test_sql_box_survives_queries_that_kill_duckdb_or_run_away(dash_home, monkeypatch):
    """The box's queries run in a child process: an abort, a huge allocation or a runaway query is an error
    on the page, and the page (in this very process) goes on answering."""
    at = page(dash_home, "token_stats", monkeypatch)
    for q, words in [("SELECT * FROM enable_logging(storage_path='/tmp/x')", "Error"),
                     ("SELECT length(repeat('x', 2000000000))", "Out of Memory"),
                     (f"SELECT * FROM read_parquet('{SAMPLE}/000_00000.parquet')", "Permission Error")]:
        at.text_area(key="sql_text").input(q)
        at.button[0].click().run()
        assert not at.exception and any(words in e.value for e in at.error), (q, [e.value for e in at.error])
    t0 = time.perf_counter()
    with pytest.raises(duckdb.InterruptException, match="time limit"):
        queries.run_sql(dash_home, "SELECT count(*) FROM documents a, documents b, documents c, documents d",
                        timeout_s=1)
    assert time.perf_counter() - t0 < 1 + queries.user_sql.GRACE_S + 5
    at.text_area(key="sql_text").input("SELECT count(*) AS n FROM documents")
    at.button[0].click().run()
    assert not at.error and at.dataframe[1].value["n"].tolist() == [len(sample_rows())]


@needs_training
def test_training_page_two_runs_side_by_side(dash_home, monkeypatch):
    at = page(dash_home, "training", monkeypatch)
    runs = at.dataframe[0].value
    assert set(runs["run_id"]) == {"tiny-fixture", "tiny-fixture-b"}
    assert sorted(at.multiselect[0].value) == ["tiny-fixture", "tiny-fixture-b"]
    steps = sorted(int(x.value) for x in at.metric if x.label == "Step")
    assert steps == [5, TRAIN_STEPS]
    best = {x.value for x in at.metric if x.label == "Best val loss"}
    assert best == {f"{r[0]:.4f}" for r in catalog.query_rows(
        dash_home, "SELECT min(val_loss) FROM metrics GROUP BY run_id")}
    # comparison charts (loss; val bpb: one home, one val split) + per run: loss, val bpb, lr, tokens/s (no MFU
    # on CPU); each run's whole-split bpb named with its split
    assert len(at.get("vega_lite_chart")) == 2 + 2 * 4
    whole = catalog.query_rows(dash_home, "SELECT value, split_id FROM evals WHERE metric = 'val_bpb'")
    assert len(whole) == 2 and all(any(f"{v:.4f} bpb" in c.value and s[:12] in c.value for c in at.caption)
                                   for v, s in whole)
    at.multiselect[0].unselect("tiny-fixture-b").run()
    assert [int(x.value) for x in at.metric if x.label == "Step"] == [TRAIN_STEPS]


@needs_training
def test_checkpoints_page_links_prefect(dash_home, monkeypatch, prefect_api):
    from flows.train import artifact_key

    monkeypatch.setenv("PREFECT_UI_URL", "http://prefect.example:4200")
    monkeypatch.setenv("PREFECT_API_URL", prefect_api)
    at = page(dash_home, "checkpoints", monkeypatch)
    df = at.dataframe[0].value
    ckpts = catalog.query_rows(dash_home, "SELECT run_id, step, sha256, flow_run_id FROM checkpoints")
    assert sorted(zip(df["run_id"], df["step"], df["sha256"])) == sorted(r[:3] for r in ckpts)
    assert {f"http://prefect.example:4200/runs/flow-run/{r[3]}" for r in ckpts} == set(df["flow_run"])
    newest = df.iloc[0]
    evals = at.dataframe[1].value  # the newest checkpoint's evaluations: its run's whole-split bpb
    want = catalog.query_rows(dash_home, "SELECT metric, value FROM evals WHERE run_id = ? AND step = ? ORDER BY 1",
                              [newest["run_id"], int(newest["step"])])
    assert sorted(zip(evals["metric"], evals["value"])) == want and [m for m, _ in want] == ["val_bpb", "val_loss"]
    arts = at.dataframe[2].value  # the newest checkpoint's flow run, as the Prefect API lists it
    assert artifact_key(newest["run_id"], f"checkpoint-{int(newest['step']):06d}") in set(arts["key"])
    assert any("state **Completed**" in m.value for m in at.markdown)


@needs_training
def test_playground_streams_and_repeats_with_a_seed(dash_home, monkeypatch):
    from dashboards import generation

    at = page(dash_home, "playground", monkeypatch)
    at.text_area(key="pg_prompt").input("The water")
    at.number_input(key="pg_len").set_value(12)
    at.number_input(key="pg_seed").set_value(7)
    at.button[0].click().run()
    assert not at.exception and not at.error
    first = at.session_state["pg_last"]["text"]
    assert first
    at.button[0].click().run()
    assert at.session_state["pg_last"]["text"] == first  # same seed, same text
    row = catalog.query_rows(dash_home, "SELECT path FROM checkpoints ORDER BY created_at DESC, step DESC LIMIT 1")
    m = generation.load(row[0][0], dash_home.tokenizer, "cpu")
    direct = "".join(generation.stream(m, "The water", 12, 0.8, 50, 1.0, 7))
    assert first == "".join(generation.markdown_literal([direct]))


# ---- a pipeline writing while the dashboard reads ------------------------------------------------

def _watch(h: Home, proc: subprocess.Popen, at: AppTest, stop_when=lambda seen: False) -> Counter:
    """Read the catalog and render the Pipeline page in a loop until `proc` ends (or `stop_when`)."""
    seen = Counter()
    while proc.poll() is None and not stop_when(seen):
        v = queries.pipeline(h)
        seen.update(v["shards"]["status"].to_pylist())
        seen["running now"] = v["shards"]["status"].to_pylist().count("running")  # the last read only
        if queries.is_running(v):
            seen["run"] += 1
            at.run()
            assert not at.exception, [e.value for e in at.exception]
            seen["page live"] += any("refreshes" in i.value for i in at.info)
    return seen


@pytest.mark.slow
def test_dashboard_reads_while_pipeline_writes(dash_home, prefect_api, tmp_path, monkeypatch):
    """`tokenize --force` in another process, SIGKILLed mid-run, then resumed, while the Pipeline page
    and its queries run in a loop: the writer never fails, the page never errors, shows the run live,
    and calls a run that died (quiet catalog, no lock holder) probably interrupted."""
    h = Home.from_env(tmp_path / "copy")
    shutil.copytree(dash_home.root, h.root, ignore=shutil.ignore_patterns("runs", "pipeline.lock"))
    src = tmp_path / "src"
    src.mkdir()
    # the sample's two files, sixteen times over (own ids and texts, so nothing dedups): a run of several
    # seconds, long enough to be watched live whatever this machine's speed (the plain sample is too quick)
    for f in sorted(SAMPLE.glob("*.parquet")):
        df = pl.read_parquet(f)
        pl.concat([df.with_columns(id=pl.col("id") + f"-{c}", text=pl.lit(f"Part {c}: ") + pl.col("text"))
                   for c in range(16)]).write_parquet(src / f.name, row_group_size=500)

    def tokenize(*extra):
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(h.root), "tokenize", *extra,
                                 "--source", str(src), "--vocab-size", "4096"], cwd=ROOT,
                                env={**os.environ, "PREFECT_API_URL": prefect_api},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    monkeypatch.setenv("LANGPWT_HOME", str(h.root))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("page_pipeline.py")
    proc = tokenize("--force")
    # killed while a shard row says `running` (a shard may still finish between the read and the kill)
    seen = _watch(h, proc, at, stop_when=lambda seen: seen["page live"] >= 2 and seen["running now"])
    proc.kill()
    proc.wait()
    assert seen["page live"] >= 2, seen
    v = queries.pipeline(h)
    if queries.is_running(v):  # the run's row (and maybe shard rows) still say `running`
        old = time.time() - 600  # ten quiet minutes later
        for p in (h.catalog, Path(f"{h.catalog}.wal")):
            if p.exists():
                os.utime(p, (old, old))
        at.run()
        assert any("probably interrupted" in w.value for w in at.warning), [w.value for w in at.warning]
        if v["totals"]["running"][0].as_py() > 0:  # killed mid-shard: those rows read "interrupted?"
            assert "interrupted?" in at.dataframe[0].value["status"].tolist()
    proc = tokenize()
    seen = _watch(h, proc, at)
    out = proc.stdout.read()
    assert proc.returncode == 0, out
    final = queries.pipeline(h)["totals"].to_pylist()[0]
    assert (final["done"], final["running"]) == (2, 0)  # shard 2's source is not in this run: still failed
    at.run()
    assert not at.exception and not any("refreshes" in i.value for i in at.info)
