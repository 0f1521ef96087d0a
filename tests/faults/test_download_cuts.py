"""Downloads cut mid-file, 10 times (5 dropped connections, 5 killed processes): nothing under the final
name until verified, the rerun completes from the bytes on disk, and the sha256 matches."""
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from storage import catalog
from storage.hub import part_path
from storage.paths import Home
from tasks.download import DownloadParams, download
from tests.conftest import ROOT, run_cli
from tests.faults import ledger
from tests.fakehub import FakeHub, Fault

BIG = "sample/10BT/004_00000.parquet"


@pytest.fixture
def hub(tree, hf_isolated, monkeypatch):
    with FakeHub(tree) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        yield h


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_connection_dropped_mid_file_5_times(hub, tree, tmp_path):
    r = ledger.rng("download-drop")
    size = tree[BIG].stat().st_size
    for it in range(5):
        home = Home.from_env(tmp_path / f"d{it}")
        cut = r.randrange(1, size - 1)
        hub.faults[BIG] = Fault(drop_after=cut, drops=r.randint(1, 3))
        got = download(home, DownloadParams(endpoint=hub.endpoint, include=BIG, backoff_s=0.01, retries=5,
                                            progress=False, min_free_bytes=0))
        final = home.raw / BIG
        ok = _sha(final) == hub.entries[BIG].sha256 == got[0].sha256 and not part_path(final).exists()
        ledger.record("download cut: connection dropped", ok, note=f"cut at byte {cut} of {size}")
        assert ok


def test_download_process_killed_mid_file_5_times(hub, tree, tmp_path):
    r = ledger.rng("download-kill")
    size = tree[BIG].stat().st_size
    for it in range(5):
        home = Home.from_env(tmp_path / f"k{it}")
        env = dict(os.environ, LANGPWT_HOME=str(home.root))
        hub.faults[BIG] = Fault(rate=2_000_000)  # ~2 s for the file: room to kill it anywhere
        at = r.randrange(64 << 10, size - (64 << 10))
        p = subprocess.Popen([sys.executable, "-m", "flows.cli", "download", "--include", BIG, "--min-free", "0",
                              "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        part, final = part_path(home.raw / BIG), home.raw / BIG
        end = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= at) and p.poll() is None and time.monotonic() < end:
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        ok = not final.exists()  # never under its final name before verification
        del hub.faults[BIG]
        rerun = run_cli("download", "--include", BIG, "--min-free", "0", env={"LANGPWT_HOME": str(home.root)})
        st = catalog.query_rows(home, "SELECT status FROM source_files WHERE file = ?", [BIG])
        ok &= rerun.returncode == 0 and _sha(final) == hub.entries[BIG].sha256 and st == [("verified",)]
        ledger.record("download cut: process killed", ok, note=f"killed past byte {at} of {size}")
        assert ok, rerun.stderr
