"""Readers during writes, 5 times: `langpwt sql` and the dashboard's queries poll the catalog while a
tokenize run writes it. The readers retry or wait; the writer never fails."""
import json
import os
import subprocess
import sys

import pytest

from storage import catalog
from storage.paths import Home
from tests.conftest import ROOT
from tests.faults import ledger
from tests.faults.corpus import make_corpus

DASHBOARD_READER = """
import json, sys, time
from dashboards import queries
from storage.paths import Home
h, ok, fail = Home.from_env(), 0, 0
while open(sys.argv[1]).read() != "stop":
    try:
        queries.pipeline(h); queries.token_stats(h); ok += 1
    except Exception as e:
        if type(e).__name__ == "CatalogMissing":
            time.sleep(0.05); continue
        fail += 1; print(repr(e), file=sys.stderr)
print(json.dumps(dict(ok=ok, fail=fail)))
"""


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("readers")
    make_corpus(d / "src", n_files=2, copies=1)
    return d / "src"


def test_readers_during_writes(prefect_api, src, tmp_path):
    for it in range(5):
        home = Home.from_env(tmp_path / f"h{it}")
        env = dict(os.environ, PREFECT_API_URL=prefect_api, LANGPWT_HOME=str(home.root))
        flag = tmp_path / f"flag{it}"
        flag.write_text("go")
        writer = subprocess.Popen([sys.executable, "-m", "flows.cli", "tokenize", "--source", str(src),
                                   "--vocab-size", "1024"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        dash = subprocess.Popen([sys.executable, "-c", DASHBOARD_READER, str(flag)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sql_ok = sql_fail = 0
        while writer.poll() is None:  # `langpwt sql`, as a user would type it, again and again
            p = subprocess.run([sys.executable, "-m", "flows.cli", "sql", "SELECT count(*) FROM documents",
                                "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True)
            if p.returncode == 0 and isinstance(json.loads(p.stdout), list):  # `--format json`: one array
                sql_ok += 1
            elif "no catalog yet" not in p.stderr:
                sql_fail += 1
        _, werr = writer.communicate()
        flag.write_text("stop")
        dout, derr = dash.communicate(timeout=120)
        stats = json.loads(dout.strip().splitlines()[-1])
        done = catalog.query_rows(home, "SELECT count(*) FROM shards WHERE status = 'done'")[0][0]
        ok = writer.returncode == 0 and done == 4 and stats["fail"] == 0 and sql_fail == 0
        ledger.record("readers (sql, dashboard) during writes", ok,
                      note=f"dashboard polls {stats['ok']}, sql runs {sql_ok}, writer rc {writer.returncode}")
        assert ok, (werr[-500:], derr[-500:])
