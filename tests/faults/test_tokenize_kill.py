"""SIGKILL during tokenize, 20 times at random points: reruns give the clean run's bytes, no token lost."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from flows.tokenize import TokenizeParams, tokenize
from storage import catalog, shard_catalog, sources
from storage.paths import Home
from tasks.plan import plan_one
from tasks.scan import scan_file
from tasks.tokenize import tokenize_file
from tasks.tokenizer import Encoder
from tests.conftest import ROOT, run_cli
from tests.faults import ledger
from tests.faults.corpus import (decoded_docs, expected_docs, final_files_complete, make_corpus, shard_bytes,
                                 token_counter)

WORKER = """
import pickle, sys
from storage import shard_catalog
from tasks.tokenize import tokenize_file
from tasks.tokenizer import Encoder
home, job = pickle.load(open(sys.argv[1], "rb"))
res = tokenize_file(home, job, Encoder(job.tokenizer_path))
shard_catalog.record_shard(home, job.source.shard_id, res.timing)
"""


@pytest.fixture(scope="module")
def clean(prefect_api, tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    rows = make_corpus(d / "src", n_files=3, copies=1)
    home = Home.from_env(d / "clean")
    tokenize(TokenizeParams(source=str(d / "src"), home=str(home.root), vocab_size=2048))
    return d, rows, home


def _jobs(home: Home, src_dir, tok):
    files = sources.list_local(src_dir)
    fcfg = TokenizeParams().filter_config()
    for f in files:
        scan_file(home, f, fcfg)
    from storage.shards import file_sha256
    sha = file_sha256(tok)
    states = shard_catalog.shard_states(home)
    return [plan_one(home, f, files[:i], fcfg, str(tok), sha, states)[1] for i, f in enumerate(files)]


def _wait(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.002)
    return False


def test_worker_killed_mid_shard_15_times(clean, tmp_path):
    d, rows, ref = clean
    r = ledger.rng("tokenize-kill-worker")
    want, expected = shard_bytes(ref), expected_docs(rows)
    ntok = token_counter(ref)
    import pickle
    for it in range(15):
        home = Home.from_env(tmp_path / f"v{it}").ensure()
        shutil.copy(ref.tokenizer, home.tokenizer)
        jobs = _jobs(home, d / "src", home.tokenizer)
        victim = r.randrange(len(jobs))
        done_before = r.randrange(victim + 1)  # some shards already done, as in a real run
        for job in jobs[:done_before]:
            res = tokenize_file(home, job, Encoder(job.tokenizer_path))
            shard_catalog.record_shard(home, job.source.shard_id, res.timing)
        pk = tmp_path / f"job{it}.pkl"
        pk.write_bytes(pickle.dumps((home, jobs[victim])))
        p = subprocess.Popen([sys.executable, "-c", WORKER, str(pk)], cwd=ROOT, env=os.environ.copy())
        # a random moment while its shard is being written (the temp file exists)
        _wait(lambda: any(home.shards.glob(".*.tmp")) or p.poll() is not None)
        time.sleep(r.uniform(0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        ok = final_files_complete(home)
        done = {s for s, st in shard_catalog.shard_states(home).items() if st["status"] == "done"}
        ok &= all(home.shard(s, "train").exists() and home.shard_meta(s).exists() for s in done)
        for job in jobs:  # the rerun: whatever is not done is redone
            if job.source.shard_id not in done:
                res = tokenize_file(home, job, Encoder(job.tokenizer_path))
                shard_catalog.record_shard(home, job.source.shard_id, res.timing)
        got = {k: v for k, v in shard_bytes(home).items() if k.endswith((".bin", ".idx"))}
        lost, dup = ledger.token_diff(expected, decoded_docs(home), ntok)
        ok &= got == {k: v for k, v in want.items() if k.endswith((".bin", ".idx"))} and lost == dup == 0
        dups = catalog.query_rows(home, "SELECT count(*) - count(DISTINCT (shard_id, split)) FROM shards")[0][0]
        ok &= dups == 0
        ledger.record("SIGKILL during tokenize (shard writer)", ok, lost, dup)
        assert ok, f"iteration {it} (seed {ledger.SEED})"


def test_cli_run_killed_5_times(clean, prefect_api, tmp_path):
    d, rows, ref = clean
    r = ledger.rng("tokenize-kill-cli")
    env = dict(os.environ, PREFECT_API_URL=prefect_api)
    want, expected = shard_bytes(ref), expected_docs(rows)
    ntok = token_counter(ref)
    t0 = time.monotonic()
    run_cli("--home", str(tmp_path / "timing"), "tokenize", "--source", str(d / "src"), "--tokenizer",
            str(ref.tokenizer), env={"PREFECT_API_URL": prefect_api}, check=True)
    duration = time.monotonic() - t0
    for it in range(5):
        home = tmp_path / f"cli{it}"
        cmd = [sys.executable, "-m", "flows.cli", "--home", str(home), "tokenize", "--source", str(d / "src"),
               "--tokenizer", str(ref.tokenizer), "--workers", "1"]
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(r.uniform(0.3, 1.0) * duration)
        p.send_signal(signal.SIGKILL)
        p.wait()
        h = Home.from_env(home)
        ok = final_files_complete(h) if h.shards.exists() else True
        rerun = run_cli("--home", str(home), "tokenize", "--source", str(d / "src"), "--tokenizer",
                        str(ref.tokenizer), env={"PREFECT_API_URL": prefect_api})
        lost, dup = ledger.token_diff(expected, decoded_docs(h), ntok)
        got = {k: v for k, v in shard_bytes(h).items()}
        ok &= rerun.returncode == 0 and got == want and lost == dup == 0
        ledger.record("SIGKILL during tokenize (whole CLI run)", ok, lost, dup)
        assert ok, f"iteration {it}: {rerun.stderr[-500:]}"
