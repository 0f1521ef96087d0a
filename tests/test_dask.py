"""Scale-out: the tokenize flow on a dask.distributed cluster of 2 worker processes writes the same
bytes and catalog rows as the default thread runner; only the flow's process touches the catalog."""
from __future__ import annotations

import hashlib

import pytest

from storage import catalog
from storage.paths import Home
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

SHARD_ROWS = ("SELECT shard_id, split, parse_filename(path), n_docs, n_tokens, sha256, source_sha256, tokenizer_sha256, "
              "config_hash, status FROM shards ORDER BY shard_id, split")
DOC_ROWS = "SELECT shard_id, count(*), sum(n_tokens), count(*) FILTER (WHERE kept) FROM documents GROUP BY 1 ORDER BY 1"


def outputs(home: Home) -> dict[str, str]:
    """sha256 of every shard and sidecar (the tokenizer too): what a worker writes."""
    files = sorted(home.shards.glob("shard_*")) + [home.tokenizer]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory, sample_source_module):
    """The default runner's output on the sample, once for the module."""
    from flows.tokenize import TokenizeParams, tokenize

    h = Home.from_env(tmp_path_factory.mktemp("ref") / "home")
    out = tokenize(TokenizeParams(source=str(sample_source_module), home=str(h.root), vocab_size=1024))
    assert out["built"] == 2 and not out["failed"], out
    return h


@pytest.fixture(scope="module")
def sample_source_module(tmp_path_factory):
    import shutil

    from tests.conftest import SAMPLE

    d = tmp_path_factory.mktemp("src") / "source"
    shutil.copytree(SAMPLE, d, ignore=shutil.ignore_patterns("*.md"))
    return d


@pytest.mark.parametrize("given", [False, True], ids=["trained", "given-tokenizer"])
def test_two_dask_workers_write_identical_shards(reference, sample_source_module, tmp_path, given):
    """A LocalCluster of 2 worker processes reached by its address, as a remote cluster would be; with a
    given tokenizer (a path a remote worker may not see) the workers load the home's copy."""
    from distributed import Client, LocalCluster, get_task_stream

    from flows.tokenize import TokenizeParams, tokenize

    h = Home.from_env(tmp_path / "home")
    tok = tmp_path / "elsewhere" / "tok.json"
    tok.parent.mkdir()
    tok.write_bytes(reference.tokenizer.read_bytes())
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client, get_task_stream(client) as stream:
        out = tokenize(TokenizeParams(source=str(sample_source_module), home=str(h.root), vocab_size=1024,
                                      dask_address=cluster.scheduler_address, tokenizer=str(tok) if given else None))
        workers = set(cluster.workers[k].worker_address for k in cluster.workers)
    assert out["built"] == 2 and not out["failed"], out
    assert outputs(h) == outputs(reference)
    for q in (SHARD_ROWS, DOC_ROWS):
        assert catalog.query_rows(h, q) == catalog.query_rows(reference, q)
    # the scans and shards ran in the cluster's worker processes, not in this one; with the tokenizer known
    # up front each file is read once (scan + encode) and its shard finished by a rename in the flow
    ran_on = {t["worker"] for t in stream.data}
    assert len(stream.data) >= (2 if given else 4) and ran_on <= workers, (stream.data, workers)


def test_cli_dask_local_matches_default(reference, sample_source_module, tmp_path, prefect_api):
    """`langpwt tokenize --dask-local 2`: the flag users type, in a fresh process."""
    h = tmp_path / "home"
    p = run_cli("--home", str(h), "tokenize", "--source", str(sample_source_module), "--vocab-size", "1024",
                "--dask-local", "2", env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 0, p.stdout + p.stderr
    assert outputs(Home.from_env(h)) == outputs(reference)
    assert catalog.query_rows(Home.from_env(h), SHARD_ROWS) == catalog.query_rows(reference, SHARD_ROWS)


def test_bad_dask_flags_fail_with_one_line(tmp_path):
    p = run_cli("--home", str(tmp_path / "h"), "tokenize", "--source", "data/sample", "--dask-address", "10.0.0.5")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert "dask" in p.stderr and "tcp://" in p.stderr
    assert not (tmp_path / "h").exists()
