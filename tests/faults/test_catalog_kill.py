"""SIGKILL while the catalog is written, 10 times: it opens (or is rebuilt) and holds each shard fully or not at all."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from flows.tokenize import TokenizeParams, tokenize
from storage import catalog, shard_catalog
from storage.paths import Home
from tests.conftest import ROOT
from tests.faults import ledger
from tests.faults.corpus import make_corpus

RECORDER = "from storage import shard_catalog; from storage.paths import Home; shard_catalog.rebuild(Home.from_env())"


@pytest.fixture(scope="module")
def built(prefect_api, tmp_path_factory):
    d = tmp_path_factory.mktemp("catkill")
    make_corpus(d / "src", n_files=4, copies=1)
    home = Home.from_env(d / "clean")
    tokenize(TokenizeParams(source=str(d / "src"), home=str(home.root), vocab_size=1024))
    return home


def _consistent(home: Home) -> tuple[bool, int]:
    """(each shard fully or not at all and no duplicate rows, shards present)."""
    q = lambda sql: catalog.query_rows(home, sql)  # noqa: E731
    shard_rows = q("SELECT shard_id, split, n_docs, n_tokens, status FROM shards")
    if len({(r[0], r[1]) for r in shard_rows}) != len(shard_rows):
        return False, 0
    present = {r[0] for r in shard_rows}
    for sid in present:
        meta = json.loads(home.shard_meta(sid).read_text())
        docs = q(f"SELECT count(*) FROM documents WHERE shard_id = {sid}")[0][0]
        toks = q(f"SELECT coalesce(sum(count), 0) FROM token_counts WHERE shard_id = {sid}")[0][0]
        want_tokens = sum(r["n_tokens"] for r in meta["rows"])
        if docs != meta["rows_in"] or toks != want_tokens or {r[4] for r in shard_rows if r[0] == sid} != {"done"}:
            return False, len(present)
    orphans = q("SELECT count(*) FROM documents WHERE shard_id NOT IN (SELECT shard_id FROM shards)")[0][0]
    return orphans == 0, len(present)


def test_kill_while_catalog_is_written_10_times(built, tmp_path):
    r = ledger.rng("catalog-kill")
    for it in range(10):
        home = Home.from_env(tmp_path / f"h{it}")
        shutil.copytree(built.shards, home.shards)
        shutil.copytree(built.tokenizer_dir, home.tokenizer_dir)
        env = dict(os.environ, LANGPWT_HOME=str(home.root))
        p = subprocess.Popen([sys.executable, "-c", RECORDER], cwd=ROOT, env=env)
        wal = home.root / "catalog.duckdb.wal"
        # wait for a write in flight (the WAL exists), then a random moment within it
        end = time.monotonic() + 60
        while not wal.exists() and p.poll() is None and time.monotonic() < end:
            time.sleep(0.001)
        time.sleep(r.uniform(0, 0.05))
        p.send_signal(signal.SIGKILL)
        p.wait()
        rebuilt = False
        try:
            ok, present = _consistent(home) if home.catalog.exists() else (True, 0)
        except catalog.CatalogMissing:
            # killed inside the first transaction, which also creates the schema: a file without tables,
            # which every reader takes for no catalog yet (as intended), and the rerun below fills
            ok, present = True, 0
        except duckdb.Error:
            shard_catalog.rebuild(home)
            rebuilt, (ok, present) = True, _consistent(home)
        shard_catalog.rebuild(home)  # the rerun completes it
        ok2, after = _consistent(home)
        ok = ok and ok2 and after == 4
        ledger.record("SIGKILL while the catalog is written", ok,
                      note=f"kill {it}: {present} shards present{' (rebuilt)' if rebuilt else ''}")
        assert ok, f"iteration {it} (seed {ledger.SEED})"
