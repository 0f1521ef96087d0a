"""The tokenize/prepare flows end to end on real text: exact round trip, reruns, reprocess, staleness."""
import json
from collections import Counter

import numpy as np
import polars as pl
import pytest

from flows.prepare import PrepareParams, prepare
from flows.tokenize import TokenizeParams, tokenize
from storage import catalog
from storage.shards import open_shard
from tasks.tokenizer import Encoder
from tests.conftest import sample_rows, write_parquet

VOCAB = 4096


def _state(home):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(home.shards.iterdir())}


def _decoded_docs(home):
    enc = Encoder(home.tokenizer)
    out = Counter()
    for p in sorted(home.shards.glob("*.bin")):
        s = open_shard(p)
        assert all(s.tokens[int(o)] == enc.eot for o in s.offsets[:-1])
        out.update(enc.decode(s.doc(k)) for k in range(s.n_docs))
    return out


def test_shards_decode_to_exactly_the_kept_documents(prefect_api, home, sample_source):
    summary = prepare(PrepareParams(source=str(sample_source), vocab_size=VOCAB))
    assert summary["built"] == 2 and not summary["failed"]
    rows = pl.DataFrame(sample_rows())
    # what the rules and dedup must keep, computed independently of the pipeline's own code
    rows = rows.with_row_index("pos")
    ok = rows.filter(pl.col("int_score") >= 3)
    ok = ok.filter(pl.col("id").is_first_distinct()).filter(pl.col("text").is_first_distinct())
    expected = Counter(ok["text"].to_list())
    assert _decoded_docs(home) == expected
    con_rows = catalog.query_rows(home, "SELECT count(*), count(*) FILTER (WHERE kept), "
                                        "sum(n_tokens) FILTER (WHERE kept) FROM documents")[0]
    assert con_rows[0] == rows.height and con_rows[1] == sum(expected.values())
    shard_tokens = catalog.query_rows(home, "SELECT sum(n_tokens), sum(n_docs) FROM shards WHERE status='done'")[0]
    assert shard_tokens == (con_rows[2] + con_rows[1], con_rows[1])  # + one <|endoftext|> per document
    counts = catalog.query_rows(home, "SELECT sum(count) FROM token_counts")[0][0]
    assert counts == shard_tokens[0]
    reasons = dict(catalog.query_rows(home, "SELECT drop_reason, count(*) FROM documents WHERE NOT kept GROUP BY 1"))
    assert reasons["low_int_score"] == int((rows["int_score"] < 3).sum())
    assert reasons["dup_id"] + reasons["dup_text"] == rows.height - reasons["low_int_score"] - ok.height
    meta = json.loads(home.shard_meta(1).read_text())
    assert meta["earlier"] == [0] and meta["filter"]["min_int_score"] == 3


def test_rerun_does_nothing_and_reprocess_touches_only_named(prefect_api, home, sample_source):
    params = TokenizeParams(source=str(sample_source), vocab_size=VOCAB)
    tokenize(params)
    before = _state(home)
    again = tokenize(params)
    assert again["built"] == 0 and again["skipped"] == 2
    assert _state(home) == before
    redo = tokenize(params.model_copy(update={"reprocess": [1]}))
    assert redo["built"] == 1
    after = _state(home)
    changed = {n for n in before if before[n][0] != after[n][0]}
    assert changed and all(n.startswith("shard_000001") for n in changed)
    assert all(before[n][1] == after[n][1] for n in before)  # same bytes
    n = catalog.query_rows(home, "SELECT count(*) FROM shards")[0][0]
    assert n == 4  # one row per shard and split, never duplicated


def test_filter_change_marks_stale_and_rebuilds(prefect_api, home, sample_source):
    params = TokenizeParams(source=str(sample_source), vocab_size=VOCAB)
    tokenize(params)
    docs_before = catalog.query_rows(home, "SELECT count(*) FROM documents WHERE kept")[0][0]
    out = tokenize(params.model_copy(update={"min_int_score": 4}))
    assert out["built"] == 2
    docs_after = catalog.query_rows(home, "SELECT count(*) FROM documents WHERE kept")[0][0]
    assert docs_after < docs_before
    assert catalog.query_rows(home, "SELECT DISTINCT status FROM shards") == [("done",)]
    runs = catalog.query_rows(home, "SELECT count(*) FROM pipeline_runs WHERE status='completed'")[0][0]
    assert runs == 2


def test_same_inputs_give_identical_bytes(prefect_api, tmp_path, sample_source, monkeypatch):
    digests = []
    for name in ("a", "b"):
        h = tmp_path / name
        tokenize(TokenizeParams(source=str(sample_source), home=str(h), vocab_size=VOCAB))
        digests.append({p.name: p.read_bytes() for p in sorted((h / "shards").iterdir())})
        digests[-1]["tokenizer.json"] = (h / "tokenizer" / "tokenizer.json").read_bytes()
    assert digests[0] == digests[1]


def test_odd_but_valid_values(prefect_api, home, tmp_path):
    base = sample_rows()[:50]
    odd_texts = ["日本語の文書です。" * 50, "emoji 🎉👍🏽 👨‍👩‍👧 " * 30, "ctrl \x00\x01\x1f chars", "z" * 100_000,
                 "literal <|endoftext|> in a document", None, "", "ok"]
    rows = [dict(base[i], text=t, id=f"<urn:odd:{i}>", int_score=4) for i, t in enumerate(odd_texts)]
    rows[1]["dump"] = None
    rows[2]["url"] = None
    write_parquet(tmp_path / "odd" / "000_00000.parquet", base + rows)
    out = tokenize(TokenizeParams(source=str(tmp_path / "odd"), vocab_size=1024, val_fraction=0.0))
    assert not out["failed"]
    got = _decoded_docs(home)
    for t in odd_texts:
        if t:
            assert got[t] == 1
    reasons = dict(catalog.query_rows(home, "SELECT drop_reason, count(*) FROM documents GROUP BY 1"))
    assert reasons["null_text"] == 1 and reasons["empty_text"] == 1


def test_token_counts_match_shards(prefect_api, home, sample_source):
    tokenize(TokenizeParams(source=str(sample_source), vocab_size=VOCAB))
    for sid in (0, 1):
        toks = open_shard(home.shard(sid, "train")).tokens
        want = np.bincount(toks, minlength=VOCAB)
        got = dict(catalog.query_rows(home, "SELECT token_id, count FROM token_counts WHERE shard_id=? AND split='train'",
                                      [sid]))
        assert {i: int(c) for i, c in enumerate(want) if c} == got


def _file_task_spans(flow_run_id) -> list[tuple]:
    """(start, end) of every scan and shard task run of one flow run, as Prefect recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [(r.start_time, r.end_time) for r in runs if r.name.startswith(("scan-", "shard-"))]


def _most_at_once(spans: list[tuple]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


def test_workers_bounds_the_file_tasks_running_at_once(prefect_api, home, tmp_path):
    rows = sample_rows()
    src = tmp_path / "four"
    for i in range(4):  # four files, scanned together as soon as the run starts
        write_parquet(src / f"{i:03d}_00000.parquet", rows[i::4])
    for workers in (1, 2):
        state = tokenize(TokenizeParams(source=str(src), home=str(tmp_path / f"home{workers}"), vocab_size=VOCAB,
                                        workers=workers), return_state=True)
        assert state.result()["built"] == 4
        spans = _file_task_spans(state.state_details.flow_run_id)
        assert len(spans) == 8 and all(s and e for s, e in spans)  # 4 scans, 4 shards
        assert _most_at_once(spans) <= workers, (workers, sorted(spans))


def _no_eot_tokenizer() -> str:
    from tokenizers import Tokenizer, models
    return Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).to_str()


@pytest.mark.parametrize("text,why", [('{"model": ', "not a readable tokenizer.json"),
                                      (None, "has no <|endoftext|>")], ids=["truncated", "no-eot"])
def test_a_given_tokenizer_that_is_not_usable_is_refused_and_changes_nothing(prefect_api, home, sample_source,
                                                                            tmp_path, text, why):
    params = TokenizeParams(source=str(sample_source), vocab_size=VOCAB)
    tokenize(params)
    before, tok_before = _state(home), home.tokenizer.read_bytes()
    rows_before = catalog.query_rows(home, "SELECT shard_id, split, status, sha256 FROM shards ORDER BY 1, 2")
    bad = tmp_path / "bad.json"
    bad.write_text(text if text is not None else _no_eot_tokenizer())
    try:
        tokenize(params.model_copy(update={"tokenizer": str(bad), "force": True}))
    except ValueError as e:
        assert str(bad) in str(e) and why in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("an unusable tokenizer.json was accepted")
    # the trained tokenizer, the shards and their rows are as they were; the next run reuses them all
    assert home.tokenizer.read_bytes() == tok_before and _state(home) == before
    assert catalog.query_rows(home, "SELECT shard_id, split, status, sha256 FROM shards ORDER BY 1, 2") == rows_before
    assert tokenize(params)["built"] == 0


@pytest.mark.parametrize("preset,expected", [(None, "jemalloc"), ("system", "system")], ids=["default", "user-set"])
def test_pipeline_processes_choose_arrows_allocator_at_start_and_imports_change_nothing(preset, expected):
    """Importing the flows leaves the environment and Arrow's pool alone; the flow's start switches Arrow to
    jemalloc (mimalloc's eager huge-page arenas are zeroed on every touch), unless the user named a pool."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "MIMALLOC_ARENA_EAGER_COMMIT")}
    if preset is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = preset
    code = ("import os\n"
            "before = dict(os.environ)\n"
            "import flows.tokenize, flows.prepare, tasks, storage\n"
            "import pyarrow as pa\n"
            "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
            # Polars' own import sets its allocator's _RJEM_MALLOC_CONF: not ours to judge
            "assert not {k for k in changed if k.startswith(('MIMALLOC', 'ARROW', 'LANGPWT'))}, changed\n"
            "imported = pa.default_memory_pool().backend_name\n"
            "from flows.runtime import arrow_allocator\n"
            "arrow_allocator()\n"
            "print(imported, pa.default_memory_pool().backend_name)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    imported, started = out.stdout.split()
    assert started == expected
    assert imported == ("mimalloc" if preset is None else preset)  # untouched until the flow starts
