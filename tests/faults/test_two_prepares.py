"""Two `prepare` runs at once on one home, 5 times: one refuses with a clear message, no work or row doubled."""
import os
import subprocess
import sys

import pytest

from storage import catalog
from storage.paths import Home
from tests.conftest import ROOT
from tests.faults import ledger
from tests.faults.corpus import decoded_docs, expected_docs, make_corpus


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    rows = make_corpus(d / "src", n_files=2, copies=1)
    return d / "src", rows


def test_two_prepares_at_once(prefect_api, src, tmp_path):
    src_dir, rows = src
    r = ledger.rng("two-prepares")
    expected = expected_docs(rows)
    for it in range(5):
        home = tmp_path / f"h{it}"
        env = dict(os.environ, PREFECT_API_URL=prefect_api, LANGPWT_HOME=str(home))
        cmd = [sys.executable, "-m", "flows.cli", "prepare", "--source", str(src_dir), "--vocab-size", "1024"]
        a = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        import time
        time.sleep(r.uniform(0.0, 1.5))
        b = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        (ao, ae), (bo, be) = a.communicate(timeout=600), b.communicate(timeout=600)
        codes = sorted([a.returncode, b.returncode])
        refused = [e for c, e in ((a.returncode, ae), (b.returncode, be)) if c != 0]
        h = Home.from_env(home)
        rows_ = catalog.query_rows(h, "SELECT count(*), count(DISTINCT (shard_id, split)) FROM shards")[0]
        docs = catalog.query_rows(h, "SELECT count(*) FROM documents")[0][0]
        ok = codes[0] == 0 and rows_[0] == rows_[1] == 4 and docs == len(rows) and decoded_docs(h) == expected
        # the loser either refused clearly, or ran after the winner released the lock and found nothing to do
        ok &= all("already running" in e for e in refused) and (codes[1] != 0 or "2 up to date" in ao + bo)
        ledger.record("two prepare runs at once on one home", ok,
                      note="second refused" if codes[1] else "second ran after the first: 0 shards rebuilt")
        assert ok, (codes, ae[-400:], be[-400:])
