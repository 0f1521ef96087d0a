"""`langpwt download` as users run it, in real processes against the fake Hub: the acceptance command,
a SIGKILL mid-file then a rerun that resumes, a persistent 500, offline mode; and the Prefect flow."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import catalog
from storage.hub import part_path
from storage.paths import Home
from tasks.download import DownloadParams
from tests.conftest import ROOT, run_cli
from tests.fakehub import Fault, FakeHub

BIG = "sample/10BT/004_00000.parquet"
TEN = [f"sample/10BT/{i:03d}_00000.parquet" for i in range(5)]


@pytest.fixture
def hub(tree, home, hf_isolated, monkeypatch):
    with FakeHub(tree) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def status(home: Home) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in catalog.query_rows(home, "SELECT file, status, error FROM source_files")}


def test_acceptance_command_fetches_and_verifies_two_files(home, hub, tree):
    p = run_cli("download", "--subset", "sample-10BT", "--max-files", "2", "--min-free", "0",
                env={"FORCE_COLOR": "1", "COLUMNS": "120", "HF_TOKEN": "hf_from_env"})  # a terminal: the bar shows
    assert p.returncode == 0, p.stderr
    assert "2 files verified" in p.stdout
    assert "download 2/2 files" in p.stderr and ("kB/s" in p.stderr or "MB/s" in p.stderr)
    assert {f: s for f, (s, _) in status(home).items()} == {TEN[0]: "verified", TEN[1]: "verified"}
    for f in TEN[:2]:
        assert (home.raw / f).read_bytes() == tree[f].read_bytes()
    hub_side = [h for h in hub.hits() if h.url.startswith(("/api/datasets/", "/datasets/"))]
    assert hub_side and all(h.auth for h in hub_side)  # HF_TOKEN reaches the Hub ...
    assert not any(h.auth for h in hub.hits(body=True))  # ... and never the storage host


def test_sigkill_mid_download_then_rerun_resumes_where_the_disk_stopped(home, hub, tree):
    size = tree[BIG].stat().st_size
    hub.faults[BIG] = Fault(rate=600_000)  # ~7 s for the file: room to kill it midway
    cmd = [sys.executable, "-m", "flows.cli", "download", "--include", BIG, "--min-free", "0", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    part = part_path(home.raw / BIG)
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size >= 1_000_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = part.stat().st_size
    assert 1_000_000 <= kept < size and not (home.raw / BIG).exists()
    assert status(home)[BIG][0] == "downloading"  # the row says what is true: not verified
    del hub.faults[BIG]
    while not hub.hits(BIG, body=True) and time.monotonic() < deadline:
        time.sleep(0.05)  # the server logs the cut-off request once its next write fails
    assert len(hub.hits(BIG, body=True)) == 1 and hub.bytes_served(BIG) >= kept

    p = run_cli("download", "--include", BIG, "--min-free", "0")
    assert p.returncode == 0, p.stderr
    resumed = hub.hits(BIG, body=True)[1:]
    assert [(h.range, h.bytes_sent) for h in resumed] == [(f"bytes={kept}-", size - kept)]
    assert hashlib.sha256((home.raw / BIG).read_bytes()).hexdigest() == hub.entries[BIG].sha256
    assert status(home)[BIG][0] == "verified" and not part.exists()


def test_persistent_500_exits_non_zero_with_one_line(home, hub):
    bad = TEN[1]
    hub.faults[bad] = Fault(always_status=500)
    p = run_cli("download", "--max-files", "2", "--retries", "2", "--min-free", "0")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("langpwt download: error: ") and bad in lines[0]
    assert "HTTP 500" in lines[0]
    assert not (home.raw / bad).exists() and not part_path(home.raw / bad).exists()
    st = status(home)
    assert st[bad][0] == "failed" and "HTTP 500" in st[bad][1] and st[TEN[0]][0] == "verified"


def test_bad_arguments_name_the_flag(home, hub):
    p = run_cli("download", "--subset", "sample-7BT")
    assert p.returncode == 2 and "--subset sample-7BT" in p.stderr
    p = run_cli("download", "--include", "sample/10BT/9*", "--min-free", "0")
    assert p.returncode == 1 and "--include sample/10BT/9*: matches none" in p.stderr
    assert not home.catalog.exists()


def test_offline_mode_serves_what_was_verified_and_refuses_the_rest(home, hub, tmp_path):
    assert run_cli("download", "--max-files", "2", "--min-free", "0").returncode == 0
    served = len(hub.hits())
    off = {"HF_HUB_OFFLINE": "1"}
    p = run_cli("download", "--max-files", "2", env=off)
    assert p.returncode == 0 and "2 files verified" in p.stdout and len(hub.hits()) == served
    p = run_cli("download", "--subset", "CC-MAIN-2024-10", env=off)
    assert p.returncode == 1 and "offline mode" in p.stderr


def test_flow_downloads_then_reruns_as_a_no_op(prefect_api, home, hub, tree):
    from flows.download import run_download_flow

    prm = DownloadParams(max_files=3, workers=2, min_free_bytes=0, progress=False, backoff_s=0.02)
    paths = run_download_flow(prm, str(home.root))
    assert paths == [str(home.raw / f) for f in TEN[:3]]
    assert all(Path(p).read_bytes() == tree[f].read_bytes() for p, f in zip(paths, TEN))
    served = len(hub.hits(body=True))
    assert run_download_flow(prm, str(home.root)) == paths and len(hub.hits(body=True)) == served
    hub.faults[TEN[3]] = Fault(corrupt=True)
    with pytest.raises(Exception, match=f"{TEN[3]}: sha256"):
        run_download_flow(prm.model_copy(update={"max_files": 4}), str(home.root))
    assert status(home)[TEN[3]][0] == "failed"
    p = run_cli("download", "--flow", "--max-files", "5", "--min-free", "0", env={"PREFECT_API_URL": prefect_api})
    assert p.returncode == 1 and f"{TEN[3]}: sha256" in p.stderr.strip().splitlines()[-1]
    assert status(home)[TEN[4]][0] == "verified" and status(home)[TEN[3]][0] == "failed"
